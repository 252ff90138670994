"""The project's own contract: README's test command is what CI runs (the import layers: tests/test_layering.py)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme_commands = re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())
    assert len(readme_commands) >= 2
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_commands[1].strip() in ci
