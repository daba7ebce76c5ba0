"""prune-export of a generative model (llava) end to end on a user's captions or VQA folder,
bench and the gate reading its metrics by name, and the bad-input lines."""

from __future__ import annotations

import json

import pytest
from llava_factory import make_tiny_llava_folder
from typer.testing import CliRunner

from vlcompress.cli import app
from vlcompress.data import load_eval, save_pairs, save_vqa

RUN = ["--calibration-size", "4", "--eval-size", "4", "--max-new-tokens", "4", "--batch-sizes", "1",
       "--iterations", "3"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    model = make_tiny_llava_folder(root)
    pairs = load_eval("shapes", n=4, batch_size=4)
    caps = save_pairs(pairs, root / "caps", captions=pairs.retrieval_captions)  # full captions
    vqa = save_vqa(pairs.images, ["what color is it ?"] * 4,
                   [[c.split()[1], "a " + c.split()[1]] for c in pairs.captions], root / "vqa")
    return model, caps, vqa


def _run(args):
    res = CliRunner().invoke(app, ["prune-export", *args])
    return res


def test_sparsegpt_24_on_user_captions_prunes_all_parts_and_reports(folders, tmp_path):
    model, caps, _ = folders
    out = tmp_path / "run"
    res = _run(["--model", str(model), "--method", "sparsegpt", "--pattern", "2:4",
                "--calibration", str(caps), "--out", str(out), *RUN])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["model"]["generative"] and rep["prune"]["scope"] == ["vision", "bridge", "language"]
    assert set(rep["prune"]["per_modality"]) == {"vision", "bridge", "language"}
    acc = rep["accuracy"]
    assert set(acc["metrics"]) == {"cider", "attribute_accuracy"}
    assert set(acc["fidelity"]) == {"token_kl", "next_token_agreement", "greedy_agreement"}
    assert acc["fidelity"]["token_kl"] > 0 and acc["n"] == 4
    assert {(r["runtime"], r["tower"]) for r in rep["latency"]} == {
        (rt, p) for rt in ("onnxruntime", "torch") for p in ("vision", "prefill", "decode")}
    assert "calibration" in rep["data"] and str(caps) in rep["data"]["calibration"]
    assert (out / "pruned" / "model" / "chat_template.jinja").is_file()
    assert "CIDEr" in (out / "report.md").read_text()
    # bench re-measures the saved pruned model against the dense one; the gate reads the
    # generative metrics by name
    res = CliRunner().invoke(app, ["bench", str(out), "--baseline", str(out / "report.json"),
                                   "--max-accuracy-drop", "0.0", "--no-latency"])
    assert res.exit_code == 0, res.output
    b = json.loads((out / "bench-report.json").read_text())
    assert b["accuracy"]["metrics"]["cider"] == acc["metrics"]["cider"]
    assert {c["name"] for c in b["gate"]["checks"]} >= {"accuracy cider", "accuracy attribute_accuracy"}


def test_vqa_folder_parts_and_per_part_sparsity(folders, tmp_path):
    model, _, vqa = folders
    out = tmp_path / "run"
    res = _run(["--model", str(model), "--method", "wanda", "--pattern", "unstructured",
                "--parts", "vision=0.3,language", "--sparsity", "0.6", "--calibration", str(vqa),
                "--out", str(out), *RUN])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["accuracy"]["metrics"]) == {"vqa_accuracy"}
    pm = rep["prune"]["per_modality"]
    assert set(pm) == {"vision", "language"}
    # wanda prunes floor(s * 32) of each 32-wide row: 0.28 for 0.3
    assert abs(pm["vision"] - 0.3) < 0.02 and abs(pm["language"] - 0.6) < 0.02
    # a captioning metric asked of this questions-only run: one line, nothing measured
    res = CliRunner().invoke(app, ["bench", str(out), "--baseline", str(out / "report.json"),
                                   "--metrics", "cider"])
    assert res.exit_code == 2 and "metric cider needs captions" in res.output, res.output
    assert not (out / "bench-report.json").exists()


