"""The simulator's backend, as Node code using `fetch`, gets a patient reply from the engine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from engine.patient import render_case_prompt
from tests.helpers import DATA

CLIENT = Path(__file__).parent / "node" / "backend_client.mjs"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
@pytest.mark.parametrize("case_id", ["sofia-insomnio", "ramon-duelo", "lucia-examenes"])
def test_node_fetch_client_reads_texto(server, cases, case_id):
    result = subprocess.run(
        ["node", str(CLIENT), str(DATA / "patient_cases.json"), case_id],
        env={**os.environ, "AI_ENGINE_URL": server.url},
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert isinstance(out["texto"], str) and out["texto"].strip()
    assert "Estudiante:" not in out["texto"] and "Paciente:" not in out["texto"]
    # The JS prompt builder and ours render the same transcript.
    assert out["prompt"] == render_case_prompt(next(c for c in cases if c["id"] == case_id))
