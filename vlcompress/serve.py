"""Serve a Triton model repository on the real ``tritonserver`` and check it.

    with TritonServer("runs/clip-triton") as srv:      # free loopback port, waits for ready
        print(srv.url)
    res = serve_check("runs/clip-triton")              # every model vs the run's PyTorch model

``serve_check`` sends each model a batch it accepts (``min(max_batch_size, 4)``; batch-1
models get batch-1 requests; a model without a batch axis gets unbatched ones), then
:data:`CONCURRENT` single requests at once from as many clients, which the dynamic batcher may
merge (the server's own statistics say how many executions served them). Every answer is
compared with the run's PyTorch model on the same inputs (``dense`` or ``pruned``; the
quantized variants with the float model they were made from), shapes first (a mismatch is a
failure, never a broadcast), then values at the tolerance of the served precision
(:data:`SERVE_TOLERANCES`). A run whose dense model cannot be rebuilt (a random-init preset:
its dense weights are not saved) has its dense models compared with onnxruntime on the run's
ONNX instead, and the row says so.

A generation model (``*_generate``, a generative run) is compared token for token with the
direct generation loop on the run's export (OrtGenerator on the same left-padded batch; a BLIP
captioning / VQA export: BlipOrtGenerator on each row alone), in a batch, in concurrent single
requests with different prompts and limits, and after malformed requests (an unreadable
image, no image, too many new tokens; VQA: no question, a blank one), each of which must be
refused in one line naming the problem while the server goes on answering.

The server is the ``tritonserver`` binary of the ``nvidia-pytriton`` wheel (the ``[serve]``
extra), which has the Python backend only: a ``--backend python`` repository serves fully; an
``onnxruntime`` or ``tensorrt`` one loads up to Triton's "unable to find backend library"
message, which :class:`ServeError` quotes. The server binds 127.0.0.1 only, HTTP only (gRPC
and metrics off), on a free port; every load loop is bounded in requests and in time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, ServeError
from .exporters.triton import GENERATE, TritonModel, TritonRepo
from .optional_deps import require_tritonclient_http, require_tritonserver

__all__ = ["TritonServer", "serve_check", "ServeCheck", "example_inputs", "drive_load", "free_port",
           "concurrent_infer", "check_serve_options", "SERVE_TOLERANCES", "CONCURRENT",
           "generate_feeds", "generate_examples", "answer_texts", "answer_tokens", "byte_rows"]

#: (atol, rtol, min per-row cosine) of a served answer against the run's PyTorch model, by the
#: precision of the served file. fp32: the export's own check. fp16: the fp16 engines' check.
#: int8 / fp8: rounding to 256 levels moves every value by a step that scales with it, so no
#: absolute tolerance holds; the per-row cosine is the check. Its floor sits under the int8
#: error of a tiny random-weight CLIP (hidden 32) on serve-check's random inputs: static int8
#: (QDQ, 64 calibration pairs) gave a min per-row cosine of 0.988 (vision) and 0.932 (text)
#: over 32 rows against the float PyTorch model; trained models stay far closer (tiny-clip:
#: mean 0.9998, benchmarks/results/quant_quality.json).
SERVE_TOLERANCES = {"fp32": (1e-4, 1e-3, None), "fp16": (2e-2, 2e-2, 0.99),
                    "mixed": (2e-2, 2e-2, 0.99), "int8": (math.inf, 0.0, 0.9),
                    "fp8": (math.inf, 0.0, 0.9)}
#: single requests sent at once to each model (the dynamic batcher's path)
CONCURRENT = 4


def check_serve_options(port=None, ready_timeout: float = 120.0) -> None:
    """``--port`` and ``--timeout``, before anything starts (one ConfigError line each)."""
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                             or not 0 < port < 65536):
        raise ConfigError(f"--port {port!r} is not valid; allowed: 1..65535")
    try:
        t = float(ready_timeout)
    except (TypeError, ValueError):
        t = float("nan")
    if isinstance(ready_timeout, bool) or not math.isfinite(t) or t <= 0:
        raise ConfigError(f"--timeout {ready_timeout!r} is not valid; allowed: seconds > 0, "
                          "e.g. 120")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class TritonServer:
    """``tritonserver`` on ``repo``, on 127.0.0.1: start, wait until ready, stop."""

    def __init__(self, repo: str | Path, *, port: int | None = None, ready_timeout: float = 120.0):
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise ConfigError(f"model repository {str(repo)!r} does not exist; allowed: an "
                              "export-triton --out folder")
        check_serve_options(port, ready_timeout)
        self.server_dir, self.libs = require_tritonserver()
        self.requested_port = port
        self.ready_timeout = ready_timeout
        self.notes: list[str] = []
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.start_seconds: float | None = None
        self._tmp: Path | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _backends(self) -> Path:
        """The wheel's backends, plus the Python-backend stub of this interpreter's version
        (the wheel ships one stub per Python version; Triton looks for it next to the backend)."""
        dst = self._tmp / "backends"
        shutil.copytree(self.server_dir / "backends", dst,
                        ignore=shutil.ignore_patterns("__pycache__"))
        ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
        stub = self.server_dir / "python_backend_stubs" / ver / "triton_python_backend_stub"
        if stub.is_file():
            shutil.copy2(stub, dst / "python" / "triton_python_backend_stub")
        else:
            self.notes.append(f"the Triton wheel has no Python-backend stub for Python {ver}")
        return dst

    def _env(self) -> dict:
        env = os.environ.copy()
        libs = str(self.libs)
        env["LD_LIBRARY_PATH"] = f"{env['LD_LIBRARY_PATH']}:{libs}" if env.get("LD_LIBRARY_PATH") else libs
        # The stub links libpython3.X.so by name: without this it may load the system's copy
        # (another patch release) beside this interpreter's stdlib, and extension modules
        # built for this one (ssl, which transformers imports) then fail to load.
        pylib = sysconfig.get_config_var("LIBDIR")
        if pylib and sysconfig.get_config_var("LDLIBRARY") and \
                (Path(pylib) / sysconfig.get_config_var("LDLIBRARY")).is_file():
            env["LD_LIBRARY_PATH"] = f"{pylib}:{env['LD_LIBRARY_PATH']}"
        # The Python-backend stub embeds libpython and finds its prefix (and so this
        # environment's numpy and onnxruntime) through the first `python3` on PATH.
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        # The stub's embedded Python ignores PYTHONPATH; a generation model imports vlcompress
        # from this folder first, so the server runs the same vlcompress that checks it.
        env["VLCOMPRESS_PATH"] = str(Path(__file__).resolve().parent.parent)
        return env

    def _pick_port(self) -> int:
        if self.requested_port is None:
            return free_port()
        if _port_free(int(self.requested_port)):
            return int(self.requested_port)
        port = free_port()
        self.notes.append(f"port {self.requested_port} is in use on 127.0.0.1; served on {port}")
        return port

    def start(self) -> TritonServer:
        self._tmp = Path(tempfile.mkdtemp(prefix="vlc-triton-"))
        backends = self._backends()
        for attempt in range(3):
            self.port = self._pick_port()
            log = self._tmp / "server.log"
            cmd = [str(self.server_dir / "bin" / "tritonserver"),
                   f"--model-repository={self.repo}", f"--backend-directory={backends}",
                   "--http-address=127.0.0.1", f"--http-port={self.port}",
                   "--allow-grpc=false", "--allow-metrics=false", "--exit-on-error=true",
                   "--strict-readiness=true", "--log-verbose=0"]
            t0 = time.perf_counter()
            with open(log, "wb") as f:
                self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                             env=self._env(), cwd=self._tmp)
            try:
                self._wait_ready(log)
            except ServeError as exc:
                if "address already in use" in str(exc).lower() and attempt < 2:
                    self.notes.append(f"port {self.port} was taken meanwhile; retried on another")
                    self.requested_port = None
                    self._end_process()  # a server that timed out is still running: end it
                    continue
                self.stop()
                raise
            self.start_seconds = time.perf_counter() - t0
            return self
        raise ServeError("no free loopback port could be bound")  # pragma: no cover

    def _wait_ready(self, log: Path) -> None:
        deadline = time.monotonic() + self.ready_timeout
        url = f"http://{self.url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise ServeError(f"tritonserver exited before it was ready: {_server_error(log)}")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.1)
        raise ServeError(f"tritonserver was not ready within {self.ready_timeout:.0f}s: "
                         f"{_server_error(log)}")

    def _end_process(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        self._end_process()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _server_error(log: Path) -> str:
    """The server's own first error line (a model that failed to load names why)."""
    text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    lines = [ln for ln in text.splitlines() if ln.startswith("E") and "CudaDriverHelper" not in ln]
    for ln in lines:
        if "failed to load" in ln or "address" in ln.lower():
            return ln.split("] ", 1)[-1].strip().strip('"')
    if lines:
        return lines[0].split("] ", 1)[-1].strip().strip('"')
    tail = [ln for ln in text.splitlines() if ln.strip()]
    return tail[-1] if tail else "no log output"


