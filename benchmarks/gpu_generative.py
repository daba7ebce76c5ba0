"""Generative decode on a GPU: PyTorch with CUDA graphs over a static KV cache, dense vs
structured-pruned decoder, and ONNX Runtime CUDA where it is installed (issue 28, item 6).

    python benchmarks/gpu_generative.py                 # on the GPU machine (scripts/gpu_generative_check.sh)
    python benchmarks/gpu_generative.py --dry-run --out /tmp/x.json   # CPU, tiny-llava, seconds

Two models of ``--model`` (default the random-weight preset ``llava-qwen2-0.5b``: latency
does not depend on the weight values): ``dense``, and ``pruned``: ``--structured-sparsity`` of
the decoder (``prune(..., --method, "structured", scope=("language",))``: whole query heads per
KV group and gated-MLP neurons, sliced). Each decodes ``--new-tokens`` tokens greedily at batch
1 after a ``--prompt``-token text prompt, one timed step per token (the step, the arg-max and
the host reading the token, as a generator checking for the end token does; a device
synchronisation closes each step), in each ``--modes``:

- ``eager``: the model's forward per token on transformers' ``DynamicCache`` (what
  ``generate`` does by default);
- ``static``: the same on a ``StaticCache`` (``max_cache_len`` = prompt + new tokens: the
  cache is allocated once, each step writes one slot; no graph);
- ``graphs``: the ``static`` step captured once in a CUDA graph (``torch.cuda.graph`` after
  warm-up on a side stream) over static input buffers (token id, position) and replayed per
  token: the kernels of a step are launched by one replay, so the host's per-kernel launch
  cost (which dominates a 0.5B decoder's step at batch 1) is gone;
- ``compile``: the ``static`` step under ``torch.compile(mode="reduce-overhead")`` (inductor
  kernels, CUDA graphs managed by torch), warmed up before timing.

``graphs`` and ``compile`` need CUDA: on CPU they are listed under ``skipped`` with the reason.
Every graph-replayed or compiled step's greedy tokens are compared with the eager step's
(``tokens_equal_to_eager``): a capture that froze the position or the cache would show there.

ONNX Runtime (``--runtimes onnxruntime``): where its CUDA provider is available (a GPU run),
each model is exported (:func:`vlcompress.exporters.generative.export_generative`, fp32) and
converted to fp16 with its fp16 KV cache (:func:`vlcompress.exporters.generative_quant
.make_fp16_variant`), then decoded with IOBinding: the presents stay on the device as
``OrtValue`` and are bound as the next step's past, only the logits come back. Without the
CUDA provider the row is skipped with the reason -- except in ``--dry-run``, which runs the
same loop on the CPU provider with the fp32 export so the code path is exercised.

The variants take turns within each (runtime, mode) cell, ``--rounds`` rounds, so drifts hit
both alike; each row has p50 / p90 ms per token, tokens/s, prefill ms and the pruned speedup
over dense in the same cell. A deadline (``--deadline-s``) starts no cell after it; the JSON is
rewritten after every cell (``complete`` false until the end), so a cut-short run keeps what it
measured and lists what it did not.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_result  # noqa: E402

MODES = ("eager", "static", "graphs", "compile")
RUNTIMES = ("torch", "onnxruntime")
VARIANTS = ("dense", "pruned")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: llava-qwen2-0.5b (tiny-llava with "
                                                   "--dry-run)")
    ap.add_argument("--method", default="magnitude")
    ap.add_argument("--structured-sparsity", type=float, default=0.5)
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"comma list of {', '.join(MODES)} (graphs, compile: CUDA only; skipped "
                         "with the reason on CPU)")
    ap.add_argument("--runtimes", default="torch,onnxruntime")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128; 8 dry)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 64; 6 with --dry-run")
    ap.add_argument("--rounds", type=int, default=None, help="default 3; 1 with --dry-run")
    ap.add_argument("--device", default=None, help="default cuda (cpu with --dry-run)")
    ap.add_argument("--deadline-s", type=float, default=420.0)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny-llava, few tokens")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dry = a.dry_run
    a.model = a.model or ("tiny-llava" if dry else "llava-qwen2-0.5b")
    a.device = a.device or ("cpu" if dry else "cuda")
    a.modes = tuple(a.modes.split(","))
    a.runtimes = tuple(a.runtimes.split(","))
    a.prompt = a.prompt or (8 if dry else 128)
    a.new_tokens = a.new_tokens or (6 if dry else 64)
    a.rounds = a.rounds or (1 if dry else 3)
    for m in a.modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}; allowed: {', '.join(MODES)}")
    for r in a.runtimes:
        if r not in RUNTIMES:
            ap.error(f"unknown runtime {r!r}; allowed: {', '.join(RUNTIMES)}")
    if a.device not in ("cpu", "cuda"):
        ap.error(f"unknown device {a.device!r}; allowed: cpu, cuda")
    return a


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


class TorchDecoder:
    """Greedy decode steps of one llava model at batch 1 in one mode (module doc)."""

    def __init__(self, model, mode: str, device: str, capacity: int):
        import torch

        from vlcompress.runtime.torch_generate import _cache_keyword

        self.model, self.mode, self.device, self.capacity = model, mode, device, capacity
        self.kw = _cache_keyword()
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.cache = self.step = None

    def _new_cache(self):
        """A fresh DynamicCache (eager); else the one StaticCache of this decoder, emptied in
        place (``reset`` zeroes its tensors: the addresses a captured graph or a compiled
        function holds stay valid, and dynamo's guards see the same object: no recompile)."""
        from transformers import DynamicCache, StaticCache

        tc = self.model.config.text_config
        if self.mode == "eager":
            return DynamicCache(config=tc)
        if self.cache is None:
            self.cache = StaticCache(config=tc, max_cache_len=self.capacity)
        else:
            self.cache.reset()
        return self.cache

    def _forward(self, ids, pos, cache):
        return self.model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1,
                          **{self.kw: cache}).logits[:, -1]

    def run(self, prompt_ids, new_tokens: int) -> tuple[float, list[float], list[int]]:
        """(prefill seconds, seconds per generated token, the greedy tokens)."""
        import torch

        p = prompt_ids.shape[1]
        with torch.inference_mode():
            cache = self._new_cache()
            _sync(self.device)
            t0 = time.perf_counter()
            logits = self._forward(prompt_ids, torch.arange(p, device=self.device)[None], cache)
            tok = int(logits.argmax(-1))
            prefill = time.perf_counter() - t0
            if self.step is None or self.mode in ("eager", "static"):
                self.step = self._step_fn(cache, p)  # graphs / compile: built once, untimed
            step = self.step
            steps, toks = [], [tok]
            for i in range(new_tokens):
                _sync(self.device)
                t0 = time.perf_counter()
                self.ids.fill_(tok)
                self.pos.fill_(p + i)
                tok = int(step().argmax(-1))  # the host reads the token: a sync
                steps.append(time.perf_counter() - t0)
                toks.append(tok)
        return prefill, steps, toks

    def _step_fn(self, cache, prompt_len: int):
        """A no-argument callable running one decode step on ``self.ids`` / ``self.pos``."""
        import torch

        if self.mode in ("eager", "static"):
            return lambda: self._forward(self.ids, self.pos, cache)
        if self.mode == "compile":
            compiled = torch.compile(self._forward, mode="reduce-overhead")

            def run():
                return compiled(self.ids, self.pos, cache).clone()
            # compile and record the CUDA graphs now (reduce-overhead records at a later
            # call), not in a timed step; the slot written here is the first step's, which
            # overwrites it
            self.pos.fill_(prompt_len)
            for _ in range(3):
                run()
            return run
        # graphs: capture one step on this cache (warm-up on a side stream, as PyTorch's
        # CUDA-graph docs do), then replay; the capture writes its slot of the cache at the
        # position in self.pos, read from the buffer at replay time
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        self.pos.fill_(prompt_len)
        with torch.cuda.stream(s):
            for _ in range(2):
                self._forward(self.ids, self.pos, cache)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._forward(self.ids, self.pos, cache)

        def replay():
            graph.replay()
            return out
        return replay


