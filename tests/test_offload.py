"""Disk offload (vlcompress.offload): a LLaVA folder saved as sharded safetensors is pruned
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


@pytest.mark.parametrize("method,pattern", [("wanda", "2:4"), ("wanda-seq", "unstructured")])
def test_offloaded_masks_equal_resident(sharded, tmp_path, method, pattern):
    from vlcompress import load_model
    from vlcompress.config import Pattern
    from vlcompress.methods.wanda_seq import wanda_sequential
    from vlcompress.offload import prune_offloaded
    from vlcompress.sparsity import sparsity_of

    # the resident run of the same block-by-block algorithm, the whole model in memory
    vlm = load_model(str(sharded))
    pat = Pattern.parse(pattern)
    layers = vlm.prunable_layers()
    ref = wanda_sequential(vlm, layers, _data(), sparsity=None if pat.is_nm else 0.5,
                           n=pat.n if pat.is_nm else 0, m=pat.m if pat.is_nm else 0,
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


def test_model_larger_than_free_disk_refused(sharded, tmp_path, monkeypatch):
    from vlcompress import offload

    monkeypatch.setattr(offload, "free_disk_bytes", lambda p: 1000)
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match="has 0.00 GB free"):
        offload.prune_offloaded(sharded, out, _data())
    assert not out.exists()


def test_bad_offload_combinations_refused(sharded, tmp_path):
    from vlcompress.offload import check_offload

    with pytest.raises(ConfigError, match="allowed: none, disk"):
        check_offload("ram", "wanda", "2:4", sharded, tmp_path)
    with pytest.raises(ConfigError, match="allowed: wanda, wanda-seq"):
        check_offload("disk", "multiflow", "2:4", sharded, tmp_path)
    with pytest.raises(ConfigError, match="structured"):
        check_offload("disk", "wanda", "structured", sharded, tmp_path)
    with pytest.raises(ConfigError, match="needs a model folder"):
        check_offload("disk", "wanda", "2:4", "tiny-clip", tmp_path)
