"""vlcompress.runtime.graphs: what a GPU latency row must not time (recompiles, per-call
host work, per-call cuSPARSELt plans) and what it must say (host-bound, attention). The
CPU-testable logic here; the CUDA parts in tests marked ``gpu``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from vlcompress.errors import ConfigError
from vlcompress.runtime.graphs import (
    HOST_BOUND_RATIO,
    CompileCounter,
    GraphedCall,
    PlannedSparseLinear,
    StaticCompile,
    attn_implementation,
    host_bound,
)
from vlcompress.runtime.latency import host_facts
from vlcompress.runtime.registry import LatencyConfig

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def test_host_bound_flag():
    assert HOST_BOUND_RATIO == 0.8
    assert host_bound(0.9, 1.0) is True and host_bound(0.8, 1.0) is True
    assert host_bound(0.2, 1.0) is False
    assert host_bound(None, 1.0) is None and host_bound(0.5, None) is None
    facts = host_facts({"dense": [1.0, 1.2, 1.1], "pruned": [2.0, 2.0, 2.0]},
                       {"dense": [0.95, 0.9, 1.0], "pruned": [0.1, 0.1, 0.2]})
    assert facts["host_bound"] == {"dense": True, "pruned": False}
    assert facts["host_ms"] == {"dense": 0.95, "pruned": 0.1}
    assert host_facts({"dense": [1.0]}, {}) == {"host_ms": None, "host_bound": None}


def test_cpu_latency_rows_say_host_bound_does_not_apply(tiny_random_clip):
    """Every row carries ``host_bound``: None on CPU (no host issue time is taken), and the
    attention implementation the torch runner ran."""
    from vlcompress.data import load_calibration
    from vlcompress.runtime.latency import build_runners, compare_latency, make_feeds

    lc = LatencyConfig(batch_sizes=(1,), warmup=0, iterations=2, runtime="torch",
                       device="cpu", towers=("vision",))
    vlm = tiny_random_clip
    runners = build_runners(lc, vlm=vlm, towers=["vision"])
    feeds = make_feeds(vlm, ["vision"], (1,), next(iter(load_calibration(
        "shapes", n=2, batch_size=2).batches())))
    rows = compare_latency(runners, runners, feeds, lc)
    assert rows[0]["host_bound"] is None and rows[0]["host_ms"] is None
    assert runners["vision"].describe()["attn_implementation"] in ("sdpa", "eager")


def test_attn_implementation_found_in_a_submodule(tiny_random_clip):
    mod = tiny_random_clip.tower_module("vision")
    assert attn_implementation(mod) == tiny_random_clip.model.config._attn_implementation
    assert attn_implementation(nn.Linear(2, 2)) is None


def test_static_compile_one_graph_per_batch_size():
    """``dynamic=False``: batch sizes 1, 2, 3 are three static graphs, a repeated size none
    more; torch.compile's default recompiled the second size symbolically and reused that
    graph for the third (2 compilations): the issue-25 slowdown."""
    torch._dynamo.reset()
    mod = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()
    sc = StaticCompile(mod, backend="eager")
    with torch.no_grad():
        for b in (1, 2, 3, 2, 1):
            torch.testing.assert_close(sc(torch.ones(b, 8)), mod(torch.ones(b, 8)))
    assert sc.compiles == 3
    torch._dynamo.reset()
    default = CompileCounter("eager")
    fn = torch.compile(nn.Sequential(nn.Linear(8, 8)).eval(), backend=default)
    with torch.no_grad():
        for b in (1, 2, 3):
            fn(torch.ones(b, 8))
    assert default.compiles == 2  # the dynamic graph the static compile avoids
    torch._dynamo.reset()


class _FakeCslt:
    """cuSPARSELt stand-ins on CPU: ``compress`` keeps the dense 2:4 weight, ``mm`` is the
    product cuSPARSELt computes (W @ B, transposed result), ``search`` counts its calls and
    records the shapes it was asked about."""

    searched: list

    def __init__(self):
        self.searched, self.mm_inputs = [], []

    def compress(self, w):
        return w.clone()

    def search(self, packed, dense_t, bias):
        self.searched.append(tuple(dense_t.shape))
        return 7

    def mm(self, packed, dense_t, bias, alg_id):
        assert alg_id == 7
        self.mm_inputs.append(dense_t)
        out = (packed @ dense_t).t()
        return out + bias if bias is not None else out


def test_planned_sparse_linear_searches_once_per_shape():
    """One algorithm search and one padded buffer per row count, reused on every later call
    (the old path searched nothing and padded with a fresh tensor on every call); the output
    is the Linear's, padding rows never read."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    with torch.no_grad():
        lin.weight[:, ::2] = 0  # 2:4 along the input dimension
    ops = _FakeCslt()
    layer = PlannedSparseLinear(lin.weight, lin.bias, min_rows=8, ops=ops)
    xs = [torch.randn(1, 5, 16), torch.randn(1, 5, 16), torch.randn(2, 4, 16),
          torch.randn(1, 5, 16), torch.randn(2, 4, 16)]
    with torch.no_grad():
        for x in xs:
            torch.testing.assert_close(layer(x), lin(x))
    assert ops.searched == [(16, 8), (16, 8)]  # rows 5 -> padded to 8; rows 8: no padding
    assert layer.searches == 2 and sorted(layer.plans) == [5, 8]
    buf5 = layer.plans[5][1]
    assert buf5 is not None and layer.plans[8][1] is None
    # every 5-row call went through the one buffer made for it; 8-row calls used the input
    assert [d.data_ptr() == buf5.data_ptr() for d in ops.mm_inputs] == [True, True, False,
                                                                         True, False]


