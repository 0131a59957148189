"""Prefix sharing on the real model: a classmate's case prompt copied from another sequence gives
the same reply, bit for bit, as reading the whole prompt cold; a class arriving at once reads its
case prompt once.

The copy is llama.cpp's own whole-stream copy between KV streams (`llama_memory_seq_cp`, kv_unified
off), cut back to the shared prefix: the same bits at the same cells as in the donor, so the rules
that keep the conversation cache exact (engine/slot_policy.py) keep this exact too, including
prompts past Gemma 3's 512-token sliding window (the SWA cache is full size, and the copy takes all
of it)."""

from __future__ import annotations

import threading

import pytest

from engine.patient import render_case_prompt
from tests.helpers import cache_scheduler, long_history, simulator_reply

QUESTIONS = ["¿Qué te trae por acá?", "¿Cómo dormís últimamente?", "¿Con quién vivís?", "¿Tomás alguna medicación?"]


def student_prompt(case: dict, exchanges: int, question: str) -> str:
    turns = long_history(case, exchanges)
    return render_case_prompt(dict(case, turnos=turns[:-1] + [["Estudiante", question]]))


@pytest.fixture(scope="module")
def fresh(default_model_file):
    eng = cache_scheduler(default_model_file, cache=False, n_parallel=1)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def fresh_flash(default_model_file):
    eng = cache_scheduler(default_model_file, cache=False, n_parallel=1, flash_attn="on")
    yield eng
    eng.close()


@pytest.mark.parametrize("exchanges, flash_attn", [
    (0, "off"), (20, "off"),  # a short case prompt, and one past the sliding window
    (20, "on"),  # flash attention (the engine's default): the copy is exact there too
])
def test_a_copied_case_prompt_answers_as_a_cold_read(default_model_file, request, cases, exchanges, flash_attn):
    """Students one after the other on each case: the first reads the case, each next one copies it
    from a classmate's sequence (busy or done) and reads only their question (64 tokens at least
    with flash attention), and every reply (text and confianza) is the one a cold read of the whole
    prompt gives."""
    fresh = request.getfixturevalue("fresh_flash" if flash_attn == "on" else "fresh")
    eng = cache_scheduler(default_model_file, cache=True, n_parallel=4, flash_attn=flash_attn)
    try:
        for case in cases:
            shared_before = eng.shared_tokens
            for i, question in enumerate(QUESTIONS):
                prompt = student_prompt(case, exchanges, question)
                a, b = simulator_reply(eng, prompt), simulator_reply(fresh, prompt)
                assert (a.text, a.mean_logprob) == (b.text, b.mean_logprob), (case["id"], question)
                if i:  # everything but the question is shared
                    question_rows = 24 if flash_attn == "off" else 64 + 4
                    assert a.reused_tokens > a.prompt_tokens - question_rows, (a.reused_tokens, a.prompt_tokens)
            assert eng.shared_tokens > shared_before
        assert eng.cache.hits == 0  # it was sharing, not the conversation cache's saved states
    finally:
        eng.close()


def test_a_class_arriving_at_once_reads_the_case_once(default_model_file, cases):
    """Four students of one case at once: one reads the case prompt, the other three wait for it and
    copy it; the prompt tokens read are about one case plus four questions."""
    eng = cache_scheduler(default_model_file, cache=True, n_parallel=4)
    try:
        prompts = [student_prompt(cases[0], 20, q) for q in QUESTIONS]
        results = [None] * 4

        def ask(i: int) -> None:
            results[i] = simulator_reply(eng, prompts[i])

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert all(r is not None and r.text for r in results)
        read = sum(r.prompt_tokens - r.reused_tokens for r in results)
        longest = max(r.prompt_tokens for r in results)
        assert read < longest + 4 * 40, (read, longest)
        assert sorted(r.reused_tokens > 0 for r in results) == [False, True, True, True]
    finally:
        eng.close()


def make_with_disk(model_file, folder, flash_attn: str = "off"):
    from engine.disk_cache import DiskCache

    return cache_scheduler(model_file, cache=True, n_parallel=2, disk=DiskCache(folder, 1 << 30, "gemma"),
                           flash_attn=flash_attn)