def example_inputs(m: TritonModel, batch: int | None = 2, seq: int = 8, seed: int = 0) -> dict:
    """Valid inputs for ``m``: pixels ~ N(0, 1), token ids below the vocabulary, a full
    attention mask; dynamic dims (-1) become ``seq``. ``batch`` is the leading axis of a
    batched model (``max_batch_size`` > 0) and ignored for a model without one."""
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = {}
    for t in m.inputs:
        shape = ([batch] if m.max_batch_size else []) + [seq if d == -1 else d for d in t.dims]
        if t.numpy.startswith(("int", "uint")):
            a = np.ones(shape) if "mask" in t.name else rng.integers(0, m.vocab_size or 2, size=shape)
        else:
            a = rng.standard_normal(shape)
        feeds[t.name] = a.astype(t.numpy)
    return feeds


def byte_rows(rows: list[bytes]):
    """Byte strings as one UINT8 ``[B, N]`` array right-padded with zero bytes: how a
    generation model takes image files and prompts (``exporters/_triton_generate_model.py``
    says why not Triton's BYTES type)."""
    import numpy as np

    width = max([len(r) for r in rows] + [1])
    out = np.zeros((len(rows), width), np.uint8)
    for i, r in enumerate(rows):
        out[i, :len(r)] = np.frombuffer(bytes(r), np.uint8)
    return out


