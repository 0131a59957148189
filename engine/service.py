"""One generation path under every API surface: prepare (validate against the model), run
(stream or not), with the response cache in front and the model host's lock around the context."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from engine.chat import ChatPrompt, chat_prompt
from engine.generation import Generation, ReplyText, SamplingParams, StopRules
from engine.model_host import LoadedModel, ModelHost


@dataclass
class Job:
    """One generation request, as every surface describes it."""

    prompt: str
    params: SamplingParams  # max_tokens <= 0: until the context is full
    new_reply: Callable[[], ReplyText]  # the surface's stop rules and cleaning
    cache_key: tuple  # what, beside prompt and params, makes the output differ (stops, cleaning)
    started: float = field(default_factory=time.perf_counter)
    result: Generation | None = None
    model_name: str = ""
    _model: LoadedModel | None = None
    _tokens: np.ndarray | None = None


def prepare(host: ModelHost, job: Job) -> None:
    """Tokenize and check the prompt fits, so a bad request fails before any response starts."""
    with host.use() as model:
        job._model, job.model_name = model, model.name
        job._tokens = model.session.tokenize(job.prompt)
        if job.params.max_tokens <= 0:  # "until the context is full" (Ollama's num_predict -1)
            room = model.n_ctx - len(job._tokens)
            job.params = dataclasses.replace(job.params, max_tokens=max(room, 1))
        model.session.check_fits(job._tokens, job.params.max_tokens)


def run(host: ModelHost, job: Job) -> Iterator[str]:
    """Generate, yielding stable reply text as it comes (one item per token, often ""); then
    `job.result` holds the finished `Generation`. Closing the iterator early stops generating."""
    if job.params.deterministic:
        hit = host.responses.get(_response_key(job))
        if hit is not None and job._model is host.current:
            now = time.perf_counter()
            job.result = dataclasses.replace(hit, cached=True, ttft_s=now - job.started,
                                             total_s=now - job.started, reused_tokens=hit.prompt_tokens)
            yield hit.text
            return
    with host.use() as model:
        if model is not job._model:  # swapped since prepare(): tokens of the new model
            job._model, job.model_name = model, model.name
            job._tokens = model.session.tokenize(job.prompt)
        result: list[Generation] = []
        yield from model.session.generate(job._tokens, job.params, job.new_reply(), job.started, result)
    job.result = result[0]
    if job.params.deterministic:
        host.responses.put(_response_key(job), job.result)


def _response_key(job: Job) -> tuple:
    return (str(job._model.path), job.prompt, job.params, job.cache_key)


def complete(host: ModelHost, job: Job) -> Generation:
    """Run to the end and return the `Generation`."""
    prepare(host, job)
    for _ in run(host, job):
        pass
    return job.result


def stop_key(stop: Sequence[str] | None) -> tuple:
    return ("default",) if stop is None else ("stop", *stop)


def chat_prompt_for(model: LoadedModel, messages: Sequence[dict[str, str]]) -> ChatPrompt:
    """`messages` rendered for `model` with its GGUF chat template (or the fallback transcript)."""
    bos, eos, adds_bos = model.session.special_token_text()
    return chat_prompt(model.metadata.get("tokenizer.chat_template"), messages, bos_token=bos,
                       eos_token=eos, tokenizer_adds_bos=adds_bos)


def plain_reply(stops: Sequence[str]) -> Callable[[], ReplyText]:
    """Raw model text (no cleaning), ended by `stops`: the Ollama and OpenAI surfaces."""
    rules_stops = tuple(stops)
    return lambda: ReplyText(StopRules(strings=rules_stops), clean=lambda text: text)
