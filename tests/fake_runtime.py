"""A runtime without a model: LlamaRuntime's interface (engine/runtime.py) in numpy, for tests
that need a scheduler that answers in milliseconds (the model manager's HTTP tests, the
scheduler's own).

- Tokens: one per UTF-8 byte (id = byte + BYTE_OFFSET), after the specials PAD, BOS and EOS;
  `tokenize` adds BOS and reads "<bos>"/"<eos>" in the text as the special tokens.
- The "model" says `reply` and then EOS: the logits of a sequence's last token are one-hot (0
  against -1e4) on the next byte of the reply, counted from where the sequence's prompt ended.
  A logits row right after the previous one of the same sequence, holding the token the reply
  expected, continues the reply; any other (the end of a prompt) starts it again. So the reply
  comes out through the scheduler's normal sampling, greedy or with a temperature.
- KV memory: each sequence is its list of tokens, checked as llama.cpp checks it (positions in
  order, at most n_ctx of them). With `n_swa`, a saved state longer than the window holds only the
  window's last positions (seq_pos_min after restoring it), and decoding a position whose window
  reaches before what the sequence holds fails, as an inexact continuation would be in llama.cpp.
- `decode(start, end)` decodes those rows of the batch, as LlamaRuntime does; `decoded` lists each
  decode's rows, so tests can see how a step was cut into parts.
- `closed`, `decode_calls`, `tokenize_calls`, `live_samplers`; every method but close() raises
  RuntimeClosed after close(), so a model used after it was switched out shows up in tests.
- `inject(method, *errors)`: the next calls of `decode` or `seq_rm` raise those errors, one each,
  changing nothing (a failed llama_decode, a runtime that breaks), for the scheduler's failure paths.
"""

from __future__ import annotations

import re
import struct
import time
from pathlib import Path

import numpy as np

from engine.errors import EngineError
from engine.generation import SamplingParams
from engine.runtime import RuntimeClosed, plain_greedy

PAD, BOS, EOS = 0, 1, 2
BYTE_OFFSET = 3
N_VOCAB = 300
SPECIAL_TEXT = {"<bos>": BOS, "<eos>": EOS}
_SPECIAL_RE = re.compile("(" + "|".join(map(re.escape, SPECIAL_TEXT)) + ")")
OTHER_LOGIT = -1e4  # every token but the reply's next one: never drawn, at any temperature
_STATE_MAGIC = b"FAKEKV1\0"


def byte_tokens(text: str) -> list[int]:
    """The fake tokenizer's tokens for `text` (no BOS, no specials)."""
    return [b + BYTE_OFFSET for b in text.encode("utf-8")]