def test_cuda_graphs_refused_off_torch_cuda():
    """One line, before any work: CUDA graphs replay PyTorch on a GPU."""
    with pytest.raises(ConfigError, match="--cuda-graphs replays PyTorch on a CUDA GPU; the "
                       "runtime here is onnxruntime on cpu"):
        LatencyConfig(runtime="onnxruntime", cuda_graphs=True)
    with pytest.raises(ConfigError, match="torch on cpu"):
        LatencyConfig(runtime="torch", device="cpu", cuda_graphs=True)
    assert LatencyConfig(runtime="torch", device="cuda", cuda_graphs=True).cuda_graphs


@pytest.mark.parametrize("args,needle", [
    (["prune-export", "--cuda-graphs"], "the runtime here is onnxruntime on cpu"),
    (["prune-export", "--engine", "torch", "--cuda-graphs"], "torch on cpu"),
    (["bench", "RUN", "--no-latency", "--cuda-graphs"], "--no-latency"),
])
def test_cuda_graphs_cli_refusals(args, needle, tmp_path):
    from typer.testing import CliRunner

    from vlcompress.cli import app

    res = CliRunner().invoke(app, [str(tmp_path) if a == "RUN" else a for a in args])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.output
    assert list(Path.cwd().iterdir()) == []


@pytest.fixture(scope="module")
def bench():
    from conftest import load_benchmark

    return load_benchmark("gpu_latency", "gpu_latency_graphs")


def test_bench_cuda_graphs_option(bench, capsys):
    a = bench.parse_args(["--cuda-graphs", "--modes", "eager,compile"])
    assert a.modes == ("eager", "compile", "eager+graphs", "compile+graphs")
    for argv, needle in ((["--dry-run", "--out", "x.json", "--cuda-graphs"],
                          "need a CUDA GPU and the dry run is CPU"),
                         (["--runtimes", "tensorrt", "--cuda-graphs"],
                          "apply to the torch runtime; --runtimes tensorrt has none")):
        with pytest.raises(SystemExit) as e:
            bench.parse_args(argv)
        assert e.value.code == 2 and needle in capsys.readouterr().err
    cells = bench.plan_cells((1, 64), ("dense",), ("torch",), ("eager+graphs", "compile+graphs"))
    assert [(c["mode"], c["batch"]) for c in cells] == [
        ("eager+graphs", 1), ("eager+graphs", 64), ("compile+graphs", 64), ("compile+graphs", 1)]
    assert bench.target("structured50", "eager+graphs", 8) == 1.6
    assert bench.target("structured50", "eager", 8) is None
    assert bench.target("2:4", "compile+graphs", 64) == 1.1 and bench.target("2:4", "eager", 64) \
        is None


