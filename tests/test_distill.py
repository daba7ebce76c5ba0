"""vlcompress.distill for every family, and recover on the user's data: it trains on the
source it is given (and says so), gets closer to the dense model there, keeps the sparsity
pattern; BLIP evaluation encodes each image once."""

import json

import pytest
import torch
from conftest import make_tiny_random_blip, make_tiny_random_clip

from vlcompress.data import load_eval, load_train, shapes
from vlcompress.distill import dense_copy, distill_gap, distill_loss, features, train_student
from vlcompress.errors import DataError
from vlcompress.eval import embed_eval, fidelity
from vlcompress.prune import prune
from vlcompress.recover import recover


def _pairs_folder(root, n=16, split="train"):
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        img, s = shapes.sample(split, 50_000 + i)
        img.save(root / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": s.caption}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _tiny_bert(seed=0):
    from transformers import BertConfig, BertModel

    from vlcompress.data.tokenizer import build_shapes_tokenizer
    from vlcompress.models.towers import BertTextTower

    torch.manual_seed(seed)
    tok = build_shapes_tokenizer()
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, pad_token_id=0,
                     initializer_range=0.2)  # layers that matter: pruning moves the output
    return BertTextTower(BertModel(cfg).eval(), tok, None, name="tiny-bert", source="test")


def _masks(vlm):
    return {ly.name: (ly.weight == 0).clone() for ly in vlm.prunable_layers()}


def _same_pattern(vlm, before):
    return all(torch.equal(ly.weight == 0, before[ly.name]) for ly in vlm.prunable_layers())


def test_recover_trains_on_user_folder_and_gets_closer_there(tmp_path):
    folder = _pairs_folder(tmp_path / "my_pairs")
    vlm = make_tiny_random_clip()
    teacher = dense_copy(vlm)
    prune(vlm, "magnitude", 0.5, "unstructured")
    ev = load_eval(folder, n=16)
    dense = embed_eval(teacher, ev)
    before = fidelity(dense, embed_eval(vlm, ev))
    res = recover(vlm, steps=40, teacher=teacher, data=str(folder), batch_size=8, lr=2e-3)
    assert res.data == {"source": str(folder), "kind": "pairs", "n": 16}
    after = fidelity(dense, embed_eval(vlm, ev))
    assert after["image_cosine"] > before["image_cosine"]
    assert after["text_cosine"] > before["text_cosine"]
    assert res.pattern_preserved


def test_run_dir_recover_defaults_to_the_runs_calibration_data(tmp_path):
    folder = _pairs_folder(tmp_path / "my_pairs", n=8)
    dense = make_tiny_random_clip()
    dense.save(tmp_path / "dense-model")
    prune(dense, "magnitude", None, "2:4")
    run = tmp_path / "run"
    dense.save(run / "pruned" / "model")
    (run / "report.json").write_text(json.dumps({
        "model": {"name": str(tmp_path / "dense-model")}, "prune": {"method": "magnitude"},
        "config": {"calibration": str(folder), "eval_data": str(folder)}}))
    res = recover(run, steps=2, batch_size=4)
    doc = json.loads((run / "recover.json").read_text())
    assert doc["data"] == {"source": str(folder), "kind": "pairs", "n": 8} == res.data
    assert doc["metrics"]["dataset"].startswith(str(folder))
    assert set(doc["metrics"]["fidelity"]["recovered"]) == {"image_cosine", "text_cosine"}
    # a text-only source for an image model: one line, before any work
    txt = tmp_path / "s.txt"
    txt.write_text("a red circle\n")
    listing = sorted(p.name for p in run.iterdir())
    with pytest.raises(DataError, match="text-only") as e:
        recover(run, steps=2, data=str(txt))
    assert "\n" not in str(e.value) and sorted(p.name for p in run.iterdir()) == listing


def test_blip_distils_keeps_pattern_lowers_loss():
    vlm = make_tiny_random_blip()
    teacher = dense_copy(vlm)
    prune(vlm, "magnitude", 0.5, "unstructured")
    pattern = _masks(vlm)
    data = load_train("shapes", n=8, batch_size=8)
    feats = features(vlm, vlm.encode(next(iter(data.batches()))))
    assert {"vision", "text", "logits", "itm", "loss"} <= set(feats)
    gap0 = distill_gap(vlm, teacher, data, {"w_contrastive": 0})
    # constant rate: 15 steps test BLIP's loss terms, not the schedule (cosine spends half of
    # such a short run warming up and decaying)
    _, losses = train_student(vlm, teacher, data, steps=15, lr=2e-3, schedule="constant")
    assert _same_pattern(vlm, pattern) and losses[-1] < losses[0]
    assert distill_gap(vlm, teacher, data, {"w_contrastive": 0}) < gap0