@pytest.mark.parametrize("args,message", [
    (["--max-new-tokens", "0"], "--max-new-tokens 0 is not valid; allowed: an integer >= 1"),
    (["--parts", "decoder"], "--parts decoder is not a part of"),
    (["--pattern", "structured", "--parts", "bridge"],
     "--pattern structured cannot slice --parts bridge of"),
    (["--parts", "vision=2"], "the sparsity is not valid"),
    (["--engine", "torch"], "--engine torch is not available for the generative model"),
])
def test_bad_input_is_one_line(folders, tmp_path, args, message):
    model, caps, _ = folders
    out = tmp_path / "run"
    res = _run(["--model", str(model), "--calibration", str(caps), "--out", str(out), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output and not out.exists()


def test_vqa_lines_without_question_and_vqa_data_for_an_encoder(folders, tmp_path):
    model, _, vqa = folders
    bad = tmp_path / "badvqa"
    bad.mkdir()
    (bad / "img").mkdir()
    for f in (vqa / "img").iterdir():
        (bad / "img" / f.name).write_bytes(f.read_bytes())
    (bad / "vqa.jsonl").write_text('{"image": "img/0.png", "answer": "red"}\n')
    res = _run(["--model", str(model), "--calibration", str(bad), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and 'vqa.jsonl:1 has no "question"' in res.output, res.output
    res = _run(["--model", "tiny-clip", "--calibration", str(vqa), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "holds questions and answers" in res.output, res.output


def test_bundled_tiny_llava_sparsegpt_24_keeps_its_captions(tmp_path):
    """The issue's command on the shipped tiny-llava and a user's captions folder: every part
    pruned 2:4 by sparsegpt, captions still right (dense and pruned on 8 held-out images)."""
    from vlcompress.data import load_eval, save_pairs

    pairs = load_eval("shapes", n=8, batch_size=8)
    caps = save_pairs(pairs, tmp_path / "my_captions", captions=pairs.retrieval_captions)
    out = tmp_path / "run"
    res = _run(["--model", "tiny-llava", "--method", "sparsegpt", "--pattern", "2:4",
                "--calibration", str(caps), "--out", str(out), "--calibration-size", "8",
                "--max-new-tokens", "12", "--batch-sizes", "1", "--iterations", "3"])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["data"]["prompts"]["caption"] == "describe the picture."  # the card's prompt
    assert all(abs(v - 0.5) < 1e-6 for v in rep["prune"]["per_modality"].values())
    acc = rep["accuracy"]["metrics"]["attribute_accuracy"]
    assert acc["dense"] == 1.0 and acc["pruned"] >= 0.75, acc
    assert rep["accuracy"]["fidelity"]["greedy_agreement"] > 0.9


def _broken_copy(model, tmp_path, name, edit):
    bad = tmp_path / name
    bad.mkdir()
    for f in model.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    edit(bad)
    return bad


def _vit_vision(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vision_config"]["model_type"] = "vit"
    (folder / "config.json").write_text(json.dumps(cfg))


def _no_image_template(folder):
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}{% endfor %}")


@pytest.mark.parametrize("edit,args,message", [
    (_vit_vision, [], "llava model's vision tower is 'vit'; allowed: clip_vision_model"),
    (_no_image_template, [], "renders no image token"),
    (None, ["--pattern", "2:4", "--method-option", "kv_groups=whole"],
     "kv_groups=whole removes whole key/value groups of a structured prune, not 2:4"),
    (None, ["--pattern", "structured", "--sparsity", "0.5", "--method", "upop",
            "--method-option", "kv_groups=auto"], "kv_groups=auto is not available with 'upop'"),
    (None, ["--offload", "disk", "--method", "wanda", "--pattern", "structured"],
     "--offload disk with --pattern structured"),
    (None, ["--offload", "tape"], "--offload 'tape'; allowed: none, disk"),
])
def test_bad_model_folders_and_options_are_one_line_nothing_written(folders, tmp_path, edit,
                                                                    args, message):
    """The issue's bad-input list through the CLI: exit 2, one line, no output folder."""
    model, caps, _ = folders
    if edit is not None:
        model = _broken_copy(model, tmp_path, "bad", edit)
    out = tmp_path / "run"
    res = _run(["--model", str(model), "--calibration", str(caps), "--out", str(out), *RUN, *args])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and message in lines[0], res.output
    assert "Traceback" not in res.output and not out.exists()
