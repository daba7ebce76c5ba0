"""Serving every variant of a generative run (issue 28 item 5): besides dense/ and pruned/,
export-triton writes a generation model for the precision variants (``--quantize int8``:
dense_int8, pruned_int8; ``--fp16``: dense_fp16 ...) and the ``--visual-tokens`` variants
(dense_tokens, pruned_tokens and their precision twins), each ``1/`` holding exactly the
graphs its generation loop runs (a token variant: its own vision graph plus its full-token
twin's embed and decoder), and serve-check compares each one token for token with the direct
OrtGenerator run of the run's own folder.

The run is built in seconds as prune-export lays it out (two tiny random LLaVAs; the token
variants' graphs exported with K = 4 of the tower's 16 tokens and ``reuse`` of their twin; the
int8 variants from ``make_int8_variant``, the token ones ``shared`` with their twin's int8)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from llava_factory import make_generative_run
from test_serve import NO_SERVER
from test_serve_generate import _load_generate_model
from typer.testing import CliRunner

from vlcompress.cli import app
from vlcompress.exporters.triton import TritonRepo, export_triton
from vlcompress.runtime.gen_inputs import PromptEncoder, read_image
from vlcompress.runtime.ort_generate import OrtGenerator
from vlcompress.serve import answer_texts, answer_tokens, generate_examples, generate_feeds

runner = CliRunner()
MAX_NEW = 6
K = 4  # of the tiny tower's 16 image tokens
ALL = ["dense", "pruned", "dense_int8", "pruned_int8", "dense_tokens", "pruned_tokens",
       "dense_tokens_int8", "pruned_tokens_int8"]


def make_variant_run(root: Path) -> Path:
    """A generative run with every variant ``--visual-tokens 4 --quantize int8`` gives."""
    from vlcompress.data import load_eval
    from vlcompress.exporters.generative import export_generative
    from vlcompress.exporters.generative_quant import make_int8_variant
    from vlcompress.models import load_model

    run = make_generative_run(root, max_new_tokens=MAX_NEW)
    images = load_eval("shapes", n=2, batch_size=2).images
    for base in ("dense", "pruned"):  # the model folders make_generative_run saved
        vlm = load_model(str(root / base / "llava"))
        export_generative(vlm, run / f"{base}_tokens", images=images, max_new_tokens=4,
                          validate=False, visual_tokens=K, reuse=run / base)
        make_int8_variant(run / base, run / f"{base}_int8")
        make_int8_variant(run / f"{base}_tokens", run / f"{base}_tokens_int8",
                          shared=run / f"{base}_int8")
    return run


@pytest.fixture(scope="module")
def var_run(tmp_path_factory):
    return make_variant_run(tmp_path_factory.mktemp("servevar"))


@pytest.fixture(scope="module")
def var_repo(var_run, tmp_path_factory):
    return export_triton(var_run, tmp_path_factory.mktemp("varrepo") / "repo")


def test_every_variant_is_served_with_exactly_the_graphs_it_runs(var_run, var_repo):
    assert [m.variant for m in var_repo.models] == ALL  # the default: every variant
    assert [m.name for m in var_repo.models] == [f"{v}_generate" for v in ALL]
    prec = {m.variant: m.precision for m in var_repo.models}
    assert prec == {v: "int8" if v.endswith("_int8") else "fp32" for v in ALL}
    for m in var_repo.models:
        one = var_repo.path / m.name / "1"
        spec = json.loads((one / "generation.json").read_text())
        own = json.loads((var_run / m.variant / "generation.json").read_text())
        # a token variant runs its own vision graph, its twin's embed and decoder
        twin = m.variant.replace("_tokens", "") if "_tokens" in m.variant else m.variant
        want = {"vision": var_run / m.variant / "vision.onnx",
                "embed": var_run / twin / "embed.onnx",
                "decoder": var_run / twin / "decoder.onnx"}
        assert set(spec["files"]) == set(want)
        for part, src in want.items():
            assert (one / spec["files"][part]).read_bytes() == src.read_bytes(), (m.name, part)
        # nothing else: no twin's vision graph, no graph of another variant
        assert sorted(p.name for p in one.glob("*.onnx*")) == sorted(
            f.name for f in want.values())
        assert {k: v for k, v in spec.items() if k not in ("files", "served_from")} == \
            {k: v for k, v in own.items() if k != "files"}
        if "_tokens" in m.variant:
            assert spec["image_tokens"] == K and spec["served_from"]["decoder"] == \
                f"{twin}/decoder.onnx"
        assert m.reference == m.variant and m.source == m.variant
    again = TritonRepo.load(var_repo.path)
    assert [m.precision for m in again.models] == [m.precision for m in var_repo.models]
    readme = (var_repo.path / "README.md").read_text()
    assert all(f"`{v}_generate`" in readme for v in ALL)


def test_variants_picks_and_keeps_the_order_given(var_run, tmp_path):
    res = runner.invoke(app, ["export-triton", str(var_run), "--out", str(tmp_path / "r"),
                              "--variants", "pruned_tokens_int8, dense_tokens,pruned_tokens_int8"])
    assert res.exit_code == 0, res.output
    repo = TritonRepo.load(tmp_path / "r")
    assert [m.name for m in repo.models] == ["pruned_tokens_int8_generate", "dense_tokens_generate"]
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "README.md", "dense_tokens_generate", "pruned_tokens_int8_generate",
        "vlcompress_triton.json"]


@pytest.mark.parametrize("value,message", [
    ("dense,pruned_fp16", "variant 'pruned_fp16' is not in run"),
    ("tokens", "variant 'tokens' is not in run"),
    (" , ", "names no variant"),
])
def test_bad_variants_are_one_line_naming_the_allowed_ones(var_run, tmp_path, value, message):
    res = runner.invoke(app, ["export-triton", str(var_run), "--out", str(tmp_path / "r"),
                              "--variants", value])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], res.output
    assert "dense_tokens_int8" in lines[0]  # the allowed list names every variant
    assert not (tmp_path / "r").exists()


def test_a_spec_pointing_outside_the_run_is_refused(var_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(var_run, run)
    spec = json.loads((run / "dense_tokens" / "generation.json").read_text())
    spec["files"]["decoder"] = "../../elsewhere/decoder.onnx"
    (run / "dense_tokens" / "generation.json").write_text(json.dumps(spec))
    res = runner.invoke(app, ["export-triton", str(run), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "outside the run folder" in res.stderr, res.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("variant", ["dense_tokens", "pruned_tokens_int8", "pruned_int8"])
def test_served_variant_answers_as_the_direct_run_of_its_folder(var_run, var_repo, monkeypatch,
                                                                variant):
    """The served model of a token / int8 variant batches requests into one generate call, and
    each row equals OrtGenerator on the run's own folder with the K-token prompt."""
    model = _load_generate_model(monkeypatch, var_repo, f"{variant}_generate")
    files, prompts = generate_examples(3, seed=5)
    spec = json.loads((var_run / variant / "generation.json").read_text())
    enc = PromptEncoder(var_run / "pruned" / "model", "llava", model.context,
                        image_tokens=spec.get("image_tokens"))
    requests = [generate_feeds([prompts[0]], images=[files[0]], max_new_tokens=MAX_NEW),
                generate_feeds(prompts[1:3], images=files[1:3], max_new_tokens=4)]
    res = model.execute(requests)
    assert not any(r.error for r in res), [r.error for r in res]
    direct = OrtGenerator(var_run / variant)
    got = answer_tokens(res[0].outputs) + answer_tokens(res[1].outputs)
    texts = answer_texts(res[0].outputs) + answer_texts(res[1].outputs)
    for i, limit in enumerate((MAX_NEW, 4, 4)):
        e = enc.encode([read_image(files[i])], [prompts[i]])
        if "_tokens" in variant:  # the prompt carries K image tokens, not the tower's 16
            assert int((e["input_ids"] == int(spec["image_token_id"])).sum()) == K
        want = direct.generate(e["input_ids"], e["attention_mask"], e["pixel_values"], limit)[0]
        assert got[i] == want and texts[i] == enc.decode(want), (variant, i)
    assert sum(len(g) for g in got) > 3  # real answers