def generate_feeds(prompts: list[str] | None, *, images: list[bytes] | None = None,
                   pixel_values=None, max_new_tokens: int | list[int] | None = None) -> dict:
    """The inputs of a ``*_generate`` model: prompts with image files (bytes) or pixels;
    ``prompts`` None sends no prompt (a BLIP captioning model then starts from the run's
    caption prompt)."""
    import numpy as np

    feeds = {} if prompts is None else {"prompt": byte_rows([p.encode("utf-8") for p in prompts])}
    rows = len(prompts) if prompts is not None else \
        len(images) if images is not None else len(pixel_values)
    if images is not None:
        feeds["image"] = byte_rows(images)
    if pixel_values is not None:
        feeds["pixel_values"] = np.ascontiguousarray(pixel_values, dtype=np.float32)
    if max_new_tokens is not None:
        n = [max_new_tokens] * rows if isinstance(max_new_tokens, int) else max_new_tokens
        feeds["max_new_tokens"] = np.array(n, np.int32).reshape(-1, 1)
    return feeds


def answer_texts(answer: dict) -> list[str]:
    """The ``text`` rows of a generation model's answer."""
    return [bytes(r).rstrip(b"\0").decode("utf-8") for r in answer["text"]]


def answer_tokens(answer: dict) -> list[list[int]]:
    """The ``token_ids`` rows of a generation model's answer, without their -1 padding."""
    return [[int(t) for t in r[:int(n)]] for r, n in
            zip(answer["token_ids"], answer["num_tokens"].reshape(-1), strict=True)]


def _infer(client, httpclient, m: TritonModel, feeds: dict) -> dict:
    inputs = []
    for t in m.inputs:
        if t.optional and t.name not in feeds:
            continue
        x = httpclient.InferInput(t.name, list(feeds[t.name].shape), t.datatype)
        x.set_data_from_numpy(feeds[t.name])
        inputs.append(x)
    outs = [httpclient.InferRequestedOutput(o.name) for o in m.outputs]
    res = client.infer(m.name, inputs, outputs=outs)
    return {o.name: res.as_numpy(o.name) for o in m.outputs}


def concurrent_infer(url: str, m: TritonModel, feeds_list: list[dict], *,
                     timeout: float = 120.0) -> list:
    """Send every feed of ``feeds_list`` at once, each from its own client and thread (released
    together by a barrier): the answers (output name -> array) or the exception each request
    raised, in order. A client that cannot start aborts the barrier instead of hanging it."""
    httpclient = require_tritonclient_http()
    results: list = [None] * len(feeds_list)
    barrier = threading.Barrier(len(feeds_list), timeout=timeout)

    def one(i: int) -> None:
        client = None
        try:
            client = httpclient.InferenceServerClient(url, network_timeout=timeout)
            barrier.wait()
            results[i] = _infer(client, httpclient, m, feeds_list[i])
        except threading.BrokenBarrierError as exc:
            if results[i] is None:
                results[i] = exc
        except Exception as exc:  # noqa: BLE001 - tritonclient raises its own types
            barrier.abort()
            results[i] = exc
        finally:
            if client is not None:
                client.close()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(feeds_list))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 30)
    return [r if r is not None else ServeError("no answer within the timeout") for r in results]


def _model_counts(client, name: str, at_least: int | None = None,
                 wait: float = 5.0) -> tuple[int, int] | None:
    """(inferences, executions) of model ``name`` so far, from the server's statistics; with
    ``at_least``, polled (up to ``wait`` s) until that many inferences are counted: the server
    updates them just after it answers."""
    deadline = time.monotonic() + wait
    while True:
        try:
            st = client.get_inference_statistics(name)["model_stats"][0]
            counts = int(st.get("inference_count", 0)), int(st.get("execution_count", 0))
        except Exception:  # noqa: BLE001 - statistics are informative; their absence is said
            return None
        if at_least is None or counts[0] >= at_least or time.monotonic() > deadline:
            return counts
        time.sleep(0.02)


