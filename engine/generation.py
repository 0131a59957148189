"""The generation core: one llama.cpp context driven through llama-cpp-python's low-level API.

Per token, Python does one single-token `llama_decode`, one `llama_sampler_sample` on a native
sampler chain, and decodes only the new token's bytes (through an incremental UTF-8 decoder, so
characters split across tokens come out whole). Stop rules look only at the tail a new piece can
complete. The prompt is evaluated in `n_batch` chunks, reusing whatever prefix of it the context
(or the conversation cache) already holds.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from engine.admission import RequestTimeout
from engine.errors import ContextOverflow, EngineError
from engine.prompt_cache import ConversationCache, common_prefix

log = logging.getLogger(__name__)

PENALTY_LAST_N = 64  # recent generated tokens the repeat penalty looks at
MIN_RESTORE_GAIN = 16  # restore a cached state only when it saves at least this many tokens


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings. The defaults keep the default model's patient replies from looping
    (a repeat penalty of 1.1 over the last 64 generated tokens) without flattening them."""

    max_tokens: int = 150
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None

    @property
    def deterministic(self) -> bool:
        return self.temperature == 0 or self.seed is not None


@dataclass
class StopRules:
    """Where a reply ends: literal stop strings and regex patterns.

    Each pattern comes with a `partial` regex that fullmatches any text that could still grow
    into a match; streaming holds such a tail back until it is decided. Matching starts only
    once the reply has visible text, so a model that opens its turn with a newline is not cut to
    an empty reply.
    """

    strings: Sequence[str] = ()
    patterns: Sequence[tuple[re.Pattern[str], re.Pattern[str]]] = ()
    lookback: int = field(init=False)

    def __post_init__(self) -> None:
        self.strings = [s for s in self.strings if s]
        # A regex match is looked for in a window this long before the new text.
        self.lookback = max([len(s) for s in self.strings] + [48 if self.patterns else 0])

    def find(self, text: str, content_start: int, new_from: int) -> int:
        """Index where the earliest stop begins in `text`, or -1; only text from `new_from` is new."""
        window_start = max(content_start, new_from - self.lookback)
        best = -1
        for s in self.strings:
            i = text.find(s, window_start)
            if i >= 0 and (best < 0 or i < best):
                best = i
        for full, _partial in self.patterns:
            m = full.search(text, window_start)
            if m and (best < 0 or m.start() < best):
                best = m.start()
        return best

    def undecided_from(self, text: str, content_start: int) -> int:
        """Index from which `text` might still turn out to be the start of a stop."""
        for i in range(max(content_start, len(text) - self.lookback), len(text)):
            tail = text[i:]
            if any(s.startswith(tail) for s in self.strings) or \
                    any(partial.fullmatch(text, i) for _full, partial in self.patterns):
                return i
        return len(text)


class ReplyText:
    """Text generated so far, fed piece by piece.

    `add` says when a stop rule has ended it. `stable()` is the cleaned reply as far as it can no
    longer change, so streamed pieces always add up to the final cleaned reply.
    """

    def __init__(self, stops: StopRules, clean: Callable[[str], str] = str.strip,
                 pending: Callable[[str], bool] = lambda text: False) -> None:
        self.stops = stops
        self.clean = clean
        self.pending = pending  # True while the start of the text could still be cleaned away
        self.text = ""
        self._content_start = -1  # index of the first visible character, once there is one

    def add(self, piece: str) -> bool:
        """Append `piece`; on a stop, cut the text where the stop begins and return True."""
        if not piece:
            return False
        new_from = len(self.text)
        self.text += piece
        if self._content_start < 0:
            visible = self.text.lstrip()
            if not visible:
                return False
            self._content_start = len(self.text) - len(visible)
        cut = self.stops.find(self.text, self._content_start, new_from)
        if cut < 0:
            return False
        self.text = self.text[:cut]
        return True

    def stable(self) -> str:
        if self._content_start < 0:
            return ""
        decided = self.text[:self.stops.undecided_from(self.text, self._content_start)]
        if self.pending(decided):
            return ""
        return self.clean(decided)

    def final(self) -> str:
        return self.clean(self.text)


@dataclass
class Generation:
    """What one generation produced, with its timings."""

    text: str  # the cleaned reply
    tokens: int
    prompt_tokens: int
    finish_reason: str  # "stop" (a stop rule), "eos" (end of sequence) or "length" (max_tokens)
    ttft_s: float
    decode_s: float
    total_s: float
    mean_logprob: float
    reused_tokens: int = 0  # prompt tokens whose KV came from the context or the cache
    cached: bool = False  # answered from the response cache

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of decoding (prompt processing excluded)."""
        if self.tokens < 2 or self.decode_s <= 0:
            return 0.0
        return (self.tokens - 1) / self.decode_s

    @property
    def confidence(self) -> float:
        """Geometric mean of the sampled tokens' probabilities under the model (0..1)."""
        return math.exp(self.mean_logprob) if self.tokens else 0.0