def test_bench_cell_records_compiles_host_and_attention(bench, tiny_random_clip):
    """The dry-run runners count static compiles; a cell's facts split them into the
    batch size's own (the priming call) and any while timed."""
    import numpy as np

    models = {"dense": tiny_random_clip}
    runners = bench.torch_runners(models, "compile", dry_run=True)
    r = runners["dense"]
    feed = {"pixel_values": np.zeros((1, 3, 32, 32), np.float32)}
    torch._dynamo.reset()
    with r:
        before = {"dense": bench.compiles_of(r)}
        r.infer(feed)
        primed = {"dense": bench.compiles_of(r)}
        r.infer(feed)
        facts = bench.cell_facts(runners, before, primed, {"dense": [1.0]}, {})
    torch._dynamo.reset()
    assert facts["compiles"] == {"dense": 1} and facts["timed_compiles"] == {"dense": 0}
    assert facts["host_bound"] is None
    assert facts["attn_implementation"]["dense"] == \
        tiny_random_clip.model.config._attn_implementation


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_graphed_call_replays_the_eager_result():
    mod = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32)).cuda().half().eval()
    g = GraphedCall(lambda x: mod(x))
    x = torch.randn(8, 64, device="cuda", dtype=torch.half)
    y = torch.randn(8, 64, device="cuda", dtype=torch.half)
    with torch.inference_mode():
        torch.testing.assert_close(g(x=x).clone(), mod(x))
        torch.testing.assert_close(g(x=y).clone(), mod(y))  # copied into the static input
        g(x=torch.randn(4, 64, device="cuda", dtype=torch.half))
    assert g.captures == 2


@pytest.mark.gpu
def test_planned_sparse_linear_on_cusparselt():
    from vlcompress.runtime.cuda import _has_cusparselt

    if not _has_cusparselt(torch) or torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs cuSPARSELt and sparse tensor cores")
    lin = nn.Linear(256, 128).cuda().half()
    with torch.no_grad():
        lin.weight.view(128, 64, 4)[:, :, :2] = 0
    layer = PlannedSparseLinear(lin.weight, lin.bias)
    for x in (torch.randn(1, 197, 256), torch.randn(8, 197, 256), torch.randn(1, 197, 256)):
        x = x.cuda().half()
        with torch.inference_mode():
            torch.testing.assert_close(layer(x), lin(x), rtol=2e-2, atol=2e-2)
    assert layer.searches == 2


@pytest.mark.gpu
def test_cuda_graph_runner_rows_record_host_time_and_captures(tiny_random_clip):
    """The torch CUDA runner under graph replay: one capture per batch size, the same output
    as eager, and the harness's host issue times for the host-bound flag."""
    import numpy as np

    from vlcompress.runtime.cuda import TorchCudaRunner
    from vlcompress.runtime.latency import measure, tower_input_names

    vlm = tiny_random_clip
    mk = lambda g: TorchCudaRunner(vlm.tower_module("vision"),  # noqa: E731
                                   tower_input_names(vlm, "vision"), cuda_graphs=g)
    eager, graphed = mk(False), mk(True)
    feed = {"pixel_values": np.random.default_rng(0).standard_normal((2, 3, 32, 32),
                                                                     dtype=np.float32)}
    with eager, graphed:
        np.testing.assert_allclose(graphed.infer(feed)["embeds"], eager.infer(feed)["embeds"],
                                   rtol=1e-2, atol=1e-2)
        host: dict = {}
        measure({"e": (eager, feed), "g": (graphed, feed)}, warmup=2, iterations=5,
                cuda_events=True, host=host)
        assert graphed.graph_captures == 1 and len(host["g"]) == 5
    assert graphed.describe()["cuda_graphs"] and graphed.describe()["graph_captures"] == 1
