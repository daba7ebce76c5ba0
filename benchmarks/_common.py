"""Shared bits of the benchmark scripts: every results JSON says where it came from.

:func:`write_result` adds, to every payload, ``provenance``: the git commit of the checkout
(and whether it had uncommitted changes), the exact command that produced it (re-runnable
from the repository root), the machine, the library versions (:func:`vlcompress.envinfo.env_info`)
and when it ran (UTC). ``env`` and ``created`` stay for the readers of older files.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from vlcompress.envinfo import env_info

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def command_line(argv: list[str] | None = None) -> str:
    """The command as run, the script path relative to the repository root when it is inside."""
    argv = list(sys.argv if argv is None else argv)
    if argv:
        try:
            argv[0] = str(Path(argv[0]).resolve().relative_to(ROOT))
        except ValueError:
            pass
    return shlex.join(["python", *argv])


_GIT_AT_START: dict | None = None


def _git_state(ignore: Path | None) -> dict:
    """Commit and dirty flag, taken once per process (at the first results write, or earlier
    through :func:`provenance`): a long run names the code it started from, even when commits
    land in the checkout while it runs."""
    global _GIT_AT_START
    if _GIT_AT_START is None:
        status = _git("status", "--porcelain", "--untracked-files=no")
        if status and ignore is not None:
            try:
                rel = Path(ignore).resolve().relative_to(ROOT).as_posix()
            except ValueError:
                rel = None
            # "XY path" (``_git`` strips the first line's leading blank): the path is the last field
            status = "\n".join(ln for ln in status.splitlines()
                               if ln.strip().split(maxsplit=1)[-1] != rel)
        if status:  # results written by other runs in the same checkout change no code
            status = "\n".join(ln for ln in status.splitlines()
                               if not ln.strip().split(maxsplit=1)[-1].startswith(
                                   "benchmarks/results/"))
        # a copy of the tree elsewhere (the GPU machine's, whose .git, if any, may be stale)
        # names its commit in VLC_COMMIT, which then wins
        _GIT_AT_START = {"git_commit": os.environ.get("VLC_COMMIT") or _git("rev-parse", "HEAD"),
                         "git_dirty": None if status is None else bool(status)}
    return _GIT_AT_START


def provenance(argv: list[str] | None = None, ignore: Path | None = None) -> dict:
    """Commit, command, machine, versions and time of this run.

    ``ignore``: the results file being written; a run that rewrites its own committed JSON
    does not make the code it ran "dirty". The git state is the one at the first call."""
    return {**_git_state(ignore),
            "command": command_line(argv),
            "machine": {"node": platform.node(), "cpu": env_info()["cpu"],
                        "cpu_count": env_info()["cpu_count"], "platform": platform.platform()},
            "versions": env_info()["packages"],
            "ran_at_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_result(name: str, payload: dict, out: str | Path | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **payload,
           "provenance": provenance(ignore=path), "env": env_info()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    return path


def parse_spec(spec: str) -> tuple[str, dict]:
    """A method with options, as benchmarks take them in a comma list:
    ``"ecoflap:estimator=block-spsa;num_noise=2"`` -> ``("ecoflap", {...})``."""
    name, _, rest = spec.partition(":")
    opts = dict(kv.split("=", 1) for kv in rest.split(";") if kv.strip())
    return name, opts
