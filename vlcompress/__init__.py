"""vlcompress: prune, export and benchmark sparse vision-language models.

Public API::

    vlm = load_model("tiny-clip")
    calib = load_calibration("shapes", n=256)
    result = prune(vlm, "multiflow", pattern="2:4", calibration=calib)
    metrics = evaluate(vlm)
    export(vlm, "out/onnx")
    report = prune_export(model="tiny-clip", out="out/run")   # the whole job
    res = benchmark("out/run", baseline="old/report.json")   # re-measure + CI gate
    rec = recover("out/run", steps=200)                      # distil dense -> pruned
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import export  # noqa: E402
from .bench import BenchConfig, benchmark  # noqa: E402
from .data import load_calibration, load_eval  # noqa: E402
from .eval import evaluate  # noqa: E402
from .models import load_model  # noqa: E402
from .pipeline import RunConfig, prune_export  # noqa: E402
from .prune import PruneResult, prune  # noqa: E402
from .recover import RecoverResult, recover  # noqa: E402
from .sweep import sweep  # noqa: E402

__all__ = ["__version__", "load_model", "load_calibration", "load_eval", "prune", "PruneResult",
           "evaluate", "export", "prune_export", "RunConfig", "benchmark", "BenchConfig", "sweep",
           "recover", "RecoverResult"]
