"""Does the GGUF compute what the original computes? Numbers per file, as a table and JSON.

- Against the Hugging Face model in transformers (float32, needs torch): NMSE of the last-token
  logits over a few Spanish and English prompts (the same token ids fed to both), how often the
  top-1 token agrees, and whether a short greedy continuation is identical.
- Against a reference GGUF (the unquantized conversion): mean KL divergence KL(ref ‖ file) of the
  next-token distributions over every position of a text sample, and top-1 agreement.

llama.cpp runs with an f32 KV cache here, so the numbers measure the weights, not the cache.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import gguf
import numpy as np

from ai_engine_common.machine import physical_cores
from convert.errors import ConvertError, VerifyError
from convert.gguf_info import read_info
from convert.metadata import SourceInfo

log = logging.getLogger(__name__)

PROMPTS = [
    "CASO CLÍNICO:\nNombre: Lucía\nEdad: 34\n\nENTREVISTA:\nEstudiante: Hola, ¿qué te trae por acá?\nPaciente:",
    "Me siento muy cansada desde hace meses y no puedo dormir bien por las noches.",
    "The patient reports trouble sleeping and a loss of interest in daily activities.",
    "Once upon a time, in a small village by the sea,",
]
KL_TEXT = (
    "La entrevista clínica es una conversación con un propósito: comprender qué le pasa a la persona "
    "que consulta. El estudiante pregunta por el motivo de consulta, la historia del problema y el "
    "estado emocional actual, y escucha con atención. Paciente: Hace meses que no duermo bien, me "
    "despierto a las cuatro de la mañana y ya no me puedo volver a dormir.\n\n"
    "A clinical interview is a conversation with a purpose. The student asks open questions, "
    "summarises what they heard, and checks whether the summary is right before moving on."
)
UNQUANTIZED = {gguf.LlamaFileType.ALL_F32, gguf.LlamaFileType.MOSTLY_F16, gguf.LlamaFileType.MOSTLY_BF16}
F32_CACHE = 0  # ggml type id of f32, for llama.cpp's KV cache


@dataclass
class Row:
    """One GGUF file's numbers (None where that comparison did not run)."""

    file: str
    type: str
    size_mb: float
    bits_per_weight: float
    nmse_mean: float | None = None
    nmse_max: float | None = None
    top1_hf: float | None = None
    greedy_same: float | None = None
    kl_mean: float | None = None
    kl_max: float | None = None
    top1_ref: float | None = None
    is_reference: bool = False


@dataclass
class Report:
    rows: list[Row]
    hf_source: str | None
    reference: str | None
    prompts: list[str] = field(default_factory=list)
    kl_tokens: int = 0
    greedy_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "rows": [dataclasses.asdict(r) for r in self.rows]}


def nmse(test: np.ndarray, ref: np.ndarray) -> float:
    """Normalised mean squared error: ‖test − ref‖² / ‖ref‖²."""
    ref64, test64 = ref.astype(np.float64), test.astype(np.float64)
    return float(((test64 - ref64) ** 2).sum() / (ref64 ** 2).sum())


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32, computed 32 rows at a time (262k-token vocabularies)."""
    rows = np.atleast_2d(logits)
    out = np.empty(rows.shape, dtype=np.float32)
    for i in range(0, rows.shape[0], 32):
        x = rows[i:i + 32].astype(np.float64)
        x -= x.max(axis=-1, keepdims=True)
        x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
        out[i:i + 32] = x
    return out.reshape(logits.shape)


def kl_divergence(ref_logprobs: np.ndarray, test_logits: np.ndarray) -> np.ndarray:
    """KL(ref ‖ test) per row, from the reference's log-probabilities and the test's logits."""
    test_lp = log_softmax(test_logits)
    out = np.empty(ref_logprobs.shape[0])
    for i in range(0, ref_logprobs.shape[0], 32):
        ref = ref_logprobs[i:i + 32].astype(np.float64)
        out[i:i + 32] = (np.exp(ref) * (ref - test_lp[i:i + 32])).sum(axis=-1)
    return out


def file_info(path: Path) -> tuple[str, int, int]:
    """(type name, file type id, parameter count) from a GGUF header."""
    try:
        info = read_info(path)
    except ConvertError as exc:
        raise VerifyError(exc.message) from None
    ftype = int(info.metadata.get(gguf.Keys.General.FILE_TYPE, -1))
    try:
        name = gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        name = f"type {ftype}"
    return name, ftype, info.n_params


class _Gguf:
    """A GGUF file loaded in llama.cpp for scoring: every position's logits, f32 KV cache."""

    def __init__(self, path: Path, n_ctx: int, threads: int | None = None) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        threads = threads or physical_cores()
        try:
            self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                                       type_k=F32_CACHE, type_v=F32_CACHE, n_threads=threads,
                                       n_threads_batch=threads, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise VerifyError(f"llama.cpp cannot load {path}: {exc}") from None
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], n: int, last: np.ndarray) -> list[int]:
        """Up to `n` argmax tokens after `ids` (already evaluated; `last` is its final logits row)."""
        out: list[int] = []
        for _ in range(n):
            token = int(np.argmax(last))
            if self._llama_cpp.llama_vocab_is_eog(self._vocab, token):
                break
            out.append(token)
            self.llm.eval([token])
            last = np.asarray(self.llm.scores[self.llm.n_tokens - 1])
        return out

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=True, special=False)

    def close(self) -> None:
        self.llm.close()


