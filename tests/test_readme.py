"""The README's commands run as written, top to bottom, as a newcomer would run them.

Every line starting with ``vlcompress`` inside a ```bash block (a trailing ``\\`` continues it
on the next line) runs through the CLI, and every ```python block runs, in the order they
appear, in one temporary folder: later steps read what earlier ones wrote (the tour reads
``vlcompress-out/report.json`` and gates the run). Blocks tagged ``text`` or ``console`` are
illustrations and do not run.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from typer.testing import CliRunner

from vlcompress.cli import app

README = Path(__file__).resolve().parent.parent / "README.md"


def _steps(text: str) -> list[tuple[str, str]]:
    """``("cli", command)`` and ``("python", code)`` in document order."""
    steps = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S):
        if lang == "python":
            steps.append(("python", body))
        elif lang == "bash":
            body = re.sub(r"\s*\\\n\s*", " ", body)  # line continuations
            for line in body.splitlines():
                line = line.split("  #")[0].strip()
                if line.startswith("vlcompress "):
                    steps.append(("cli", line))
    return steps


def _commands() -> list[str]:
    return [s for kind, s in _steps(README.read_text(encoding="utf-8")) if kind == "cli"]


def test_readme_has_commands():
    cmds = _commands()
    assert "vlcompress prune-export" in cmds  # the no-argument default is documented
    assert any(c.startswith("vlcompress bench ") and "--baseline" in c for c in cmds)  # the gate


def test_continuations_join():
    steps = _steps("```bash\nvlcompress bench a \\\n    --x 1  # note\n```\n```text\nvlcompress no\n```")
    assert steps == [("cli", "vlcompress bench a --x 1")]


def test_readme_runs_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for kind, step in _steps(README.read_text(encoding="utf-8")):
        if kind == "cli":
            res = runner.invoke(app, shlex.split(step)[1:])
            assert res.exit_code == 0, f"{step}\n{res.output}"
        else:
            exec(compile(step, str(README), "exec"), {"__name__": "readme"})
