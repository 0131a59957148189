"""A prompt cache on disk: the llama.cpp KV state of prompt prefixes, kept across restarts.

Why: a whole class shares one clinical case prompt of 2,000-3,000 tokens. After a restart, reading it
again costs seconds per slot; `DiskCache` keeps the state of such prefixes (`llama_state_seq_get_data`
of one sequence: opaque bytes) in files, so the scheduler restores one and reads only the rest.
A pure store: no llama.cpp, no threads of its own.

Layout: `<folder>/<model_id>/<sha256(tokens as int32 LE)[:32]>.kv`. The folder is shared by all
models; a `DiskCache` owns one model's subfolder (`model_identity`: the GGUF's resolved path, size and
mtime, so a replaced file never matches old states) and bounds it by its own LRU byte budget. A file
is `_HEADER` (magic, version, model_id, token count, state length, sha256 of the state), the token
ids (int32 LE), the state. An in-memory index of the tokens, built from the files at start, finds
the longest saved prefix of a prompt by hashing the prompt's 64-token blocks (as vLLM's prefix
caching does) and comparing token arrays only within the matching buckets.

Guarantees:
- `load` returns only bytes whose header, model, tokens, size and checksum verify; a file that does
  not is removed and counted in `stats["corrupt"]`.
- A write goes to a new 0600 file with a random name (O_EXCL, O_NOFOLLOW) in the same folder, is
  fsynced and renamed into place: a crash never leaves a file that `load` accepts. Folders created
  here, and the model's subfolder always, are 0700 whatever the umask; a saved file that others could
  read (copied in, or left by an older version) is made 0600 when the index is built.
- Disk errors are logged, never raised; a cache that cannot work is disabled (one warning).
- Logs name files and counts only, never tokens: they are health data.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import stat
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

log = logging.getLogger(__name__)

MAGIC = b"AIEKV1\0\0"
VERSION = 1
_HEADER = struct.Struct("<8sI32sQQ32s")  # magic, version, model_id, n_tokens, state length, sha256(state)
_TOKEN = np.dtype("<i4")
BLOCK = 64  # tokens per block of the prefix index
SUFFIX, TEMP_SUFFIX = ".kv", ".kv.tmp"
STALE_TEMP_S = 600  # a younger temporary file may be another engine's write in progress
_MODEL_ID = re.compile(r"[0-9A-Za-z_-]{1,32}")
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/ai-engine/prompt-cache`, or `~/.cache/ai-engine/prompt-cache` when
    XDG_CACHE_HOME is unset, empty or relative (as the XDG base directory spec says)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "ai-engine" / "prompt-cache"


def model_identity(gguf_path: str | os.PathLike) -> str:
    """A 16-hex-digit id of a GGUF file from its resolved path, size and mtime_ns (nothing is read,
    and a replaced or re-converted file gets a new id). Raises OSError if it cannot be stat'ed."""
    real = os.path.realpath(gguf_path)
    st = os.stat(real)
    return hashlib.sha256(f"{real}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]


def token_key(tokens: np.ndarray) -> str:
    """The file name of the state of `tokens` (int32 little-endian)."""
    return hashlib.sha256(tokens.tobytes()).hexdigest()[:32] + SUFFIX


def _as_tokens(tokens: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(tokens, dtype=_TOKEN).reshape(-1)


def _block_key(tokens: np.ndarray) -> bytes:
    """The index bucket of a saved prefix: a hash of its whole 64-token blocks."""
    return hashlib.blake2b(tokens[:len(tokens) // BLOCK * BLOCK].tobytes(), digest_size=16).digest()


class _Corrupt(Exception):
    """A cache file that must not be used; the message says why (never with token contents)."""


@dataclass
class _Entry:
    tokens: np.ndarray  # read-only int32
    size: int  # bytes on disk


def _open_checked(path: Path, model_id: str) -> tuple[BinaryIO, np.ndarray, int, bytes]:
    """An open cache file whose header and tokens check out, positioned at the state; with its
    tokens, state length and the state's sha256."""
    try:  # O_NONBLOCK: a FIFO planted here must not hang the engine
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _Corrupt("a symbolic link") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _Corrupt("not a regular file")
    f = os.fdopen(fd, "rb")
    try:
        raw = f.read(_HEADER.size)
        if len(raw) != _HEADER.size:
            raise _Corrupt("shorter than a header")
        magic, version, mid, n_tokens, state_len, digest = _HEADER.unpack(raw)
        if magic != MAGIC:
            raise _Corrupt("not a prompt cache file")
        if version != VERSION:
            raise _Corrupt(f"format version {version}, expected {VERSION}")
        if mid.rstrip(b"\0") != model_id.encode():
            raise _Corrupt("saved for another model")
        if n_tokens == 0 or st.st_size != _HEADER.size + 4 * n_tokens + state_len:
            raise _Corrupt(f"{st.st_size} bytes, the header says {_HEADER.size + 4 * n_tokens + state_len}")
        tokens = np.frombuffer(f.read(4 * n_tokens), dtype=_TOKEN)
        if len(tokens) != n_tokens or token_key(tokens) != path.name:
            raise _Corrupt("tokens do not match the file name")
        return f, tokens, state_len, digest
    except BaseException:
        f.close()
        raise


def make_private_dirs(path: Path) -> None:
    """`mkdir -p` whose new folders are 0700 whatever the umask (existing ones are left as they are:
    they may be shared, as /tmp is). Also used for the prompt history's folder (engine.logs)."""
    if path.is_dir():
        return
    make_private_dirs(path.parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if path.is_dir():
            return
        raise
    os.chmod(path, 0o700)


def _unlink_quiet(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("disk prompt cache: could not remove %s (%s)", os.path.basename(path), e.strerror)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable; best effort (some filesystems refuse fsync on a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class DiskCache:
    """Saved KV states of prompt prefixes of one model, LRU-bounded by `budget_bytes` on disk.

    `folder` is shared by all models; this instance owns `folder/model_id/`. A budget of 0, or a
    folder that cannot be created or written, disables the cache (one warning, no exception).
    Safe to call from several threads; files are read and written outside the lock.
    """

    def __init__(self, folder: Path, budget_bytes: int, model_id: str) -> None:
        if not _MODEL_ID.fullmatch(model_id):
            raise ValueError(f"model_id must be 1-32 of [0-9A-Za-z_-] (see model_identity), not {model_id!r}")
        self.model_id = model_id
        self.budget = max(0, int(budget_bytes))
        self.dir = Path(folder) / model_id
        self._lock = threading.Lock()
        self._lru: OrderedDict[str, _Entry] = OrderedDict()  # file name -> entry, least recent first
        self._buckets: dict[bytes, set[str]] = {}  # _block_key -> file names
        self._bytes = 0
        self._counts = dict.fromkeys(("hits", "misses", "writes", "evictions", "corrupt"), 0)
        self.enabled = False
        if self.budget == 0:
            return
        try:
            make_private_dirs(self.dir)
            if not stat.S_ISDIR(os.lstat(self.dir).st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a folder (a symbolic link?)")
            os.chmod(self.dir, 0o700)
            os.unlink(self._write_temp(b""))  # can files be created here?
            self._build_index()
        except OSError as e:
            log.warning("disk prompt cache disabled: cannot use %s (%s)", self.dir, e.strerror or e)
            return
        self.enabled = True
        log.info("disk prompt cache %s: %d entries, %d of %d bytes", self.dir, len(self._lru), self._bytes, self.budget)

    @property
    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._lru), "bytes": self._bytes, **self._counts}

    def longest(self, prompt: np.ndarray, usable: Callable[[int], bool] = lambda n: True, *, count: bool = True
                ) -> tuple[int, Path] | None:
        """The longest saved prefix of `prompt` whose length `usable` accepts, as (its length, its file) for
        `load`; None if there is none (a miss, unless `count` is false: a look that serves no request)."""
        if not self.enabled:
            return None
        prompt = _as_tokens(prompt)
        found = []
        h = hashlib.blake2b(digest_size=16)
        with self._lock:
            for k in range(len(prompt) // BLOCK + 1):  # the bucket of each block-aligned prefix
                if k:
                    h.update(prompt[(k - 1) * BLOCK:k * BLOCK].tobytes())
                for name in self._buckets.get(h.copy().digest(), ()):
                    saved = self._lru[name].tokens
                    if len(saved) <= len(prompt) and np.array_equal(saved, prompt[:len(saved)]):
                        found.append((len(saved), name))
        for n, name in sorted(found, reverse=True):
            if usable(n):
                return n, self.dir / name
        return self._miss() if count else None

    def load(self, n_tokens: int, path: str | Path) -> bytes | None:
        """The state saved for the `n_tokens`-token prefix at `path` (from `longest`), verified against
        its header, tokens and checksum; None if it is gone or does not verify (then it is removed)."""
        if not self.enabled:
            return None
        name = Path(path).name
        with self._lock:
            entry = self._lru.get(name)
        if entry is None or len(entry.tokens) != n_tokens:
            return self._miss()
        try:
            f, tokens, state_len, digest = _open_checked(self.dir / name, self.model_id)
            with f:
                state = f.read(state_len)
            if not np.array_equal(tokens, entry.tokens):  # a hash is not the tokens
                raise _Corrupt("tokens differ from the index")
            if len(state) != state_len or hashlib.sha256(state).digest() != digest:
                raise _Corrupt("state checksum mismatch")
        except _Corrupt as e:
            with self._lock:
                self._discard(name, e)
            return self._miss()
        except FileNotFoundError:  # another engine sharing the folder evicted it
            with self._lock:
                self._drop(name)
            return self._miss()
        except OSError as e:  # maybe passing (out of file handles): kept for later
            log.warning("disk prompt cache: cannot read %s (%s)", name, e.strerror or e)
            return self._miss()
        with self._lock:
            if name in self._lru:
                self._touch(name)
            self._counts["hits"] += 1
        return state

    def contains(self, tokens: np.ndarray) -> bool:
        """Whether the state of exactly `tokens` is saved."""
        if not self.enabled:
            return False
        tokens = _as_tokens(tokens)
        with self._lock:
            entry = self._lru.get(token_key(tokens))
        return entry is not None and np.array_equal(entry.tokens, tokens)

    def put(self, tokens: np.ndarray, state: bytes) -> None:
        """Save the state of `tokens`, removing least recently used entries to stay within the budget.
        Already saved: only made most recent. Bigger than the budget: not saved. Disk errors are
        logged, never raised."""
        if not self.enabled or len(tokens) == 0:
            return
        tokens = np.array(tokens, dtype=_TOKEN).reshape(-1)  # our own copy
        tokens.flags.writeable = False
        name = token_key(tokens)
        size = _HEADER.size + tokens.nbytes + len(state)
        with self._lock:
            if name in self._lru:
                self._touch(name)
                return
            if size > self.budget:
                log.info("disk prompt cache: a %d-byte state is over the budget of %d; not saved", size, self.budget)
                return
            self._evict_to(self.budget - size)  # make room first: the folder never holds more
        digest = hashlib.sha256(state).digest()
        header = _HEADER.pack(MAGIC, VERSION, self.model_id.encode(), len(tokens), len(state), digest)
        try:
            tmp = self._write_temp(header, tokens.tobytes(), state)
            try:
                os.replace(tmp, self.dir / name)
            except BaseException:
                _unlink_quiet(tmp)
                raise
        except OSError as e:
            log.warning("disk prompt cache: could not save %s (%s)", name, e.strerror or e)
            return
        _fsync_dir(self.dir)
        with self._lock:
            if name not in self._lru:
                self._add(name, _Entry(tokens, size))
                self._counts["writes"] += 1
            self._evict_to(self.budget)  # others may have written meanwhile

    def _write_temp(self, *chunks: bytes) -> str:
        """A new fsynced 0600 file in the subfolder holding `chunks`; its path."""
        path = os.path.join(self.dir, f".{secrets.token_hex(16)}{TEMP_SUFFIX}")  # 128 random bits: no retry
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | _O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o600)  # the umask may have taken bits off
                for chunk in chunks:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            _unlink_quiet(path)
            raise
        return path

    # The methods below expect the lock held (or, in __init__, no other user yet).

    def _build_index(self) -> None:
        """Index the headers and tokens of the subfolder's files; the oldest mtime is the least recent."""
        found, now, exposed = [], time.time(), 0
        with os.scandir(self.dir) as it:
            for e in it:
                try:
                    if e.name.endswith(TEMP_SUFFIX):
                        if now - e.stat(follow_symlinks=False).st_mtime > STALE_TEMP_S:
                            self._discard(e.name, "temporary file of an interrupted write")
                    elif e.name.endswith(SUFFIX):
                        f, tokens, _, _ = _open_checked(self.dir / e.name, self.model_id)
                        with f:
                            st = os.fstat(f.fileno())
                            if stat.S_IMODE(st.st_mode) & 0o077:
                                os.fchmod(f.fileno(), 0o600)
                                exposed += 1
                        found.append((st.st_mtime_ns, e.name, _Entry(tokens, st.st_size)))
                except _Corrupt as err:
                    self._discard(e.name, err)
                except OSError as err:  # not ours to judge: left alone, not indexed
                    log.warning("disk prompt cache: cannot read %s (%s)", e.name, err.strerror or err)
        if exposed:
            log.warning("disk prompt cache: %d saved files could be read by other users; made them private (0600)",
                        exposed)
        for _, name, entry in sorted(found, key=lambda f: f[:2]):
            self._add(name, entry)
        self._evict_to(self.budget)

    def _miss(self) -> None:
        with self._lock:
            self._counts["misses"] += 1

    def _touch(self, name: str) -> None:
        """Most recent now: in memory, and in the file's mtime for the next start."""
        self._lru.move_to_end(name)
        with contextlib.suppress(OSError):
            os.utime(self.dir / name, follow_symlinks=False)

    def _add(self, name: str, entry: _Entry) -> None:
        self._lru[name] = entry
        self._bytes += entry.size
        self._buckets.setdefault(_block_key(entry.tokens), set()).add(name)

    def _drop(self, name: str) -> None:
        entry = self._lru.pop(name, None)
        if entry is not None:
            self._bytes -= entry.size
            bucket = self._buckets[_block_key(entry.tokens)]
            bucket.discard(name)
            if not bucket:
                del self._buckets[_block_key(entry.tokens)]

    def _discard(self, name: str, why: object) -> None:
        self._drop(name)
        self._counts["corrupt"] += 1
        _unlink_quiet(self.dir / name)
        log.warning("disk prompt cache: removed %s (%s)", name, why)

    def _evict_to(self, limit: int) -> None:
        while self._bytes > limit and self._lru:
            name = next(iter(self._lru))
            self._drop(name)
            _unlink_quiet(self.dir / name)
            self._counts["evictions"] += 1
            log.debug("disk prompt cache: evicted %s", name)
