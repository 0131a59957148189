"""The token loop: prompt → tokens, native sampling, incremental detokenization, stop strings.

Sampling runs in llama.cpp's native sampler chain (via `Llama.generate`); Python sees one token id
per step. Text is decoded incrementally (bytes of each new piece through a UTF-8 incremental
decoder, so multi-byte characters split across tokens come out whole) and stop strings are
searched only in the tail that a new piece can complete, never in the whole text again.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from engine.errors import ContextOverflow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings. The defaults keep the default model's patient replies from looping."""

    max_tokens: int = 150
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    seed: int | None = None


@dataclass
class StopRules:
    """Where a reply ends: literal stop strings and (optionally) regex patterns.

    Matching starts only once the reply has visible text, so a model that opens its turn with a
    newline is not cut to an empty reply.
    """

    strings: Sequence[str] = ()
    patterns: Sequence[re.Pattern[str]] = ()
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
        for p in self.patterns:
            m = p.search(text, window_start)
            if m and (best < 0 or m.start() < best):
                best = m.start()
        return best


class ReplyText:
    """Text generated so far, fed piece by piece; `add` says when a stop rule has ended it."""

    def __init__(self, stops: StopRules) -> None:
        self.stops = stops
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


@dataclass
class Generation:
    """What one generation produced, with its timings."""

    text: str
    tokens: int
    prompt_tokens: int
    finish_reason: str  # "stop" (a stop string), "eos" (end of sequence) or "length" (max_tokens)
    ttft_s: float
    decode_s: float
    total_s: float
    mean_logprob: float

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


def token_piece(llm, token: int, buf: ctypes.Array) -> bytes:
    """The bytes of one token, growing the buffer for long pieces (llama.cpp returns -needed)."""
    import llama_cpp

    n = llama_cpp.llama_token_to_piece(llm._model.vocab, token, buf, len(buf), 0, False)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(llm._model.vocab, token, buf, len(buf), 0, False)
    return buf.raw[:n]


def count_prompt_tokens(llm, prompt: str) -> list[int]:
    """Tokenize a prompt as the model sees it (BOS added when the model wants one)."""
    return llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)


def generate(llm, prompt: str, params: SamplingParams, stops: StopRules,
             started: float | None = None) -> Generation:
    """Generate a reply to `prompt`. `started` (perf_counter) is when the request arrived."""
    import llama_cpp

    started = time.perf_counter() if started is None else started
    prompt_ids = count_prompt_tokens(llm, prompt)
    n_ctx = llm.n_ctx()
    if len(prompt_ids) + params.max_tokens > n_ctx:
        raise ContextOverflow(
            f"the prompt is {len(prompt_ids)} tokens and max_length asks for {params.max_tokens} more, "
            f"but the context holds {n_ctx} tokens (N_CTX); shorten the prompt, lower max_length or "
            "raise N_CTX", field="prompt")

    llm.set_seed(llama_cpp.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF)
    vocab = llm._model.vocab
    n_vocab = llm.n_vocab()
    buf = ctypes.create_string_buffer(64)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    reply = ReplyText(stops)
    n_tokens = 0
    logprob_sum = 0.0
    finish = "length"
    t_first = t_last = None

    for token in llm.generate(prompt_ids, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
                              temp=params.temperature, repeat_penalty=params.repeat_penalty):
        now = time.perf_counter()
        if t_first is None:
            t_first = now
        t_last = now
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            finish = "eos"
            break
        n_tokens += 1
        logprob_sum += _logprob(llm, token, n_vocab)
        if reply.add(decoder.decode(token_piece(llm, token, buf))):
            finish = "stop"
            break
        if n_tokens >= params.max_tokens:
            break
    if finish != "stop":
        reply.add(decoder.decode(b"", final=True))
    text = reply.text
    ended = time.perf_counter()
    return Generation(
        text=text, tokens=n_tokens, prompt_tokens=len(prompt_ids), finish_reason=finish,
        ttft_s=(t_first or ended) - started, decode_s=(t_last or ended) - (t_first or ended),
        total_s=ended - started, mean_logprob=logprob_sum / n_tokens if n_tokens else 0.0)


def _logprob(llm, token: int, n_vocab: int) -> float:
    """log p(token) from the last decode's logits, read in place (no copy into Python)."""
    import llama_cpp

    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
    top = float(logits.max())
    return float(logits[token]) - top - math.log(float(np.exp(logits - top).sum()))
