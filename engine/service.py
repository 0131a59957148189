"""One generation path under every API surface: the admission queue, the prompt checks, the
response cache, streaming or not, and the metrics, the same for the simulator, Ollama and OpenAI.

It knows nothing of HTTP: the API layer (engine/api/service.py) passes in what a request adds,
its access-log fields, its path and a check that its client is still there, and builds the
streamed response.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from engine.admission import QueueFull
from engine.chat import ChatPrompt, chat_prompt
from engine.generation import Generation, ReplyText, SamplingParams, StopRules
from engine.logs import log_prompt
from engine.model_manager import Lease, LoadedModel, ModelManager


DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


@dataclass
class Job:
    """One generation request, as every surface describes it."""

    prompt: str
    params: SamplingParams  # max_tokens <= 0: until the context is full
    new_reply: Callable[[], ReplyText]  # the surface's stop rules and cleaning
    cache_key: tuple  # what, beside prompt and params, makes the output differ (stops, cleaning)
    started: float = field(default_factory=time.perf_counter)
    deadline: float = 0.0  # time.perf_counter() by which it must be done (set by start())
    result: Generation | None = None
    model_name: str = ""
    adapters: list = field(default_factory=list)  # the LoRA adapters of the model that answered
    fields: dict = field(default_factory=dict)  # the access log's fields of this request (set by start())
    path: str = ""  # the endpoint asked, for the opt-in prompt history (set by start())


class Run:
    """A job submitted to a model's scheduler, holding a lease on that model until it ends.

    Creating it tokenizes the prompt (a prompt that does not fit is a 400) and queues it (a full
    queue is a 503), before any response starts. Iterating yields stable reply text as it comes
    (one item per token, often ""), after the wait for a free sequence slot; `wait()` blocks until
    the end instead. Afterwards `job.result` holds the `Generation`. `close()` cancels it and
    gives the lease back: safe at any time and more than once, also when iteration never started
    or stopped early (a client that went away). `start()` makes one. `client_gone`, when given,
    says that the client left: `wait()` then cancels the generation.
    """

    def __init__(self, host: ModelManager, lease: Lease, job: Job,
                 client_gone: Callable[[], bool] | None = None) -> None:
        self.host, self.lease, self.job = host, lease, job
        self.client_gone = client_gone
        self.seq = None
        self._hit: Generation | None = None
        self.model = model = lease.model
        job.model_name = model.name
        job.adapters = model.describe_adapters()
        if job.params.deterministic:
            self._hit = host.responses.get(_response_key(job, model))
            if self._hit is not None:
                return
        engine = model.engine
        tokens = engine.tokenize(job.prompt)
        if job.params.max_tokens <= 0:  # "until the context is full" (Ollama's num_predict -1)
            job.params = dataclasses.replace(job.params, max_tokens=max(model.n_ctx - len(tokens), 1))
        try:
            self.seq = engine.submit(tokens, job.params, job.new_reply(), job.started,
                                     job.deadline or job.started + host.settings.request_timeout_s)
        except QueueFull:
            host.metrics.rejections.inc()
            raise

    @property
    def load_seconds(self) -> float:
        """Seconds this request spent loading its model (0 when it was resident)."""
        return self.lease.load_seconds

    def __iter__(self) -> Iterator[str]:
        if self._hit is not None:
            self.close()
            yield self._cached().text
            return
        try:
            yield from self.seq.stream()
        finally:
            self.close()
        self._finished()

    def wait(self) -> Generation:
        """Run to the end without following it token by token (a non-streaming reply)."""
        if self._hit is not None:
            self.close()
            return self._cached()
        try:
            if self.client_gone is not None:
                # A client that left stops its generation within a second (the reply has no reader);
                # it then ends as Cancelled (499 in the access log).
                while not self.seq.done.wait(DISCONNECT_POLL_S):
                    if self.client_gone():
                        self.seq.cancel()
            self.seq.wait()
        finally:
            self.close()
        return self._finished()

    def _cached(self) -> Generation:
        """The response cache's reply, timed as this request."""
        self.host.metrics.cache_hits.labels(cache="response").inc()
        now = time.perf_counter()
        job = self.job
        job.result = dataclasses.replace(self._hit, cached=True, ttft_s=now - job.started,
                                         total_s=now - job.started, reused_tokens=self._hit.prompt_tokens)
        self._record(job.result)
        return job.result

    def _finished(self) -> Generation:
        job, metrics = self.job, self.host.metrics
        job.result = r = self.seq.result
        self._record(r)
        metrics.ttft.observe(r.ttft_s)
        metrics.prompt_tokens.inc(r.prompt_tokens)
        metrics.prompt_tokens_reused.inc(r.reused_tokens)
        if r.tokens > 1:
            metrics.tokens_per_second.observe(r.tokens_per_second)
        if job.params.deterministic:
            self.host.responses.put(_response_key(job, self.model), r)
        return r

    def close(self) -> None:
        if self.seq is not None and self.seq.result is None:
            self.seq.cancel()  # the scheduler drops it at its next step (it finishes before a close)
        self.lease.release()

    def _record(self, r: Generation) -> None:
        """Token counts into the access log; prompt and reply into the opt-in history only."""
        job = self.job
        job.fields.update(model=job.model_name, prompt_tokens=r.prompt_tokens, cached_prompt_tokens=r.reused_tokens,
                          tokens=r.tokens, ttft_ms=round(r.ttft_s * 1000, 1), finish_reason=r.finish_reason)
        log_prompt(job.fields.get("request_id", ""), job.path, job.prompt, r.text, job.model_name)