class LlamaSession:
    """Sequence 0 of one llama.cpp context: which tokens its KV cache holds, prefill and decode."""

    def __init__(self, llm, cache: ConversationCache) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self.llm = llm
        self.ctx = llm.ctx
        self.vocab = llm._model.vocab
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.n_ctx = llm.n_ctx()
        self.n_vocab = llm.n_vocab()
        self.n_batch = llm.n_batch
        self.cache = cache
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._kv = np.zeros(self.n_ctx, dtype=np.int32)  # tokens in the KV cache, positions 0..n_kv-1
        self.n_kv = 0
        self._piece_buf = ctypes.create_string_buffer(64)

    def close(self) -> None:
        if self._batch is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None

    # -- tokens -----------------------------------------------------------------------------
    def tokenize(self, text: str) -> np.ndarray:
        """The prompt as the model sees it (BOS added when the model wants one)."""
        return np.asarray(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True), dtype=np.int32)

    def piece(self, token: int) -> bytes:
        """The bytes of one token; llama.cpp returns -needed when the buffer is too small."""
        n = self._lib.llama_token_to_piece(self.vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        if n < 0:
            self._piece_buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self.vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        return self._piece_buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self.vocab, token))

    def special_token_text(self) -> tuple[str, str, bool]:
        """(BOS text, EOS text, whether the tokenizer adds BOS) for chat templates."""
        lib = self._lib

        def text(token: int) -> str:
            return "" if token < 0 else lib.llama_vocab_get_text(self.vocab, token).decode("utf-8", "replace")

        return (text(lib.llama_vocab_bos(self.vocab)), text(lib.llama_vocab_eos(self.vocab)),
                bool(lib.llama_vocab_get_add_bos(self.vocab)))

    # -- KV cache ---------------------------------------------------------------------------
    def _decode(self, tokens: np.ndarray, pos0: int) -> None:
        """Evaluate `tokens` at positions pos0..; logits only for the last one."""
        b = self._batch
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            b.n_tokens = len(chunk)
            for i, tok in enumerate(chunk.tolist()):
                b.token[i] = tok
                b.pos[i] = pos0 + start + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = 0
            b.logits[len(chunk) - 1] = start + len(chunk) == len(tokens)
            rc = self._lib.llama_decode(self.ctx, b)
            if rc != 0:
                raise EngineError(f"llama_decode failed with status {rc}")
        self._kv[pos0:pos0 + len(tokens)] = tokens
        self.n_kv = pos0 + len(tokens)

    def step(self, token: int) -> None:
        """Evaluate one generated token (the fast path: no array slicing)."""
        b = self._batch
        b.n_tokens = 1
        b.token[0] = token
        b.pos[0] = self.n_kv
        b.n_seq_id[0] = 1
        b.seq_id[0][0] = 0
        b.logits[0] = 1
        rc = self._lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise EngineError(f"llama_decode failed with status {rc}")
        self._kv[self.n_kv] = token
        self.n_kv += 1

    def _truncate(self, keep: int) -> int:
        if keep >= self.n_kv:
            return self.n_kv
        if not self._lib.llama_memory_seq_rm(self.mem, 0, keep, -1):
            # Some caches (a sliding-window one that is not full size) cannot drop a suffix.
            self._lib.llama_memory_seq_rm(self.mem, 0, -1, -1)
            keep = 0
        self.n_kv = keep
        return keep

    def _save(self) -> None:
        """Put the context's current state into the conversation cache (unless it is there)."""
        tokens = self._kv[:self.n_kv]
        if self.n_kv == 0 or not self.cache.enabled or self.cache.contains(tokens):
            return
        size = self._lib.llama_state_seq_get_size(self.ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        written = self._lib.llama_state_seq_get_data(self.ctx, buf, size, 0)
        if written:
            self.cache.put(tokens, bytes(buf)[:written])

    def _restore(self, state: bytes, tokens: np.ndarray) -> bool:
        self._lib.llama_memory_seq_rm(self.mem, 0, -1, -1)
        self.n_kv = 0
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if not self._lib.llama_state_seq_set_data(self.ctx, buf, len(state), 0):
            log.warning("could not restore a cached state; evaluating the prompt in full")
            self._lib.llama_memory_seq_rm(self.mem, 0, -1, -1)
            return False
        self._kv[:len(tokens)] = tokens
        self.n_kv = len(tokens)
        return True

    def prefill(self, prompt: np.ndarray) -> int:
        """Make the KV cache hold `prompt` with logits for its last token; returns tokens reused."""
        # With the cache off (CACHE_RAM_MB=0) every prompt is evaluated in full.
        live = common_prefix(self._kv[:self.n_kv], prompt) if self.cache.enabled else 0
        if self.cache.enabled:
            entry, cached = self.cache.best(prompt)
            if entry is not None and cached >= live + MIN_RESTORE_GAIN:
                self._save()  # keep the conversation being replaced
                live = cached if self._restore(entry.state, entry.tokens) else 0
                self.cache.hits += 1
            elif live < len(prompt) // 2:
                self.cache.misses += 1
            if live < self.n_kv:
                self._save()
        # Keep at least one prompt token to evaluate: sampling needs its logits.
        keep = self._truncate(min(live, len(prompt) - 1))
        self._decode(prompt[keep:], keep)
        return keep

    def logprob(self, token: int) -> float:
        """log p(token) from the last decode's logits, read in place (no copy into Python)."""
        logits = np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
        top = float(logits.max())
        return float(logits[token]) - top - math.log(float(np.exp(logits - top).sum()))

    # -- sampling ---------------------------------------------------------------------------
    def sampler(self, params: SamplingParams):
        """A native sampler chain. top-k runs first, so the penalty and the rest work on k
        candidates rather than the whole vocabulary (262k entries for Gemma 3)."""
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        add = lambda s: lib.llama_sampler_chain_add(chain, s)  # noqa: E731
        if params.top_k > 0:
            add(lib.llama_sampler_init_top_k(params.top_k))
        if params.repeat_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
            add(lib.llama_sampler_init_penalties(self.n_vocab, PENALTY_LAST_N, params.repeat_penalty,
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

    # -- the loop ---------------------------------------------------------------------------
    def check_fits(self, prompt: np.ndarray, max_tokens: int) -> None:
        if len(prompt) + max_tokens > self.n_ctx:
            raise ContextOverflow(
                f"the prompt is {len(prompt)} tokens and max_length asks for {max_tokens} more, "
                f"but the context holds {self.n_ctx} tokens (N_CTX); shorten the prompt, lower "
                "max_length or raise N_CTX", field="prompt")

    def generate(self, prompt: np.ndarray, params: SamplingParams, reply: ReplyText,
                 started: float, result: list[Generation], deadline: float = math.inf,
                 on_token: Callable[[], None] = lambda: None) -> Iterator[str]:
        """Generate into `reply`, yielding the newly stable reply text after each token (often
        ""). The finished `Generation` is appended to `result`. Past `deadline` (perf_counter)
        generation stops with `RequestTimeout`; closing the iterator stops it at the next token."""
        self.check_fits(prompt, params.max_tokens)
        lib = self._lib
        reused = self.prefill(prompt)
        chain = self.sampler(params)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        emitted = ""
        n_tokens, logprob_sum, finish = 0, 0.0, "length"
        t_first = t_last = None
        try:
            while n_tokens < params.max_tokens:
                token = lib.llama_sampler_sample(chain, self.ctx, -1)
                t_last = time.perf_counter()
                t_first = t_first or t_last
                if self.is_eog(token):
                    finish = "eos"
                    break
                n_tokens += 1
                on_token()
                if t_last > deadline:
                    raise RequestTimeout(f"the request timed out after {t_last - started:.1f} s with "
                                         f"{n_tokens} tokens generated (REQUEST_TIMEOUT_S)")
                logprob_sum += self.logprob(token)
                stopped = reply.add(decoder.decode(self.piece(token)))
                if stopped:
                    finish = "stop"
                    break
                if n_tokens < params.max_tokens:
                    self.step(token)
                stable = reply.stable()
                yield stable[len(emitted):]
                emitted = stable
        finally:
            lib.llama_sampler_free(chain)
        if finish != "stop":
            reply.add(decoder.decode(b"", final=True))
        text = reply.final()
        if not text.startswith(emitted):  # would be a bug in ReplyText.stable: make it loud
            log.error("streamed text %r is not a prefix of the reply %r", emitted, text)
        if text[len(emitted):]:
            yield text[len(emitted):]
        ended = time.perf_counter()
        result.append(Generation(
            text=text, tokens=n_tokens, prompt_tokens=len(prompt), finish_reason=finish,
            ttft_s=(t_first or ended) - started, decode_s=(t_last or ended) - (t_first or ended),
            total_s=ended - started, mean_logprob=logprob_sum / n_tokens if n_tokens else 0.0,
            reused_tokens=reused))
