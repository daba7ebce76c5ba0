"""Serve a Triton model repository on the real ``tritonserver`` and check it.

    with TritonServer("runs/clip-triton") as srv:      # free loopback port, waits for ready
        print(srv.url)
    res = serve_check("runs/clip-triton")              # one request per model vs onnxruntime

The server is the ``tritonserver`` binary of the ``nvidia-pytriton`` wheel (the ``[serve]``
extra), which has the Python backend only: a ``--backend python`` repository serves fully; an
``onnxruntime`` or ``tensorrt`` one loads up to Triton's "unable to find backend library"
message, which :class:`ServeError` quotes. The server binds 127.0.0.1 only, HTTP only (gRPC
and metrics off), on a free port; every load loop is bounded in requests and in time.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, ServeError
from .exporters.triton import TritonModel, TritonRepo
from .optional_deps import require_tritonclient_http, require_tritonserver

__all__ = ["TritonServer", "serve_check", "ServeCheck", "example_inputs", "drive_load", "free_port"]


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
        if port is not None and not 0 < int(port) < 65536:
            raise ConfigError(f"--port {port!r} is not valid; allowed: 1..65535")
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
        # The Python-backend stub embeds libpython and finds its prefix (and so this
        # environment's numpy and onnxruntime) through the first `python3` on PATH.
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
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

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
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


def example_inputs(m: TritonModel, batch: int = 2, seq: int = 8, seed: int = 0) -> dict:
    """Valid inputs for ``m``: pixels ~ N(0, 1), token ids below the vocabulary, a full
    attention mask; dynamic dims (-1) become ``seq``."""
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


def _infer(client, httpclient, m: TritonModel, feeds: dict) -> dict:
    inputs = []
    for t in m.inputs:
        x = httpclient.InferInput(t.name, list(feeds[t.name].shape), t.datatype)
        x.set_data_from_numpy(feeds[t.name])
        inputs.append(x)
    outs = [httpclient.InferRequestedOutput(o.name) for o in m.outputs]
    res = client.infer(m.name, inputs, outputs=outs)
    return {o.name: res.as_numpy(o.name) for o in m.outputs}


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
        return all(r["passed"] for r in self.rows)

    def to_dict(self) -> dict:
        return {"repo": self.repo, "backend": self.backend, "url": self.url,
                "start_seconds": round(self.start_seconds, 3), "passed": self.passed,
                "rows": self.rows, "notes": self.notes}


def serve_check(repo: str | Path, *, port: int | None = None, atol: float = 1e-4,
                rtol: float = 1e-3, ready_timeout: float = 120.0) -> ServeCheck:
    """Start ``tritonserver`` on ``repo``, send one request per model, compare each output with
    onnxruntime run directly on the model's ONNX, stop the server."""
    import numpy as np
    import onnxruntime as ort

    rep = TritonRepo.load(repo)
    httpclient = require_tritonclient_http()
    with TritonServer(rep.path, port=port, ready_timeout=ready_timeout) as srv:
        res = ServeCheck(str(rep.path), rep.backend, srv.url, srv.start_seconds, notes=srv.notes)
        client = httpclient.InferenceServerClient(srv.url, network_timeout=120.0)
        try:
            for m in rep.models:
                onnx_path = rep.path / m.name / "1" / "model.onnx"
                if not onnx_path.is_file():  # tensorrt: the run's ONNX the engine came from
                    onnx_path = rep.path / rep.run_dir / m.reference_onnx
                feeds = example_inputs(m)
                t0 = time.perf_counter()
                try:
                    got = _infer(client, httpclient, m, feeds)
                except Exception as exc:  # tritonclient raises its own exception types
                    raise ServeError(f"request to model {m.name!r} failed: {exc}") from exc
                ms = (time.perf_counter() - t0) * 1000
                sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
                ref = dict(zip([o.name for o in m.outputs],
                               sess.run([o.name for o in m.outputs], feeds), strict=True))
                diff = max(float(np.max(np.abs(got[k].astype(np.float64) - ref[k]))) for k in ref)
                ok = all(got[k].shape == ref[k].shape and np.allclose(got[k], ref[k], atol=atol,
                                                                      rtol=rtol) for k in ref)
                res.rows.append({"model": m.name, "batch": int(next(iter(feeds.values())).shape[0]),
                                 "max_abs_diff": diff, "passed": bool(ok), "ms": round(ms, 3)})
        finally:
            client.close()
    return res


def drive_load(url: str, m: TritonModel, feeds: dict, *, concurrency: int, seconds: float,
               max_requests: int = 100_000, warmup: int = 1) -> dict:
    """``concurrency`` closed-loop clients (one thread and connection each) send ``feeds`` to
    model ``m`` until ``seconds`` pass or ``max_requests`` are sent: requests per second,
    p50 / p99 latency (ms) and failed requests."""
    import numpy as np

    httpclient = require_tritonclient_http()
    lat: list[float] = []
    failed = [0]
    sent = [0]
    lock = threading.Lock()
    stop_at = [0.0]
    errors: list[str] = []

    def worker():
        client = httpclient.InferenceServerClient(url, network_timeout=300.0)
        try:
            for _ in range(warmup):
                _infer(client, httpclient, m, feeds)
            barrier.wait()
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

    barrier = threading.Barrier(concurrency + 1)
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    stop_at[0] = float("inf")
    barrier.wait()
    t_start = time.perf_counter()
    stop_at[0] = t_start + seconds
    for t in threads:
        t.join(timeout=seconds + 600)
    wall = time.perf_counter() - t_start
    ms = np.array(lat) * 1000 if lat else np.array([float("nan")])
    return {"concurrency": concurrency, "requests": len(lat), "failed": failed[0],
            "seconds": round(wall, 3), "rps": len(lat) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "errors": errors}