def start(host: ModelManager, name: str | None, make_job: Callable[[LoadedModel], Job], *,
          keep_alive_s: float | None = None, started: float | None = None, timeout_s: float | None = None,
          fields: dict | None = None, path: str = "", client_gone: Callable[[], bool] | None = None) -> Run:
    """Lease the model `name` means (the default when empty; loading it if need be, within the
    request's deadline), build the job for it (`make_job` may render a chat template with the
    model), and submit it. The deadline is REQUEST_TIMEOUT_S after `started`, or the client's
    shorter `timeout_s`. The lease ends with the run, or here if anything fails.

    From the caller: `fields`, the dict its access log is written from (the run adds the model and
    token counts); `path`, the endpoint the prompt history names; `client_gone`, a check that the
    client has left (a non-streaming run then stops)."""
    started = time.perf_counter() if started is None else started
    deadline = started + min(host.settings.request_timeout_s, timeout_s or math.inf)
    lease = host.acquire(name, keep_alive_s=keep_alive_s, deadline=deadline)
    try:
        job = make_job(lease.model)
        job.deadline = deadline
        if fields is not None:
            job.fields = fields
        job.path = path
        return Run(host, lease, job, client_gone)
    except BaseException:
        lease.release()
        raise


def complete(run: Run) -> str:
    """Run to the end; returns the reply text (`run.job.result` has the rest)."""
    try:
        return run.wait().text
    finally:
        run.close()


def _response_key(job: Job, model: LoadedModel) -> tuple:
    return (str(model.path), model.stamp, model.adapters, job.prompt, job.params, job.cache_key)


def json_job(prompt: str, params: SamplingParams, started: float) -> Job:
    """A job held to `params.grammar` whose reply is the JSON text, stripped, with no stop rules
    (the simulator's `json_schema`: its speaker-turn stops would cut the JSON)."""
    return Job(prompt=prompt, params=params, started=started, cache_key=("json",),
               new_reply=lambda: ReplyText(StopRules()))


def stop_key(stop: Sequence[str] | None) -> tuple:
    return ("default",) if stop is None else ("stop", *stop)


def chat_prompt_for(model: LoadedModel, messages: Sequence[dict[str, str]], template: str | None = None) -> ChatPrompt:
    """`messages` rendered for `model` with `template` (a preset's), else its GGUF chat template, else
    the fallback transcript. The caller holds a lease on `model` (its vocabulary is read)."""
    bos, eos, adds_bos = model.engine.special_token_text()
    return chat_prompt(template or model.metadata.get("tokenizer.chat_template"), messages, bos_token=bos,
                       eos_token=eos, tokenizer_adds_bos=adds_bos)


def plain_job(prompt: str, params: SamplingParams, stops: Sequence[str], started: float) -> Job:
    """A job whose reply is the raw model text (no cleaning), ended by `stops`: the Ollama and
    OpenAI surfaces. A reply held to a grammar (structured output) ends where the grammar lets
    it: stop strings, the client's or a chat template's, would cut the JSON short, so they do not
    apply to it (docs/api.md)."""
    stops = () if params.grammar else tuple(stops)
    return Job(prompt=prompt, params=params, started=started, cache_key=("plain", *stops),
               new_reply=lambda: ReplyText(StopRules(strings=stops), clean=lambda text: text))