def test_token_variant_answer_differs_from_its_full_token_twin(var_run, var_repo, monkeypatch):
    """The token variant's model really runs its own vision graph (K embeddings), not the
    twin's: on the same requests its prompt is shorter and its direct run is another one."""
    files, prompts = generate_examples(2, seed=1)
    feeds = generate_feeds(prompts, images=files, max_new_tokens=MAX_NEW)
    outs = {}
    for v in ("pruned", "pruned_tokens"):
        model = _load_generate_model(monkeypatch, var_repo, f"{v}_generate")
        outs[v] = model.parse(feeds)[0]["input_ids"].shape[1]
    assert outs["pruned"] - outs["pruned_tokens"] == 16 - K


@pytest.mark.slow  # each generation stub imports transformers: 20-50 s to ready here
@pytest.mark.skipif(NO_SERVER is not None, reason=str(NO_SERVER))
def test_serve_check_compares_token_and_int8_variants_through_the_real_server(var_run,
                                                                               tmp_path):
    repo = export_triton(var_run, tmp_path / "repo",
                         variants="pruned_tokens,dense_int8,pruned_tokens_int8")
    res = runner.invoke(app, ["serve-check", str(repo.path), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["passed"] and len(out["rows"]) == 9  # batch, concurrent, refusals per model
    for r in out["rows"]:
        assert f"run's {r['variant']}/ export" in r["reference"]
        if r["kind"] == "refusal":
            assert r["refused"] == r["bad_requests"] == 3
        else:
            assert r["rows_equal"] == r["rows"] == 4 and r["new_tokens"] > 0
    # a served token variant whose decoder is not its twin's fails, exit 1
    bad = export_triton(var_run, tmp_path / "bad", variants="pruned_tokens")
    served = bad.path / "pruned_tokens_generate" / "1" / "decoder.onnx"
    served.unlink()  # a hard link to the run's file: replaced, never written through
    shutil.copyfile(var_run / "dense" / "decoder.onnx", served)
    res = runner.invoke(app, ["serve-check", str(bad.path)])
    assert res.exit_code == 1 and "MISMATCH" in res.output, res.output


def test_blip_precision_variant_is_served_and_answers_as_its_direct_run(tmp_path, monkeypatch):
    """A BLIP captioning run's ``--fp16`` variant (fp16 graphs, fp16 KV cache) is served too,
    by the BLIP generation model, each row as BlipOrtGenerator on the run's pruned_fp16/."""
    from test_serve_blip import make_blip_run

    from vlcompress.exporters.generative_quant import make_fp16_variant
    from vlcompress.runtime.ort_generate_blip import BlipOrtGenerator

    run = make_blip_run(tmp_path)
    make_fp16_variant(run / "pruned", run / "pruned_fp16")
    repo = export_triton(run, tmp_path / "repo")
    assert [(m.name, m.precision) for m in repo.models] == [
        ("dense_generate", "fp32"), ("pruned_generate", "fp32"), ("pruned_fp16_generate", "fp16")]
    one = repo.path / "pruned_fp16_generate" / "1"
    spec = json.loads((one / "generation.json").read_text())
    for f in spec["files"].values():
        assert (one / f).read_bytes() == (run / "pruned_fp16" / f).read_bytes()
    assert "BlipOrtGenerator" in (one / "model.py").read_text()
    model = _load_generate_model(monkeypatch, repo, "pruned_fp16_generate")
    files, _ = generate_examples(2, seed=4)
    res = model.execute([generate_feeds(["a picture of", "the shape"], images=files,
                                        max_new_tokens=5)])
    assert not res[0].error, res[0].error
    direct = BlipOrtGenerator(run / "pruned_fp16")
    enc = model.encoder
    for i, prompt in enumerate(["a picture of", "the shape"]):
        feeds = enc.batch(enc.encode([read_image(files[i])], [prompt]))
        want = direct.generate(feeds["input_ids"], feeds["attention_mask"],
                               feeds["pixel_values"], 5)[0]
        assert answer_tokens(res[0].outputs)[i] == want, i
