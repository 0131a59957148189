"""Every shell command in README.md and docs/*.md runs here, or is marked as needing what a test
cannot have (#19).

The convention, for whoever writes the docs:

- Every fenced code block names its language. Commands go in ```bash (or sh, shell, zsh; in
  ```console only the lines after `$ ` are commands), output and other text in ```text.
- A command is a line, or several joined by a trailing backslash or an open quote or parenthesis.
  Comment lines right after a command that start with `{`, `[` or `data:` show its output.
- A command that cannot run in the suite carries a mark, a comment that starts with one of
      # needs: KIND[, KIND...] ...   what the suite lacks: gpu, network, docker, cluster
                                     (several machines) or root
      # long: WHY                     it would run here, but takes minutes
      # run by CI                     .ci/run runs it (checked here)
  At the end of a command's (last) line a mark covers that command; on a line of its own it covers
  the commands after it, up to the next blank line of the block.
- Every other command runs, in the docs' order, and must succeed:
  * `scripts/serve.sh` and `ai-engine serve` start on a free loopback port, with MODEL_PATH a
    temporary folder holding the default model, until /health answers 200. The first of them
    (the README's) is the one engine every curl command talks to.
  * `curl ... localhost:5000 ...` goes to that engine (the address rewritten); every response must
    be 2xx and hold every key of the output the doc shows under it.
  * anything else runs with bash in one temporary folder holding stand-ins for the files the docs
    name (a tiny checkpoint as ./my-finetune and ./gemma-3-270m-hf, its GGUF, an adapter, the
    cases), `.venv/bin/` being this interpreter's, without network (HF_HUB_OFFLINE, PIP_NO_INDEX).
    Only the programs in WORKSPACE_PROGRAMS run there: a command with any other is reported as
    neither run nor marked.
- The engine's cheap commands that the prose names inline (`ai-engine settings`, `doctor`,
  `ensure-model`, `--help`) run too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import DATA, DEFAULT_MODEL, link_or_copy
from tests.server_process import REPO_ROOT, Server, start_server, stop_server

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"bash", "sh", "shell", "zsh", "console"}
NEEDS = {
    "gpu": "an NVIDIA GPU and a CUDA build",
    "network": "the internet: the Hugging Face hub, package registries, image registries",
    "docker": "a Docker daemon",
    "cluster": "several machines",
    "root": "root on the machine",
}
DOC_ADDRESS = "localhost:5000"  # where the docs' curl commands send their requests
AI_ENGINE = {"ai-engine", ".venv/bin/ai-engine"}
WORKSPACE_PROGRAMS = AI_ENGINE | {".venv/bin/python", "echo", "chmod"}
# Nothing that runs here may reach the network or set up again (a set-up that would fails at once).
OFFLINE = {"HF_HUB_OFFLINE": "1", "PIP_NO_INDEX": "1", "CMAKE_ARGS": ""}
TIMEOUT_S = 180

FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([^\s`{]*)")
MARK = re.compile(r"(?:^|\s)#\s*(?:needs:\s*(?P<needs>[a-z]+(?:\s*,\s*[a-z]+)*)"
                  r"|long:\s*(?P<long>\S.*)|(?P<ci>run by CI)\b)")
OUTPUT_COMMENT = re.compile(r"^#\s?\s*(\{|\[|data:)")
PUNCTUATION = set("();<>|&")
SEPARATORS = set("();|&")


@dataclass
class Block:
    path: Path
    line: int
    language: str
    lines: list[tuple[int, str]]


@dataclass
class Command:
    path: Path
    line: int
    text: str
    marks: list[str]
    output: list[str] = field(default_factory=list)  # the output the doc shows under it

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO_ROOT)}:{self.line}"

    def __str__(self) -> str:
        return f"{self.id}: `{self.text.splitlines()[0].strip()}`"


def code_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with the line numbers of their lines."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        close = re.compile(rf"^\s*{re.escape(m.group(1)[0])}{{{len(m.group(1))},}}\s*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        blocks.append(Block(path, i + 1, m.group(2).lower(), [(k + 1, lines[k]) for k in range(i + 1, j)]))
        i = j + 1
    return blocks


def _tokens(text: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def _complete(text: str) -> bool:
    """Whether bash would take `text` as a whole command: no trailing backslash, open quote or '('."""
    if text.rstrip().endswith("\\"):
        return False
    try:
        tokens = _tokens(text)
    except ValueError:  # no closing quotation
        return False
    punctuation = "".join(t for t in tokens if set(t) <= PUNCTUATION)
    return punctuation.count("(") <= punctuation.count(")")


def _marks(line: str) -> list[str]:
    return [m.group(0).strip() for m in MARK.finditer(line)]


def commands_of(block: Block) -> list[Command]:
    """Split a shell block into commands, each with the marks that cover it."""
    commands: list[Command] = []
    pending: list[str] = []
    paragraph_marks: list[str] = []
    last: Command | None = None
    start = 0
    for number, raw in block.lines:
        if not pending:
            if block.language == "console":
                if not raw.lstrip().startswith("$ "):
                    continue  # output
                raw = raw.lstrip()[2:]
            stripped = raw.strip()
            if not stripped:
                paragraph_marks, last = [], None
                continue
            if stripped.startswith("#"):
                if _marks(stripped):
                    paragraph_marks = paragraph_marks + _marks(stripped)
                elif last is not None and (last.output or OUTPUT_COMMENT.match(stripped)):
                    last.output.append(stripped[1:])
                continue
            start = number
        pending.append(raw)
        text = "\n".join(pending)
        if _complete(text):
            last = Command(block.path, start, text, paragraph_marks + _marks(text))
            commands.append(last)
            pending = []
    assert not pending, f"{block.path.relative_to(REPO_ROOT)}:{start}: the command never ends"
    return commands


def simple_commands(text: str) -> list[list[str]]:
    """The words of each simple command in `text` (split at ; && || | & and parentheses), without
    leading VAR=value assignments and comments."""
    lexer = shlex.shlex(text.replace("\\\n", " "), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    result, current = [], []
    for token in lexer:
        if set(token) <= SEPARATORS:
            result.append(current)
            current = []
        else:
            current.append(token)
    result.append(current)
    for words in result:
        while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
            words.pop(0)
    return [words for words in result if words]


def runner(command: Command) -> str | None:
    """How this test runs the command: 'server', 'http', 'workspace', or None (it cannot)."""
    words = simple_commands(command.text)
    programs = [w[0] for w in words]
    if len(words) == 1 and (programs == ["scripts/serve.sh"] or
                            (programs[0] in AI_ENGINE and words[0][1:2] == ["serve"])):
        return "server"
    if programs and set(programs) == {"curl"} and DOC_ADDRESS in command.text:
        return "http"
    if programs and set(programs) <= WORKSPACE_PROGRAMS:
        return "workspace"
    return None


def shell_commands() -> list[Command]:
    return [c for path in DOCS for b in code_blocks(path) if b.language in SHELL_LANGUAGES
            for c in commands_of(b)]


COMMANDS = shell_commands()
RUN = [c for c in COMMANDS if not c.marks and runner(c)]
SHARED_SERVER = next((c for c in RUN if runner(c) == "server"), None)


# --- the convention -----------------------------------------------------------------------------


def test_every_code_block_names_its_language():
    unnamed = [f"{b.path.relative_to(REPO_ROOT)}:{b.line}" for path in DOCS for b in code_blocks(path)
               if not b.language]
    assert not unnamed, ("code blocks without a language (```bash for commands, ```text for output): "
                         + ", ".join(unnamed))


def test_every_command_is_run_or_marked():
    ci = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")
    problems = []
    for command in COMMANDS:
        for mark in command.marks:
            kinds = MARK.search(mark).group("needs")
            unknown = [k for k in re.split(r"\s*,\s*", kinds) if k not in NEEDS] if kinds else []
            if unknown:
                problems.append(f"{command}: `{mark}` names {unknown}; known: {', '.join(NEEDS)}")
            if "run by CI" in mark and not all(" ".join(w) in ci for w in simple_commands(command.text)):
                problems.append(f"{command}: marked `run by CI`, but .ci/run does not run it")
        if not command.marks and runner(command) is None:
            problems.append(f"{command}: neither run by this test nor marked (`# needs: KIND`, "
                            "`# long: WHY` or `# run by CI`; see the top of tests/test_docs_commands.py)")
    assert not problems, "\n".join(problems)
    assert SHARED_SERVER is not None, "no documented command starts the engine the curl commands need"


# --- running them -------------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, **OFFLINE, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""), **extra}


def _bash(text: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", text], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def docs_models(tmp_path_factory, default_model_file) -> Path:
    """MODEL_PATH for the docs' engines: the default model, and the same file under every other
    model name a curl command asks for (a stand-in, so that /load-model's example loads)."""
    folder = tmp_path_factory.mktemp("docs") / "models"
    names = {DEFAULT_MODEL} | {n for c in RUN if runner(c) == "http"
                               for n in re.findall(r'"([\w.-]+\.gguf)"', c.text)}
    for name in names:
        link_or_copy(default_model_file, folder / name)
    return folder


def _start(command: Command, docs_models: Path, tmp_path_factory) -> Server:
    log = tmp_path_factory.mktemp("docs-server") / "server.log"
    # A small context bounds the longest reply a documented request without a limit can get.
    env = {**OFFLINE, "MODEL_PATH": str(docs_models), "N_CTX": "1024"}
    try:
        return start_server(env, log, argv=lambda port: ["bash", "-c", command.text])
    except RuntimeError as exc:
        pytest.fail(f"{command} did not bring up an engine (scripts/serve.sh sets up only what "
                    f"scripts/test.sh has not: run that first): {exc}")


@pytest.fixture(scope="module")
def engine(docs_models, tmp_path_factory):
    """The engine every curl command talks to, started by the docs' first serve command."""
    server = _start(SHARED_SERVER, docs_models, tmp_path_factory)
    yield server
    stop_server(server)


def _listening_pattern(port: str) -> re.Pattern:
    """The README's example of the line the engine prints, with this engine's port."""
    line = next(line for b in code_blocks(REPO_ROOT / "README.md") for _, line in b.lines
                if line.startswith("ai-engine listening on"))
    return re.compile(re.escape(line).replace("5000", port).replace(re.escape("..."), ".*"))


def check_server(command: Command, request) -> None:
    if command is SHARED_SERVER:
        server = request.getfixturevalue("engine")
        port = server.url.rsplit(":", 1)[1]
        assert _listening_pattern(port).search(server.log()), server.log()
        return
    server = _start(command, request.getfixturevalue("docs_models"),
                    request.getfixturevalue("tmp_path_factory"))
    try:
        assert f"ai-engine listening on {server.url}" in server.log(), server.log()
    finally:
        stop_server(server)


def check_http(command: Command, request, tmp_path: Path) -> None:
    server = request.getfixturevalue("engine")
    text = command.text.replace(DOC_ADDRESS, server.url.removeprefix("http://"))
    text = re.sub(r"(?<![\w./-])curl(?=\s)", "curl -w '%{stderr}[http %{http_code}]\\n'", text)
    result = _bash(text, tmp_path, _env())
    statuses = re.findall(r"\[http (\d{3})\]", result.stderr)
    curls = sum(1 for w in simple_commands(command.text) if w[0] == "curl")
    assert result.returncode == 0 and len(statuses) == curls and all(s.startswith("2") for s in statuses), (
        f"{command}: exit {result.returncode}, HTTP {statuses}\n{result.stdout}\n{result.stderr}")
    for key in re.findall(r'"([A-Za-z_]\w*)":', "\n".join(command.output)):
        assert f'"{key}"' in result.stdout, (
            f"{command}: the doc shows {key!r}, the reply has none:\n{result.stdout}")


def _tiny_adapter(folder: Path, hidden: int, layers: int, rank: int = 4) -> None:
    """A PEFT LoRA adapter for the tiny checkpoint (q_proj and v_proj of every layer), as
    `ai-engine finetune` saves one, written with numpy."""
    import numpy as np

    from tests.convert_fixtures import write_safetensors

    rng = np.random.default_rng(0)
    tensors = {}
    for i in range(layers):
        for module in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, hidden)) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((hidden, rank)) * 0.1
    folder.mkdir(parents=True)
    write_safetensors(folder / "adapter_model.safetensors", tensors)
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
        "target_modules": ["q_proj", "v_proj"]}), encoding="utf-8")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder with stand-ins for the files the docs' commands name."""
    from tests.convert_fixtures import numpy_llama

    root = tmp_path_factory.mktemp("docs-workspace")
    numpy_llama(root / "my-finetune", hidden=64, layers=2)
    shutil.copytree(root / "my-finetune", root / "gemma-3-270m-hf")
    shutil.copyfile(DATA / "patient_cases.json", root / "my_cases.json")
    _tiny_adapter(root / "adapters" / "clinic", hidden=64, layers=2)
    # docs/converting.md's own example makes the f16 file its quantize and verify commands read.
    made = _bash("ai-engine convert ./my-finetune -o models/my-finetune-f16.gguf", root, _env())
    assert made.returncode == 0, made.stderr
    return root


