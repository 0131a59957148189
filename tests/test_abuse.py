"""The abuse run of scripts/abuse.py, in its quick size: hostile requests of every kind, valid and
abandoned generations, trickling and idle clients against a real engine on loopback; the script's
own checks (no 5xx but 503/504, every valid request answered, abandoned ones cancelled, healthy
afterwards, no traceback, bounded memory) decide."""

from __future__ import annotations

import json
import subprocess
import sys

from engine.settings import REPO_ROOT


def test_abuse_run(tmp_path, default_model_file):
    out = tmp_path / "abuse"
    done = subprocess.run([sys.executable, "scripts/abuse.py", "--requests", "60", "--out", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    report = json.loads(out.with_suffix(".json").read_text())
    assert done.returncode == 0 and report["failures"] == [], done.stdout + done.stderr
    assert len(report["statuses"]) >= 25 and report["valid"] == {"200": report["valid_sent"]}
