"""`ai-engine pull` and `POST /api/pull`: one GGUF from the Hugging Face hub into MODEL_PATH.

Through huggingface-hub (its HTTP client, HF_TOKEN and HF_ENDPOINT): `plan` asks the hub which
files the repo has, with their LFS sha256 (`model_info(files_metadata=True)`), and picks the one
the name means (engine/hub_names.py). `Pull.run` then

1. downloads it into a staging file outside MODEL_PATH (`HF_HUB_CACHE/ai-engine-pulls/<sha256>.partial`,
   0600), with huggingface-hub's HTTP session and headers: a cut connection is resumed with a
   `Range: bytes=N-` request from the last byte written, and a pull that failed (or was stopped)
   resumes from the staging file the next time;
2. checks the whole file's sha256 against the hub's; a mismatch deletes the staging file and
   refuses the download;
3. moves (or copies) it to a hidden temporary file in its folder under MODEL_PATH, 0600, fsynced,
   and `os.replace`s it to `MODEL_PATH/hf.co/ORG/REPO/<file>` (folders it creates are 0700).
   Until that rename nothing is listed under MODEL_PATH; a failure removes what it made there.

Progress is reported as Ollama's `/api/pull` NDJSON lines (`emit` is called with each dict).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ai_engine_common.errors import EngineError
from engine.errors import ModelNotFound
from engine.hub_names import HubRef, local_path, pick_file

log = logging.getLogger(__name__)

Emit = Callable[[dict], None]
CHUNK = 1 << 20
RETRIES = 5  # connection failures in a row, without a byte between them, before a pull fails
RETRY_PAUSE_S = 1.0
PROGRESS_EVERY_S = 0.1  # progress lines at most this often (and the last one always)


class HubError(EngineError):
    """The hub could not be reached or answered with an error (a gateway's fault: 502)."""

    status = 502


class DigestMismatch(HubError):
    """The bytes downloaded are not the ones the hub's metadata describes."""


class PullFailed(EngineError):
    """A pull's file could not be written here (permissions, a full disk); messages name no absolute path."""

    status = 500


class PullInProgress(EngineError):
    status = 409


@dataclass(frozen=True)
class PullPlan:
    """What one pull fetches: the repo's file at a commit, its size and sha256, and where it goes."""

    repo_id: str
    revision: str
    filename: str  # path in the repo
    size: int
    sha256: str
    rel: str  # where it lives, relative to MODEL_PATH

    @property
    def digest(self) -> str:
        return f"sha256:{self.sha256}"


def endpoint() -> str:
    """The hub's address: HF_ENDPOINT as huggingface-hub reads it, read at call time."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def staging_dir() -> Path:
    """Where partial downloads wait to be resumed: beside huggingface-hub's cache, never under MODEL_PATH."""
    cache = os.environ.get("HF_HUB_CACHE")
    if not cache:
        home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
        cache = os.path.join(home, "hub")
    return Path(cache).expanduser() / "ai-engine-pulls"


def plan(ref: HubRef) -> PullPlan:
    """Ask the hub for the repo's files and pick the GGUF `ref` means; 404 for an unknown repo or
    quant (listing what the repo has), 502 when the hub fails."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi(endpoint=endpoint()).model_info(ref.repo_id, files_metadata=True)
    except GatedRepoError as exc:
        raise HubError(f"hf.co/{ref.repo_id} is gated: accept its terms on the hub and set HF_TOKEN "
                       f"({_first_line(exc)})") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise ModelNotFound(f"hf.co/{ref.repo_id} was not found on the hub (a private repo needs HF_TOKEN)",
                            field="model") from None
    except Exception as exc:  # the hub's HTTP errors, connection errors, offline mode
        raise HubError(f"the hub at {endpoint()} could not be asked about {ref.repo_id}: {_first_line(exc)}") from None
    siblings = {s.rfilename: s for s in info.siblings or []}
    filename = pick_file(ref.repo_id, sorted(siblings), ref.quant)
    sibling = siblings[filename]
    sha256 = str(sibling.lfs.sha256 if sibling.lfs else "").lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha256) or not isinstance(sibling.lfs.size, int) or sibling.lfs.size < 0:
        raise HubError(f"the hub reports no sha256 and size for {filename} in {ref.repo_id}, so it cannot be verified")
    repo_id = info.id if info.id and info.id.lower() == ref.repo_id.lower() else ref.repo_id
    return PullPlan(repo_id=repo_id, revision=info.sha or "main", filename=filename, size=sibling.lfs.size,
                    sha256=sha256, rel=local_path(repo_id, filename).as_posix())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


class Pull:
    """One planned pull into `model_dir`; `run(emit)` does it and reports progress (see the module)."""

    def __init__(self, plan: PullPlan, model_dir: Path, staging: Path | None = None) -> None:
        self.plan, self.model_dir = plan, model_dir
        self.staging = staging or staging_dir()
        self.target = model_dir / plan.rel

    def run(self, emit: Emit) -> Path:
        p = self.plan
        emit({"status": "pulling manifest"})
        status = f"pulling {p.sha256[:12]}"
        progress = {"status": status, "digest": p.digest, "total": p.size}
        if self._already_there():
            emit({**progress, "completed": p.size})
        else:
            part = self.staging / f"{p.sha256}.partial"
            try:
                _make_dirs(self.staging)
                lock = _locked(self.staging / f"{p.sha256}.lock", p.rel)
                with lock:
                    self._download(part, _throttled(lambda done: emit({**progress, "completed": done}), p.size))
                    emit({"status": "verifying sha256 digest"})
                    self._verify(part)
            except OSError as exc:
                raise PullFailed(f"the download's staging folder (HF_HUB_CACHE/ai-engine-pulls) cannot be written: "
                                 f"{exc.strerror or exc}; set HF_HUB_CACHE or HF_HOME to a writable folder") from None
            emit({"status": "writing manifest"})
            try:
                self._place(part)
            except OSError as exc:
                raise PullFailed(f"MODEL_PATH/{p.rel} cannot be written: {exc.strerror or exc}") from None
        emit({"status": "success"})
        return self.target

    def _already_there(self) -> bool:
        from engine.gguf_info import digest

        try:
            return self.target.is_file() and self.target.stat().st_size == self.plan.size \
                and digest(self.target) == self.plan.sha256
        except OSError:
            return False

    def _download(self, part: Path, report: Callable[[int], None]) -> None:
        """The file into `part`, from where an earlier try left it: each GET asks for the bytes
        still missing (`Range: bytes=N-`), and a connection cut or timed out is asked again, up to
        RETRIES times in a row without progress."""
        p = self.plan
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "ab") as f:
            os.fchmod(f.fileno(), 0o600)
            have = f.seek(0, os.SEEK_END)
            if have > p.size:  # not a prefix of this file: start again
                f.truncate(0)
                have = 0
            if have:
                log.info("pull %s: resuming at %d of %d bytes", p.rel, have, p.size)
            report(have)
            failures = 0
            while have < p.size:
                try:
                    have = self._get(f, have, report)
                    failures = 0
                except HubError:
                    raise
                except Exception as exc:  # a connection refused, cut or timed out
                    failures = 0 if f.tell() > have else failures + 1
                    if failures > RETRIES:
                        raise HubError(f"downloading {p.filename} from {p.repo_id} failed after {f.tell()} of "
                                       f"{p.size} bytes (pull again to resume): {_first_line(exc)}") from None
                    log.warning("pull %s: %s; resuming at byte %d", p.rel, _first_line(exc), f.tell())
                    have = f.tell()
                    time.sleep(RETRY_PAUSE_S)
            os.fsync(f.fileno())

    def _get(self, f, have: int, report: Callable[[int], None]) -> int:
        """One GET of the bytes from `have` on, appended to `f` as they come; the new size."""
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.errors import HfHubHTTPError
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        p = self.plan
        url = hf_hub_url(p.repo_id, p.filename, revision=p.revision, endpoint=endpoint())
        headers = build_hf_headers()
        if have:
            headers["Range"] = f"bytes={have}-"
        with get_session().stream("GET", url, headers=headers, follow_redirects=True,
                                  timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
            try:
                hf_raise_for_status(response)
            except HfHubHTTPError as exc:
                raise HubError(f"the hub refused {p.filename} of {p.repo_id}: {_first_line(exc)}") from None
            if have and response.status_code != 206:  # the server sent the whole file again
                f.truncate(0)
                have = 0
            for chunk in response.iter_bytes():
                f.write(chunk)
                f.flush()
                have += len(chunk)
                report(have)
                if have > p.size:
                    break  # more than the hub said: the check of the digest refuses it
        if have < p.size:
            raise ConnectionError(f"the connection closed after {have} of {p.size} bytes")
        return have

    def _verify(self, part: Path) -> None:
        h = hashlib.sha256()
        with part.open("rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        if h.hexdigest() != self.plan.sha256:
            part.unlink(missing_ok=True)
            raise DigestMismatch(f"{self.plan.filename} from {self.plan.repo_id} has sha256 {h.hexdigest()}, but the "
                                 f"hub says {self.plan.sha256}: the download was discarded, nothing was written to "
                                 "MODEL_PATH")

    def _place(self, part: Path) -> None:
        """The verified file to its place under MODEL_PATH, atomically; on failure nothing new is left there."""
        folder = self.target.parent
        made = _make_dirs(folder)
        tmp = folder / f".{self.target.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            try:
                os.replace(part, tmp)  # same file system: a rename
            except OSError:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                with part.open("rb") as src, os.fdopen(os.open(tmp, flags, 0o600), "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
            os.chmod(tmp, 0o600)
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.target)
            _fsync_dir(folder)
        except BaseException:
            tmp.unlink(missing_ok=True)
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise
        part.unlink(missing_ok=True)


def _throttled(report: Callable[[int], None], total: int) -> Callable[[int], None]:
    """`report`, called at most every PROGRESS_EVERY_S, and always for the first and the last byte."""
    last = [-1.0]

    def throttled(done: int) -> None:
        now = time.monotonic()
        if last[0] < 0 or done >= total or now - last[0] >= PROGRESS_EVERY_S:
            last[0] = now
            report(done)

    return throttled


@contextlib.contextmanager
def _locked(path: Path, what: str):
    """One pull of a file at a time (across processes too): a second one is a 409."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PullInProgress(f"{what} is being pulled already; wait for that pull to end") from None
        yield
    finally:
        os.close(fd)


def _make_dirs(path: Path) -> list[Path]:
    """`mkdir -p` with new folders 0700 whatever the umask; the folders it made, outermost first."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    made = []
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue
        os.chmod(d, 0o700)
        made.append(d)
    return made


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