def test_bert_text_encoder_recovers_on_text_only_data(tmp_path):
    txt = tmp_path / "sentences.txt"
    txt.write_text("\n".join(shapes.sample("train", i)[1].full_caption for i in range(16)) + "\n")
    vlm = _tiny_bert()
    assert not vlm.needs_images
    teacher = dense_copy(vlm)
    prune(vlm, "magnitude", 0.5, "unstructured")
    pattern = _masks(vlm)
    data = load_train(txt, n=16, batch_size=8)
    gap0 = distill_gap(vlm, teacher, data)
    res = recover(vlm, steps=20, teacher=teacher, data=str(txt), batch_size=8, lr=1e-3,
                  evaluate=True, eval_data=str(txt), eval_size=16)
    assert res.data == {"source": str(txt), "kind": "text", "n": 16}
    assert res.pattern_preserved and _same_pattern(vlm, pattern)
    assert distill_gap(vlm, teacher, data) < gap0 and res.losses[-1] < res.losses[0]
    fid = res.metrics["fidelity"]
    assert fid["recovered"]["text_cosine"] > fid["pruned"]["text_cosine"]
    assert res.metrics["dense"] == {}  # one tower: fidelity is the evaluation


def test_distill_loss_one_tower_is_per_token_cosine():
    s = {"vision": torch.ones(2, 3, 4)}
    t = {"vision": torch.ones(2, 3, 4)}
    assert float(distill_loss(s, t)) == pytest.approx(0.0, abs=1e-6)
    t["vision"][0, 0] = -1
    assert float(distill_loss(s, t)) == pytest.approx(2 / 6, rel=1e-5)


def test_blip_eval_encodes_each_image_once_and_matches_reference():
    from vlcompress.eval.metrics import ITM_CANDIDATES, metrics_from_embeddings

    vlm = make_tiny_random_blip()
    data = load_eval(n=12, batch_size=5)
    seen = []
    h = vlm.model.vision_model.register_forward_hook(
        lambda m, a, kw, o: seen.append(kw.get("pixel_values", a[0] if a else None).shape[0]),
        with_kwargs=True)
    emb = embed_eval(vlm, data)
    h.remove()
    assert sum(seen) == len(data) and len(seen) == data.num_batches  # each image once
    # same re-ranking as scoring each pair from the raw images (the old protocol)
    caps = data.retrieval_captions
    ids = {c: i for i, c in enumerate(dict.fromkeys(caps))}
    sim = emb.image @ emb.caption.t()
    ref = {}
    for name, s, q_img in (("i2t_r1_itm", sim, True), ("t2i_r1_itm", sim.t(), False)):
        top, hits = s.topk(ITM_CANDIDATES, dim=1).indices, 0
        for q in range(len(top)):
            c = top[q].tolist()
            sc = (vlm.itm_scores([data.images[q]] * len(c), [caps[j] for j in c]) if q_img
                  else vlm.itm_scores([data.images[j] for j in c], [caps[q]] * len(c)))
            hits += ids[caps[c[int(sc.argmax())]]] == ids[caps[q]]
        ref[name] = hits / len(top)
    m = metrics_from_embeddings(emb)
    assert m["i2t_r1_itm"] == pytest.approx(ref["i2t_r1_itm"])
    assert m["t2i_r1_itm"] == pytest.approx(ref["t2i_r1_itm"])


def test_relation_loss_is_zero_for_the_same_geometry_and_off_by_default():
    import torch

    from vlcompress.distill import distill_loss, relation_loss

    torch.manual_seed(0)
    t = torch.randn(6, 8)
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    assert float(relation_loss(3.0 * t @ q, t)) == pytest.approx(0.0, abs=1e-6)  # rotated, scaled
    s = torch.randn(6, 8)
    assert float(relation_loss(s, t)) > 0.01
    # by hand for two vectors: cosines [[1, c], [c, 1]] vs [[1, 0], [0, 1]] -> 2 c^2 / 4
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert float(relation_loss(a, b)) == pytest.approx(2 * 0.5 / 4)
    out_s, out_t = {"vision": s, "text": s}, {"vision": t, "text": t}
    base = distill_loss(out_s, out_t, w_logits=0, w_contrastive=0)
    more = distill_loss(out_s, out_t, w_logits=0, w_contrastive=0, w_relation=1.0)
    assert float(more - base) == pytest.approx(2 * float(relation_loss(s, t)), rel=1e-5)
