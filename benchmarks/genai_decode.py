"""ONNX Runtime GenAI beside vlcompress's OrtGenerator on the same generative exports (CPU).

Both runtimes load the same ``vision.onnx`` / ``decoder.onnx`` (GenAI through its ``gemma3``
multimodal pipeline and the ``embed_merge.onnx`` adapter, see
``vlcompress/runtime/genai_generate.py``). For each variant of the tiny-llava run
(``--run``, built when absent: magnitude structured 50%) and of the ``--big`` preset
(``llava-qwen2-0.5b``: random weights, SigLIP cut to ``--big-vision-layers`` layer(s) as
benchmarks/decode_latency.py does; exported once into ``--big-dir`` by a child process, so
the PyTorch model's memory is gone before the two runtimes load, and reused after):

1. **greedy, token for token**: every validation item (shapes images x prompts) at batch 1,
   and in batches of 4 with different prompts (left padding, which the adapter turns into
   the right padding GenAI reads), GenAI against OrtGenerator, and OrtGenerator against
   PyTorch (:class:`TorchGenerator` of the run's dense model and pruned twin, tiny-llava);
   on the 0.5B preset the timed rounds' tokens (up to the first end token) instead;
2. **sampling** (tiny-llava): GenAI's seeded sampler draws other tokens than ours for one
   seed (std::mt19937 vs numpy), so the distributions are compared: ``--draws`` first tokens
   of one prompt (a batch of copies, each row drawn independently) from each runtime against
   the exact distribution ``Sampling.probs`` gives from the prefill logits (total variation
   vs its 99.9% quantile under chance alone, :func:`draw_check`), for several temperature /
   top-k / top-p settings; and multi-token draws teacher-forced on OrtGenerator: no GenAI
   token outside the kept set (:func:`support_violations`); the same seed twice gives the
   same tokens;
3. **timing**, interleaved in one process, step by step: per repeat and batch size each
   runtime's prefill (GenAI: its generator built, inputs set and first token; ours:
   ``prefill`` and the arg-max), then ``--new-tokens`` - 1 decode steps alternating between
   the runtimes (GenAI's ``min_length`` holds off the end token; ours steps on regardless),
   the runtime order flipped every repeat. ms per decode step p50 / p90 at each batch size
   (the same image and prompt repeated: no padding), tokens/s = batch x 1000 / p50.

    python benchmarks/genai_decode.py                    # tiny-llava run + llava-qwen2-0.5b
    python benchmarks/genai_decode.py --big none --repeats 10

The machine is shared: the result records os.getloadavg() before and after; the runtimes are
interleaved so load hits them alike, but absolute ms vary.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

PROMPTS = ("describe the picture.", "what color is it ?", "what shape is it ?")
RUN_SETTINGS = {"method": "magnitude", "pattern": "structured", "sparsity": 0.5,
                "calibration_size": 8, "eval_size": 8, "max_new_tokens": 16,
                "batch_sizes": "1,4,8"}
#: (temperature, top_k, top_p) of the sampling checks
SAMPLINGS = ((1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.9), (1.5, 8, 0.8), (2.0, 0, 1.0))


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("onnxruntime", "onnxruntime-genai", "torch", "transformers"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def _pct(xs) -> dict:
    a = np.asarray(xs, np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "mean": float(a.mean()), "n": int(a.size)}


def _until_eos(seq, eos):
    return seq[: seq.index(eos)] if eos in seq else seq


# -- greedy ----------------------------------------------------------------------------------
def greedy(ort, genai, torch_gen, encoder, items, max_new: int) -> dict:
    """Token-exact shares at batch 1 and in batches of 4 (left-padded mixed prompts)."""
    res = {}
    for b in (1, 4):
        same_genai = same_torch = n = 0
        examples = []
        for i in range(0, len(items) - b + 1, b):
            group = items[i:i + b]
            e = encoder.encode([g[0] for g in group], [g[1] for g in group])
            feeds = (e["input_ids"], e["attention_mask"], e["pixel_values"])
            o = ort.generate(*feeds, max_new)
            g = genai.generate(*feeds, max_new)
            t = torch_gen.generate(*feeds, max_new) if torch_gen is not None else None
            for r in range(b):
                n += 1
                same_genai += o[r] == g[r]
                same_torch += t is not None and o[r] == t[r]
                if len(examples) < 4:
                    examples.append({"prompt": group[r][1], "onnxruntime": o[r], "genai": g[r],
                                     **({"torch": t[r]} if t is not None else {})})
        res[f"batch{b}"] = {"answers": n, "genai_equals_onnxruntime": same_genai / n,
                            **({"onnxruntime_equals_torch": same_torch / n}
                               if torch_gen is not None else {}),
                            "padded_batches": b > 1, "examples": examples}
    return res


# -- sampling --------------------------------------------------------------------------------
def uncertain_point(ort, feeds: tuple, max_new: int) -> tuple[tuple, int, float]:
    """The prompt extended by the first j tokens of its greedy answer, for the j where the
    next token's distribution (T=1) has the most entropy (a trained model is nearly sure of
    most tokens: draws there compare nothing); (feeds, j, entropy in nats)."""
    ids, mask, px = feeds
    answer = ort.generate(*feeds, max_new)[0]
    st = ort.prefill(*feeds, len(answer) + 1)
    best = (-1.0, 0)
    for j in range(len(answer) + 1):
        x = st.logits[0].astype(np.float64)
        q = np.exp(x - x.max())
        q /= q.sum()
        best = max(best, (float(-(q * np.log(np.maximum(q, 1e-300))).sum()), j))
        if j < len(answer):
            ort.step(st, np.array([answer[j]], np.int64))
    ent, j = best
    ext = np.array([answer[:j]], ids.dtype)
    return ((np.concatenate([ids, ext], 1), np.concatenate([mask, np.ones_like(ext)], 1), px),
            j, ent)


def sampling_checks(ort, genai, encoder, item, draws: int, max_new: int) -> list[dict]:
    from vlcompress.runtime.genai_generate import draw_check, support_violations
    from vlcompress.runtime.ort_generate import Sampling

    e = encoder.encode([item[0]], [item[1]])
    feeds, j, entropy = uncertain_point(ort, (e["input_ids"], e["attention_mask"],
                                              e["pixel_values"]), 24)
    logits = ort.prefill(*feeds, 1).logits  # [1, vocab]: the last position's
    out = []
    for t, k, p in SAMPLINGS:
        target = Sampling(t, k, p).probs(logits)[0]
        first = {"genai": [], "onnxruntime": []}
        per_call = 32  # GenAI's largest batch
        for c in range(max(1, draws // per_call)):  # each call: one seed, a batch of copies
            s = Sampling(t, k, p, seed=100 + c)
            rep = tuple(np.repeat(x, per_call, 0) for x in feeds)
            first["genai"] += [r[0] if r else int(genai.spec["eos_token_id"])
                               for r in genai.generate(*rep, 1, s)]
            first["onnxruntime"] += [r[0] if r else int(ort.spec["eos_token_id"])
                                     for r in ort.generate(*rep, 1, s)]
        s = Sampling(t, k, p, seed=7)
        rep = tuple(np.repeat(x, 8, 0) for x in feeds)
        seqs = genai.generate(*rep, max_new, s)
        again = genai.generate(*rep, max_new, s)
        row = {"temperature": t, "top_k": k, "top_p": p, "answer_prefix_tokens": j,
               "entropy_at_t1_nats": entropy, "support_size": int((target > 0).sum()),
               "target_max_prob": float(target.max()),
               "first_token": {rt: draw_check(target, d) for rt, d in first.items()},
               "genai_sequences_teacher_forced": support_violations(ort, feeds, seqs, s),
               "onnxruntime_sequences_teacher_forced": support_violations(
                   ort, feeds, ort.generate(*rep, max_new, s), s),
               "genai_same_seed_same_tokens": seqs == again}
        out.append(row)
        print(f"  sampling T={t} k={k} p={p}: first-token TV genai "
              f"{row['first_token']['genai']['tv']:.3f} / ours "
              f"{row['first_token']['onnxruntime']['tv']:.3f} (chance bound "
              f"{row['first_token']['genai']['tv_bound']:.3f}); genai tokens outside the kept "
              f"set {row['genai_sequences_teacher_forced']['outside_support']}", flush=True)
    return out


# -- timing ----------------------------------------------------------------------------------
class _OrtRound:
    def __init__(self, gen, feeds, new_tokens):
        self.gen, self.feeds, self.new = gen, feeds, new_tokens

    def prefill(self):
        self.st = self.gen.prefill(*self.feeds, self.new)
        self.tok = self.st.logits.argmax(-1).astype(np.int64)
        self.tokens = [self.tok.copy()]

    def step(self):
        self.gen.step(self.st, self.tok)
        self.tok = self.st.logits.argmax(-1).astype(np.int64)
        self.tokens.append(self.tok.copy())


class _GenaiRound:
    def __init__(self, gen, feeds, new_tokens):
        self.gen, self.feeds, self.new = gen, feeds, new_tokens

    def prefill(self):
        self.g = self.gen.start(*self.feeds, self.new, min_new_tokens=self.new)
        self.g.generate_next_token()
        self.tokens = [np.asarray(self.g.get_next_tokens()).copy()]

    def step(self):
        self.g.generate_next_token()
        self.tokens.append(np.asarray(self.g.get_next_tokens()).copy())


def timing(gens: dict, feeds_by_batch: dict, new_tokens: int, repeats: int, eos: int,
           say, warmup: str = "each") -> dict:
    """Interleaved prefill and decode steps (module doc); ``warmup``: an untimed round at
    ``each`` batch size, at the ``first`` only, or ``none``."""
    rounds = {"onnxruntime": _OrtRound, "genai": _GenaiRound}
    out = {}
    for b, feeds in feeds_by_batch.items():
        pre = {k: [] for k in gens}
        dec = {k: [] for k in gens}
        agree = []
        warm = {"each": 1, "none": 0}.get(warmup, int(b == next(iter(feeds_by_batch))))
        for r in range(repeats + warm):  # the first `warm`: untimed
            order = list(gens) if r % 2 == 0 else list(gens)[::-1]
            rs = {k: rounds[k](gens[k], feeds, new_tokens) for k in order}
            for k in order:
                t0 = time.perf_counter()
                rs[k].prefill()
                if r >= warm:
                    pre[k].append((time.perf_counter() - t0) * 1e3)
            for _ in range(new_tokens - 1):
                for k in order:
                    t0 = time.perf_counter()
                    rs[k].step()
                    if r >= warm:
                        dec[k].append((time.perf_counter() - t0) * 1e3)
            toks = {k: np.stack(v.tokens, 1).tolist() for k, v in rs.items()}
            # ours steps on after an end token; GenAI's min_length picks another token there
            agree.append(all(g[: len(_until_eos(o, eos))] == _until_eos(o, eos) for o, g in
                             zip(toks["onnxruntime"], toks["genai"], strict=True)))
            rs.clear()
            gc.collect()
        res = {k: {"prefill_ms": _pct(pre[k]), "decode_ms_per_step": _pct(dec[k]),
                   "tokens_per_s": b * 1000.0 / _pct(dec[k])["p50"]} for k in gens}
        res["genai_decode_speedup_p50"] = (res["onnxruntime"]["decode_ms_per_step"]["p50"]
                                           / res["genai"]["decode_ms_per_step"]["p50"])
        res["genai_prefill_speedup_p50"] = (res["onnxruntime"]["prefill_ms"]["p50"]
                                            / res["genai"]["prefill_ms"]["p50"])
        res["timed_tokens_equal_until_eos"] = all(agree)
        res["prompt_tokens"] = int(feeds[0].shape[1])
        res["warmup_rounds"] = warm
        out[f"batch{b}"] = res
        say(f"batch {b}: decode p50/p90 ms per step ours "
            f"{res['onnxruntime']['decode_ms_per_step']['p50']:.2f}/"
            f"{res['onnxruntime']['decode_ms_per_step']['p90']:.2f}, genai "
            f"{res['genai']['decode_ms_per_step']['p50']:.2f}/"
            f"{res['genai']['decode_ms_per_step']['p90']:.2f} (genai "
            f"{res['genai_decode_speedup_p50']:.2f}x); prefill p50 ours "
            f"{res['onnxruntime']['prefill_ms']['p50']:.1f}, genai "
            f"{res['genai']['prefill_ms']['p50']:.1f} ms; tokens equal {all(agree)}")
    return out


def batch_feeds(encoder, item, batches) -> dict:
    out = {}
    for b in batches:
        e = encoder.encode([item[0]] * b, [item[1]] * b)
        out[b] = (e["input_ids"], e["attention_mask"], e["pixel_values"])
    return out


# -- the two models --------------------------------------------------------------------------
def tiny_llava(a, say) -> tuple[dict, dict]:
    import json

    from vlcompress.data import load_eval
    from vlcompress.exporters.triton import processor_dir
    from vlcompress.models import load_model
    from vlcompress.runtime.gen_inputs import PromptEncoder
    from vlcompress.runtime.genai_generate import GenaiGenerator
    from vlcompress.runtime.ort_generate import OrtGenerator, read_spec
    from vlcompress.runtime.torch_generate import TorchGenerator

    run = Path(a.run)
    built = False
    if not (run / "report.json").is_file():
        from vlcompress import prune_export

        say(f"building {run}")
        run.parent.mkdir(parents=True, exist_ok=True)
        prune_export(model="tiny-llava", out=str(run), **RUN_SETTINGS)
        built = True
    report = json.loads((run / "report.json").read_text())
    spec = read_spec(run / "dense")
    encoder = PromptEncoder(processor_dir(run, report), report["model"]["name"],
                            int(spec["context"]))
    images = load_eval("shapes", n=a.items, batch_size=a.items).images
    items = [(im, PROMPTS[i % len(PROMPTS)]) for i, im in enumerate(images)]
    items += [(im, PROMPTS[(i + 1) % len(PROMPTS)]) for i, im in enumerate(images)]
    torch_models = {"dense": lambda: load_model(report["model"]["name"]),
                    "pruned": lambda: load_model(str(run / "pruned" / "model"))}
    results = {}
    for v in ("dense", "pruned"):
        say(f"tiny-llava {v}")
        ort, genai = OrtGenerator(run / v, a.threads), GenaiGenerator(run / v, a.threads)
        tg = TorchGenerator(torch_models[v]())
        import torch

        torch.set_num_threads(a.threads)
        res = {"greedy": greedy(ort, genai, tg, encoder, items, a.max_new_tokens)}
        say(f"  greedy genai == ours: batch 1 {res['greedy']['batch1']['genai_equals_onnxruntime']:.3f}"
            f", batch 4 {res['greedy']['batch4']['genai_equals_onnxruntime']:.3f}; ours == torch: "
            f"{res['greedy']['batch1']['onnxruntime_equals_torch']:.3f} / "
            f"{res['greedy']['batch4']['onnxruntime_equals_torch']:.3f}")
        del tg
        res["sampling"] = sampling_checks(ort, genai, encoder, items[0], a.draws, 16)
        res["timing"] = timing({"onnxruntime": ort, "genai": genai},
                               batch_feeds(encoder, items[0], a.batches), a.new_tokens,
                               a.repeats, int(spec["eos_token_id"]), say)
        genai.close()
        results[v] = res
    meta = {"run": str(run), "run_built": built,
            "run_settings": RUN_SETTINGS if built else report.get("config"),
            "validation_items": len(items), "last_logits_only": genai.last_logits_only}
    return results, meta


def export_big(a) -> None:
    """The ``--big`` preset's exports and timing inputs into ``--big-dir`` (run in a child
    process: the PyTorch model's memory goes back to the system when it exits, so the timing
    process holds only the two runtimes' sessions)."""
    from decode_latency import seeded_preset

    from vlcompress.data import generative_eval_data, load_calibration
    from vlcompress.exporters.generative import export_generative
    from vlcompress.prune import prune
    from vlcompress.runtime.gen_latency import latency_inputs

    out = Path(a.big_dir)
    vlm = seeded_preset(a.big, a.big_vision_layers)
    inputs = latency_inputs(vlm, generative_eval_data("shapes", n=1), a.batches)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "inputs.npz", **{f"{k}_{b}": v for b, x in inputs.items() for k, v in x.items()})
    export_generative(vlm, out / "dense", images=[], validate=False)
    if "pruned" in a.big_variants.split(","):
        calib = load_calibration("shapes", n=4, batch_size=2, seed=0)
        prune(vlm, "magnitude", 0.5, "structured", calibration=calib, scope=("language",))
        export_generative(vlm, out / "pruned", images=[], validate=False)


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def big_model(a, say, save) -> dict:
    """The ``--big`` preset, each variant and batch size timed as tiny-llava's (no warm-up
    round: a 738-token prefill costs minutes on the shared cores; the decode steps follow a
    prefill either way). A batch is left out, with the reason, when its prefill (both
    runtimes' [batch, prompt, vocab] fp32 logits for a decoder that returns every position's,
    plus activations) would not fit the memory available, or when ``--big-budget-s`` has
    passed."""
    import subprocess

    from vlcompress.runtime.genai_generate import GenaiGenerator
    from vlcompress.runtime.ort_generate import OrtGenerator, read_spec

    big = Path(a.big_dir)
    variants = [v for v in a.big_variants.split(",") if v]
    built = not all((big / v / "generation.json").is_file() for v in variants) \
        or not (big / "inputs.npz").is_file()
    if built:
        say(f"{a.big}: exporting {variants} into {big} (child process)")
        subprocess.run([sys.executable, __file__, "--export-big-only", "--big", a.big,
                        "--big-dir", str(big), "--big-variants", a.big_variants,
                        "--big-vision-layers", str(a.big_vision_layers),
                        "--batches", ",".join(map(str, a.batches))], check=True)
    npz = np.load(big / "inputs.npz")
    res = {"model": a.big, "vision_layers_kept": a.big_vision_layers or "all",
           "weights": "random (a preset), seeded 0", "exports": str(big),
           "exports_built_by_this_run": built, "repeats": a.big_repeats, "variants": {}}
    for v in variants:
        spec = read_spec(big / v)
        say(f"{a.big} {v}")
        ort, genai = OrtGenerator(big / v, a.threads), GenaiGenerator(big / v, a.threads)
        res["variants"][v] = {"last_logits_only": genai.last_logits_only, "timing": {}}
        for b in a.batches:
            feeds = tuple(npz[f"{k}_{b}"] for k in ("input_ids", "attention_mask",
                                                     "pixel_values"))
            p = int(feeds[0].shape[1])
            rows = 1 if genai.last_logits_only else p
            logits = 2 * b * rows * int(spec.get("vocab_size_out") or spec["vocab_size"]) * 4
            # the prefill's activations and arenas beside the logits: about 1 MiB per prompt
            # token and row for Qwen2-0.5B (measured: batch 4 x 738 tokens took the process
            # from ~4.5 to 11.2 GB, 3.6 GB of it the two runtimes' logits)
            need = logits + b * p * 2**20 + 2**30
            elapsed = time.perf_counter() - a.t0
            why = None
            if need > _available_bytes():
                why = (f"its prefill needs about {need / 2**30:.1f} GiB ({logits / 2**30:.1f} "
                       f"GiB of logits, 1 GiB margin), {_available_bytes() / 2**30:.1f} GiB "
                       "available on the shared machine")
            elif elapsed > a.big_budget_s:
                why = f"{elapsed:.0f} s elapsed, above --big-budget-s {a.big_budget_s}"
            if why:
                res["variants"][v]["timing"][f"batch{b}"] = {"not_measured": why}
                say(f"batch {b}: not measured ({why})")
            else:
                res["variants"][v]["timing"].update(timing(
                    {"onnxruntime": ort, "genai": genai}, {b: feeds}, a.new_tokens,
                    a.big_repeats, int(spec["eos_token_id"]), say, "none"))
            save(res)
        genai.close()
        del ort, genai
        gc.collect()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/serve-llava-s50",
                    help="a tiny-llava generative prune-export run (built when absent)")
    ap.add_argument("--max-new-tokens", type=int, default=24, help="greedy validation")
    ap.add_argument("--items", type=int, default=8, help="validation images (x 2 prompts)")
    ap.add_argument("--draws", type=int, default=512, help="first-token draws per runtime")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens per timed round")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--repeats", type=int, default=6, help="timed rounds, tiny-llava")
    ap.add_argument("--big", default="llava-qwen2-0.5b", help="a llava preset, or none")
    ap.add_argument("--big-variants", default="dense")
    ap.add_argument("--big-repeats", type=int, default=1)
    ap.add_argument("--big-vision-layers", type=int, default=1)
    ap.add_argument("--big-dir", default="runs/genai-big",
                    help="the --big exports (built in a child process when absent, else reused)")
    ap.add_argument("--big-budget-s", type=float, default=720,
                    help="start no --big measurement after this many seconds")
    ap.add_argument("--export-big-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    a.batches = tuple(int(b) for b in a.batches.split(","))
    if a.export_big_only:
        export_big(a)
        return 0
    a.t0 = t0 = time.perf_counter()

    def say(what):
        print(f"[{time.perf_counter() - t0:6.0f} s] {what}", flush=True)

    load_before = os.getloadavg()
    payload = {"threads": a.threads, "batches": list(a.batches), "new_tokens": a.new_tokens,
               "versions": _versions(),
               "loadavg_note": "the machine is shared with other developers' jobs: the runtimes "
                               "are interleaved step by step, absolute ms vary"}

    def save(big=None):  # after every part: what was measured survives a kill
        if big is not None:
            payload["big"] = big
        payload["seconds_total"] = round(time.perf_counter() - t0, 1)
        payload["loadavg_1_5_15"] = {"before": list(load_before), "now": list(os.getloadavg())}
        return write_result("genai_decode", payload, a.out)

    tiny, tiny_meta = tiny_llava(a, say)
    payload["tiny_llava"] = {**tiny_meta, "repeats": a.repeats, "variants": tiny}
    path = save()
    if a.big != "none":
        path = save(big_model(a, say, save))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
