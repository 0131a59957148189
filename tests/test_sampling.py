"""The scheduler's sampling on the real model, in process: the plain-greedy shortcut."""

from __future__ import annotations

import pytest

from engine.generation import SamplingParams
from engine.patient import render_case_prompt
from engine.runtime import sampler_chain
from engine.scheduler import Scheduler
from tests.helpers import real_scheduler, submit

GREEDY = SamplingParams(max_tokens=48, temperature=0, repeat_penalty=1.0)


@pytest.fixture(scope="module")
def engine(default_model_file):
    eng = real_scheduler(default_model_file, n_ctx=1024, n_parallel=1)
    yield eng
    eng.close()


def generate(eng: Scheduler, prompt: str, params: SamplingParams):
    return submit(eng, prompt, params).wait()


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
