"""The llama.cpp handles of one loaded model: model, context, decode batch, LoRA adapters.

`LlamaRuntime` owns them and nothing else: it tokenizes, fills and decodes a `llama_batch`,
samples a logits row, and reads, cuts, saves and restores the KV memory of one sequence. What to
decode, and when, is the scheduler's (engine/scheduler.py), which uses only the methods below;
tests/fake_runtime.py implements the same interface without a model. Every method raises
`RuntimeClosed` after `close()`, instead of touching freed memory.

The context holds N_PARALLEL sequences of N_CTX cells each (not unified: a request's limit does
not depend on the others), with a full-size sliding-window cache so that a sequence can drop a
suffix of its cache (prefix reuse).
"""

from __future__ import annotations

import ctypes
import math
import threading
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from engine.errors import EngineError
from engine.generation import SamplingParams
from engine.grammar import Candidates, GrammarSampler

PENALTY_LAST_N = 64  # recent generated tokens the repeat penalty looks at


class RuntimeClosed(EngineError):
    """A runtime was used after close(): a model that was switched out is still being used."""

    status = 503


class Runtime(Protocol):
    """What the scheduler uses of a runtime: LlamaRuntime, or tests/fake_runtime.FakeRuntime."""

    path: Path
    n_ctx: int  # per sequence
    n_parallel: int
    n_batch: int
    n_vocab: int
    n_swa: int  # sliding window (0: none)
    flash_attn: bool
    metadata: dict[str, str]

    def tokenize(self, text: str) -> np.ndarray: ...
    def piece(self, token: int) -> bytes: ...
    def special_token_text(self) -> tuple[str, str, bool]: ...
    def is_eog(self, token: int) -> bool: ...
    def batch_clear(self) -> None: ...
    def batch_add(self, seq_id: int, token: int, pos: int, logits: bool) -> int: ...
    def decode(self, start: int = 0, end: int | None = None) -> None: ...
    def logits(self, index: int) -> np.ndarray: ...
    def new_sampler(self, params: SamplingParams, native: bool = False): ...
    def sample(self, chain, index: int) -> int: ...
    def free_sampler(self, chain) -> None: ...
    def sample_banning(self, params: SamplingParams, index: int, banned: list[int]) -> int: ...
    def seq_rm(self, seq_id: int, p0: int, p1: int) -> bool: ...
    def seq_clear(self, seq_id: int) -> None: ...
    def seq_pos_min(self, seq_id: int) -> int: ...
    def seq_copy(self, src: int, dst: int) -> None: ...
    def state_get(self, seq_id: int) -> bytes: ...
    def state_set(self, seq_id: int, data: bytes) -> bool: ...
    def close(self) -> None: ...


