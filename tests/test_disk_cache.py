"""The prompt cache on disk (engine/disk_cache.py) on plain token arrays and byte strings, no model.

What it promises the scheduler: the longest saved prefix of a prompt, and only bytes that verify
(a corrupt, truncated, foreign or planted file is removed, never loaded); LRU by size within a
budget; atomic private writes; a restart finds what was saved; and no exception from the disk.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from pathlib import Path

import numpy as np
import pytest

from engine import disk_cache
from engine.disk_cache import _HEADER, DiskCache, default_cache_dir, model_identity, token_key

MODEL = "0123456789abcdef"
SECRET = 31337  # tokens are SECRET..SECRET+999: health data, never to appear in a log
TOKEN_IN_TEXT = re.compile(r"\b3[12]\d{3}\b")


def toks(n: int, seed: int = 0) -> np.ndarray:
    """`n` tokens of one prompt; another seed is another prompt."""
    return np.random.default_rng(seed).integers(SECRET, SECRET + 1000, size=n, dtype=np.int32)


def state(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed + 1000).bytes(n)


def file_size(tokens: np.ndarray, state_len: int) -> int:
    return _HEADER.size + 4 * len(tokens) + state_len


def files(cache: DiskCache) -> list[str]:
    return sorted(os.listdir(cache.dir))


@pytest.fixture
def folder(tmp_path) -> Path:
    return tmp_path / "cache"


def test_round_trip(folder):
    cache = DiskCache(folder, 1 << 20, MODEL)
    prompt, s = toks(300), state(5000)
    assert cache.enabled and cache.longest(prompt) is None and not cache.contains(prompt)
    cache.put(prompt, s)
    assert cache.contains(prompt) and not cache.contains(prompt[:-1])
    n, path = cache.longest(prompt)
    assert (n, path) == (300, cache.dir / token_key(prompt))
    assert cache.load(n, path) == s
    assert files(cache) == [token_key(prompt)]
    assert cache.stats == {"entries": 1, "bytes": file_size(prompt, 5000), "hits": 1, "misses": 1, "writes": 1,
                           "evictions": 0, "corrupt": 0}
    assert cache.longest(toks(300, seed=1), count=False) is None  # a look that serves no request (background reads)
    assert cache.stats["misses"] == 1


BASE = toks(400)
SAVED = [10, 64, 100, 128, 130, 200]  # prefixes of BASE, around 64-token block boundaries
OTHER = np.concatenate([BASE[:150], toks(100, seed=1)])  # shares 150 tokens with BASE, then diverges
ALTERED = BASE.copy()
ALTERED[70] += 1


@pytest.mark.parametrize("prompt,usable,expected", [
    (BASE, None, 200),
    (BASE[:200], None, 200),
    (BASE[:199], None, 130),  # a prompt shorter than a saved prefix does not match it
    (BASE[:130], None, 130),
    (BASE[:129], None, 128),
    (BASE[:64], None, 64),
    (BASE[:63], None, 10),
    (BASE[:9], None, None),
    (BASE[:0], None, None),
    (ALTERED, None, 64),  # one token differs inside the longer prefixes
    (OTHER, None, 250),
    (OTHER[:249], None, 130),
    (toks(400, seed=2), None, None),
    (BASE, lambda n: n % 100 == 0, 200),
    (BASE, lambda n: n < 150, 130),
    (BASE, lambda n: n < 64, 10),
    (BASE, lambda n: False, None),
])
def test_longest_prefix(folder, prompt, usable, expected):
    cache = DiskCache(folder, 1 << 20, MODEL)
    for n in SAVED:
        cache.put(BASE[:n], state(50, seed=n))
    cache.put(OTHER[:250], state(50, seed=250))
    found = cache.longest(prompt) if usable is None else cache.longest(prompt, usable)
    if expected is None:
        assert found is None
        return
    n, path = found
    assert n == expected
    assert cache.load(n, path) == state(50, seed=n)


def test_load_needs_the_indexed_length(folder):
    cache = DiskCache(folder, 1 << 20, MODEL)
    cache.put(BASE[:100], state(50))
    n, path = cache.longest(BASE)
    assert cache.load(n - 1, path) is None and cache.load(n, cache.dir / token_key(BASE[:99])) is None
    assert cache.load(n, path) == state(50)


def test_other_models_are_left_alone(folder):
    a = DiskCache(folder, 1 << 20, "aaaa")
    a.put(BASE, state(100))
    b = DiskCache(folder, 1 << 20, "bbbb")
    assert b.longest(BASE) is None and not b.contains(BASE)
    b.put(BASE[:50], state(100))
    assert b.stats["entries"] == 1 and b.stats["corrupt"] == 0
    a2 = DiskCache(folder, 1 << 20, "aaaa")
    assert a2.longest(BASE)[0] == 400 and a2.stats["entries"] == 1 and a2.stats["corrupt"] == 0
    assert sorted(os.listdir(folder)) == ["aaaa", "bbbb"]


def flip(offset: int):
    def mutate(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[offset] ^= 0x01
        path.write_bytes(bytes(data))
    return mutate


def rewrite_header(**fields):
    def mutate(path: Path) -> None:
        data = path.read_bytes()
        head = dict(zip(["magic", "version", "model", "n", "state_len", "sha"], _HEADER.unpack(data[:_HEADER.size])))
        path.write_bytes(_HEADER.pack(*{**head, **fields}.values()) + data[_HEADER.size:])
    return mutate


def truncate(n: int):
    return lambda path: path.write_bytes(path.read_bytes()[:n])


TOKENS_AT = _HEADER.size  # first byte of the token ids
# Each way a saved file can be wrong; each is found at a restart (header, size, tokens) or at load
# (state bytes, checksum), removed, and counted once.
CORRUPTIONS = {
    "state byte flipped": flip(-1),
    "first state byte flipped": flip(TOKENS_AT + 4 * 300),
    "checksum byte flipped": flip(TOKENS_AT - 1),
    "truncated state": truncate(-10),
    "truncated tokens": truncate(TOKENS_AT + 10),
    "truncated header": truncate(20),
    "empty": truncate(0),
    "extra bytes": lambda path: path.write_bytes(path.read_bytes() + b"\0"),
    "wrong magic": rewrite_header(magic=b"AIEKV9\0\0"),
    "wrong version": rewrite_header(version=2),
    "wrong model": rewrite_header(model=b"fedcba9876543210"),
    "token count changed": rewrite_header(n=299, state_len=1004),
    "token altered": flip(TOKENS_AT + 8),
    "garbage": lambda path: path.write_bytes(os.urandom(3000)),
    # A valid file outside the model's folder, linked in: only O_NOFOLLOW keeps it out.
    "symlink": lambda path: (path.rename(path.parent.parent / path.name),
                             path.symlink_to(path.parent.parent / path.name)),
    "folder": lambda path: (path.unlink(), path.mkdir()),
    "fifo": lambda path: (path.unlink(), os.mkfifo(path)),  # must not hang the engine
}
AT_LOAD = {"state byte flipped", "first state byte flipped", "checksum byte flipped"}


@pytest.mark.parametrize("restart", [True, False], ids=["restart", "same instance"])
@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_corrupt_files_are_removed_and_never_loaded(folder, how, restart, caplog):
    cache = DiskCache(folder, 1 << 20, MODEL)
    prompt = toks(300)
    cache.put(prompt, state(1000))
    path = cache.dir / token_key(prompt)
    CORRUPTIONS[how](path)
    if restart:
        cache = DiskCache(folder, 1 << 20, MODEL)
        assert os.path.lexists(path) == (how in AT_LOAD or how == "folder")
    found = cache.longest(prompt)
    if found:
        assert cache.load(*found) is None
    assert not os.path.exists(path) or how == "folder"  # a folder is not ours to remove
    assert not os.path.islink(path)
    assert cache.stats["corrupt"] == 1 and cache.stats["entries"] == 0
    assert cache.longest(prompt) is None
    assert os.path.exists(folder / path.name) == (how == "symlink")  # a link's target is left alone
    assert token_key(prompt) in caplog.text and not TOKEN_IN_TEXT.search(caplog.text)


def test_tokens_are_compared_not_only_hashed(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(disk_cache, "token_key", lambda tokens: "0" * 32 + ".kv")  # every name collides
    a, b = toks(100, seed=1), toks(100, seed=2)
    cache = DiskCache(folder, 1 << 20, MODEL)
    cache.put(a, state(100, seed=1))
    assert cache.contains(a) and not cache.contains(b) and cache.longest(b) is None
    other = DiskCache(tmp_path / "other", 1 << 20, MODEL)
    other.put(b, state(100, seed=2))
    os.replace(other.dir / ("0" * 32 + ".kv"), cache.dir / ("0" * 32 + ".kv"))  # b's file where a's was
    assert cache.load(*cache.longest(a)) is None and cache.stats["corrupt"] == 1


def test_stray_files(folder):
    cache = DiskCache(folder, 1 << 20, MODEL)
    cache.put(BASE, state(100))
    stale, fresh, foreign = (cache.dir / ".stale.kv.tmp", cache.dir / ".fresh.kv.tmp", cache.dir / "notes.txt")
    for path in (stale, fresh, foreign):
        path.write_bytes(b"x" * 100)
    old = time.time() - disk_cache.STALE_TEMP_S - 60
    os.utime(stale, (old, old))
    cache = DiskCache(folder, 1 << 20, MODEL)
    # A crash's leftover goes; a young one may be another engine's write in progress; others aren't ours.
    assert not stale.exists() and fresh.exists() and foreign.exists()
    assert cache.stats["corrupt"] == 1 and cache.stats["entries"] == 1
    assert cache.load(*cache.longest(BASE)) == state(100)


def test_lru_eviction_by_budget(folder):
    prompts = [toks(100, seed=i) for i in range(5)]
    one = file_size(prompts[0], 1000)
    cache = DiskCache(folder, 3 * one, MODEL)
    for p in prompts[:3]:
        cache.put(p, state(1000))
    assert cache.load(*cache.longest(prompts[0])) is not None  # 0 is now the most recent, 1 the least
    cache.put(prompts[3], state(1000))
    assert [cache.contains(p) for p in prompts] == [True, False, True, True, False]
    cache.put(prompts[2], state(1000))  # already there: only refreshed, so 0 is the least recent
    assert cache.stats["writes"] == 4
    cache.put(prompts[4], state(1000))
    assert [cache.contains(p) for p in prompts] == [False, False, True, True, True]
    assert files(cache) == sorted(token_key(p) for p in prompts[2:])
    assert cache.stats["evictions"] == 2 and cache.stats["bytes"] == 3 * one


def test_recency_survives_a_restart(folder):
    prompts = [toks(100, seed=i) for i in range(4)]
    one = file_size(prompts[0], 1000)
    cache = DiskCache(folder, 3 * one, MODEL)
    for i, p in enumerate(prompts[:3]):
        cache.put(p, state(1000))
        t = time.time() - 1000 + i
        os.utime(cache.dir / token_key(p), (t, t))
    cache = DiskCache(folder, 3 * one, MODEL)
    assert cache.load(*cache.longest(prompts[0])) is not None  # touches the file
    cache = DiskCache(folder, 3 * one, MODEL)
    cache.put(prompts[3], state(1000))
    assert [cache.contains(p) for p in prompts] == [True, False, True, True]


def test_lower_budget_at_restart_evicts_oldest(folder):
    prompts = [toks(100, seed=i) for i in range(3)]
    cache = DiskCache(folder, 1 << 20, MODEL)
    for i, p in enumerate(prompts):
        cache.put(p, state(1000))
        t = time.time() - 1000 + i
        os.utime(cache.dir / token_key(p), (t, t))
    cache = DiskCache(folder, file_size(prompts[0], 1000), MODEL)
    assert [cache.contains(p) for p in prompts] == [False, False, True]
    assert files(cache) == [token_key(prompts[2])]


def test_state_bigger_than_budget_is_not_written(folder):
    small, big = toks(10, seed=1), toks(10, seed=2)
    cache = DiskCache(folder, 2000, MODEL)
    cache.put(small, state(500))
    cache.put(big, state(2000))
    assert cache.contains(small) and not cache.contains(big)
    assert files(cache) == [token_key(small)] and cache.stats["writes"] == 1 and cache.stats["evictions"] == 0


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
def test_private_files_and_folders(tmp_path, umask):
    old = os.umask(umask)
    try:
        cache = DiskCache(tmp_path / "a" / "b", 1 << 20, MODEL)
        cache.put(BASE, state(100))
    finally:
        os.umask(old)
    for folder in (tmp_path / "a", tmp_path / "a" / "b", cache.dir):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((cache.dir / token_key(BASE)).stat().st_mode) == 0o600


def failing(code: int, message: str):
    def fail(*args, **kwargs):
        raise OSError(code, message)
    return fail


@pytest.mark.parametrize("target", ["open", "fchmod", "fsync", "replace"])
def test_write_failure_leaves_nothing(folder, monkeypatch, target, caplog):
    cache = DiskCache(folder, 1 << 20, MODEL)
    cache.put(BASE[:100], state(100))
    monkeypatch.setattr(os, target, failing(28, "No space left on device"))
    cache.put(BASE, state(100))  # does not raise
    monkeypatch.undo()
    assert files(cache) == [token_key(BASE[:100])]  # no temporary, no partial file
    assert cache.stats["writes"] == 1 and cache.longest(BASE)[0] == 100 and not cache.contains(BASE)
    assert "could not save" in caplog.text


def test_read_failure_keeps_the_file(folder, monkeypatch):
    cache = DiskCache(folder, 1 << 20, MODEL)
    cache.put(BASE, state(100))
    found = cache.longest(BASE)
    monkeypatch.setattr(os, "open", failing(24, "Too many open files"))
    assert cache.load(*found) is None
    monkeypatch.undo()
    assert cache.stats["corrupt"] == 0 and cache.load(*cache.longest(BASE)) == state(100)


def test_another_engine_evicted_it(folder):
    cache = DiskCache(folder, 1 << 20, MODEL)
    cache.put(BASE, state(100))
    found = cache.longest(BASE)
    os.unlink(found[1])
    assert cache.load(*found) is None and cache.longest(BASE) is None
    assert cache.stats["corrupt"] == 0 and cache.stats["entries"] == 0 and cache.stats["bytes"] == 0


def test_concurrent_puts_stay_within_budget(folder, monkeypatch):
    prompts = [toks(100, seed=i) for i in range(3)]
    cache = DiskCache(folder, 2 * file_size(prompts[0], 1000), MODEL)
    cache.put(prompts[0], state(1000))
    write_temp, calls = DiskCache._write_temp, []

    def write_while_another_puts(self, *chunks):
        calls.append(1)
        if len(calls) == 1:
            cache.put(prompts[2], state(1000))  # files are written outside the lock
        return write_temp(self, *chunks)
    monkeypatch.setattr(DiskCache, "_write_temp", write_while_another_puts)
    cache.put(prompts[1], state(1000))
    assert [cache.contains(p) for p in prompts] == [False, True, True]
    assert cache.stats["bytes"] <= cache.budget and len(files(cache)) == 2


def test_write_failure_mid_file(folder, monkeypatch):
    cache = DiskCache(folder, 1 << 20, MODEL)
    real_fsync = os.fsync
    seen = []

    def fsync_after_looking(fd):
        seen.append(os.listdir(cache.dir))
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "fsync", fsync_after_looking)
    cache.put(BASE, state(100))
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert len(seen) == 1 and seen[0][0].endswith(".kv.tmp")  # it was written as a temporary
    assert files(cache) == [] and cache.longest(BASE) is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(folder):
    cache = DiskCache(folder, 1 << 20, MODEL)
    os.chmod(cache.dir, 0o500)
    try:
        cache.put(BASE, state(100))
    finally:
        os.chmod(cache.dir, 0o700)
    assert files(cache) == [] and cache.longest(BASE) is None


def test_restart_finds_what_was_saved(folder):
    cache = DiskCache(folder, 1 << 20, MODEL)
    saved = {n: state(200, seed=n) for n in (50, 130, 260)}
    for n, s in saved.items():
        cache.put(BASE[:n], s)
    before = cache.stats
    cache = DiskCache(folder, 1 << 20, MODEL)
    assert (cache.stats["entries"], cache.stats["bytes"]) == (before["entries"], before["bytes"])
    for n, s in saved.items():
        assert cache.contains(BASE[:n])
        found = cache.longest(BASE[:n + 5])
        assert found[0] == n and cache.load(*found) == s


def disabled_setup(tmp: Path, how: str) -> tuple[Path, int]:
    """A folder and budget with which the cache cannot work."""
    if how == "budget 0":
        return tmp / "cache", 0
    if how == "under a regular file":
        (tmp / "file").write_text("x")
        return tmp / "file" / "cache", 1 << 20
    (tmp / "cache").mkdir()
    if how == "model folder is a file":
        (tmp / "cache" / MODEL).write_text("x")
    else:
        (tmp / "cache" / MODEL).symlink_to(tmp)
    return tmp / "cache", 1 << 20


@pytest.mark.parametrize("how", ["budget 0", "under a regular file", "model folder is a file",
                                 "model folder is a symlink"])
def test_disabled_cache_does_nothing(tmp_path, how, caplog):
    folder, budget = disabled_setup(tmp_path, how)
    before = sorted(tmp_path.rglob("*"))
    with caplog.at_level(logging.WARNING):
        cache = DiskCache(folder, budget, MODEL)
        cache.put(BASE, state(100))
        assert cache.longest(BASE) is None and cache.load(400, folder / MODEL / token_key(BASE)) is None
        assert not cache.contains(BASE)
    assert not cache.enabled and sorted(tmp_path.rglob("*")) == before
    assert cache.stats == dict.fromkeys(["entries", "bytes", "hits", "misses", "writes", "evictions", "corrupt"], 0)
    assert len(caplog.records) == (0 if budget == 0 else 1)


def test_unwritable_folder_disables(folder, monkeypatch, caplog):
    real_open = os.open

    def refuse_create(path, flags, *args):
        if flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)
    monkeypatch.setattr(os, "open", refuse_create)  # as a read-only folder does, even for root
    cache = DiskCache(folder, 1 << 20, MODEL)
    assert not cache.enabled and "disabled" in caplog.text
    cache.put(BASE, state(100))
    assert cache.longest(BASE) is None


@pytest.mark.parametrize("model_id", ["", "../x", "a/b", ".", "x" * 33, "é"])
def test_bad_model_id_is_refused(folder, model_id):
    with pytest.raises(ValueError, match="model_id"):
        DiskCache(folder, 1 << 20, model_id)


def test_model_identity(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    (tmp_path / "link.gguf").symlink_to(gguf)
    ident = model_identity(gguf)
    assert len(ident) == 16 and int(ident, 16) >= 0
    assert model_identity(str(gguf)) == ident == model_identity(tmp_path / "link.gguf")
    os.utime(gguf, ns=(0, 123))
    assert model_identity(gguf) != ident
    with pytest.raises(OSError):
        model_identity(tmp_path / "missing.gguf")


@pytest.mark.parametrize("xdg,expected", [
    ("/xdg", "/xdg/ai-engine/prompt-cache"),
    ("", "/home/u/.cache/ai-engine/prompt-cache"),
    (None, "/home/u/.cache/ai-engine/prompt-cache"),
    ("relative", "/home/u/.cache/ai-engine/prompt-cache"),
])
def test_default_cache_dir(monkeypatch, xdg, expected):
    monkeypatch.setenv("HOME", "/home/u")
    if xdg is None:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    assert default_cache_dir() == Path(expected)


def test_logs_name_files_never_tokens(folder, caplog):
    with caplog.at_level(logging.DEBUG, logger="engine.disk_cache"):
        cache = DiskCache(folder, 3 * file_size(BASE, 100), MODEL)
        for i in range(5):
            cache.put(toks(400, seed=i), state(100))
        cache.put(toks(400, seed=9), state(1 << 20))
        flip(-1)(cache.dir / token_key(toks(400, seed=4)))
        assert cache.load(*cache.longest(toks(400, seed=4))) is None
    assert "evicted" in caplog.text and "removed" in caplog.text and "over the budget" in caplog.text
    assert not TOKEN_IN_TEXT.search(caplog.text)


def test_the_folder_names_the_attention_resolved_and_the_gpu_layers(tmp_path):
    """States are kept per arithmetic: FLASH_ATTN=auto shares its folder with the setting it resolves
    to (it held the word "auto" before, so a state saved without flash attention could be offered to
    a runtime with it), and another GPU layer count is another folder."""
    from engine.model_files import ModelSpec
    from engine.model_loading import _disk_cache
    from engine.settings import Settings

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 100)

    def folder(setting: str, resolved: bool, n_gpu: int = 0) -> Path:
        settings = Settings(prompt_cache_dir=str(tmp_path / "pc"), flash_attn=setting)
        return _disk_cache(settings, ModelSpec(gguf), resolved, n_gpu).dir

    assert folder("auto", True) == folder("on", True) and folder("auto", False) == folder("off", False)
    assert len({folder("auto", True), folder("auto", False), folder("auto", True, 12)}) == 3


def test_the_writer_goes_on_after_an_unexpected_error(folder, monkeypatch, caplog):
    """A bug in one save is logged (without the tokens) and the next save is written; the failed
    prefix is no longer counted as on its way, so it can be saved again."""
    from engine.disk_prompts import DiskPrompts

    cache = DiskCache(folder, 1 << 20, MODEL)
    put = cache.put
    calls = []

    def first_fails(tokens, st):
        calls.append(len(tokens))
        if len(calls) == 1:
            raise RuntimeError("a bug")
        put(tokens, st)

    monkeypatch.setattr(cache, "put", first_fails)
    prompts = DiskPrompts(cache, runtime=None, policy=None)
    failed, saved = toks(200, seed=1), toks(300, seed=2)
    with caplog.at_level(logging.ERROR, logger="engine.disk_prompts"):
        prompts._queue(failed, state(100))
        prompts._queue(saved, state(100))
        prompts.close()  # waits for the writer: it must still be there to see the end
    assert calls == [200, 300] and cache.contains(saved) and not cache.contains(failed)
    assert "saving 200 tokens failed" in caplog.text and not TOKEN_IN_TEXT.search(caplog.text)
    assert not prompts._saved_or_queued(failed)
