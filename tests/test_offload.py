"""Disk offload (vlcompress.methods.offload): a LLaVA folder saved as sharded safetensors is pruned
block by block with its decoder on disk; the masks and the written weights equal a resident
run's, the output reloads, and a model larger than the free disk is refused before any work."""

from __future__ import annotations

import json

import pytest
import torch
from llava_factory import make_tiny_llava_model

from vlcompress.errors import ConfigError


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    from vlcompress.models.llava import build_processor

    model, tok = make_tiny_llava_model(seed=1)
    folder = tmp_path_factory.mktemp("big") / "llava"
    model.save_pretrained(folder, max_shard_size="20KB")  # many shards, blocks split across
    build_processor(model.config, tok).save_pretrained(folder)
    assert len(json.loads((folder / "model.safetensors.index.json").read_text())
               ["weight_map"].values()) > 0
    return folder


def _data():
    from vlcompress.data.pairs import shapes_pairs

    return shapes_pairs("calibration", 6, batch_size=3)


@pytest.mark.parametrize("method,pattern", [("wanda", "2:4"), ("wanda-seq", "unstructured"),
                                            ("sparsegpt", "2:4")])
def test_offloaded_masks_equal_resident(sharded, tmp_path, method, pattern):
    from vlcompress import load_model
    from vlcompress.config import Pattern
    from vlcompress.methods.offload import prune_offloaded
    from vlcompress.methods.wanda_seq import wanda_sequential
    from vlcompress.sparsity import sparsity_of

    # the resident run of the same block-by-block algorithm, the whole model in memory
    vlm = load_model(str(sharded))
    pat = Pattern.parse(pattern)
    layers = vlm.prunable_layers()
    nm = dict(n=pat.n, m=pat.m) if pat.is_nm else {}
    if method == "sparsegpt":
        from vlcompress.methods.sparsegpt import sparsegpt_prune

        ref = sparsegpt_prune(vlm, layers, _data(), sparsity=None if pat.is_nm else 0.5, **nm)
    else:
        ref = wanda_sequential(vlm, layers, _data(), sparsity=None if pat.is_nm else 0.5, **nm,
                               inputs="dense" if method == "wanda" else "pruned")
    ref.achieved = sparsity_of(ref.masks, layers)
    out = tmp_path / "pruned"
    res = prune_offloaded(sharded, out, _data(), method=method, pattern=pattern)
    assert res["offloaded_stacks"] == ["model.language_model.layers"]
    assert res["block_loads"] == 2  # each decoder block read once
    assert set(res["masks"]) == set(ref.masks)
    for name in ref.masks:
        assert torch.equal(res["masks"][name], ref.masks[name]), name
    assert res["achieved"] == pytest.approx(ref.achieved)
    assert res["shards_written"] > 2  # a shard per block at least, then the resident part
    counted = prune_offloaded(sharded, tmp_path / "counts", _data(), method=method,
                              pattern=pattern, keep_masks=False)
    assert counted["masks"] is None and counted["achieved"] == pytest.approx(ref.achieved)
    # the written checkpoint is the resident run's pruned model, and reloads
    again = load_model(str(out))
    sd, want = again.model.state_dict(), vlm.model.state_dict()
    assert set(sd) == set(want)
    for k, v in want.items():
        assert torch.equal(sd[k], v), k


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="needs a CUDA GPU"))])
def test_offloaded_blocks_run_on_device(sharded, tmp_path, device):
    """Each block read from disk runs its turn on ``device``: the same masks as on the host
    (wanda's 2:4 choice is stable to float rounding on this model)."""
    from vlcompress.methods.offload import prune_offloaded

    host = prune_offloaded(sharded, tmp_path / "host", _data())
    dev = prune_offloaded(sharded, tmp_path / "dev", _data(), device=device)
    assert dev["details"]["device"] == device
    agree = [torch.equal(host["masks"][k], dev["masks"][k]) for k in host["masks"]]
    assert sum(agree) >= len(agree) - 1, agree


def test_bad_device_refused_before_any_work(sharded, tmp_path):
    from vlcompress.methods.offload import prune_offloaded

    with pytest.raises(ConfigError, match="device='tpu'"):
        prune_offloaded(sharded, tmp_path / "o", _data(), device="tpu")
    assert not (tmp_path / "o").exists()


def test_model_larger_than_free_disk_refused(sharded, tmp_path, monkeypatch):
    from vlcompress.methods import offload

    monkeypatch.setattr(offload, "free_disk_bytes", lambda p: 1000)
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match="has 0.00 GB free"):
        offload.prune_offloaded(sharded, out, _data())
    assert not out.exists()


def test_bad_offload_combinations_refused(sharded, tmp_path):
    from vlcompress.methods.offload import check_offload

    with pytest.raises(ConfigError, match="allowed: none, disk"):
        check_offload("ram", "wanda", "2:4", sharded, tmp_path)
    with pytest.raises(ConfigError, match="allowed: wanda, wanda-seq, sparsegpt"):
        check_offload("disk", "multiflow", "2:4", sharded, tmp_path)
    with pytest.raises(ConfigError, match="structured"):
        check_offload("disk", "wanda", "structured", sharded, tmp_path)
    with pytest.raises(ConfigError, match="needs a model folder"):
        check_offload("disk", "wanda", "2:4", "tiny-clip", tmp_path)