class Turn:
    """A first-come, first-served lock: the scheduler's decode steps and embedding decodes take it
    in the order they asked (a plain Lock could let the scheduler thread take it back again and
    again before a waiting request wakes)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0  # next ticket to give
        self._serving = 0  # ticket whose turn it is
        self._gone: set[int] = set()  # tickets whose holder stopped waiting: skipped when they come

    def acquire(self, timeout: float | None = None) -> bool:
        with self._cond:
            ticket = self._next
            self._next += 1
            if not self._cond.wait_for(lambda: self._serving == ticket, timeout):
                if self._serving == ticket:  # it came just now: pass it on
                    self._pass_on()
                else:
                    self._gone.add(ticket)
                return False
            return True

    def release(self) -> None:
        with self._cond:
            self._pass_on()

    def _pass_on(self) -> None:
        self._serving += 1
        while self._serving in self._gone:
            self._gone.discard(self._serving)
            self._serving += 1
        self._cond.notify_all()

    def __enter__(self) -> "Turn":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def flash_attn_type(setting: str) -> int:
    """llama.cpp's flash_attn_type for FLASH_ATTN (auto, on or off)."""
    import llama_cpp as lib

    return {"auto": lib.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": lib.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            "off": lib.LLAMA_FLASH_ATTN_TYPE_DISABLED}[setting]


def penalised(params: SamplingParams) -> bool:
    return bool(params.repeat_penalty != 1.0 or params.frequency_penalty or params.presence_penalty)


def plain_greedy(params: SamplingParams) -> bool:
    """Temperature 0 without penalties: the token is the argmax of the logits row."""
    return params.temperature <= 0 and not penalised(params)


def sampler_chain(lib, n_vocab: int, params: SamplingParams, native: bool = False):
    """A native sampler chain for `params` (free it with llama_sampler_free). top-k runs first,
    so the penalty and the rest work on k candidates rather than the whole vocabulary (262k
    entries for Gemma 3; a repeat penalty over all of them costs ~0.9 ms a token here).

    Plain greedy decoding (temperature 0, no penalties) gets no chain (None) unless `native`: its
    token is the argmax of the logits row, which the scheduler reads in place anyway for log p.
    llama.cpp's greedy sampler first copies the row into a 262k-entry candidate array (0.3 ms a
    token here, 2% of a decode step); numpy's argmax takes 0.04 ms and picks the same token (the
    first of equal maxima, as llama.cpp does)."""
    if plain_greedy(params) and not native:
        return None
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    add: Callable = lambda s: lib.llama_sampler_chain_add(chain, s)  # noqa: E731
    if params.top_k > 0:
        add(lib.llama_sampler_init_top_k(params.top_k))
    if penalised(params):
        add(lib.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, params.repeat_penalty,
                                             params.frequency_penalty, params.presence_penalty))
    if params.temperature <= 0:
        add(lib.llama_sampler_init_greedy())
    else:
        add(lib.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0:
            add(lib.llama_sampler_init_min_p(params.min_p, 1))
        add(lib.llama_sampler_init_temp(params.temperature))
        seed = lib.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
        add(lib.llama_sampler_init_dist(seed))
    return chain


class LlamaRuntime:
    """A loaded GGUF model and its context: N_PARALLEL sequences of `n_ctx` tokens each."""

    def __init__(self, path: Path, *, n_ctx: int, n_parallel: int, n_batch: int, n_threads: int,
                 n_threads_batch: int, n_gpu_layers: int, flash_attn: str, kv_type: int,
                 adapters: list[tuple[Path, float]] = ()) -> None:
        import llama_cpp
        from llama_cpp import _internals

        if min(n_batch, n_ctx) < n_parallel:  # a decode step holds one token of every sequence
            raise ValueError(f"n_batch ({min(n_batch, n_ctx)}) must be at least n_parallel ({n_parallel})")
        self._lib = lib = llama_cpp
        self.path = Path(path)
        self._closed = True  # until every handle is there
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = n_gpu_layers
        self.model = _internals.LlamaModel(path_model=str(path), params=model_params, verbose=False)
        ctx_params = lib.llama_context_default_params()
        ctx_params.n_ctx = n_ctx * n_parallel
        ctx_params.n_seq_max = n_parallel
        ctx_params.kv_unified = False  # one KV stream of n_ctx cells per sequence
        ctx_params.n_batch = ctx_params.n_ubatch = min(n_batch, n_ctx)
        ctx_params.n_threads, ctx_params.n_threads_batch = n_threads, n_threads_batch
        ctx_params.flash_attn_type = flash_attn_type(flash_attn)
        ctx_params.type_k = ctx_params.type_v = kv_type
        ctx_params.swa_full = True  # lets a sequence drop a suffix of its cache (prefix reuse)
        ctx_params.no_perf = True
        try:
            self.context = _internals.LlamaContext(model=self.model, params=ctx_params, verbose=False)
        except Exception:
            self.model.close()
            raise
        self.ctx = self.context.ctx
        self._adapters = []
        try:
            self._apply_adapters(adapters)
        except Exception:
            self._free_adapters()
            self.context.close()
            self.model.close()
            raise
        self.vocab = self.model.vocab
        self.mem = lib.llama_get_memory(self.ctx)
        self.n_ctx = n_ctx
        self.n_parallel = n_parallel
        self.n_batch = ctx_params.n_batch
        self.n_vocab = self.model.n_vocab()
        self.metadata = self.model.metadata()
        self.n_swa = lib.llama_model_n_swa(self.model.model)  # sliding-window size (0: none)
        self.flash_attn = ctx_params.flash_attn_type != lib.LLAMA_FLASH_ATTN_TYPE_DISABLED  # auto: on (CPU, CUDA)
        self._batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self._first_row = 0  # the first row of the batch the last decode held (logits are indexed from it)
        self._n = 0  # tokens in the batch
        self._piece_buf = ctypes.create_string_buffer(64)
        self._candidates: Candidates | None = None  # for grammar sampling, made on first use
        self.turn = Turn()  # decode steps and the embedding context's decodes, one at a time
        self._closed = False

    def _live(self) -> None:
        if self._closed:
            raise RuntimeClosed(f"the model {self.path.name} was closed (switched out); retry the request")

    # -- tokens -----------------------------------------------------------------------------
    def tokenize(self, text: str) -> np.ndarray:
        """The prompt as the model sees it (BOS added when the model wants one)."""
        self._live()
        return np.asarray(self.model.tokenize(text.encode("utf-8"), add_bos=True, special=True), dtype=np.int32)

    def piece(self, token: int) -> bytes:
        """The bytes of one token; llama.cpp returns -needed when the buffer is too small."""
        self._live()
        lib = self._lib
        n = lib.llama_token_to_piece(self.vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        if n < 0:
            self._piece_buf = ctypes.create_string_buffer(-n)
            n = lib.llama_token_to_piece(self.vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        return self._piece_buf.raw[:n]

    def special_token_text(self) -> tuple[str, str, bool]:
        """(BOS text, EOS text, whether the tokenizer adds BOS) for chat templates."""
        self._live()
        lib = self._lib

        def text(token: int) -> str:
            return "" if token < 0 else lib.llama_vocab_get_text(self.vocab, token).decode("utf-8", "replace")

        return (text(lib.llama_vocab_bos(self.vocab)), text(lib.llama_vocab_eos(self.vocab)),
                bool(lib.llama_vocab_get_add_bos(self.vocab)))

    def is_eog(self, token: int) -> bool:
        """Whether `token` ends a generation (EOS, end of turn)."""
        self._live()
        return bool(self._lib.llama_vocab_is_eog(self.vocab, token))

    # -- the batch --------------------------------------------------------------------------
    def batch_clear(self) -> None:
        self._live()
        self._n = 0

    def batch_add(self, seq_id: int, token: int, pos: int, logits: bool) -> int:
        """Append one token of sequence `seq_id` at position `pos`; returns its index in the batch
        (where its logits are, when `logits`)."""
        self._live()
        i = self._n
        if i >= self.n_batch:
            raise EngineError(f"the decode batch is full ({self.n_batch} tokens, N_BATCH)")
        b = self._batch
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq_id
        b.logits[i] = logits
        self._n = i + 1
        return i

    def decode(self, start: int = 0, end: int | None = None) -> None:
        """One llama_decode of the batch's rows [start, end) (default: all of them); their logits
        are then read by their index in the whole batch."""
        self._live()
        end = self._n if end is None else end
        if not 0 <= start < end <= self._n:
            raise EngineError(f"no rows {start}-{end} in a batch of {self._n}")
        batch = self._batch if start == 0 else rows_from(self._lib, self._batch, start)
        batch.n_tokens = end - start
        with self.turn:
            rc = self._lib.llama_decode(self.ctx, batch)
        if rc != 0:
            raise EngineError(f"llama_decode failed with status {rc}")
        self._first_row = start

    # -- sampling ---------------------------------------------------------------------------
    def logits(self, index: int) -> np.ndarray:
        """The logits row of batch index `index`, in place (n_vocab float32; valid until the next
        decode)."""
        self._live()
        return np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self.ctx, index - self._first_row),
                                     shape=(self.n_vocab,))

    def new_sampler(self, params: SamplingParams, native: bool = False):
        """A sampler chain for `params`; None for plain greedy unless `native` (`sampler_chain`).
        With a grammar (structured output): a GrammarSampler of its own (engine/grammar.py)."""
        self._live()
        if params.grammar:
            if self._candidates is None:
                self._candidates = Candidates(self._lib, self.n_vocab)
            chain = sampler_chain(self._lib, self.n_vocab, params, native=True)
            return GrammarSampler(self._lib, self.vocab, chain, params.grammar, self._candidates)
        return sampler_chain(self._lib, self.n_vocab, params, native)

    def sample(self, chain, index: int) -> int:
        self._live()
        if isinstance(chain, GrammarSampler):
            return chain.sample(self.logits(index))
        return self._lib.llama_sampler_sample(chain, self.ctx, index - self._first_row)

    def free_sampler(self, chain) -> None:
        self._live()
        if isinstance(chain, GrammarSampler):
            chain.free()
        elif chain is not None:
            self._lib.llama_sampler_free(chain)

    def sample_banning(self, params: SamplingParams, index: int, banned: list[int]) -> int:
        """Sample batch index `index` again with the tokens `banned` made impossible."""
        self._live()
        lib = self._lib
        biases = (lib.llama_logit_bias * len(banned))(*[lib.llama_logit_bias(t, -math.inf) for t in banned])
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_logit_bias(self.n_vocab, len(banned), biases))
        lib.llama_sampler_chain_add(chain, sampler_chain(lib, self.n_vocab, params, native=True))
        try:
            return lib.llama_sampler_sample(chain, self.ctx, index - self._first_row)
        finally:
            lib.llama_sampler_free(chain)

    # -- KV memory of one sequence ------------------------------------------------------------
    def seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        """Drop positions [p0, p1) of a sequence (-1: open end); False when the cache cannot (a
        sliding-window cache that is not full size, a recurrent one: only whole sequences)."""
        self._live()
        return bool(self._lib.llama_memory_seq_rm(self.mem, seq_id, p0, p1))

    def seq_clear(self, seq_id: int) -> None:
        self._live()
        self._lib.llama_memory_seq_rm(self.mem, seq_id, -1, -1)

    def seq_copy(self, src: int, dst: int) -> None:
        """Make sequence `dst` hold what `src` holds, cell for cell. Each sequence has its own KV
        stream (kv_unified off), so llama.cpp copies the whole stream's buffers (it can only copy
        whole streams between streams: a partial range aborts the process) at the start of the
        next decode; the cells' metadata is copied at once. Cut `dst` back with `seq_rm`: the
        cells it then holds are the same bits, at the same cells, as in `src`."""
        self._live()
        self._lib.llama_memory_seq_cp(self.mem, src, dst, -1, -1)

    def seq_pos_min(self, seq_id: int) -> int:
        """The first position the sequence holds (-1: empty)."""
        self._live()
        return self._lib.llama_memory_seq_pos_min(self.mem, seq_id)

    def state_get(self, seq_id: int) -> bytes:
        """The sequence's KV state (b"" when llama.cpp writes none)."""
        self._live()
        lib = self._lib
        size = lib.llama_state_seq_get_size(self.ctx, seq_id)
        buf = (ctypes.c_uint8 * size)()
        written = lib.llama_state_seq_get_data(self.ctx, buf, size, seq_id)
        return ctypes.string_at(buf, written) if written else b""

    def state_set(self, seq_id: int, data: bytes) -> bool:
        """Replace the sequence's KV with a saved state; False when llama.cpp refuses it."""
        self._live()
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        return bool(self._lib.llama_state_seq_set_data(self.ctx, buf, len(data), seq_id))

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Free the batch, the context, the adapters and the model (once)."""
        if self._closed:
            return
        self._closed = True
        self._lib.llama_batch_free(self._batch)
        self.context.close()
        self._free_adapters()
        self.model.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _apply_adapters(self, adapters: list[tuple[Path, float]]) -> None:
        """Load LoRA adapters (GGUF) for this model and set them, with their scales, on the context."""
        lib = self._lib
        for path, _scale in adapters:
            adapter = lib.llama_adapter_lora_init(self.model.model, str(path).encode("utf-8"))
            if not adapter:
                raise EngineError(f"llama.cpp could not load the LoRA adapter {path.name}: not a LoRA GGUF, or "
                                  "made for another base model")
            self._adapters.append(adapter)
        if self._adapters:
            arr = (lib.llama_adapter_lora_p_ctypes * len(self._adapters))(*self._adapters)
            scales = (ctypes.c_float * len(self._adapters))(*[scale for _, scale in adapters])
            if lib.llama_set_adapters_lora(self.ctx, arr, len(self._adapters), scales):
                raise EngineError("llama.cpp could not apply the LoRA adapters to the context")

    def _free_adapters(self) -> None:
        for adapter in self._adapters:
            self._lib.llama_adapter_lora_free(adapter)
        self._adapters = []


def rows_from(lib, batch, start: int):
    """A llama_batch over `batch`'s arrays from row `start` on (no copy; its n_tokens is the caller's)."""
    view = lib.llama_batch()
    for name in ("token", "pos", "n_seq_id", "seq_id", "logits"):
        array = getattr(batch, name)
        address = ctypes.addressof(array.contents) + start * ctypes.sizeof(array._type_)
        setattr(view, name, ctypes.cast(address, type(array)))
    return view