class OrtCudaDecoder:
    """Greedy decode at batch 1 on ONNX Runtime with IOBinding: the presents stay where the
    provider put them (``OrtValue``) and are bound as the next step's past."""

    def __init__(self, folder: Path, provider: str):
        import onnxruntime as ort

        from vlcompress.runtime.ort_generate import read_spec

        self.spec = read_spec(folder)
        self.dev = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
        so = ort.SessionOptions()
        so.log_severity_level = 3
        prov = [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])
        self.embed = ort.InferenceSession(str(folder / self.spec["files"]["embed"]), so,
                                          providers=prov)
        self.decoder = ort.InferenceSession(str(folder / self.spec["files"]["decoder"]), so,
                                            providers=prov)
        self.outs = [o.name for o in self.decoder.get_outputs()]
        self.kv = np.dtype(self.spec.get("kv_dtype", "float32"))
        self.hidden = None

    def _ov(self, arr):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr), self.dev, 0)

    def _decode(self, embeds, mask, pos, past: dict):
        io = self.decoder.io_binding()
        io.bind_ortvalue_input("inputs_embeds", embeds)
        io.bind_ortvalue_input("attention_mask", self._ov(mask))
        io.bind_ortvalue_input("position_ids", self._ov(pos))
        for k, v in past.items():
            io.bind_ortvalue_input(k, v)
        io.bind_output("logits", "cpu")  # the only host copy: one row of logits
        for name in self.outs[1:]:
            io.bind_output(name, self.dev)
        self.decoder.run_with_iobinding(io)
        vals = dict(zip(self.outs, io.get_outputs(), strict=True))
        return vals["logits"].numpy(), {k.replace("present.", "past.", 1): v
                                        for k, v in vals.items() if k != "logits"}

    def _embed(self, ids: np.ndarray):
        io = self.embed.io_binding()
        io.bind_ortvalue_input("input_ids", self._ov(ids.astype(np.int64)))
        io.bind_output("inputs_embeds", self.dev)
        self.embed.run_with_iobinding(io)
        return io.get_outputs()[0]

    def run(self, prompt_ids, new_tokens: int) -> tuple[float, list[float], list[int]]:
        s = self.spec
        ids = np.asarray(prompt_ids.cpu() if hasattr(prompt_ids, "cpu") else prompt_ids,
                         np.int64)
        p = ids.shape[1]
        empty = np.zeros((1, int(s["num_key_value_heads"]), 0, int(s["head_dim"])), self.kv)
        past = {f"past.{i}.{kv}": self._ov(empty) for i in range(int(s["num_layers"]))
                for kv in ("key", "value")}
        t0 = time.perf_counter()
        logits, past = self._decode(self._embed(ids), np.ones((1, p), np.int64),
                                    np.arange(p, dtype=np.int64)[None], past)
        tok = int(logits[0, -1].argmax())
        prefill = time.perf_counter() - t0
        steps, toks = [], [tok]
        for i in range(new_tokens):
            t0 = time.perf_counter()
            logits, past = self._decode(self._embed(np.array([[tok]])),
                                        np.ones((1, p + i + 1), np.int64),
                                        np.array([[p + i]], np.int64), past)
            tok = int(logits[0, -1].argmax())
            steps.append(time.perf_counter() - t0)
            toks.append(tok)
        return prefill, steps, toks