@dataclass
class _HfResults:
    prompt_ids: list[list[int]]
    last_logits: list[np.ndarray]
    greedy: list[list[int]]


def check_available() -> None:
    """Raise now, before a long conversion, if comparing with transformers cannot work."""
    import importlib.util

    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise VerifyError(f"--verify compares with the original in transformers and needs "
                          f"{' and '.join(missing)}: pip install 'ai-engine[verify]'")


def hf_reference(folder: Path, prompts: list[str], greedy_tokens: int) -> _HfResults:
    """Token ids, last-token logits and greedy continuations from transformers (float32)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise VerifyError("comparing with the original needs torch and transformers: "
                          "pip install 'ai-engine[verify]'") from None
    try:
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise VerifyError(f"transformers cannot load {folder}: {str(exc).splitlines()[0]}") from None
    model.eval()
    ids_all, logits_all, greedy_all = [], [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt)["input_ids"]
            ids_all.append(ids)
            logits_all.append(model(torch.tensor([ids])).logits[0, -1].float().numpy().copy())
            if greedy_tokens:
                out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=greedy_tokens, do_sample=False, pad_token_id=tok.pad_token_id
                                     if tok.pad_token_id is not None else tok.eos_token_id)
                new = out[0, len(ids):].tolist()
                eos = set(_as_list(model.generation_config.eos_token_id)) | {tok.eos_token_id}
                greedy_all.append(_until(new, eos))
    del model
    gc.collect()
    return _HfResults(ids_all, logits_all, greedy_all)


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [int(value)]


def _until(tokens: list[int], stop: set[int]) -> list[int]:
    out = []
    for t in tokens:
        if t in stop:
            break
        out.append(t)
    return out


def verify_files(files: list[Path], *, hf_source: SourceInfo | None = None,
                 reference: Path | None = None, json_path: Path | None = None,
                 prompts: list[str] | None = None, kl_text: str = KL_TEXT,
                 greedy_tokens: int = 16, threads: int | None = None) -> Report:
    """Measure every file; write FILE.verify.json beside each (and the table to `json_path`)."""
    prompts = prompts or PROMPTS
    infos = {f: file_info(f) for f in files}
    if reference is None:
        reference = next((f for f in files if infos[f][1] in UNQUANTIZED), None)
    elif reference not in infos:
        infos[reference] = file_info(reference)
    hf = hf_reference(hf_source.folder, prompts, greedy_tokens) if hf_source else None
    needs_kl = reference is not None and any(f.resolve() != reference.resolve() for f in files)
    ref_data = _reference_logprobs(reference, kl_text, threads) if needs_kl else None
    rows = [_measure(f, infos[f], hf, reference, ref_data, greedy_tokens, threads) for f in files]
    report = Report(rows, hf_source.label if hf_source else None, str(reference) if reference else None,
                    prompts, kl_tokens=len(ref_data[0]) if ref_data else 0,
                    greedy_tokens=greedy_tokens if hf else 0)
    for f, row in zip(files, rows):
        out = f.with_name(f.name + ".verify.json")
        out.write_text(json.dumps({**report.as_dict(), "rows": [dataclasses.asdict(row)]}, indent=2) + "\n",
                       encoding="utf-8")
    if json_path is not None:
        json_path.write_text(json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8")
    return report


def _reference_logprobs(reference: Path, kl_text: str, threads: int | None) -> tuple[list[int], np.ndarray]:
    """The reference GGUF's token ids for the KL text and its log-probabilities at every position."""
    probe = _Gguf(reference, 16, threads)
    ids = probe.tokenize(kl_text)
    probe.close()
    model = _Gguf(reference, len(ids) + 8, threads)
    try:
        return ids, log_softmax(model.logits(ids))
    finally:
        model.close()