def _agreement(got: dict, ref: dict, precision: str) -> dict:
    """Served outputs against reference outputs: names and shapes first (a mismatch fails and
    is said; nothing is broadcast), then values at ``SERVE_TOLERANCES[precision]``."""
    import numpy as np

    from .exporters.tensorrt import embedding_agreement

    atol, rtol, min_cos = SERVE_TOLERANCES.get(precision, SERVE_TOLERANCES["fp32"])
    worst = {"ok": True, "max_abs_diff": 0.0, "min_cosine": 1.0}
    for name, r in ref.items():
        g = got.get(name)
        if g is None:
            return {"ok": False, "max_abs_diff": float("inf"), "min_cosine": float("nan"),
                    "error": f"output {name!r} missing from the answer"}
        g, r = np.asarray(g), np.asarray(r)
        if g.shape != r.shape:
            return {"ok": False, "max_abs_diff": float("inf"), "min_cosine": float("nan"),
                    "error": f"output {name!r} has shape {list(g.shape)}, the reference "
                             f"{list(r.shape)}"}
        if g.ndim == 1:  # unbatched: one row
            g, r = g[None], r[None]
        if math.isinf(atol):  # int8 / fp8: no value tolerance, the cosine decides
            a = embedding_agreement(g, r, atol=0.0, rtol=0.0, min_cosine=min_cos)
            a["ok"] = a["cosine_ok"]
        else:
            a = embedding_agreement(g, r, atol=atol, rtol=rtol, min_cosine=min_cos)
        worst["ok"] = worst["ok"] and a["ok"]
        worst["max_abs_diff"] = max(worst["max_abs_diff"], a["max_abs_diff"])
        worst["min_cosine"] = min(worst["min_cosine"], a["min_cosine"])
    return worst


class _References:
    """What each served model must reproduce on given inputs: the run's PyTorch model (dense,
    pruned) run on them; for dense models of a run whose dense model cannot be rebuilt,
    onnxruntime on the run's ONNX (said in ``kind``)."""

    def __init__(self, repo: TritonRepo):
        self.repo = repo
        self.run = repo.path / repo.run_dir if not Path(repo.run_dir).is_absolute() \
            else Path(repo.run_dir)
        if not self.run.is_dir():
            raise ConfigError(f"the run folder of repository {str(repo.path)!r} ({str(self.run)!r}) "
                              "does not exist; serve-check compares with the run's PyTorch model: "
                              "allowed: a repository whose run folder is in place")
        report = {}
        if (self.run / "report.json").is_file():
            report = json.loads((self.run / "report.json").read_text(encoding="utf-8"))
        self.model = report.get("model") or {}
        self.vlms: dict = {}
        self.kinds: dict = {}
        refs = {m.reference or m.variant for m in repo.models if m.tower != GENERATE}
        for ref in sorted(refs):
            folder = self.run / ref / "model"
            if ref == "pruned" and not folder.is_dir():
                raise ConfigError(f"run folder {str(self.run)!r} lacks pruned/model, the pruned "
                                  "PyTorch model serve-check compares with; allowed: a "
                                  "prune-export folder")
            if ref not in ("dense", "pruned"):
                raise ConfigError(f"repository {str(repo.path)!r} names reference {ref!r}; "
                                  "allowed: dense, pruned")
        for ref in sorted(refs):  # loaded now: a model that cannot load fails before the server
            self._vlm(ref)

    def _vlm(self, ref: str):
        if ref in self.vlms:
            return self.vlms[ref]
        from .models import load_model

        vlm, kind = None, f"PyTorch {ref} model"
        if (self.run / ref / "model").is_dir():
            vlm = load_model(self.run / ref / "model")
        elif str(self.model.get("source", "")).startswith("preset:") or not self.model:
            kind = (f"onnxruntime on the run's ONNX (the run's {ref} model is a random-init "
                    "preset whose weights were not saved, so PyTorch cannot rebuild it)")
        else:
            from .bench import _load_dense

            vlm = _load_dense(self.model)
        self.vlms[ref], self.kinds[ref] = vlm, kind
        return vlm

    def kind(self, m: TritonModel) -> str:
        self._vlm(m.reference or m.variant)
        return self.kinds[m.reference or m.variant]

    def outputs(self, m: TritonModel, feeds: dict) -> dict:
        import numpy as np

        vlm = self._vlm(m.reference or m.variant)
        names = [o.name for o in m.outputs]
        unbatched = not m.max_batch_size
        if vlm is None:
            import onnxruntime as ort

            sess = ort.InferenceSession(str(self.run / m.reference_onnx),
                                        providers=["CPUExecutionProvider"])
            return dict(zip(names, sess.run(names, feeds), strict=True))
        import torch

        module = vlm.tower_module(m.tower).eval()
        inputs = {}
        for k, v in feeds.items():
            a = np.asarray(v)
            a = a.astype(np.float32) if a.dtype.kind == "f" else a
            t = torch.from_numpy(np.ascontiguousarray(a))
            inputs[k] = t[None] if unbatched else t
        with torch.no_grad():
            out = module(**inputs)
        if hasattr(out, "to_tuple"):
            out = out.to_tuple()
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        arrs = [o.detach().float().cpu().numpy() for o in outs[:len(names)]]
        if unbatched:
            arrs = [a[0] for a in arrs]
        return dict(zip(names, arrs, strict=False))