class _Sampler:
    """A sampler chain's stand-in: greedy at temperature 0, else top-k and a seeded draw."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def pick(self, row: np.ndarray) -> int:
        p = self.params
        if p.temperature <= 0:
            return int(row.argmax())
        row = row.astype(np.float64)
        if p.top_k > 0:
            row[np.argsort(-row, kind="stable")[p.top_k:]] = -np.inf
        weights = np.exp((row - row.max()) / p.temperature)
        return int(self.rng.choice(len(row), p=weights / weights.sum()))


class FakeRuntime:
    """LlamaRuntime's interface, deterministic and fast; see the module docstring."""

    def __init__(self, path: Path | str = "fake.gguf", *, n_ctx: int = 2048, n_parallel: int = 4,
                 n_batch: int = 512, n_threads: int = 1, n_threads_batch: int = 1, n_gpu_layers: int = 0,
                 flash_attn: str | bool = "off", kv_type: int = 1, adapters=(), reply: str | None = None,
                 step_delay_s: float = 0.0, n_swa: int = 0, metadata: dict[str, str] | None = None) -> None:
        if min(n_batch, n_ctx) < n_parallel:  # as LlamaRuntime refuses it
            raise ValueError(f"n_batch ({min(n_batch, n_ctx)}) must be at least n_parallel ({n_parallel})")
        for adapter, _scale in adapters:
            if not Path(adapter).is_file():
                raise EngineError(f"llama.cpp could not load the LoRA adapter {Path(adapter).name}: not a LoRA "
                                  "GGUF, or made for another base model")
        self.path = Path(path)
        self.n_ctx = n_ctx
        self.n_parallel = n_parallel
        self.n_batch = min(n_batch, n_ctx)
        self.n_vocab = N_VOCAB
        self.n_swa = n_swa
        self.flash_attn = flash_attn not in ("off", False)
        self.adapters = list(adapters)
        self.reply = f"Me siento bien, soy {self.path.stem}." if reply is None else reply
        self._reply_tokens = byte_tokens(self.reply)
        self.step_delay_s = step_delay_s
        self.metadata = {"general.architecture": "fake", "general.name": self.path.stem,
                         "general.file_type": "15", "fake.context_length": str(n_ctx), **(metadata or {})}
        self.closed = False
        self.decode_calls = 0
        self.decoded: list[list[tuple[int, int, int, bool]]] = []  # each decode's rows (seq_id, token, pos, logits)
        self.tokenize_calls = 0
        self.live_samplers = 0
        self._kv: list[list[int]] = [[] for _ in range(n_parallel)]  # tokens at positions 0..n-1
        self.copies = 0  # seq_copy calls (prefix sharing between sequences)
        self._first: list[int] = [0] * n_parallel  # first position whose KV is held
        self._said: dict[int, tuple[int, int]] = {}  # seq_id -> (position of its last logits, reply bytes said)
        self._batch: list[tuple[int, int, int, bool]] = []
        self._rows: dict[int, int] = {}  # batch index -> row of _logits
        self._logits = np.zeros((0, N_VOCAB), dtype=np.float32)
        self._faults: dict[str, list[BaseException]] = {}

    def _live(self) -> None:
        if self.closed:
            raise RuntimeClosed(f"the model {self.path.name} was closed (switched out); retry the request")

    def inject(self, method: str, *errors: BaseException) -> None:
        """The next calls of `method` ("decode" or "seq_rm") raise `errors`, one per call."""
        if method not in ("decode", "seq_rm"):
            raise ValueError(f"faults can be injected into decode and seq_rm, not {method}")
        self._faults.setdefault(method, []).extend(errors)

    def _fault(self, method: str) -> None:
        errors = self._faults.get(method)
        if errors:
            raise errors.pop(0)

    # -- tokens -----------------------------------------------------------------------------
    def tokenize(self, text: str) -> np.ndarray:
        self._live()
        self.tokenize_calls += 1
        tokens = [BOS]
        for part in _SPECIAL_RE.split(text):
            tokens += [SPECIAL_TEXT[part]] if part in SPECIAL_TEXT else byte_tokens(part)
        return np.asarray(tokens, dtype=np.int32)

    def piece(self, token: int) -> bytes:
        self._live()
        return bytes([token - BYTE_OFFSET]) if BYTE_OFFSET <= token < BYTE_OFFSET + 256 else b""

    def special_token_text(self) -> tuple[str, str, bool]:
        self._live()
        return "<bos>", "<eos>", True

    def is_eog(self, token: int) -> bool:
        self._live()
        return token == EOS

    # -- the batch --------------------------------------------------------------------------
    def batch_clear(self) -> None:
        self._live()
        self._batch = []

    def batch_add(self, seq_id: int, token: int, pos: int, logits: bool) -> int:
        self._live()
        if len(self._batch) >= self.n_batch:
            raise EngineError(f"the decode batch is full ({self.n_batch} tokens, N_BATCH)")
        self._batch.append((int(seq_id), int(token), int(pos), bool(logits)))
        return len(self._batch) - 1

    def decode(self, start: int = 0, end: int | None = None) -> None:
        self._live()
        self.decode_calls += 1
        self._fault("decode")
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        end = len(self._batch) if end is None else end
        if not 0 <= start < end <= len(self._batch):
            raise EngineError(f"no rows {start}-{end} in a batch of {len(self._batch)}")
        part = self._batch[start:end]
        self.decoded.append(part)
        rc = self._check_batch(part)
        if rc != 0:
            raise EngineError(f"llama_decode failed with status {rc}")
        self._rows = {}
        rows = []
        for i, (seq_id, token, pos, logits) in enumerate(part, start):
            self._kv[seq_id].append(token)
            if logits:
                self._rows[i] = len(rows)
                rows.append(self._next_token(seq_id, token, pos))
        self._logits = np.full((len(rows), N_VOCAB), OTHER_LOGIT, dtype=np.float32)
        self._logits[np.arange(len(rows)), rows] = 0.0

    def _check_batch(self, rows: list[tuple[int, int, int, bool]]) -> int:
        """llama_decode's status for the rows: -1 for a bad token, sequence or position, 1 when a
        sequence has no cells left; nothing is changed unless it is 0."""
        if not rows:
            return -1
        n_held = [len(kv) for kv in self._kv]
        for seq_id, token, pos, _logits in rows:
            if not (0 <= token < N_VOCAB and 0 <= seq_id < self.n_parallel) or pos != n_held[seq_id]:
                return -1
            if pos >= self.n_ctx:
                return 1
            if self._first[seq_id] > max(0, pos - self.n_swa):  # its window reaches cells not held
                return -1
            n_held[seq_id] += 1
        return 0

    def _next_token(self, seq_id: int, token: int, pos: int) -> int:
        """The reply's next token after `token` at `pos`: see the module docstring."""
        last = self._said.get(seq_id)
        said = 0
        if last is not None and last[0] == pos - 1 and last[1] < len(self._reply_tokens) \
                and token == self._reply_tokens[last[1]]:
            said = last[1] + 1
        self._said[seq_id] = (pos, said)
        return self._reply_tokens[said] if said < len(self._reply_tokens) else EOS

    # -- sampling ---------------------------------------------------------------------------
    def logits(self, index: int) -> np.ndarray:
        self._live()
        if index not in self._rows:
            raise EngineError(f"no logits for batch index {index}")
        return self._logits[self._rows[index]]

    def new_sampler(self, params: SamplingParams, native: bool = False):
        self._live()
        if plain_greedy(params) and not native:
            return None
        self.live_samplers += 1
        return _Sampler(params)

    def sample(self, chain: _Sampler, index: int) -> int:
        self._live()
        return chain.pick(self.logits(index))

    def free_sampler(self, chain) -> None:
        self._live()
        if chain is not None:
            self.live_samplers -= 1

    def sample_banning(self, params: SamplingParams, index: int, banned: list[int]) -> int:
        self._live()
        row = self.logits(index).copy()
        row[banned] = -np.inf
        return _Sampler(params).pick(row)

    # -- KV memory of one sequence ------------------------------------------------------------
    def seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        """Drops a suffix [p0, end) or the whole sequence; a range inside it is refused (False),
        as by a cache that cannot make holes. Dropping into the held window empties it."""
        self._live()
        self._fault("seq_rm")
        kv = self._kv[seq_id]
        p0 = max(p0, 0)
        if 0 <= p1 < len(kv):
            return False
        if p0 <= self._first[seq_id]:
            p0, self._first[seq_id] = 0, 0
        del kv[p0:]
        self._said.pop(seq_id, None)
        return True

    def seq_clear(self, seq_id: int) -> None:
        self.seq_rm(seq_id, -1, -1)

    def seq_copy(self, src: int, dst: int) -> None:
        """Whole-sequence copy, as llama.cpp does between KV streams."""
        self._live()
        self._kv[dst] = list(self._kv[src])
        self._first[dst] = self._first[src]
        self._said.pop(dst, None)
        self.copies += 1

    def seq_pos_min(self, seq_id: int) -> int:
        self._live()
        return self._first[seq_id] if self._kv[seq_id] else -1

    def state_get(self, seq_id: int) -> bytes:
        self._live()
        kv = self._kv[seq_id]
        if not kv:
            return b""
        first = max(self._first[seq_id], len(kv) - self.n_swa if 0 < self.n_swa < len(kv) else 0)
        return _STATE_MAGIC + struct.pack("<II", first, len(kv)) + np.asarray(kv, dtype=np.int32).tobytes()

    def state_set(self, seq_id: int, data: bytes) -> bool:
        self._live()
        self.seq_clear(seq_id)
        head = len(_STATE_MAGIC) + 8
        if len(data) < head or not data.startswith(_STATE_MAGIC):
            return False
        first, n = struct.unpack("<II", data[len(_STATE_MAGIC):head])
        if len(data) != head + 4 * n or n > self.n_ctx or first >= max(n, 1):
            return False
        self._kv[seq_id] = np.frombuffer(data, dtype=np.int32, offset=head).tolist()
        self._first[seq_id] = first
        return True

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        self.closed = True
