"""Shared bits of the benchmark scripts: result files that say where they came from.

Every result JSON written through :func:`write_result` names the git commit of the tree that
ran (``-dirty`` when tracked files under ``vlcompress/`` or ``benchmarks/`` were modified),
the exact command, when it ran (``created``), and the machine and library versions (``env``,
:func:`vlcompress.envinfo.env_info`). A script may pass its own ``command`` (e.g. with the
defaults it filled in); it overrides the one read from ``sys.argv``.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from vlcompress.envinfo import env_info

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str | None:
    """HEAD of the repository the benchmark runs from, ``-dirty`` when tracked code changed;
    None outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=ROOT, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no",
                                "vlcompress", "benchmarks"], capture_output=True, text=True,
                               cwd=ROOT, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "") if sha else None


def command_line() -> str:
    """The command that is running, as a shell would take it back."""
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def write_result(name: str, payload: dict, out: str | Path | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "git_commit": git_commit(), "command": command_line(), **payload, "env": env_info()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    return path
