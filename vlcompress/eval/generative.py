"""Accuracy of a generative VLM (captioning, VQA) and its fidelity to the dense model.

:func:`run_generative` runs one model once over the evaluation data: greedy generation
(batched, left padding; ``max_new_tokens``) for each distinct image (captioning) or each
question (VQA), and the next-token log-probabilities on the data's own sequences (prompt +
target) for fidelity. :func:`generative_metrics` scores one run against the references,
:func:`generative_fidelity` compares a pruned run with the dense one.

- **CIDEr** (``cider``): the CIDEr-D scorer of ``pycocoevalcap`` on text we tokenize
  ourselves (lower case, punctuation removed, split on whitespace): its PTB tokenizer needs
  Java. References of an image are every caption the data gives it (equal images grouped);
  the IDF is that of the evaluation references, as in the COCO evaluation. Raw score (COCO
  papers print it x100).
- **attribute accuracy** (``attribute_accuracy``, shapes-style data only: references naming
  size, colour, shape and position): the fraction of images whose generated caption names
  all four correctly.
- **VQA accuracy** (``vqa_accuracy``): exact match after VQA-style normalisation (lower
  case, punctuation, articles, number words to digits) against any accepted answer. The
  official VQA metric, min(#annotators agreeing / 3, 1), needs ten human answers per
  question; a list of accepted strings counts each as fully right.
- **fidelity**: ``token_kl`` = mean KL(dense || pruned) of the next-token distributions at
  the target positions of the data's sequences (the caption / answer tokens, end token
  included); ``next_token_agreement`` = how often their arg-max agree there;
  ``greedy_agreement`` = the fraction of the dense model's greedy tokens that the pruned
  model reproduces at the same position (a sequence counts max(len dense, len pruned)).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, DataError

CAPTION_METRICS = ("cider", "attribute_accuracy")
VQA_METRICS = ("vqa_accuracy",)
#: sequences whose next-token distributions are kept for ``token_kl`` (memory: n x target
#: tokens x vocabulary floats)
FIDELITY_SEQUENCES = 64

_PUNCT = re.compile(r"[^\w\s]")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}


def check_max_new_tokens(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"--max-new-tokens {n!r} is not valid; allowed: an integer >= 1")
    return n


def tokenize_caption(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed (what CIDEr compares)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def normalize_answer(text: str) -> str:
    """VQA-style answer normalisation: lower case, punctuation dropped, number words as
    digits, articles removed."""
    words = _PUNCT.sub(" ", text.lower().replace("'s", " 's")).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def cider(predictions: list[str], references: list[list[str]]) -> float:
    """CIDEr-D (pycocoevalcap) of ``predictions`` against each one's ``references``."""
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        from ..errors import MissingDependencyError

        raise MissingDependencyError("captioning CIDEr needs pycocoevalcap; install it with "
                                     "`pip install pycocoevalcap`") from None
    gts = {i: [tokenize_caption(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [tokenize_caption(p) or "<empty>"] for i, p in enumerate(predictions)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def caption_attributes(caption: str) -> dict[str, str] | None:
    """Size, colour, shape and position a shapes caption names (``shapes.parse_caption``);
    None unless it names all four, each once."""
    from ..data import shapes

    found = shapes.parse_caption(caption)
    return found if set(found) == set(shapes.ATTRIBUTES) else None


def _image_key(img) -> str:
    return hashlib.sha1(img.tobytes() + repr((img.size, img.mode)).encode()).hexdigest()


@dataclass
class GenerativeRun:
    """One model's outputs on the evaluation data."""

    task: str  # "caption" | "vqa"
    tokens: list[list[int]]  # greedy ids per generated item
    texts: list[str]
    references: list[list[str]]  # per generated item
    logprobs: list[torch.Tensor] = field(default_factory=list)  # [targets, vocab] per sequence
    n: int = 0


def _items(data):
    """(task, images, questions or None, references) of ``data``: VQA data asks each
    question once; caption data generates once per distinct image (its references: every
    caption of that image, and its full caption where the data has one)."""
    from ..data.vqa import VqaData

    if isinstance(data, VqaData):
        return "vqa", list(data.images), list(data.questions), [list(a) for a in data.answers]
    if data.images is None:
        raise DataError(f"data {data.source!r} is text-only; a generative model is evaluated on "
                        "images with captions or questions")
    order, refs, imgs = [], {}, {}
    full = data.retrieval_captions or [None] * len(data)
    for img, cap, fc in zip(data.images, data.captions, full, strict=True):
        k = _image_key(img)
        if k not in refs:
            order.append(k)
            refs[k], imgs[k] = [], img
        for c in (cap, fc):
            if c is not None and c not in refs[k]:
                refs[k].append(c)
    return "caption", [imgs[k] for k in order], None, [refs[k] for k in order]


def validation_items(datasets, per_set: int) -> tuple[list, list[str | None]]:
    """The first ``per_set`` generated items (images, questions; None: the caption prompt) of
    each data set: the prompts an ONNX export is validated on."""
    images, questions = [], []
    for d in datasets:
        _, im, qs, _ = _items(d)
        images += im[:per_set]
        questions += (qs or [None] * len(im))[:per_set]
    return images, questions


@torch.no_grad()
def run_generative(vlm, data, *, max_new_tokens: int = 24, batch_size: int = 16,
                   fidelity_sequences: int = FIDELITY_SEQUENCES, progress=None) -> GenerativeRun:
    """Generate for every item of ``data`` and keep the next-token log-probabilities of the
    first ``fidelity_sequences`` sequences (see the module doc)."""
    from ..progress import NULL

    progress = progress or NULL
    check_max_new_tokens(max_new_tokens)
    task, images, questions, refs = _items(data)
    tokens: list[list[int]] = []
    with progress.task("generate", total=len(images)) as t:
        for i in range(0, len(images), batch_size):
            q = None if questions is None else questions[i:i + batch_size]
            tokens += vlm.generate(images[i:i + batch_size], q, max_new_tokens=max_new_tokens)
            t.advance(len(images[i:i + batch_size]))
    logprobs: list[torch.Tensor] = []
    for batch in data.batches():
        if len(logprobs) >= fidelity_sequences:
            break
        enc = vlm.encode(batch)
        lp = torch.log_softmax(vlm.logits(enc).float(), -1)
        for row, mask in zip(lp, enc["target_mask"], strict=True):
            if len(logprobs) < fidelity_sequences:
                logprobs.append(row[mask].cpu())
    return GenerativeRun(task, tokens, vlm.decode(tokens), refs, logprobs, len(images))


def generative_metrics(run: GenerativeRun) -> dict[str, float]:
    """The task's metrics of one run (names: :data:`CAPTION_METRICS`, :data:`VQA_METRICS`)."""
    if run.task == "vqa":
        ok = [normalize_answer(p) in {normalize_answer(a) for a in refs}
              for p, refs in zip(run.texts, run.references, strict=True)]
        return {"vqa_accuracy": sum(ok) / max(1, len(ok))}
    out = {"cider": cider(run.texts, run.references)}
    truth = [next((a for a in map(caption_attributes, refs) if a is not None), None)
             for refs in run.references]
    if all(t is not None for t in truth):  # shapes-style references: attributes checkable
        ok = [caption_attributes(p) == t for p, t in zip(run.texts, truth, strict=True)]
        out["attribute_accuracy"] = sum(ok) / max(1, len(ok))
    return out


def generative_fidelity(dense: GenerativeRun, pruned: GenerativeRun) -> dict[str, float]:
    """``token_kl``, ``next_token_agreement`` and ``greedy_agreement`` (module doc)."""
    kl, agree, n = 0.0, 0, 0
    for d, p in zip(dense.logprobs, pruned.logprobs, strict=True):
        kl += float((d.exp() * (d - p)).sum())
        agree += int((d.argmax(-1) == p.argmax(-1)).sum())
        n += d.shape[0]
    same = total = 0
    for d, p in zip(dense.tokens, pruned.tokens, strict=True):
        if not d and not p:  # both end at once: the one (end) token agrees
            same, total = same + 1, total + 1
            continue
        same += sum(int(a == b) for a, b in zip(d, p, strict=False))
        total += max(len(d), len(p))
    return {"token_kl": kl / max(1, n), "next_token_agreement": agree / max(1, n),
            "greedy_agreement": same / max(1, total)}


def check_caption_metric(metric: str, dataset: str) -> None:
    """A captioning metric asked of a generative evaluation that holds questions only (its
    report's ``accuracy.dataset`` names no caption set): one line."""
    if metric in CAPTION_METRICS and "(vqa)" in dataset and "(caption)" not in dataset:
        raise ConfigError(f"metric {metric} needs captions, and the evaluation data {dataset!r} "
                          "holds only questions (vqa.jsonl); allowed for it: "
                          f"{', '.join(VQA_METRICS)}")

def dataset_name(datasets, *, random_weights: bool = False) -> str:
    """The report's ``accuracy.dataset`` of a generative evaluation (what bench and the gate
    compare)."""
    from ..data.vqa import VqaData

    name = " + ".join(f"{d.source} ({'vqa' if isinstance(d, VqaData) else 'caption'})"
                      for d in datasets)
    return name + ("; preset: random weights, fidelity only" if random_weights else "")


def run_all(vlm, datasets, *, max_new_tokens: int, progress=None) -> list[GenerativeRun]:
    return [run_generative(vlm, d, max_new_tokens=max_new_tokens, progress=progress)
            for d in datasets]


def merged_runs(runs: list[GenerativeRun]) -> GenerativeRun:
    out = GenerativeRun("mixed", [], [], [], [], 0)
    for r in runs:
        out.tokens += r.tokens
        out.logprobs += r.logprobs
        out.n += r.n
    return out


def generative_accuracy(datasets, dense: list[GenerativeRun], pruned: list[GenerativeRun],
                        *, random_weights: bool = False) -> dict:
    """The report's ``accuracy`` section of a generative run: each task's metrics (dense and
    pruned, by name) and the fidelity over every sequence; metrics are left out for random
    weights (a preset: fidelity only)."""
    dm, pm = {}, {}
    if not random_weights:
        for d, p in zip(dense, pruned, strict=True):
            dm.update(generative_metrics(d))
            pm.update(generative_metrics(p))
    name = dataset_name(datasets, random_weights=random_weights)
    acc = {"dataset": name,  # the shape of report.accuracy_section
           "metrics": {k: {"dense": dm[k], "pruned": pm[k], "delta": pm[k] - dm[k]} for k in dm},
           "fidelity": generative_fidelity(merged_runs(dense), merged_runs(pruned))}
    acc["n"] = sum(r.n for r in dense)
    acc["tasks"] = {r.task: {"n": r.n, "source": d.source,
                             "examples": [{"references": r.references[i][:3],
                                           "dense": r.texts[i], "pruned": p.texts[i]}
                                          for i in range(min(3, r.n))]}
                    for d, r, p in zip(datasets, dense, pruned, strict=True)}
    return acc


def variants_accuracy(runs: dict[str, list[GenerativeRun]], *,
                      random_weights: bool = False) -> dict:
    """Per variant (``dense``, ``pruned``, ``dense_tokens``, ``pruned_tokens``: weights alone,
    visual tokens alone, both): each task's metrics, the share of the dense metric it keeps
    (``retained``), and its fidelity to the dense model (module doc). Metrics are left out for
    random weights (a preset: fidelity only)."""
    dense = runs["dense"]
    dm = {}
    if not random_weights:
        for r in dense:
            dm.update(generative_metrics(r))
    out = {}
    for name, rs in runs.items():
        m = {}
        if not random_weights:
            for r in rs:
                m.update(generative_metrics(r))
        out[name] = {"metrics": m,
                     "retained": {k: (v / dm[k] if dm.get(k) else float("nan"))
                                  for k, v in m.items()},
                     "fidelity": generative_fidelity(merged_runs(dense), merged_runs(rs))}
    return out
