"""One embedding path under every API surface (Ollama's /api/embed and /api/embeddings, OpenAI's
/v1/embeddings), held to the same rules as generation (engine/service.py):

- the model is leased (engine/model_manager.py), loading it if need be within the request's
  deadline, so it cannot be freed while an embedding is read;
- admission: one embedding at a time per model (`Embedder`); a request that would wait while
  MAX_QUEUE requests already wait for that model, generation and embeddings counted together, is
  refused with 503 and Retry-After; one the measured speed says cannot finish by its deadline is
  refused at once (503 + Retry-After); a deadline (REQUEST_TIMEOUT_S, or the client's) that passes
  while it waits is a 504;
- the metrics (requests by route, rejections, timeouts, tokens read) and the access log's fields
  (model, tokens) are the generation path's.

The embedding context of a model is made on its first embedding request and counted in the memory
budget then (engine/embedding.py); it is freed with the model.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from engine.admission import DeadlineUnreachable, QueueFull, RequestTimeout
from engine.embedding import MAX_INPUTS, EmbeddingContext, context_bytes, pooling_of
from engine.errors import BadRequest, ContextOverflow
from engine.model_manager import LoadedModel, ModelManager
from engine.runtime import Turn
from engine.sequence import Cancelled

log = logging.getLogger(__name__)


@dataclass
class EmbedResult:
    """What a surface shapes its reply from: one raw (un-normalized) vector per input, in order."""

    vectors: list[np.ndarray]
    model_name: str
    prompt_tokens: int
    load_seconds: float
    total_seconds: float = 0.0
    truncated: int = 0  # inputs cut to the context


@dataclass
class EmbedRequest:
    """An embedding request as every surface describes it. Each input is a text, or token ids
    (OpenAI's token arrays, used as given). `truncate`: cut an input longer than the context to fit
    (else a 400); `num_ctx`: Ollama's option, a smaller limit than the context's."""

    inputs: list
    truncate: bool = True
    num_ctx: int | None = None
    keep_alive_s: float | None = None
    timeout_s: float | None = None
    overflow_hint: str = ""  # how this surface's client can avoid the overflow 400, after "; shorten it"
    started: float = field(default_factory=time.perf_counter)


class Embedder:
    """A resident model's embedding side: its context, and who may use it now. One request reads
    at a time; the others wait in arrival order (a Turn), up to their deadline."""

    def __init__(self, context: EmbeddingContext, metrics) -> None:
        self.context, self.metrics = context, metrics
        self._turn = Turn()
        self._lock = threading.Lock()
        self.waiting = 0  # requests waiting for the context
        self.busy = False

    def admit(self, engine, max_queue: int, work_tokens: int, deadline: float) -> None:
        """Take the context, or refuse: 503 when it would wait and MAX_QUEUE requests already wait
        for this model (its generation queue counted); 503 when the measured speed says the work
        ahead cannot finish by the deadline; 504 when the deadline passes while waiting."""
        with self._lock:
            queued = self.waiting + (engine.waiting if hasattr(engine, "waiting") else 0)
            if self.busy and queued >= max_queue:
                self.metrics.rejections.inc()
                retry = max(1, round(getattr(engine, "recent_s", 2.0)))
                raise QueueFull(f"the engine is busy: {queued} requests are already waiting for this model "
                                f"(MAX_QUEUE={max_queue}); retry shortly", retry)
            self._refuse_unreachable(engine, work_tokens, deadline)
            self.waiting += 1
        try:
            taken = self._turn.acquire(max(0.0, deadline - time.perf_counter()))
        finally:
            with self._lock:
                self.waiting -= 1
        if not taken:
            self.metrics.timeouts.inc()
            raise RequestTimeout("the request timed out waiting for the model's embedding context (REQUEST_TIMEOUT_S)")
        with self._lock:
            self.busy = True

    def _refuse_unreachable(self, engine, work_tokens: int, deadline: float) -> None:
        """The scheduler's measured cost of a prompt token, times the tokens to read (this
        request's and those waiting before it, guessed alike), against the time left."""
        estimator = getattr(engine, "estimator", None)
        if estimator is None or not estimator.ready:
            return
        seconds = work_tokens * (1 + self.waiting + self.busy) * estimator.row_s
        left = deadline - time.perf_counter()
        if seconds > left:
            self.metrics.deadline_rejections.inc()
            retry = max(1, math.ceil(seconds - left))
            raise DeadlineUnreachable(f"the engine cannot answer within this request's deadline: about {seconds:.1f} s "
                                      f"of work is ahead and {max(left, 0):.1f} s are left; retry in {retry} s", retry)

    def release(self) -> None:
        with self._lock:
            self.busy = False
        self._turn.release()

    def close(self) -> None:
        self.context.close()


def embedder_of(host: ModelManager, model: LoadedModel, deadline: float) -> Embedder:
    """The model's Embedder, made on first use: its context is planned into the memory budget
    (which may unload idle models) before llama.cpp allocates it. The caller holds a lease."""
    with model.embed_lock:
        if model.embedder is not None:
            return model.embedder
        runtime = model.engine.runtime
        if not hasattr(runtime, "turn"):
            raise BadRequest(f"model '{model.name}' cannot give embeddings in this engine", field="model")
        pooling = pooling_of(model.metadata)
        s = host.settings
        try:
            ram = context_bytes(model.path, pooling, n_ctx=s.n_ctx, n_batch=s.n_batch, flash_attn=s.flash_attn != "off")
        except Exception:  # the planner cannot read this file: count what a chunk's buffers take at least
            ram = 64 << 20
        host.grow(model, ram, deadline)
        try:
            context = EmbeddingContext(runtime, pooling, n_ctx=s.n_ctx, n_batch=s.n_batch, n_threads=s.n_threads,
                                       n_threads_batch=s.n_threads_batch, flash_attn=s.flash_attn)
        except BaseException:
            host.grow(model, -ram, None)
            raise
        model.embedder = Embedder(context, host.metrics)
        return model.embedder


def embed(host: ModelManager, name: str | None, req: EmbedRequest, fields: dict | None = None,
          client_gone: Callable[[], bool] | None = None) -> EmbedResult:
    """Lease the model `name` means (the default when empty), tokenize and fit every input, wait
    for the model's embedding context, and read one vector per input, in order. `fields`: the
    access log's fields of the request; `client_gone`: a check that the client left (the reading
    then stops before the next input, as a non-streaming generation does)."""
    if len(req.inputs) > MAX_INPUTS:
        raise BadRequest(f"'input' has {len(req.inputs)} entries; at most {MAX_INPUTS} are allowed", field="input")
    deadline = req.started + min(host.settings.request_timeout_s, req.timeout_s or math.inf)
    lease = host.acquire(name, keep_alive_s=req.keep_alive_s, deadline=deadline)
    try:
        model = lease.model
        if fields is not None:
            fields["model"] = model.name
        embedder = embedder_of(host, model, deadline)
        tokens, truncated = _fit_all(model, embedder.context, req)
        n_tokens = sum(len(t) for t in tokens)
        embedder.admit(model.engine, host.settings.max_queue, n_tokens, deadline)
        try:
            vectors = []
            for t in tokens:
                if client_gone is not None and client_gone():  # nobody would read the reply
                    raise Cancelled("the client went away")
                vectors.append(embedder.context.embed(t, lambda: max(0.0, deadline - time.perf_counter())))
        except TimeoutError:
            host.metrics.timeouts.inc()
            raise RequestTimeout("the request timed out while its inputs were read (REQUEST_TIMEOUT_S)") from None
        finally:
            embedder.release()
        host.metrics.embedding_inputs.inc(len(tokens))
        host.metrics.embedding_tokens.inc(n_tokens)
        if fields is not None:
            fields.update(prompt_tokens=n_tokens, inputs=len(tokens), truncated_inputs=truncated)
        return EmbedResult(vectors, model.name, n_tokens, lease.load_seconds,
                           time.perf_counter() - req.started, truncated)
    finally:
        lease.release()


def _fit_all(model: LoadedModel, context: EmbeddingContext, req: EmbedRequest) -> tuple[list[np.ndarray], int]:
    """Every input as tokens within the limit (the context's, or a smaller `num_ctx`): cut when
    `truncate`, else a 400 naming the input; token ids outside the vocabulary are a 400."""
    limit = min(context.limit, req.num_ctx) if req.num_ctx else context.limit
    out, truncated = [], 0
    for i, item in enumerate(req.inputs):
        where = "input" if len(req.inputs) == 1 else f"input[{i}]"
        if isinstance(item, str):
            tokens = model.engine.tokenize(item)
        else:
            bad = [t for t in item if not 0 <= t < context.n_vocab]  # before numpy: ids past int64 too
            tokens = np.asarray(item if not bad else [], dtype=np.int64)
            if len(bad):
                raise BadRequest(f"'{where}' has the token id {int(bad[0])}, but the model's vocabulary holds "
                                 f"{context.n_vocab} tokens", field="input")
            tokens = tokens.astype(np.int32)
        if len(tokens) == 0:
            raise BadRequest(f"'{where}' gives no tokens to embed", field="input")
        if len(tokens) > limit:
            if not req.truncate:
                raise ContextOverflow(
                    f"the input length exceeds the context length: '{where}' is {len(tokens)} tokens, but the "
                    f"context holds {limit} tokens for embeddings; shorten it{req.overflow_hint}", field="input")
            tokens = context.fit(tokens, limit)
            truncated += 1
        out.append(tokens)
    return out, truncated