def _measure(path: Path, info: tuple[str, int, int], hf: _HfResults | None, reference: Path | None,
             ref_data: tuple[list[int], np.ndarray] | None, greedy_tokens: int,
             threads: int | None) -> Row:
    type_name, _, n_params = info
    size = path.stat().st_size
    row = Row(path.name, type_name, round(size / 1e6, 1), round(size * 8 / max(n_params, 1), 2),
              is_reference=reference is not None and path.resolve() == reference.resolve())
    kl_ids, ref_lp = ref_data if ref_data is not None and not row.is_reference else ([], None)
    n_ctx = max([len(kl_ids)] + [len(i) + greedy_tokens for i in (hf.prompt_ids if hf else [])] + [16]) + 8
    model = _Gguf(path, n_ctx, threads)
    try:
        if hf is not None:
            errors, same, greedy = [], [], []
            wanted = hf.greedy or [None] * len(hf.prompt_ids)
            for ids, ref, want in zip(hf.prompt_ids, hf.last_logits, wanted):
                last = model.logits(ids)[-1]
                errors.append(nmse(last, ref))
                same.append(int(np.argmax(last) == np.argmax(ref)))
                if greedy_tokens and want is not None:
                    greedy.append(model.greedy(ids, greedy_tokens, last) == want)
            row.nmse_mean, row.nmse_max = float(np.mean(errors)), float(np.max(errors))
            row.top1_hf = float(np.mean(same))
            row.greedy_same = float(np.mean(greedy)) if greedy else None
        if ref_lp is not None:
            logits = model.logits(kl_ids)
            kl = kl_divergence(ref_lp, logits)
            row.kl_mean, row.kl_max = float(kl.mean()), float(kl.max())
            row.top1_ref = float(np.mean(np.argmax(logits, -1) == np.argmax(ref_lp, -1)))
    finally:
        model.close()
    log.info("verified %s: %s", path.name, row)
    return row


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def print_table(report: Report, out: TextIO) -> None:
    """The report as a Markdown table."""
    print(f"\nverification: HF model {report.hf_source or '(not compared)'}; "
          f"KL reference {Path(report.reference).name if report.reference else '(none)'}", file=out)
    print("| file | type | size (MB) | bits/weight | logit NMSE vs HF (mean / max) | top-1 = HF "
          "| greedy = HF | KL vs ref (mean / max) | top-1 = ref |", file=out)
    print("|---|---|---|---|---|---|---|---|---|", file=out)
    for r in report.rows:
        nmse_ = "—" if r.nmse_mean is None else f"{r.nmse_mean:.2e} / {r.nmse_max:.2e}"
        kl = "reference" if r.is_reference else ("—" if r.kl_mean is None else f"{r.kl_mean:.5f} / {r.kl_max:.4f}")
        print(f"| {r.file} | {r.type} | {r.size_mb:.1f} | {r.bits_per_weight:.2f} | {nmse_} | "
              f"{_fmt(r.top1_hf, '.0%')} | {_fmt(r.greedy_same, '.0%')} | {kl} | {_fmt(r.top1_ref, '.1%')} |",
              file=out)
