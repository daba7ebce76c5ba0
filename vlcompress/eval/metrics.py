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
    image: torch.Tensor | None  # [N, D] normalised ([N*T, D] for token features)
    caption: torch.Tensor | None  # [N, D] normalised, retrieval captions
    classes: torch.Tensor | None  # [C, D] normalised class prompts
    labels: torch.Tensor | None
    caption_text: list[str]
    extra: dict[str, float] | None = None  # metrics computed at embedding time (ITM re-ranking)


@torch.no_grad()
def _embed_texts(vlm, texts: list[str], batch_size: int) -> torch.Tensor:
    out = [vlm.embed_texts(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
    return F.normalize(torch.cat(out).float(), dim=-1)


def _supports(vlm, method: str) -> bool:
    from ..models.base import VLM

    return getattr(type(vlm), method) is not getattr(VLM, method)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[N, D] as is; token features [N, T, D] become [N*T, D] (fidelity is per token)."""
    return F.normalize((x.flatten(0, -2) if x.dim() > 2 else x).float(), dim=-1)


@torch.no_grad()
def embed_eval(vlm, data: PairData, progress=NULL, *, itm: bool = True) -> EvalEmbeddings:
    """Embed every image (once: a model with ITM re-ranking keeps each image's token
    embeddings from that one pass), every retrieval caption and every class prompt of
    ``data`` that the model can embed (a one-tower model embeds only its own side;
    text-only data has no images). ``itm=False`` skips ITM re-ranking (contrastive only)."""
    captions = data.retrieval_captions or data.captions
    image = caption = classes = labels = tokens = None
    itm = itm and hasattr(vlm, "itm_scores_from_embeds") and hasattr(vlm, "embed_images_with_tokens")
    if _supports(vlm, "embed_images") and data.images is not None:
        ims, toks = [], []
        with progress.task("evaluate", total=data.num_batches) as t:
            for b in data.batches():
                if itm:
                    feats, tok = vlm.embed_images_with_tokens(b.images)
                    toks.append(tok)
                else:
                    feats = vlm.embed_images(b.images)
                ims.append(feats)
                t.advance()
        image = _flat(torch.cat(ims))
        tokens = torch.cat(toks) if toks else None
    if _supports(vlm, "embed_texts"):
        caption = _flat(torch.cat([vlm.embed_texts(captions[i:i + data.batch_size])
                                   for i in range(0, len(captions), data.batch_size)]))
    if image is not None and caption is not None and data.class_prompts and data.labels is not None:
        classes = _embed_texts(vlm, data.class_prompts, data.batch_size)
        labels = torch.tensor(data.labels)
    emb = EvalEmbeddings(image, caption, classes, labels, list(captions))
    if tokens is not None and caption is not None:
        emb.extra = itm_rerank(vlm, tokens, emb)
    return emb


ITM_CANDIDATES = 8


@torch.no_grad()
def itm_rerank(vlm, image_tokens: torch.Tensor, e: EvalEmbeddings,
               k: int = ITM_CANDIDATES) -> dict[str, float]:
    """Image-text matching re-ranking (BLIP's retrieval protocol): the top ``k`` candidates of
    the contrastive similarity are re-scored by the model's ITM head; R@1 of the new order.

    ``image_tokens`` are the cached vision token embeddings ([N, T, D], from the one vision
    pass of :func:`embed_eval`); no image is encoded again. Each (image, caption text) pair is
    scored once, even when both directions (and duplicate captions) ask for it, and all the
    texts of one image go in one call (its cross-attention keys/values computed once)."""
    captions = e.caption_text
    k = min(k, len(captions))
    sim = e.image @ e.caption.t()
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    cid = torch.tensor([ids[c] for c in captions])
    i2t = sim.topk(k, dim=1).indices  # [N images, k caption indices]
    t2i = sim.t().topk(k, dim=1).indices  # [N captions, k image indices]
    wanted: dict[int, dict[str, None]] = {}
    for q in range(len(i2t)):
        for c in i2t[q].tolist():
            wanted.setdefault(q, {})[captions[c]] = None
    for q in range(len(t2i)):
        for i in t2i[q].tolist():
            wanted.setdefault(i, {})[captions[q]] = None
    score: dict[tuple[int, str], float] = {}
    for i, texts in wanted.items():
        texts = list(texts)
        for s, t in zip(vlm.itm_scores_from_embeds(image_tokens[i], texts).tolist(), texts,
                        strict=True):
            score[(i, t)] = s
    hits_i2t = hits_t2i = 0
    for q in range(len(i2t)):
        cands = i2t[q].tolist()
        best = max(cands, key=lambda c: (score[(q, captions[c])], -cands.index(c)))
        hits_i2t += int(cid[best] == cid[q])
    for q in range(len(t2i)):
        cands = t2i[q].tolist()
        best = max(cands, key=lambda i: (score[(i, captions[q])], -cands.index(i)))
        hits_t2i += int(cid[best] == cid[q])
    return {"i2t_r1_itm": hits_i2t / len(i2t), "t2i_r1_itm": hits_t2i / len(t2i)}


def _recall(sim: torch.Tensor, relevant: torch.Tensor, k: int) -> float:
    k = min(k, sim.shape[1])
    top = sim.topk(k, dim=1).indices
    return relevant.gather(1, top).any(1).float().mean().item()


def metrics_from_embeddings(e: EvalEmbeddings) -> dict[str, float]:
    """Zero-shot and retrieval metrics; empty for a one-tower model (fidelity only)."""
    out: dict[str, float] = {}
    if e.image is None or e.caption is None:
        return out
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
    out.update(e.extra or {})
    return out


def fidelity(dense: EvalEmbeddings, pruned: EvalEmbeddings) -> dict[str, float]:
    """Mean cosine similarity of pruned to dense embeddings (image and caption)."""
    out = {}
    if dense.image is not None and pruned.image is not None:
        out["image_cosine"] = (dense.image * pruned.image).sum(-1).mean().item()
    if dense.caption is not None and pruned.caption is not None:
        out["text_cosine"] = (dense.caption * pruned.caption).sum(-1).mean().item()
    return out


def evaluate(vlm, data: PairData | None = None, progress=NULL) -> dict[str, float]:
    """Zero-shot top-1 (where the data has classes) and retrieval R@1/R@5 both ways.

    ``data`` defaults to the bundled shapes eval split (720 pairs, 36 classes).
    """
    if data is None:
        from ..data import load_eval

        data = load_eval()
    return metrics_from_embeddings(embed_eval(vlm, data, progress))
