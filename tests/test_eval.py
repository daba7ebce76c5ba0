import torch
import torch.nn.functional as F

from vlcompress.data import load_eval
from vlcompress.eval import EvalEmbeddings, embed_eval, evaluate, fidelity, metrics_from_embeddings


def _emb(image, caption, classes=None, labels=None, texts=None):
    n = F.normalize
    return EvalEmbeddings(n(torch.tensor(image, dtype=torch.float32), dim=-1),
                          n(torch.tensor(caption, dtype=torch.float32), dim=-1),
                          None if classes is None else n(torch.tensor(classes, dtype=torch.float32), dim=-1),
                          None if labels is None else torch.tensor(labels), texts)


def test_metrics_known_answer():
    # 3 images, 3 captions; image 2 matches caption 0 better than its own.
    img = [[1, 0], [0, 1], [1, 0.1]]
    cap = [[1, 0], [0, 1], [0.7, 0.7]]
    e = _emb(img, cap, classes=[[1, 0], [0, 1]], labels=[0, 1, 1], texts=["a", "b", "c"])
    m = metrics_from_embeddings(e)
    assert abs(m["zeroshot_top1"] - 2 / 3) < 1e-6
    assert abs(m["i2t_r1"] - 2 / 3) < 1e-6  # image 2 retrieves caption 0 first
    assert m["i2t_r5"] == 1.0
    assert 0 <= m["t2i_r1"] <= 1


def test_identical_captions_count_as_hits():
    img = [[1, 0], [1, 0.01]]
    cap = [[1, 0], [1, 0]]
    m = metrics_from_embeddings(_emb(img, cap, texts=["same", "same"]))
    assert m["i2t_r1"] == 1.0 and m["t2i_r1"] == 1.0
    m2 = metrics_from_embeddings(_emb([[1, 0], [0, 1]], [[0, 1], [1, 0]], texts=["x", "y"]))
    assert m2["i2t_r1"] == 0.0 and m2["t2i_r1"] == 0.0


def test_fidelity_identity_is_one(tiny_random_clip):
    data = load_eval(n=12)
    e = embed_eval(tiny_random_clip, data)
    f = fidelity(e, e)
    assert abs(f["image_cosine"] - 1) < 1e-5 and abs(f["text_cosine"] - 1) < 1e-5


def test_evaluate_keys(tiny_random_clip):
    m = evaluate(tiny_random_clip, load_eval(n=16))
    assert set(m) == {"zeroshot_top1", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"}
    assert all(0 <= v <= 1 for v in m.values())
