"""Continuous batching: one llama.cpp context decoding up to N_PARALLEL sequences per step.

A scheduler thread owns the context. Requests wait in a bounded FIFO (`MAX_QUEUE`; full → 503
with Retry-After) until a sequence slot is free; then each step builds one `llama_batch` holding
the next token of every decoding sequence plus chunks of the prompts being read (so a long prompt
never stalls the others), runs one `llama_decode`, and samples every sequence that has logits
with its own native sampler chain (plain greedy takes the argmax). Finished, cancelled and
timed-out sequences leave at once.

Each slot is a KV-cache sequence of its own, N_CTX tokens long (the context is split, not shared:
a request's limit does not depend on the others). A new request goes to the free slot whose
cached tokens share the longest prefix with its prompt, or gets the state of a recent prompt
from the conversation cache; only the new tokens are evaluated.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from engine.admission import QueueFull, RequestTimeout, Unavailable
from engine.errors import ContextOverflow, EngineError
from engine.generation import Generation, ReplyText, SamplingParams
from engine.prompt_cache import ConversationCache, common_prefix

log = logging.getLogger(__name__)

PENALTY_LAST_N = 64  # recent generated tokens the repeat penalty looks at
MIN_RESTORE_GAIN = 16  # restore a cached state only when it saves at least this many tokens
# The conversation cache must not change a reply by a single bit, so prompt positions are always
# computed along the same kernel path as when the whole prompt is read at once. llama.cpp's CPU
# matrix kernels take a batch of 8 rows or more in groups of 4, and its last `rows % 4` rows along
# another summation path; a batch under 8 rows (under 64 with flash attention, whose kernel tiles
# 64 query rows) takes another path altogether. So a kept prefix ends, and reading resumes, at a
# multiple of ROW_GROUP, and every part of a prompt is read in batches of at least MIN_ROWS.
ROW_GROUP = 4
MIN_ROWS = 8
MIN_ROWS_FLASH_ATTN = 64
SWA_ALIGN = 64
CONTINUES_WITHIN = ROW_GROUP  # a prompt sharing all but this many of a slot's exact tokens continues it
_DONE = object()


class Cancelled(EngineError):
    """The client went away; nobody reads this."""

    status = 499


@dataclass(eq=False)
class Sequence:
    """One request inside the scheduler; its text pieces come out of `stream()`."""

    tokens: np.ndarray
    params: SamplingParams
    reply: ReplyText
    started: float
    deadline: float
    out: queue.Queue = field(default_factory=queue.Queue)
    result: Generation | None = None
    cancelled: bool = False
    # scheduler state
    slot: "Slot | None" = None
    n_prompt_done: int = 0
    reused: int = 0
    chain: object = None
    pending_token: int | None = None
    n_tokens: int = 0
    logprob_sum: float = 0.0
    emitted: str = ""
    t_first: float | None = None
    t_last: float | None = None
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def stream(self) -> Iterator[str]:
        """Stable reply text as it comes (one item per token, often ""); raises the request's error."""
        while True:
            item = self.out.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def wait(self) -> Generation:
        """Block until the request ends; its result, or raises its error. One wake-up at the end
        instead of one per token: on 2 cores a thread woken per token takes a core from llama.cpp
        in the middle of its decode (about 2% of decode speed)."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result

    def cancel(self) -> None:
        self.cancelled = True

    def end(self, error: BaseException | None = None) -> None:
        """The scheduler is done with this request (`result` is set, or `error`)."""
        self.error = error
        self.out.put(_DONE if error is None else error)
        self.done.set()


@dataclass(eq=False)
class Slot:
    seq_id: int
    kv: np.ndarray  # tokens whose KV this sequence holds, positions 0..n_kv-1
    n_kv: int = 0
    # Positions 0..n_exact-1 hold exactly the KV that reading the prompt in full computes for them
    # (read as prompt, in row groups); generated tokens (decoded one at a time) never count.
    n_exact: int = 0
    seq: Sequence | None = None
    last_used: float = 0.0


def flash_attn_type(setting: str) -> int:
    """llama.cpp's flash_attn_type for FLASH_ATTN (auto, on or off)."""
    import llama_cpp as lib

    return {"auto": lib.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": lib.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            "off": lib.LLAMA_FLASH_ATTN_TYPE_DISABLED}[setting]


def sampler_chain(lib, n_vocab: int, params: SamplingParams, native: bool = False):
    """A native sampler chain for `params` (free it with llama_sampler_free). top-k runs first,
    so the penalty and the rest work on k candidates rather than the whole vocabulary (262k
    entries for Gemma 3; a repeat penalty over all of them costs ~0.9 ms a token here).

    Plain greedy decoding (temperature 0, no penalties) gets no chain (None) unless `native`: its
    token is the argmax of the logits row, which the scheduler reads in place anyway for log p.
    llama.cpp's greedy sampler first copies the row into a 262k-entry candidate array (0.3 ms a
    token here, 2% of a decode step); numpy's argmax takes 0.04 ms and picks the same token (the
    first of equal maxima, as llama.cpp does)."""
    penalised = params.repeat_penalty != 1.0 or params.frequency_penalty or params.presence_penalty
    if params.temperature <= 0 and not penalised and not native:
        return None
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    add: Callable = lambda s: lib.llama_sampler_chain_add(chain, s)  # noqa: E731
    if params.top_k > 0:
        add(lib.llama_sampler_init_top_k(params.top_k))
    if penalised:
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


class BatchEngine:
    """A loaded model, its context and the scheduler thread that drives it."""

    def __init__(self, path: Path, *, n_ctx: int, n_parallel: int, n_batch: int, n_threads: int,
                 n_threads_batch: int, n_gpu_layers: int, flash_attn: str, kv_type: int, cache_bytes: int,
                 max_queue: int, metrics=None, adapters: list[tuple[Path, float]] = ()) -> None:
        import llama_cpp
        from llama_cpp import _internals

        if min(n_batch, n_ctx) < n_parallel:  # a decode step holds one token of every sequence
            raise ValueError(f"n_batch ({min(n_batch, n_ctx)}) must be at least n_parallel ({n_parallel})")
        self._lib = lib = llama_cpp
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
        self.max_queue = max_queue
        self.n_swa = lib.llama_model_n_swa(self.model.model)  # sliding-window size (0: none)
        self.flash_attn = ctx_params.flash_attn_type != lib.LLAMA_FLASH_ATTN_TYPE_DISABLED  # auto: on (CPU, CUDA)
        self.min_rows = MIN_ROWS_FLASH_ATTN if self.flash_attn else MIN_ROWS
        self.cache = ConversationCache(cache_bytes)
        self.metrics = metrics
        self._batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self._piece_buf = ctypes.create_string_buffer(64)
        self.slots = [Slot(i, np.zeros(n_ctx, dtype=np.int32)) for i in range(n_parallel)]
        self._pending: deque[Sequence] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._recent_s = 2.0  # moving estimate of one request's time, for Retry-After
        self._thread = threading.Thread(target=self._run, name=f"scheduler-{path.name}", daemon=True)
        self._thread.start()

    # -- tokens -----------------------------------------------------------------------------
    def tokenize(self, text: str) -> np.ndarray:
        """The prompt as the model sees it (BOS added when the model wants one)."""
        return np.asarray(self.model.tokenize(text.encode("utf-8"), add_bos=True, special=True), dtype=np.int32)

    def piece(self, token: int) -> bytes:
        """The bytes of one token; llama.cpp returns -needed when the buffer is too small."""
        lib = self._lib
        n = lib.llama_token_to_piece(self.vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        if n < 0:
            self._piece_buf = ctypes.create_string_buffer(-n)
            n = lib.llama_token_to_piece(self.vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        return self._piece_buf.raw[:n]

    def special_token_text(self) -> tuple[str, str, bool]:
        """(BOS text, EOS text, whether the tokenizer adds BOS) for chat templates."""
        lib = self._lib

        def text(token: int) -> str:
            return "" if token < 0 else lib.llama_vocab_get_text(self.vocab, token).decode("utf-8", "replace")

        return (text(lib.llama_vocab_bos(self.vocab)), text(lib.llama_vocab_eos(self.vocab)),
                bool(lib.llama_vocab_get_add_bos(self.vocab)))

    def check_fits(self, prompt: np.ndarray, max_tokens: int) -> None:
        if len(prompt) + max_tokens > self.n_ctx:
            raise ContextOverflow(
                f"the prompt is {len(prompt)} tokens and max_length asks for {max_tokens} more, "
                f"but the context holds {self.n_ctx} tokens (N_CTX); shorten the prompt, lower "
                "max_length or raise N_CTX", field="prompt")

    # -- the queue --------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        free = sum(s.seq is None for s in self.slots)
        return max(0, len(self._pending) - free)

    @property
    def active(self) -> int:
        return sum(s.seq is not None for s in self.slots)

    def submit(self, tokens: np.ndarray, params: SamplingParams, reply: ReplyText, started: float,
               deadline: float) -> Sequence:
        """Queue a request (503 at once when MAX_QUEUE requests already wait)."""
        self.check_fits(tokens, params.max_tokens)
        seq = Sequence(tokens=tokens, params=params, reply=reply, started=started, deadline=deadline)
        with self._cond:
            if self._stopping:
                raise Unavailable("the engine is switching models; retry in a moment")
            if self.waiting >= self.max_queue:
                retry = max(1, round(self._recent_s * (self.waiting + 1) / (2 * self.n_parallel)))
                raise QueueFull(f"the engine is busy: {self.waiting} requests are already waiting "
                                f"(MAX_QUEUE={self.max_queue}); retry shortly", retry)
            self._pending.append(seq)
            self._cond.notify_all()
        self._report_queue()
        return seq

    def close(self) -> None:
        """Finish what was accepted, then free the context and the model."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()
        self._lib.llama_batch_free(self._batch)
        self.context.close()
        self._free_adapters()
        self.model.close()

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

    def _report_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.waiting)

    # -- the scheduler thread ---------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self.active and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._pending and not self.active:
                    return
            try:
                self._admit()
                self._step()
            except Exception as exc:  # a bug or a llama.cpp failure: fail the requests, keep serving
                log.exception("scheduler step failed")
                for slot in self.slots:
                    if slot.seq is not None:
                        self._finish(slot.seq, EngineError(f"generation failed: {exc}"))

    def _admit(self) -> None:
        now = time.perf_counter()
        with self._cond:  # placed under the lock, so `waiting` never undercounts for submit()
            free = sum(s.seq is None for s in self.slots)
            for seq in list(self._pending):
                if seq.cancelled or now > seq.deadline:
                    self._pending.remove(seq)
                    self._fail_waiting(seq, now)
                elif free > 0:
                    self._pending.remove(seq)
                    try:
                        self._place(seq)
                    except Exception as exc:  # a llama.cpp or memory failure: this request fails, not silently
                        log.exception("could not place a request")
                        seq.end(EngineError(f"generation failed: {exc}"))
                        continue
                    free -= 1
        self._report_queue()

    def _fail_waiting(self, seq: Sequence, now: float) -> None:
        if seq.cancelled:
            seq.end(Cancelled("cancelled"))
            return
        if self.metrics is not None:
            self.metrics.timeouts.inc()
        seq.end(RequestTimeout("the request timed out waiting in the queue (REQUEST_TIMEOUT_S)"))

    def _place(self, seq: Sequence) -> None:
        """Put `seq` in a free slot (`_pick_slot`), resume from what that slot or a saved state holds
        exactly of its prompt, drop the rest of the slot's cache, and prepare its sampler."""
        enabled = self.cache.enabled
        slot = self._pick_slot(seq.tokens)
        keep = self._resume_point(common_prefix(slot.kv[:slot.n_exact], seq.tokens) if enabled else 0, seq.tokens)
        if not self._can_resume(slot, keep):
            keep = 0
        if enabled:
            entry, restore = self.cache.best(seq.tokens, lambda e, n: self._restore_point(e, n, seq.tokens))
            if entry is not None and restore >= keep + MIN_RESTORE_GAIN:
                self._save(slot, 0)
                keep = restore if self._restore(slot, entry) else 0
                if keep:
                    self.cache.hits += 1
                    if self.metrics is not None:
                        self.metrics.cache_hits.labels(cache="conversation").inc()
            elif keep < slot.n_kv:
                self._save(slot, keep)
        keep = self._truncate(slot, keep)
        seq.slot, seq.n_prompt_done, seq.reused = slot, keep, keep
        seq.chain = self._sampler(seq.params)
        slot.seq, slot.last_used = seq, time.perf_counter()

    def _pick_slot(self, tokens: np.ndarray) -> Slot:
        """The free slot whose exact prefix this prompt continues (the same conversation, one turn
        on), else an empty slot, else the least recently used one. Conversations that only share an
        opening (a system prompt, or two students on the same case) do not evict each other while
        there are slots for all of them."""
        free = [s for s in self.slots if s.seq is None]
        if self.cache.enabled:
            for s in sorted(free, key=lambda s: -s.n_exact):
                if s.n_exact and common_prefix(s.kv[:s.n_exact], tokens) >= s.n_exact - CONTINUES_WITHIN:
                    return s
        empty = [s for s in free if s.n_kv == 0]
        return empty[0] if empty else min(free, key=lambda s: s.last_used)

    def _resume_point(self, reuse: int, prompt: np.ndarray) -> int:
        """Where reading `prompt` resumes when `reuse` of its tokens are cached: on a row-group
        boundary, with at least `min_rows` prompt tokens left to read."""
        keep = max(0, min(reuse, len(prompt) - self.min_rows))
        return keep - keep % ROW_GROUP

    def _restore_point(self, entry, shared: int, prompt: np.ndarray) -> int:
        """Where reading `prompt` would resume from a saved state sharing `shared` of its tokens; 0
        when it cannot: a state longer than the sliding window holds only the window's last cells,
        so it is only continued from its very end."""
        keep = self._resume_point(shared, prompt)
        return keep if keep == len(entry.tokens) or not self._windowed(len(entry.tokens)) else 0

    def _windowed(self, n: int) -> bool:
        """Whether a saved state of `n` tokens keeps only the sliding window's last cells."""
        return 0 < self.n_swa < n

    def _can_resume(self, slot: Slot, keep: int) -> bool:
        """Whether the slot's cache still holds what a token at position `keep` attends to: a state
        restored from the conversation cache lacks the cells before its last sliding window
        (llama.cpp saves only those), so it cannot be cut back into that window."""
        if keep == 0 or not self.n_swa:
            return True
        return self._lib.llama_memory_seq_pos_min(self.mem, slot.seq_id) <= max(0, keep - self.n_swa)

    def _step(self) -> None:
        """One llama_decode for every active sequence, then sample those that have logits."""
        now = time.perf_counter()
        for seq in [s.seq for s in self.slots if s.seq is not None]:
            if seq.cancelled:
                self._finish(seq, Cancelled("cancelled"))
            elif now > seq.deadline:
                self._finish(seq, RequestTimeout(
                    f"the request timed out after {now - seq.started:.1f} s with {seq.n_tokens} tokens "
                    "generated (REQUEST_TIMEOUT_S)"))
        active = [s.seq for s in self.slots if s.seq is not None]
        decoding = [q for q in active if q.pending_token is not None]
        prefilling = sorted((q for q in active if q.pending_token is None), key=lambda q: q.started)
        n = 0
        wants: list[tuple[Sequence, int]] = []  # sequences to sample, and where their logits are
        for seq in decoding:  # one token each: decoding never waits for a prompt to be read
            self._add(seq.slot.seq_id, seq.pending_token, seq.slot.n_kv, n, True)
            wants.append((seq, n))
            n += 1
        chunks: list[tuple[Sequence, int]] = []
        for seq in prefilling:  # then prompts, in chunks that fill the rest of the batch
            start, room = seq.n_prompt_done, self.n_batch - n
            if room <= 0:
                break
            end = min(start + room, len(seq.tokens))
            if end < len(seq.tokens):  # on a row-group boundary, leaving min_rows to read, room permitting
                aligned = min(end, len(seq.tokens) - self.min_rows)
                aligned -= aligned % ROW_GROUP
                end = aligned if aligned > start else end
            chunk = seq.tokens[start:end].tolist()
            last = end == len(seq.tokens)
            for i, tok in enumerate(chunk):
                self._add(seq.slot.seq_id, tok, start + i, n, last and i == len(chunk) - 1)
                n += 1
            chunks.append((seq, len(chunk)))
            if last:
                wants.append((seq, n - 1))
        if n == 0:
            return
        self._batch.n_tokens = n
        rc = self._lib.llama_decode(self.ctx, self._batch)
        if rc != 0:
            raise EngineError(f"llama_decode failed with status {rc}")
        for seq in decoding:  # the batch went in: record what each sequence's cache now holds
            slot = seq.slot
            slot.kv[slot.n_kv] = seq.pending_token
            slot.n_kv += 1
            seq.pending_token = None
        for seq, k in chunks:
            slot, start = seq.slot, seq.n_prompt_done
            slot.kv[start:start + k] = seq.tokens[start:start + k]
            slot.n_kv = seq.n_prompt_done = start + k
            # Exact up to the last full row group. A part read beside other sequences' tokens counts
            # too (llama.cpp then splits the batch its own way): requests decoded together are not
            # bit-exact against the same requests alone anyway, and not reusing their prompts would
            # make the next turn of every interview under load read its whole transcript again.
            if slot.n_exact == start and k >= self.min_rows:
                slot.n_exact = start + k - (start + k) % ROW_GROUP
        for seq, index in wants:
            self._sample(seq, index)

    def _add(self, seq_id: int, token: int, pos: int, i: int, logits: bool) -> None:
        b = self._batch
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq_id
        b.logits[i] = logits

    def _sample(self, seq: Sequence, index: int) -> None:
        lib = self._lib
        logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,))
        if seq.chain is None:  # plain greedy: the argmax, read in place (see _sampler)
            token = int(logits.argmax())
        else:
            token = lib.llama_sampler_sample(seq.chain, self.ctx, index)
        if seq.reply.require_text and lib.llama_vocab_is_eog(self.vocab, token) and not seq.reply.text.strip():
            token = self._sample_without_end(seq, index, token)
        now = time.perf_counter()
        seq.t_last = now
        seq.t_first = seq.t_first or now
        if lib.llama_vocab_is_eog(self.vocab, token):
            self._finish(seq, finish="eos")
            return
        seq.n_tokens += 1
        if self.metrics is not None:
            self.metrics.generated_tokens.inc()
        seq.logprob_sum += self._logprob(logits, token)
        if seq.reply.add(seq.decoder.decode(self.piece(token))):
            self._finish(seq, finish="stop")
            return
        if seq.n_tokens >= seq.params.max_tokens:
            self._finish(seq, finish="length")
            return
        seq.pending_token = token
        stable = seq.reply.stable()
        seq.out.put(stable[len(seq.emitted):])
        seq.emitted = stable

    def _sample_without_end(self, seq: Sequence, index: int, token: int) -> int:
        """A reply that must say something may not end before its first word: sample again with
        the end-of-generation tokens banned (a fine-tuned persona can learn to stop at once)."""
        lib = self._lib
        banned: list[int] = []
        while lib.llama_vocab_is_eog(self.vocab, token) and len(banned) < 8:
            banned.append(token)
            biases = (lib.llama_logit_bias * len(banned))(*[lib.llama_logit_bias(t, -math.inf) for t in banned])
            chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_logit_bias(self.n_vocab, len(banned), biases))
            lib.llama_sampler_chain_add(chain, self._sampler(seq.params, native=True))
            token = lib.llama_sampler_sample(chain, self.ctx, index)
            lib.llama_sampler_free(chain)
        return token

    def _finish(self, seq: Sequence, error: BaseException | None = None, finish: str = "") -> None:
        """Take `seq` out of its slot and hand its result (or error) to the waiting request."""
        slot = seq.slot
        if seq.chain is not None:
            self._lib.llama_sampler_free(seq.chain)
            seq.chain = None
        slot.seq = None
        seq.pending_token = None
        if error is not None:
            # Its cells are freed now, so the next request in this slot has the whole context.
            self._lib.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
            slot.n_kv = slot.n_exact = 0
            if isinstance(error, RequestTimeout) and self.metrics is not None:
                self.metrics.timeouts.inc()
            seq.end(error)
            return
        if finish != "stop":
            seq.reply.add(seq.decoder.decode(b"", final=True))
        text = seq.reply.final()
        if not text.startswith(seq.emitted):  # would be a bug in ReplyText.stable: make it loud
            log.error("streamed text %r is not a prefix of the reply %r", seq.emitted, text)
        ended = time.perf_counter()
        self._recent_s = 0.8 * self._recent_s + 0.2 * (ended - seq.started)
        t_first = seq.t_first or ended
        seq.result = Generation(
            text=text, tokens=seq.n_tokens, prompt_tokens=len(seq.tokens), finish_reason=finish,
            ttft_s=t_first - seq.started, decode_s=(seq.t_last or ended) - t_first, total_s=ended - seq.started,
            mean_logprob=seq.logprob_sum / seq.n_tokens if seq.n_tokens else 0.0, reused_tokens=seq.reused)
        if text[len(seq.emitted):]:
            seq.out.put(text[len(seq.emitted):])
        seq.end()
        with self._cond:
            self._cond.notify_all()

    # -- KV cache of one slot -----------------------------------------------------------------
    def _truncate(self, slot: Slot, keep: int) -> int:
        if keep >= slot.n_kv:
            return slot.n_kv
        if not self._lib.llama_memory_seq_rm(self.mem, slot.seq_id, keep, -1):
            # Some caches (a sliding-window one that is not full size) cannot drop a suffix.
            self._lib.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
            keep = 0
        slot.n_kv = keep
        slot.n_exact = min(slot.n_exact, keep)
        return keep

    def _save(self, slot: Slot, keep: int) -> None:
        """Put the slot's exact prefix into the conversation cache, unless it is there or the slot
        keeps it anyway (`keep` tokens); the rest of the slot (its generated tokens) is dropped.
        A state longer than the sliding window is saved with a length that starts its window on a
        multiple of SWA_ALIGN: restored at cell 0, its cells then line up with the SIMD lanes of
        llama.cpp's attention as in a context that read the prompt in full. With flash attention
        such a state is not saved: restored, it holds fewer cells than a full read, and the decode
        kernel splits its work by the number of cells."""
        n = slot.n_exact
        if self._windowed(n - self.min_rows):  # continued only from its end: even the same prompt again
            if self.flash_attn:  # its decode kernel splits the cells it reads by their count: not exact
                return
            n -= self.min_rows
            n -= (n - self.n_swa) % SWA_ALIGN
        if not self.cache.enabled or n <= keep or not self._can_resume(slot, n):
            return
        if self._truncate(slot, n) < n:  # a cache that cannot drop a suffix (recurrent): nothing to save
            return
        tokens = slot.kv[:n]
        if self.cache.contains(tokens):
            return
        lib = self._lib
        size = lib.llama_state_seq_get_size(self.ctx, slot.seq_id)
        buf = (ctypes.c_uint8 * size)()
        written = lib.llama_state_seq_get_data(self.ctx, buf, size, slot.seq_id)
        if written:
            self.cache.put(tokens, bytes(buf)[:written])

    def _restore(self, slot: Slot, entry) -> bool:
        lib = self._lib
        lib.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
        slot.n_kv = slot.n_exact = 0
        buf = (ctypes.c_uint8 * len(entry.state)).from_buffer_copy(entry.state)
        if not lib.llama_state_seq_set_data(self.ctx, buf, len(entry.state), slot.seq_id):
            log.warning("could not restore a cached state; evaluating the prompt in full")
            lib.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
            return False
        slot.kv[:len(entry.tokens)] = entry.tokens
        slot.n_kv = slot.n_exact = len(entry.tokens)  # only exact prefixes are saved
        return True

    # -- sampling -------------------------------------------------------------------------------
    @staticmethod
    def _logprob(logits: np.ndarray, token: int) -> float:
        """log p(token) from a row of llama.cpp's logits, worked on in place: no copy into Python
        and no temporary arrays (262k floats each). It overwrites the row, so it must be the
        row's last reader (sampling is done; the next decode refills it)."""
        top = logits.max()
        chosen = float(logits[token])
        np.subtract(logits, top, out=logits)
        np.exp(logits, out=logits)
        return chosen - float(top) - math.log(float(logits.sum()))

    def _sampler(self, params: SamplingParams, native: bool = False):
        return sampler_chain(self._lib, self.n_vocab, params, native)
