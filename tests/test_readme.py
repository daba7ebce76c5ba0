"""The README's commands run as written.

Every line starting with ``vlcompress`` inside a ```bash block runs through the CLI, in
order, in one temporary folder (so later commands can use earlier outputs); every ```python
block runs too. Blocks tagged ``text`` or ``console`` are illustrations and do not run.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlcompress.cli import app

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def _commands() -> list[str]:
    cmds = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("vlcompress "):
                cmds.append(line)
    return cmds


def test_readme_has_commands():
    cmds = _commands()
    assert any(c.startswith("vlcompress prune-export") for c in cmds)
    assert "vlcompress prune-export" in cmds  # the no-argument default is documented


def test_readme_commands_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for cmd in _commands():
        res = runner.invoke(app, shlex.split(cmd)[1:])
        assert res.exit_code == 0, f"{cmd}\n{res.output}"


@pytest.mark.parametrize("code", _blocks("python"))
def test_readme_python_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
