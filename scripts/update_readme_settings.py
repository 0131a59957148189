#!/usr/bin/env python3
"""Rewrite the configuration table in docs/configuration.md from the settings schema (`ai-engine settings`)."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.settings import Settings  # noqa: E402

readme = ROOT / "docs" / "configuration.md"
text = readme.read_text(encoding="utf-8")
marker = "<!-- settings-table -->\n"
new, n = re.subn(re.escape(marker) + r"(?:\|.*\n)+", lambda m: marker + Settings.markdown_table() + "\n", text)
if n != 1:
    raise SystemExit("docs/configuration.md: no settings table after the <!-- settings-table --> marker")
readme.write_text(new, encoding="utf-8")
