"""`ai-engine eval --url`: the trial against a stand-in server with the simulator's `/generate`
contract that returns known replies (real HTTP on a real socket), two models compared, the
sampling grid, the judge through Ollama's /api/chat, the failures, and the report in a real
browser (headless Chromium)."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from engine.cli import main
from engine.eval.cases import load_case

ROOT = Path(__file__).resolve().parent.parent
CASE_FILE = ROOT / "examples" / "eval" / "martin-duelo.json"
CASE = load_case(CASE_FILE)
GOOD = ["Y... mi mujer dice que estoy insoportable, que me peleo con todos.",
        "Cansado, laburo doce horas y los pasajeros me sacan.",
        "Bien, supongo. No hay mucho para contar.",
        "Sí... mi hermano, hace ocho meses. No me gusta hablar de eso.",
        "Me sirvo un whisky, a veces dos, para poder dormir.",
        "Raro. Nunca se lo había contado a nadie."]
# The bad model breaks the role twice and reveals the brother at the first question: 3 of 6 pass.
BAD = ["Mi hermano murió y por eso estoy mal.", GOOD[1], "Como modelo de lenguaje, no tengo familia.",
       GOOD[3], "¿En qué más te puedo ayudar?", GOOD[5]]
JUDGE_OK = {"character": 4, "natural": 5, "reason": "Suena como Martín."}


class StandIn(BaseHTTPRequestHandler):
    """/generate answers the known reply for the question the prompt ends with (SSE when asked to
    stream, except for model "plain", which answers plain JSON as a non-streaming server does);
    /api/chat answers as a judge; model "broken" answers 500."""

    protocol_version = "HTTP/1.1"
    received: list[dict] = []

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append({"path": self.path, **body})
        if body.get("model") == "broken":
            return self._send(500, "application/json", json.dumps({"error": "the model crashed"}).encode())
        if self.path == "/api/chat":
            content = json.dumps(JUDGE_OK) if body["model"] == "judge-ok" else "Este paciente está bien."
            return self._send(200, "application/json", json.dumps(
                {"model": body["model"], "message": {"role": "assistant", "content": content}, "done": True}).encode())
        question = body["prompt"].rsplit("Estudiante: ", 1)[1].removesuffix("\nPaciente:")
        index = CASE.questions.index(question)
        text = (BAD if body.get("model") == "bad" else GOOD)[index]
        final = {"texto": text, "confianza": 0.9, "metadata": {"modelo": body.get("model") or "stand-in.gguf",
                                                                "tokens": 12, "temperature": body["temperature"]}}
        if not body.get("stream") or body.get("model") == "plain":
            return self._send(200, "application/json", json.dumps(final).encode())
        if body.get("model") == "cut":
            events = [{"text": text[:5]}, {"error": "the engine stopped"}]
        else:
            events = [{"text": word + " "} for word in text.split()] + [final]
        self._send(200, "text/event-stream", b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events))

    def _send(self, status: int, content_type: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def stand_in():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    StandIn.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", StandIn.received
    server.shutdown()
    server.server_close()


def run_eval(*args) -> int:
    return main(["eval", str(CASE_FILE), *map(str, args)])


def test_two_models_compared_over_http(stand_in, tmp_path, capsys):
    url, received = stand_in
    assert run_eval("--url", url, "--model", "good", "--model", "bad", "--out", tmp_path) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    replies = results["replies"]
    assert [r["text"] for r in replies] == GOOD + BAD
    assert [r["model"] for r in replies] == ["good"] * 6 + ["bad"] * 6
    assert all(r["passed"] for r in replies[:6])
    assert [r["passed"] for r in replies[6:]] == [False, True, False, True, False, True]
    assert not replies[6]["checks"]["no_early_reveal"] and not replies[8]["checks"]["no_role_break"]
    assert not replies[10]["checks"]["no_role_break"] and replies[9]["checks"]["no_early_reveal"]
    assert all(r["streamed"] and 0 <= r["ttft_s"] <= r["total_s"] for r in replies)
    assert [(m["model"], m["pass_rate"], m["verdict"]) for m in results["models"]] == [
        ("good", 1.0, "adopt"), ("bad", 0.5, "reject")]
    assert set(results["models"][0]) >= {"model", "temperature", "top_p", "mean_s", "p95_s", "pass_rate", "verdict"}

    # Asked as the simulator's backend asks: the transcript grows by each reply, one question at a time.
    generate = [r for r in received if r["path"] == "/generate"]
    assert len(generate) == 12
    assert generate[0]["prompt"] == CASE.prompt + f"Estudiante: {CASE.questions[0]}\nPaciente:"
    assert generate[2]["prompt"] == (CASE.prompt + f"Estudiante: {CASE.questions[0]}\nPaciente: {GOOD[0]}\n"
                                     f"Estudiante: {CASE.questions[1]}\nPaciente: {GOOD[1]}\n"
                                     f"Estudiante: {CASE.questions[2]}\nPaciente:")
    assert generate[7]["prompt"].endswith(f"Paciente: {BAD[0]}\nEstudiante: {CASE.questions[1]}\nPaciente:")
    assert {(r["model"], r["max_length"], r["temperature"], r["top_p"], r["stream"]) for r in generate} == {
        ("good", 150, 0.7, 0.9, True), ("bad", 150, 0.7, 0.9, True)}

    out, err = capsys.readouterr()
    assert "good temperature=0.7 top_p=0.9: pass rate 100%" in out and "-> reject" in out
    assert "eval [" in err and "12/12" in err  # the progress bar
    md = (tmp_path / "report.md").read_text()
    assert "| good | 0.7 | 0.9 |" in md and "**reject**" in md and GOOD[3] in md
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "Como modelo de lenguaje" in html
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "pass_rate.png", "report.html", "report.md", "results.json", "time_per_question.png"]


def test_a_temperature_by_top_p_grid(stand_in, tmp_path):
    url, received = stand_in
    assert run_eval("--url", url, "--temperature", "0.5,0.9", "--top-p", "0.8,1", "--out", tmp_path) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [(m["temperature"], m["top_p"]) for m in results["models"]] == [(0.5, 0.8), (0.5, 1.0), (0.9, 0.8),
                                                                           (0.9, 1.0)]
    assert all(m["model"] == "stand-in.gguf" for m in results["models"])  # the server's own name for its model
    assert [(r["temperature"], r["top_p"]) for r in received][::6] == [(0.5, 0.8), (0.5, 1.0), (0.9, 0.8), (0.9, 1.0)]
    assert all("model" not in r for r in received)  # no --model: the server's default
    assert (tmp_path / "grid_stand-in.gguf.png").stat().st_size > 0
    assert (tmp_path / "report.html").read_text().count("data:image/png;base64,") == 3


def test_a_server_without_streaming_is_timed_as_a_whole(stand_in, tmp_path):
    url, _ = stand_in
    assert run_eval("--url", url, "--model", "plain", "--out", tmp_path) == 0
    replies = json.loads((tmp_path / "results.json").read_text())["replies"]
    assert [r["text"] for r in replies] == GOOD
    assert all(not r["streamed"] and r["ttft_s"] == r["total_s"] for r in replies)


def test_the_judge_is_asked_with_a_json_schema(stand_in, tmp_path):
    url, received = stand_in
    assert run_eval("--url", url, "--model", "good", "--judge", "judge-ok", "--out", tmp_path / "ok") == 0
    replies = json.loads((tmp_path / "ok" / "results.json").read_text())["replies"]
    assert all(r["judge"] == {"verdict": "rated", **JUDGE_OK} for r in replies)
    chats = [r for r in received if r["path"] == "/api/chat"]
    assert len(chats) == 6 and all(c["model"] == "judge-ok" and c["stream"] is False for c in chats)
    assert chats[0]["format"]["properties"]["character"]["type"] == "integer"
    assert chats[1]["messages"][1]["content"].startswith(CASE.prompt)
    summary = json.loads((tmp_path / "ok" / "results.json").read_text())["models"][0]
    assert summary["judge"] == {"rated": 6, "unavailable": 0, "character": 4.0, "natural": 5.0}
    assert "character 4/5, natural 5/5" in (tmp_path / "ok" / "report.md").read_text()


@pytest.mark.parametrize("judge", ["judge-prose", "broken"])
def test_a_judge_that_does_not_fit_is_unavailable(stand_in, tmp_path, judge):
    url, _ = stand_in
    assert run_eval("--url", url, "--model", "good", "--judge", judge, "--out", tmp_path) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert all(r["judge"]["verdict"] == "unavailable" and r["judge"]["error"] for r in results["replies"])
    assert all(r["passed"] for r in results["replies"])  # the judge's ratings do not change the checks
    assert results["models"][0]["judge"] == {"rated": 0, "unavailable": 6, "character": None, "natural": None}


@pytest.mark.parametrize("model, message", [
    ("broken", "answered 500: the model crashed"),
    ("cut", "stopped with an error: the engine stopped"),
])
def test_questions_the_server_fails_are_failed_replies(stand_in, tmp_path, capsys, model, message):
    """The trial goes on; each failed question is in the report with its error, and the exit status is 1."""
    url, received = stand_in
    assert run_eval("--url", url, "--model", model, "--out", tmp_path) == 1
    assert f"6 of 6 questions got no reply (first: {url}/generate" in capsys.readouterr().err
    results = json.loads((tmp_path / "results.json").read_text())
    assert all(message in r["error"] and r["text"] == "" and not r["passed"] for r in results["replies"])
    assert results["models"][0]["errors"] == 6 and results["models"][0]["verdict"] == "reject"
    assert f"(error: {url}/generate" in (tmp_path / "report.md").read_text()
    # A failed question is left out of the transcript the next question sees.
    assert received[1]["prompt"] == CASE.prompt + f"Estudiante: {CASE.questions[1]}\nPaciente:"


def test_an_unreachable_url_stops_the_trial_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{} (an earlier trial's)")
    assert run_eval("--url", "http://127.0.0.1:9", "--out", out) == 2
    assert "cannot reach http://127.0.0.1:9/generate" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["results.json"]  # no half-written report, the earlier one kept
    assert (out / "results.json").read_text() == "{} (an earlier trial's)"


@pytest.mark.parametrize("args, message", [
    (["--temperature", "3"], "--temperature values must lie in [0, 2]"),
    (["--temperature", "warm"], "--temperature takes comma-separated numbers"),
    (["--top-p", "0"], "--top-p values must lie in (0, 1]"),
    (["--top-p", "0.5,1.5"], "--top-p values must lie in (0, 1]"),
])
def test_bad_flags(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        run_eval("--url", "http://127.0.0.1:9", *args)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_a_bad_case_file_is_refused_before_any_question(stand_in, tmp_path, capsys):
    url, received = stand_in
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"id": "x", "language": "es", "prompt": "sin entrevista", "questions": ["¿Hola?"]}))
    assert main(["eval", str(CASE_FILE), str(bad), "--url", url, "--out", str(tmp_path / "out")]) == 2
    assert "'prompt' must end with" in capsys.readouterr().err and not received


# -- the report in a real browser -------------------------------------------------------------------

def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not found:
        pytest.skip("no Chromium on this machine: scripts/test.sh installs Debian's chromium when it runs as root "
                    "(or with sudo); otherwise apt-get install chromium")
    return found


def screenshot(html: Path, png: Path, tmp_path: Path) -> None:
    """Headless Chromium renders `html` into `png` (1200 × 1600)."""
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--screenshot={png}",
                    "--window-size=1200,1600", html.resolve().as_uri()],
                   check=True, capture_output=True, timeout=180)


def assert_not_blank(png: Path) -> None:
    from matplotlib.image import imread

    pixels = imread(png)
    assert pixels.shape[:2] == (1600, 1200)
    colours = {tuple(p) for p in pixels[::8, ::8, :3].reshape(-1, 3).round(2).tolist()}
    assert len(colours) > 20, f"the page rendered as {len(colours)} colour(s): blank"
    dark = (pixels[:, :, :3].mean(axis=2) < 0.5).mean()
    assert 0.002 < dark < 0.5, f"{dark:.1%} of the page is dark text or chart"


def test_the_report_renders_in_a_browser(stand_in, tmp_path):
    url, _ = stand_in
    out = tmp_path / "report"
    assert run_eval("--url", url, "--model", "good", "--model", "bad", "--temperature", "0.5,0.9",
                    "--out", out) == 0
    png = tmp_path / "page.png"
    screenshot(out / "report.html", png, tmp_path)
    assert_not_blank(png)


def test_the_committed_bench_report_renders_in_a_browser(tmp_path):
    report = ROOT / "bench" / "results" / "eval" / "report.html"
    results = json.loads((report.parent / "results.json").read_text())
    assert len(results["replies"]) == 4 * 6 * 6 and len(results["models"]) == 6  # 4 cases, 6 questions, 3 × 2 grid
    png = tmp_path / "bench.png"
    screenshot(report, png, tmp_path)
    assert_not_blank(png)
