"""From a row of logits to a request's reply: the next token (the argmax in place for plain
greedy, the sequence's sampler chain otherwise, sampled again with the end banned when a reply
that must say something would end empty), its log-probability, the stop rules, the stable text
streamed as it comes, and at the end the request's Generation."""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

import numpy as np

from engine.generation import Generation
from engine.runtime import Runtime
from engine.sequence import Sequence

log = logging.getLogger(__name__)

MAX_BANNED_ENDS = 8  # end-of-generation tokens a reply that must say something may ban in turn


class Replier:
    """`observe_reply(seconds, tokens)` hears of every request that completes (Admission's)."""

    def __init__(self, runtime: Runtime, observe_reply: Callable[[float, int], None], metrics=None) -> None:
        self.runtime, self.observe_reply, self.metrics = runtime, observe_reply, metrics

    def sample(self, seq: Sequence, index: int) -> str:
        """Sample `seq`'s next token from logits row `index` and add it to the reply. Returns why
        the reply ends ("eos", "stop", "length"; the caller then finishes it), or "" to go on."""
        rt = self.runtime
        logits = rt.logits(index)
        if seq.chain is None:  # plain greedy: the argmax, read in place (see runtime.sampler_chain)
            token = int(logits.argmax())
        else:
            token = rt.sample(seq.chain, index)
        if seq.reply.require_text and rt.is_eog(token) and not seq.reply.text.strip() and not seq.params.grammar:
            token = self._sample_without_end(seq, index, token)
        now = time.perf_counter()
        seq.t_last = now
        seq.t_first = seq.t_first or now
        if rt.is_eog(token):
            return "eos"
        seq.n_tokens += 1
        if self.metrics is not None:
            self.metrics.generated_tokens.inc()
        seq.logprob_sum += _logprob(logits, token)
        if seq.reply.add(seq.decoder.decode(rt.piece(token))):
            return "stop"
        if seq.n_tokens >= seq.params.max_tokens:
            return "length"
        seq.pending_token = token
        stable = seq.reply.stable()
        seq.out.put(stable[len(seq.emitted):])
        seq.emitted = stable
        return ""

    def _sample_without_end(self, seq: Sequence, index: int, token: int) -> int:
        """A reply that must say something may not end before its first word: sample again with
        the end-of-generation tokens banned (a fine-tuned persona can learn to stop at once)."""
        banned: list[int] = []
        while self.runtime.is_eog(token) and len(banned) < MAX_BANNED_ENDS:
            banned.append(token)
            token = self.runtime.sample_banning(seq.params, index, banned)
        return token

    def complete(self, seq: Sequence, finish: str) -> None:
        """`seq.result`, and the rest of its text to its stream."""
        if finish != "stop":
            seq.reply.add(seq.decoder.decode(b"", final=True))
        text = seq.reply.final()
        if not text.startswith(seq.emitted):  # would be a bug in ReplyText.stable: make it loud
            log.error("streamed text %r is not a prefix of the reply %r", seq.emitted, text)
        ended = time.perf_counter()
        self.observe_reply(ended - seq.started, seq.n_tokens)
        t_first = seq.t_first or ended
        seq.result = Generation(
            text=text, tokens=seq.n_tokens, prompt_tokens=len(seq.tokens), finish_reason=finish,
            ttft_s=t_first - seq.started, decode_s=(seq.t_last or ended) - t_first, total_s=ended - seq.started,
            mean_logprob=seq.logprob_sum / seq.n_tokens if seq.n_tokens else 0.0, reused_tokens=seq.reused)
        if text[len(seq.emitted):]:
            seq.out.put(text[len(seq.emitted):])


def _logprob(logits: np.ndarray, token: int) -> float:
    """log p(token) from a row of llama.cpp's logits, worked on in place: no copy into Python
    and no temporary arrays (262k floats each). It overwrites the row, so it must be the
    row's last reader (sampling is done; the next decode refills it)."""
    top = logits.max()
    chosen = float(logits[token])
    np.subtract(logits, top, out=logits)
    np.exp(logits, out=logits)
    return chosen - float(top) - math.log(float(logits.sum()))