def test_cli_prune_offload_disk(sharded, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from vlcompress import load_model
    from vlcompress.cli import app
    from vlcompress.methods import offload

    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["prune", "--model", str(sharded), "--method", "wanda", "--pattern", "2:4",
            "--calibration-size", "4", "--offload", "disk", "--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    info = json.loads((out / "prune.json").read_text())
    assert info["offload"] == "disk" and info["achieved"] == pytest.approx(0.5)
    assert load_model(str(out)).family == "llava"

    def one_line(res, *needles):
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1, res.output
        for n in needles:
            assert n in lines[0], lines[0]

    bad = tmp_path / "bad"
    one_line(runner.invoke(app, [*args[:-1], str(bad), "--offload", "ram"]), "allowed: none, disk")
    one_line(runner.invoke(app, [*args[:-1], str(bad), "--method", "multiflow"]),
             "allowed: wanda, wanda-seq, sparsegpt")
    monkeypatch.setattr(offload, "free_disk_bytes", lambda p: 10)
    one_line(runner.invoke(app, [*args[:-1], str(bad)]), "GB free")
    assert not bad.exists()


def test_missing_accelerate_is_one_sentence(sharded, tmp_path, monkeypatch):
    import sys

    from vlcompress.errors import MissingDependencyError
    from vlcompress.methods.offload import prune_offloaded

    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(MissingDependencyError, match=r"^accelerate is not installed: .*\.$"):
        prune_offloaded(sharded, tmp_path / "o", _data())


# --------------------------------------------------------------------------------------------
# device maps (several GPUs, bounded host memory, disk) and prune-export --offload disk
# --------------------------------------------------------------------------------------------
def test_device_map_planning_with_fake_gpus(sharded):
    from vlcompress.methods.offload import host_budget, load_empty, plan_device_map

    _, model, _, _ = load_empty(sharded)
    stack = "model.language_model.layers"
    block = sum(p.numel() * p.element_size() for p in model.get_submodule(stack)[0].parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    budget = host_budget(model, [stack])
    assert budget == total - len(model.get_submodule(stack)) * block + 2 * block
    assert host_budget(model, [stack], blocks=1) == total - block  # 2 decoder blocks here
    # two fake GPUs of a third of the model each, then host memory: the model is spread over
    # both GPUs in module order, and no layer is split across devices
    plan = plan_device_map(model, {0: total // 3, 1: total // 3, "cpu": budget})
    devices = list(plan.values())
    assert devices[0] == 0 and 1 in devices and devices[-1] == "cpu"
    assert not any(".layers." in k and k.split(".layers.")[1].count(".") for k in plan)
    # host memory only, too small for everything: the rest goes to disk, in module order
    plan = plan_device_map(model, {"cpu": total // 2})
    devices = list(plan.values())
    assert devices[0] == "cpu" and devices[-1] == "disk"
    assert devices.index("disk") > max(i for i, d in enumerate(devices) if d == "cpu")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two or more GPUs: the map "
                    "across GPUs is planned on CPU in test_device_map_planning_with_fake_gpus")
def test_offloaded_inference_across_gpus(sharded, tmp_path):
    from vlcompress import load_model
    from vlcompress.methods.offload import load_offloaded

    vlm, plan = load_offloaded(sharded, tmp_path / "off")
    assert {0, 1} & set(plan.values())
    ref = load_model(str(sharded))
    imgs = next(iter(_data().batches())).images
    assert vlm.generate(imgs, max_new_tokens=4) == ref.generate(imgs, max_new_tokens=4)


def test_offloaded_inference_equals_resident(sharded, tmp_path):
    from vlcompress import load_model
    from vlcompress.methods.offload import load_offloaded

    vlm, plan = load_offloaded(sharded, tmp_path / "off", device="cpu")
    assert "disk" in plan.values() and "cpu" in plan.values()
    ref = load_model(str(sharded))
    batch = next(iter(_data().batches()))
    assert vlm.generate(batch.images, max_new_tokens=5) == ref.generate(batch.images,
                                                                        max_new_tokens=5)
    enc = ref.encode(batch)
    assert torch.allclose(vlm.logits(enc), ref.logits(enc), atol=1e-5)


def test_prune_export_offload_disk(sharded, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from vlcompress import load_model
    from vlcompress.cli import app
    from vlcompress.methods import offload

    runner = CliRunner()
    out = tmp_path / "run"
    args = ["prune-export", "--model", str(sharded), "--method", "wanda", "--pattern", "2:4",
            "--calibration-size", "4", "--eval-size", "3", "--max-new-tokens", "3",
            "--offload", "disk", "--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["prune"]["achieved"] == pytest.approx(0.5)
    assert rep["prune"]["offload"]["stacks"] == ["model.language_model.layers"]
    assert "disk" in rep["prune"]["offload"]["eval_device_map"]
    assert rep["export"]["format"] is None and any("--offload disk" in n
                                                   for n in rep["data"]["notes"])
    assert rep["accuracy"]["tasks"] and not list(out.glob("**/.offload-*"))
    assert load_model(str(out / "pruned" / "model")).family == "llava"

    def one_line(extra, needle, model=str(sharded)):
        bad = tmp_path / "bad"
        a = [*args[:-1], str(bad), *extra]
        a[a.index("--model") + 1] = model
        r = runner.invoke(app, a)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and needle in lines[0], r.output
        assert not bad.exists()

    one_line(["--method", "snip"], "allowed: wanda, wanda-seq, sparsegpt")
    one_line(["--reconstruct"], "--reconstruct is not available with --offload disk")
    one_line(["--pattern", "structured"], "allowed: unstructured, N:M")
    one_line(["--recover-steps", "5"], "recovery trains the whole model in memory")
    one_line(["--method-option", "permute=true"], "--method-option permute")
    one_line(["--parts", "vision=0.3,language"], "one sparsity for every part")
    one_line([], "is for generative models", model="tiny-clip")
    monkeypatch.setattr(offload, "free_disk_bytes", lambda p: 10)
    one_line([], "GB free")