def test_the_case_prompt_survives_a_restart_on_disk(default_model_file, fresh, cases, tmp_path):
    """Two students share a case prompt (past the sliding window): the engine saves it to disk. A
    new engine (a restart) answers the next student's first turn reading only their own part, with
    the reply a cold read gives. A corrupt file is removed and the prompt read in full, same reply."""
    prompts = [student_prompt(cases[1], 20, q) for q in QUESTIONS]
    eng = make_with_disk(default_model_file, tmp_path)
    try:
        simulator_reply(eng, prompts[0])
        assert simulator_reply(eng, prompts[1]).reused_tokens > 0
    finally:
        eng.close()  # the file being written is finished first
    files = list(tmp_path.glob("gemma/*.kv"))
    assert len(files) == 1
    eng = make_with_disk(default_model_file, tmp_path)
    try:
        a, b = simulator_reply(eng, prompts[2]), simulator_reply(fresh, prompts[2])
        assert (a.text, a.mean_logprob) == (b.text, b.mean_logprob)
        assert a.reused_tokens > a.prompt_tokens - 24 - 64, (a.reused_tokens, a.prompt_tokens)
        assert eng.disk.stats["hits"] == 1
    finally:
        eng.close()
    data = bytearray(files[0].read_bytes())
    data[-100] ^= 0xFF
    files[0].write_bytes(bytes(data))
    eng = make_with_disk(default_model_file, tmp_path)
    try:
        a, b = simulator_reply(eng, prompts[3]), simulator_reply(fresh, prompts[3])
        assert (a.text, a.mean_logprob) == (b.text, b.mean_logprob) and a.reused_tokens == 0
        assert not files[0].exists() and eng.disk.stats["corrupt"] == 1
    finally:
        eng.close()


def test_with_flash_attention_the_restarted_case_prompt_is_close(default_model_file, fresh_flash, cases, tmp_path):
    """With flash attention (the default) the case prompt is saved and restored after a restart as
    well, so the next class reads only its own part; the restored state past the sliding window is
    the one place the cache is close rather than bit for bit (engine/slot_policy.py): the same text
    at temperature 0, a mean log-probability within 1e-2."""
    prompts = [student_prompt(cases[1], 20, q) for q in QUESTIONS]
    eng = make_with_disk(default_model_file, tmp_path, "on")
    try:
        simulator_reply(eng, prompts[0])
        assert simulator_reply(eng, prompts[1]).reused_tokens > 0
    finally:
        eng.close()
    assert len(list(tmp_path.glob("gemma/*.kv"))) == 1
    eng = make_with_disk(default_model_file, tmp_path, "on")
    try:
        for prompt in prompts[2:]:
            a, b = simulator_reply(eng, prompt), simulator_reply(fresh_flash, prompt)
            assert a.text == b.text and abs(a.mean_logprob - b.mean_logprob) < 1e-2
            assert a.reused_tokens > a.prompt_tokens - 24 - 2 * 64, (a.reused_tokens, a.prompt_tokens)
        assert eng.disk.stats["hits"] >= 1
    finally:
        eng.close()


def test_one_classmate_saves_the_case_and_the_others_copy_all_they_can(tmp_path):
    """A class arriving at once on a case past the sliding window, with the prompt cache on disk:
    the first copier saves the case (its copy ends where a saved state restores: the window on a
    multiple of SWA_ALIGN, min_rows before the students part) and reads on from there; the others
    copy all they can and read only their own part, instead of each cutting its copy back to the
    same save point and saving the same file again (fake runtime: exact about what is read)."""
    from engine.disk_cache import DiskCache
    from engine.generation import SamplingParams
    from engine.prompt_cache import common_prefix
    from engine.slot_policy import SlotPolicy
    from tests.helpers import fake_scheduler, submit

    case = "Sos Martina, 34 años, consultás por ataques de pánico en el subte. " * 40 + "Estudiante: "
    questions = ["¿Qué te pasa?", "¿Desde cuándo?", "¿Con quién vivís?", "¿Dormís bien?"]
    eng = fake_scheduler("a.gguf", n_parallel=4, n_batch=512, n_ctx=8192, n_swa=512, flash_attn="on",
                         reply="x" * 4, cache_bytes=64 << 20, disk=DiskCache(tmp_path, 1 << 30, "fake"))
    try:
        prompts = [eng.tokenize(case + q + "\nPaciente:") for q in questions]
        policy = SlotPolicy(n_swa=512, flash_attn=True, cache_enabled=True)
        common = min(common_prefix(prompts[0], p) for p in prompts[1:])
        best = policy.resume_point(common, min(len(p) for p in prompts))
        save = policy.state_point(policy.resume_point(common, common))
        assert save < best - 8, (save, best)  # the test tells the two apart
        with eng._cond:  # all four placed at the same step
            seqs = [submit(eng, case + q + "\nPaciente:", SamplingParams(temperature=0, max_tokens=4))
                    for q in questions]
        results = [s.wait() for s in seqs]
    finally:
        eng.close()  # the file being written is finished first
    reused = sorted(r.reused_tokens for r in results)
    assert reused[0] == 0 and reused[1] == save and min(reused[2:]) >= best, (reused, save, best)
    assert len(list(tmp_path.glob("fake/*.kv"))) == 1