def _row(runtime, mode, variant, prefill, steps, dense_p50=None) -> dict:
    ms = np.array(steps) * 1e3
    p50 = float(np.percentile(ms, 50))
    return {"runtime": runtime, "mode": mode, "variant": variant, "batch": 1,
            "decode_ms_per_token": {"p50": p50, "p90": float(np.percentile(ms, 90)),
                                    "n": int(ms.size)},
            "tokens_per_s": 1e3 / p50, "prefill_ms": float(np.median(prefill) * 1e3),
            "speedup_over_dense": None if dense_p50 is None else dense_p50 / p50}


def _cell(decoders: dict, prompt_ids, a) -> dict:
    """Every variant in turn, ``a.rounds`` rounds, after one untimed warm-up run each."""
    for d in decoders.values():
        d.run(prompt_ids, min(4, a.new_tokens))
    pre = {v: [] for v in decoders}
    steps = {v: [] for v in decoders}
    toks = {}
    for _ in range(a.rounds):
        for v, d in decoders.items():
            pf, st, tk = d.run(prompt_ids, a.new_tokens)
            pre[v].append(pf)
            steps[v] += st
            toks[v] = tk
    return {"prefill": pre, "steps": steps, "tokens": toks}


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch

    from vlcompress.data import load_calibration
    from vlcompress.models import load_model
    from vlcompress.prune import prune

    t_start = time.perf_counter()
    deadline = t_start + a.deadline_s
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("gpu_generative: --device cuda but torch sees no GPU (use --dry-run on CPU)",
              file=sys.stderr)
        return 2
    res = {"model": a.model, "device": a.device, "dry_run": a.dry_run, "modes": list(a.modes),
           "runtimes": list(a.runtimes), "prompt_tokens": a.prompt, "new_tokens": a.new_tokens,
           "rounds": a.rounds, "gpu": torch.cuda.get_device_name(0) if cuda else None,
           "rows": [], "skipped": [], "errors": [], "complete": False,
           "loadavg_start": list(os.getloadavg())}

    def save():
        res["seconds"] = round(time.perf_counter() - t_start, 1)
        write_result("gpu_generative", res, a.out)

    vlm = load_model(a.model)
    dtype = torch.float16 if cuda else torch.float32
    dense_vlm = copy.deepcopy(vlm)
    calib = load_calibration("shapes", n=4, batch_size=2, seed=0)
    pr = prune(vlm, a.method, a.structured_sparsity, "structured", calibration=calib,
               scope=("language",)).to_dict()
    res["prune"] = {"method": a.method, "pattern": "structured", "parts": ["language"],
                    "sparsity": a.structured_sparsity, "achieved": pr.get("achieved")}
    models = {"dense": dense_vlm, "pruned": vlm}
    vocab = int(vlm.model.config.text_config.vocab_size)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, min(vocab, 30000), (1, a.prompt), generator=g)
    image_id = int(vlm.model.config.image_token_index)  # text only: no image token
    prompt[prompt == image_id] = 4
    capacity = a.prompt + a.new_tokens + 1

    eager = {}
    if "torch" in a.runtimes:
        for m in models.values():
            m.model.to(a.device, dtype).eval()
        prompt_dev = prompt.to(a.device)
        for mode in a.modes:
            if mode in ("graphs", "compile") and not cuda:
                res["skipped"].append({"runtime": "torch", "mode": mode,
                                       "reason": "needs CUDA (CUDA-graph capture / "
                                                 "reduce-overhead); this run is on CPU"})
                continue
            if time.perf_counter() > deadline:
                res["skipped"].append({"runtime": "torch", "mode": mode, "reason": "deadline"})
                continue
            try:
                decs = {v: TorchDecoder(m.model, mode, a.device, capacity)
                        for v, m in models.items()}
                cell = _cell(decs, prompt_dev, a)
            except Exception as exc:  # noqa: BLE001 - recorded per cell, the run goes on
                res["errors"].append({"runtime": "torch", "mode": mode,
                                      "error": f"{type(exc).__name__}: "
                                               f"{' '.join(str(exc).split())[:300]}"})
                save()
                continue
            d50 = float(np.percentile(cell["steps"]["dense"], 50)) * 1e3
            for v in VARIANTS:
                row = _row("torch", mode, v, cell["prefill"][v], cell["steps"][v], d50)
                row["tokens"] = cell["tokens"][v]
                res["rows"].append(row)
            save()
        eager = {r["variant"]: r["tokens"] for r in res["rows"] if r["mode"] == "eager"}
        for r in res["rows"]:  # a replayed / compiled step that froze its inputs shows here
            if r["mode"] != "eager" and r["variant"] in eager:
                r["tokens_equal_to_eager"] = r["tokens"] == eager[r["variant"]]
        for m in models.values():
            m.model.to("cpu", torch.float32)
        if cuda:
            torch.cuda.empty_cache()

    if "onnxruntime" in a.runtimes:
        import onnxruntime as ort

        provider = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
        if provider not in ort.get_available_providers():
            res["skipped"].append({"runtime": "onnxruntime", "mode": "iobinding",
                                   "reason": f"onnxruntime {ort.__version__} has no {provider} "
                                             "here (onnxruntime-gpu not installed)"})
        elif time.perf_counter() > deadline:
            res["skipped"].append({"runtime": "onnxruntime", "mode": "iobinding",
                                   "reason": "deadline"})
        else:
            from vlcompress.exporters.generative import export_generative
            from vlcompress.exporters.generative_quant import make_fp16_variant

            with tempfile.TemporaryDirectory(prefix="gpu-gen-") as work:
                work = Path(work)
                folders = {}
                for v, m in models.items():
                    export_generative(m, work / v, images=[], validate=False)
                    folders[v] = work / v
                    if cuda:  # fp16 with its fp16 KV cache, as a GPU deployment runs it
                        make_fp16_variant(work / v, work / f"{v}_fp16")
                        folders[v] = work / f"{v}_fp16"
                precision = "fp16" if cuda else "fp32"
                try:
                    decs = {v: OrtCudaDecoder(f, provider) for v, f in folders.items()}
                    cell = _cell(decs, prompt, a)
                    d50 = float(np.percentile(cell["steps"]["dense"], 50)) * 1e3
                    for v in VARIANTS:
                        row = _row("onnxruntime", f"iobinding-{provider}", v, cell["prefill"][v],
                                   cell["steps"][v], d50)
                        row["precision"] = precision
                        row["tokens"] = cell["tokens"][v]
                        if v in eager:  # fp16 on the GPU may move a near-tie arg-max
                            row["tokens_equal_to_torch_eager"] = row["tokens"] == eager[v]
                        res["rows"].append(row)
                except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                    res["errors"].append({"runtime": "onnxruntime", "mode": "iobinding",
                                          "error": f"{type(exc).__name__}: "
                                                   f"{' '.join(str(exc).split())[:300]}"})
            save()

    res["complete"] = not res["errors"] and not any(s["reason"] == "deadline"
                                                    for s in res["skipped"])
    res["loadavg_end"] = list(os.getloadavg())
    save()
    for r in res["rows"]:
        sp = r["speedup_over_dense"]
        print(f"{r['runtime']:12s} {r['mode']:28s} {r['variant']:7s} "
              f"{r['decode_ms_per_token']['p50']:8.3f} ms/token  {r['tokens_per_s']:8.1f} tok/s"
              + (f"  {sp:.2f}x" if sp else ""))
    for s in res["skipped"]:
        print(f"skipped {s['runtime']} {s['mode']}: {s['reason']}")
    for e in res["errors"]:
        print(f"ERROR {e['runtime']} {e['mode']}: {e['error']}")
    return 0 if res["complete"] else 3


if __name__ == "__main__":
    sys.exit(main())
