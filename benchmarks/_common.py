"""Shared bits of the benchmark scripts: result files with the machine named."""

from __future__ import annotations

import json
import time
from pathlib import Path

from vlcompress.envinfo import env_info

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(name: str, payload: dict, out: str | Path | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **payload,
           "env": env_info()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    return path