def check_workspace(command: Command, request) -> None:
    words = [w for simple in simple_commands(command.text) for w in simple]
    if "--hf" in words or "--verify" in words or "finetune" in words:
        missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            pytest.skip(f"{command} needs {', '.join(missing)} (scripts/test.sh installs them)")
    venv_bin = Path(sys.executable).parent
    text = re.sub(r"(?<![\w/.-])\.venv/bin/", f"{venv_bin}/", command.text)
    result = _bash(text, request.getfixturevalue("workspace"), _env())
    assert result.returncode == 0, f"{command}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"


@pytest.mark.parametrize("command", RUN, ids=[c.id for c in RUN])
def test_documented_command_runs(command, request, tmp_path):
    kind = runner(command)
    if kind == "server":
        check_server(command, request)
    elif kind == "http":
        check_http(command, request, tmp_path)
    else:
        check_workspace(command, request)


INLINE_CLI = re.compile(r"`(ai-engine (?:settings|doctor|ensure-model|--help))`")
INLINE = sorted({m for path in DOCS for m in INLINE_CLI.findall(path.read_text(encoding="utf-8"))})


@pytest.mark.parametrize("command", INLINE)
def test_inline_cli_command_runs(command, docs_models, tmp_path):
    """The engine's cheap commands the prose names, against the docs' MODEL_PATH."""
    result = _bash(command, tmp_path, _env(MODEL_PATH=str(docs_models)))
    assert result.returncode == 0 and result.stdout.strip(), (
        f"{command}: exit {result.returncode}\n{result.stderr}")
