"""Zero-shot top-1, image-text retrieval R@1/R@5 and fidelity to a dense model.

Retrieval counts a hit when the retrieved caption (or image) has exactly the same caption
text as the query's own: identical captions are indistinguishable, so ranking one above the
other is not an error. Fidelity is the mean cosine similarity of the pruned model's
embeddings to the dense model's on the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.pairs import PairData
from ..progress import NULL


@dataclass
class EvalEmbeddings:
    image: torch.Tensor  # [N, D] normalised
    caption: torch.Tensor  # [N, D] normalised, retrieval captions
    classes: torch.Tensor | None  # [C, D] normalised class prompts
    labels: torch.Tensor | None
    caption_text: list[str]


@torch.no_grad()
def _embed_texts(vlm, texts: list[str], batch_size: int) -> torch.Tensor:
    out = [vlm.embed_texts(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
    return F.normalize(torch.cat(out).float(), dim=-1)


@torch.no_grad()
def embed_eval(vlm, data: PairData, progress=NULL) -> EvalEmbeddings:
    """Embed every image, every retrieval caption and every class prompt of ``data``."""
    captions = data.retrieval_captions or data.captions
    ims = []
    with progress.task("evaluate", total=data.num_batches) as t:
        for b in data.batches():
            ims.append(vlm.embed_images(b.images))
            t.advance()
    image = F.normalize(torch.cat(ims).float(), dim=-1)
    caption = _embed_texts(vlm, captions, data.batch_size)
    classes = labels = None
    if data.class_prompts and data.labels is not None:
        classes = _embed_texts(vlm, data.class_prompts, data.batch_size)
        labels = torch.tensor(data.labels)
    return EvalEmbeddings(image, caption, classes, labels, list(captions))


def _recall(sim: torch.Tensor, relevant: torch.Tensor, k: int) -> float:
    k = min(k, sim.shape[1])
    top = sim.topk(k, dim=1).indices
    return relevant.gather(1, top).any(1).float().mean().item()


def metrics_from_embeddings(e: EvalEmbeddings) -> dict[str, float]:
    out: dict[str, float] = {}
    if e.classes is not None:
        pred = (e.image @ e.classes.t()).argmax(1)
        out["zeroshot_top1"] = (pred == e.labels).float().mean().item()
    ids = {c: i for i, c in enumerate(dict.fromkeys(e.caption_text))}
    cid = torch.tensor([ids[c] for c in e.caption_text])
    relevant = cid[:, None] == cid[None, :]
    sim = e.image @ e.caption.t()
    out["i2t_r1"] = _recall(sim, relevant, 1)
    out["i2t_r5"] = _recall(sim, relevant, 5)
    out["t2i_r1"] = _recall(sim.t(), relevant.t(), 1)
    out["t2i_r5"] = _recall(sim.t(), relevant.t(), 5)
    return out


def fidelity(dense: EvalEmbeddings, pruned: EvalEmbeddings) -> dict[str, float]:
    """Mean cosine similarity of pruned to dense embeddings (image and caption)."""
    return {
        "image_cosine": (dense.image * pruned.image).sum(-1).mean().item(),
        "text_cosine": (dense.caption * pruned.caption).sum(-1).mean().item(),
    }


def evaluate(vlm, data: PairData | None = None, progress=NULL) -> dict[str, float]:
    """Zero-shot top-1 (where the data has classes) and retrieval R@1/R@5 both ways.

    ``data`` defaults to the bundled shapes eval split (720 pairs, 36 classes).
    """
    if data is None:
        from ..data import load_eval

        data = load_eval()
    return metrics_from_embeddings(embed_eval(vlm, data, progress))
