"""The scheduler's sampling on the real model, in process: the plain-greedy shortcut."""

from __future__ import annotations

import time

import pytest

from engine.generation import ReplyText, SamplingParams, StopRules
from engine.patient import render_case_prompt
from engine.runtime import LlamaRuntime, sampler_chain
from engine.scheduler import Scheduler

GREEDY = SamplingParams(max_tokens=48, temperature=0, repeat_penalty=1.0)


@pytest.fixture(scope="module")
def engine(default_model_file):
    import llama_cpp as L

    runtime = LlamaRuntime(default_model_file, n_ctx=1024, n_parallel=1, n_batch=512, n_threads=2,
                           n_threads_batch=2, n_gpu_layers=0, flash_attn="off", kv_type=L.GGML_TYPE_F16)
    eng = Scheduler(runtime, cache_bytes=0, max_queue=4)
    yield eng
    eng.close()


def generate(eng: Scheduler, prompt: str, params: SamplingParams):
    started = time.perf_counter()
    seq = eng.submit(eng.tokenize(prompt), params, ReplyText(StopRules()), started, started + 120)
    return seq.wait()


def test_plain_greedy_takes_the_argmax_and_matches_llama_cpp_greedy_sampler(engine, cases, monkeypatch):
    """Temperature 0 without penalties skips llama.cpp's sampler (its 262k-entry candidate array)
    and takes numpy's argmax of the logits: the same tokens, hence the same text and confianza,
    as llama.cpp's own greedy sampler on every fixture case."""
    import llama_cpp as L

    n_vocab = engine.runtime.n_vocab
    assert sampler_chain(L, n_vocab, GREEDY) is None  # the shortcut is what runs below
    assert sampler_chain(L, n_vocab, SamplingParams(temperature=0)) is not None  # penalised: native
    fast = [generate(engine, render_case_prompt(c), GREEDY) for c in cases]
    monkeypatch.setattr(engine.runtime, "new_sampler", lambda params, native=False: sampler_chain(L, n_vocab, params,
                                                                                                  native=True))
    native = [generate(engine, render_case_prompt(c), GREEDY) for c in cases]
    for f, n in zip(fast, native):
        assert f.tokens == n.tokens == GREEDY.max_tokens and f.text
        assert f.text == n.text
        assert f.mean_logprob == pytest.approx(n.mean_logprob, abs=1e-6)