@dataclass
class ServeCheck:
    repo: str
    backend: str
    url: str
    start_seconds: float
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r["passed"] for r in self.rows)

    def to_dict(self) -> dict:
        return {"repo": self.repo, "backend": self.backend, "url": self.url,
                "start_seconds": round(self.start_seconds, 3), "passed": self.passed,
                "tolerances": {k: list(v) for k, v in SERVE_TOLERANCES.items()},
                "rows": self.rows, "notes": self.notes}


def _error_text(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def serve_check(repo: str | Path, *, port: int | None = None, ready_timeout: float = 120.0,
                concurrent: int = CONCURRENT) -> ServeCheck:
    """Start ``tritonserver`` on ``repo``; to every model send one batch it accepts, then
    ``concurrent`` single requests at once; compare each answer with the run's PyTorch model
    on the same inputs (see the module docstring); stop the server. Every option, the
    repository and its run folder are checked before the server starts."""
    check_serve_options(port, ready_timeout)
    if isinstance(concurrent, bool) or not isinstance(concurrent, int) or concurrent < 1:
        raise ConfigError(f"concurrent {concurrent!r} is not valid; allowed: an integer >= 1")
    rep = TritonRepo.load(repo)
    httpclient = require_tritonclient_http()
    require_tritonserver()
    refs = _References(rep)
    gen_refs = _GenReferences(refs.run, rep) if any(m.tower == GENERATE for m in rep.models) else None
    with TritonServer(rep.path, port=port, ready_timeout=ready_timeout) as srv:
        res = ServeCheck(str(rep.path), rep.backend, srv.url, srv.start_seconds, notes=srv.notes)
        client = httpclient.InferenceServerClient(srv.url, network_timeout=120.0)
        try:
            for m in rep.models:
                if m.tower == GENERATE:
                    res.rows.append(_check_generate_batch(client, httpclient, m, gen_refs))
                    res.rows.append(_check_generate_concurrent(client, srv.url, m, gen_refs,
                                                               concurrent))
                    res.rows.append(_check_generate_refusals(client, httpclient, m, gen_refs))
                    continue
                res.rows.append(_check_batch(client, httpclient, m, refs))
                res.rows.append(_check_concurrent(client, srv.url, m, refs, concurrent))
        finally:
            client.close()
    return res


def _row(m: TritonModel, refs: _References, kind: str, batch, requests: int) -> dict:
    return {"model": m.name, "variant": m.variant, "precision": m.precision, "kind": kind,
            "batch": batch, "requests": requests, "reference": refs.kind(m)}


def _check_batch(client, httpclient, m: TritonModel, refs: _References) -> dict:
    batch = min(m.max_batch_size, 4) if m.max_batch_size else None
    feeds = example_inputs(m, batch=batch, seed=0)
    row = _row(m, refs, "batch", batch, 1)
    t0 = time.perf_counter()
    try:
        got = _infer(client, httpclient, m, feeds)
    except Exception as exc:  # noqa: BLE001 - tritonclient raises its own types
        return {**row, "passed": False, "max_abs_diff": float("inf"), "min_cosine": float("nan"),
                "error": f"request failed: {_error_text(exc)}"}
    row["ms"] = round((time.perf_counter() - t0) * 1000, 3)
    a = _agreement(got, refs.outputs(m, feeds), m.precision)
    return {**row, "passed": bool(a["ok"]), "max_abs_diff": a["max_abs_diff"],
            "min_cosine": a["min_cosine"], **({"error": a["error"]} if "error" in a else {})}


def _check_concurrent(client, url: str, m: TritonModel, refs: _References, n: int) -> dict:
    batch = 1 if m.max_batch_size else None
    feeds = [example_inputs(m, batch=batch, seed=100 + i) for i in range(n)]
    row = _row(m, refs, "concurrent", batch, n)
    before = _model_counts(client, m.name)
    t0 = time.perf_counter()
    answers = concurrent_infer(url, m, feeds)
    row["ms"] = round((time.perf_counter() - t0) * 1000, 3)
    after = _model_counts(client, m.name, at_least=None if before is None else before[0] + n)
    if before is not None and after is not None:  # how the batcher grouped them
        row["inferences"], row["executions"] = after[0] - before[0], after[1] - before[1]
    ok, worst_diff, worst_cos, errors = True, 0.0, 1.0, []
    for i, (f, ans) in enumerate(zip(feeds, answers, strict=True)):
        if isinstance(ans, BaseException):
            ok = False
            errors.append(f"request {i}: {_error_text(ans)}")
            continue
        a = _agreement(ans, refs.outputs(m, f), m.precision)  # each against its own reference
        ok = ok and bool(a["ok"])
        worst_diff = max(worst_diff, a["max_abs_diff"])
        worst_cos = min(worst_cos, a["min_cosine"]) if not math.isnan(a["min_cosine"]) else worst_cos
        if "error" in a:
            errors.append(f"request {i}: {a['error']}")
    out = {**row, "passed": ok, "max_abs_diff": worst_diff, "min_cosine": worst_cos}
    if errors:
        out["error"] = "; ".join(errors[:3])
    return out


#: prompts serve-check sends a generation model (cycled): different lengths, so a batch is
#: left-padded (and a BLIP VQA batch holds questions of different lengths)
GENERATE_PROMPTS = ("describe the picture.", "what color is it ?", "what shape is it ?",
                    "where is the shape in the picture ?")
#: caption starts sent to a BLIP captioning model (cycled; the empty one: no start)
CAPTION_PROMPTS = ("a picture of", "", "a picture of the", "the shape is")


def generate_examples(n: int, seed: int = 0,
                      kind: str = "llava") -> tuple[list[bytes], list[str]]:
    """``n`` PNG files of the bundled shapes set (from image ``seed`` on) and prompts for a
    generation model of ``kind`` (``TritonModel.parameters["kind"]``): caption starts for
    ``blip-caption``, instructions / questions otherwise."""
    import io

    from .data import load_eval

    images = load_eval("shapes", n=n + seed, batch_size=n + seed).images[seed:]
    files = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        files.append(buf.getvalue())
    pool = CAPTION_PROMPTS if kind == "blip-caption" else GENERATE_PROMPTS
    return files, [pool[(seed + i) % len(pool)] for i in range(n)]


class _GenReferences:
    """What each generation model must reproduce: the generation loop run directly on the
    run's own export folder of the served variant (``dense/``, ``pruned_int8/``,
    ``dense_tokens/`` ...) with the run's processor, on the same
    image bytes (or pixels), prompts and ``max_new_tokens``: :class:`OrtGenerator` on the same
    left-padded batch; for a BLIP captioning / VQA export, :class:`BlipOrtGenerator` on each
    row alone (the served model promises each row its answer alone, see
    :class:`~vlcompress.runtime.gen_inputs.BlipPromptEncoder`)."""

    def __init__(self, run: Path, repo: TritonRepo):
        from .exporters.triton import _read_report, processor_dir
        from .runtime.gen_inputs import BLIP_KINDS, BlipPromptEncoder, PromptEncoder
        from .runtime.ort_generate import OrtGenerator, read_spec

        report = _read_report(run)
        models = [m for m in repo.models if m.tower == GENERATE]
        spec = read_spec(run / models[0].reference)
        name = models[0].parameters.get("model_name", "model")
        self.blip = spec.get("kind") in BLIP_KINDS
        if self.blip:
            from .runtime.ort_generate_blip import BlipOrtGenerator

            self.encoder = BlipPromptEncoder(processor_dir(run, report), name, spec)
            self.generators = {m.reference: BlipOrtGenerator(run / m.reference) for m in models}
            self.loop = "BlipOrtGenerator"
        else:
            self.generators = {m.reference: OrtGenerator(run / m.reference) for m in models}
            # a --visual-tokens export's prompts carry its K image tokens
            self.encoders = {r: PromptEncoder(processor_dir(run, report), name,
                                              int(spec["context"]),
                                              image_tokens=g.spec.get("image_tokens"))
                             for r, g in self.generators.items()}
            self.encoder = next(iter(self.encoders.values()))  # decode and pixels: one for all
            self.loop = "OrtGenerator"
        self.context = int(spec["context"])

    def kind(self, m: TritonModel) -> str:
        alone = ", each row alone" if self.blip else ""
        return f"{self.loop} on the run's {m.reference}/ export (direct{alone})"

    def tokens(self, m: TritonModel, feeds: dict, prompts: list[str] | None, limit: int,
               images: list[bytes] | None = None) -> list[list[int]]:
        from .runtime.gen_inputs import read_image

        if self.blip:
            px = feeds.get("pixel_values")
            n = len(images) if images is not None else len(px)
            qs = prompts if prompts is not None else [None] * n
            rows = (self.encoder.encode([read_image(f) for f in images], qs)
                    if images is not None else self.encoder.encode_pixels(px, qs))
            gen = self.generators[m.reference]
            return [self.encoder.generate(gen, [r], [limit])[0] for r in rows]
        encoder = self.encoders[m.reference]
        enc = (encoder.encode([read_image(f) for f in images], prompts) if images is not None
               else encoder.encode_pixels(feeds["pixel_values"], prompts))
        return self.generators[m.reference].generate(enc["input_ids"], enc["attention_mask"],
                                                     enc["pixel_values"], limit)

    def pixels(self, file: bytes, prompt: str | None):
        """The processor's pixels ``[1, 3, H, W]`` of one image file (what a client that
        preprocesses sends)."""
        from .runtime.gen_inputs import read_image

        if self.blip:
            return self.encoder.encode([read_image(file)], [prompt])[0]["pixel_values"][None]
        return self.encoder.encode([read_image(file)], [prompt])["pixel_values"]


def _gen_row(m: TritonModel, refs: _GenReferences, kind: str, batch: int, requests: int) -> dict:
    return {"model": m.name, "variant": m.variant, "precision": m.precision, "kind": kind,
            "batch": batch, "requests": requests, "reference": refs.kind(m), "generate": True}


def _compare_tokens(got: list, want: list, texts: list, refs: _GenReferences, row: dict) -> dict:
    """Token-for-token agreement of served and direct rows (and the served text = the decoded
    direct tokens)."""
    same = [g == w for g, w in zip(got, want, strict=True)]
    bad = [f"row {i}: served {g} {t!r}, direct {w} {refs.encoder.decode(w)!r}"
           for i, (g, w, t, ok) in enumerate(zip(got, want, texts, same, strict=True)) if not ok]
    bad += [f"row {i}: served text {t!r} is not the decoded tokens {refs.encoder.decode(g)!r}"
            for i, (g, t) in enumerate(zip(got, texts, strict=True)) if t != refs.encoder.decode(g)]
    out = {**row, "passed": not bad, "rows_equal": sum(same), "rows": len(same),
           "new_tokens": sum(len(g) for g in got)}
    if bad:
        out["error"] = "; ".join(bad[:2])
    return out


def _check_generate_batch(client, httpclient, m: TritonModel, refs: _GenReferences) -> dict:
    """One request of several rows (a BLIP captioning model: without a prompt, so the run's
    caption prompt starts every row)."""
    batch = min(m.max_batch_size, 4)
    limit = int(m.parameters.get("max_new_tokens", 24))
    kind = m.parameters.get("kind", "llava")
    files, prompts = generate_examples(batch, seed=0, kind=kind)
    if kind == "blip-caption":
        prompts = None
    feeds = generate_feeds(prompts, images=files, max_new_tokens=limit)
    row = _gen_row(m, refs, "batch", batch, 1)
    t0 = time.perf_counter()
    try:
        got = _infer(client, httpclient, m, feeds)
    except Exception as exc:  # noqa: BLE001 - tritonclient raises its own types
        return {**row, "passed": False, "error": f"request failed: {_error_text(exc)}"}
    row["ms"] = round((time.perf_counter() - t0) * 1000, 3)
    want = refs.tokens(m, feeds, prompts, limit, images=files)  # the same batch, left-padded
    return _compare_tokens(answer_tokens(got), want, answer_texts(got), refs, row)


def _check_generate_concurrent(client, url: str, m: TritonModel, refs: _GenReferences,
                               n: int) -> dict:
    """``n`` single requests at once: alternately image bytes and processor pixels, with
    different prompts and ``max_new_tokens`` (a BLIP captioning model: every fourth without a
    prompt); each compared with its own direct run alone."""
    limit = int(m.parameters.get("max_new_tokens", 24))
    kind = m.parameters.get("kind", "llava")
    files, texts = generate_examples(n, seed=8, kind=kind)
    prompts = [None if kind == "blip-caption" and i % 4 == 3 else t for i, t in enumerate(texts)]
    cases = []
    for i in range(n):
        lim = max(1, limit - (i % 3) * (limit // 3))  # the batcher may merge different limits
        one = None if prompts[i] is None else [prompts[i]]
        if i % 2:
            px = refs.pixels(files[i], prompts[i])
            cases.append((generate_feeds(one, pixel_values=px, max_new_tokens=lim), None, lim))
        else:
            cases.append((generate_feeds(one, images=[files[i]], max_new_tokens=lim),
                          [files[i]], lim))
    row = _gen_row(m, refs, "concurrent", 1, n)
    before = _model_counts(client, m.name)
    t0 = time.perf_counter()
    answers = concurrent_infer(url, m, [c[0] for c in cases])
    row["ms"] = round((time.perf_counter() - t0) * 1000, 3)
    after = _model_counts(client, m.name, at_least=None if before is None else before[0] + n)
    if before is not None and after is not None:
        row["inferences"], row["executions"] = after[0] - before[0], after[1] - before[1]
    got, want, texts, errors = [], [], [], []
    for i, ((feeds, imgs, lim), ans) in enumerate(zip(cases, answers, strict=True)):
        if isinstance(ans, BaseException):
            errors.append(f"request {i}: {_error_text(ans)}")
            continue
        got += answer_tokens(ans)
        texts += answer_texts(ans)
        want += refs.tokens(m, feeds, None if prompts[i] is None else [prompts[i]], lim,
                            images=imgs)
    out = _compare_tokens(got, want, texts, refs, row)
    if errors:
        out["passed"] = False
        out["error"] = "; ".join(errors[:3] + ([out["error"]] if "error" in out else []))
    return out


def _bad_generate_requests(m: TritonModel, refs: _GenReferences) -> list[tuple[str, dict, str]]:
    """(what, feeds, a phrase the refusal must hold) of malformed requests for a generation
    model: each must get its own one-line error, and the server must go on answering."""
    kind = m.parameters.get("kind", "llava")
    files, prompts = generate_examples(1, seed=0, kind=kind)
    prompt = prompts[0] or "a picture of"
    cases = [("an image that cannot be read",
              generate_feeds([prompt], images=[b"not an image"]), "cannot be read"),
             ("neither image nor pixels", generate_feeds([prompt]), "exactly one of"),
             ("max_new_tokens above the context",
              generate_feeds([prompt], images=files, max_new_tokens=refs.context + 1),
              f"outside 1..{refs.context}")]
    if kind == "blip-vqa":
        cases += [("a VQA request without a question", generate_feeds(None, images=files),
                   "question"),
                  ("a VQA request with a blank question", generate_feeds(["  "], images=files),
                   "question")]
    return cases


def _check_generate_refusals(client, httpclient, m: TritonModel, refs: _GenReferences) -> dict:
    """Malformed requests (:func:`_bad_generate_requests`) are each refused in one line that
    names the problem, and a valid request right after them is still answered as the direct
    run answers it."""
    row = _gen_row(m, refs, "refusal", 1, 0)
    problems, refused = [], 0
    cases = _bad_generate_requests(m, refs)
    for what, feeds, phrase in cases:
        try:
            _infer(client, httpclient, m, feeds)
            problems.append(f"{what}: answered instead of refused")
        except Exception as exc:  # noqa: BLE001 - tritonclient raises its own types
            text = str(exc)
            if "\n" in text.strip() or "invalid request" not in text or phrase not in text:
                problems.append(f"{what}: refused with {_error_text(exc)!r}, not one line "
                                f"naming {phrase!r}")
            else:
                refused += 1
    limit = int(m.parameters.get("max_new_tokens", 24))
    files, prompts = generate_examples(1, seed=2, kind=m.parameters.get("kind", "llava"))
    feeds = generate_feeds(prompts, images=files, max_new_tokens=limit)
    try:
        got = _infer(client, httpclient, m, feeds)
        after = _compare_tokens(answer_tokens(got), refs.tokens(m, feeds, prompts, limit,
                                                                images=files),
                                answer_texts(got), refs, {})
        if not after["passed"]:
            problems.append(f"the valid request after them: {after['error']}")
    except Exception as exc:  # noqa: BLE001 - tritonclient raises its own types
        problems.append(f"the valid request after them failed: {_error_text(exc)}")
    out = {**row, "requests": len(cases) + 1, "refused": refused, "bad_requests": len(cases),
           "passed": not problems}
    if problems:
        out["error"] = "; ".join(problems[:3])
    return out


def drive_load(url: str, m: TritonModel, feeds: dict, *, concurrency: int, seconds: float,
               max_requests: int = 100_000, warmup: int = 1, start_timeout: float = 300.0) -> dict:
    """``concurrency`` closed-loop clients (one thread and connection each) send ``feeds`` to
    model ``m`` until ``seconds`` pass or ``max_requests`` are sent: requests per second,
    p50 / p99 latency (ms) and failed requests. The clients start together after their
    warm-up; one whose warm-up fails aborts the start, and drive_load raises a ServeError
    naming why (nothing hangs: the start barrier also times out after ``start_timeout`` s)."""
    import numpy as np

    httpclient = require_tritonclient_http()
    lat: list[float] = []
    failed = [0]
    sent = [0]
    lock = threading.Lock()
    stop_at = [float("inf")]
    errors: list[str] = []
    warmup_errors: list[str] = []
    barrier = threading.Barrier(concurrency + 1, timeout=start_timeout)

    def worker():
        client = None
        try:
            client = httpclient.InferenceServerClient(url, network_timeout=300.0)
            for _ in range(warmup):
                _infer(client, httpclient, m, feeds)
        except Exception as exc:  # noqa: BLE001 - the start is aborted, the reason kept
            with lock:
                warmup_errors.append(_error_text(exc))
            barrier.abort()
            if client is not None:
                client.close()
            return
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            client.close()
            return
        try:
            while True:
                with lock:
                    if sent[0] >= max_requests or time.perf_counter() >= stop_at[0]:
                        return
                    sent[0] += 1
                t0 = time.perf_counter()
                try:
                    _infer(client, httpclient, m, feeds)
                    dt = time.perf_counter() - t0
                    with lock:
                        lat.append(dt)
                except Exception as exc:  # counted, and the first few kept
                    with lock:
                        failed[0] += 1
                        if len(errors) < 3:
                            errors.append(str(exc)[:200])
        finally:
            client.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        for t in threads:
            t.join(timeout=5)
        why = warmup_errors[0] if warmup_errors else f"not every client was ready within {start_timeout:g}s"
        raise ServeError(f"load test on model {m.name!r} did not start: a client's warm-up "
                         f"failed: {why}") from None
    t_start = time.perf_counter()
    stop_at[0] = t_start + seconds
    for t in threads:
        t.join(timeout=seconds + 600)
    wall = time.perf_counter() - t_start
    ms = np.array(lat) * 1000 if lat else np.array([float("nan")])
    return {"concurrency": concurrency, "requests": len(lat), "failed": failed[0],
            "seconds": round(wall, 3), "rps": len(lat) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)),
            "errors": errors}
