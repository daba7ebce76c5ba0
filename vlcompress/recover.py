"""``recover()``: knowledge distillation from the dense model into the pruned one.

    res = recover("build/run", steps=200)                    # a prune-export output folder
    res = recover("build/run", steps=200, data="my_pairs/")  # on the user's own data
    res = recover(pruned_vlm, steps=50, teacher=dense_vlm, data=pairs)   # in memory

The training loop, its loss and the checkpoints are :mod:`vlcompress.distill` (shared with
UPop / EfficientVLM retraining); it works for every family through ``VLM.features``: CLIP /
SigLIP (contrastive + embedding cosine + logit KL), BLIP (ITC + embedding cosine + ITC / ITM
logit KL) and one-tower models (1 - cosine of the tower's output features).

``data`` is what the student trains on: a ``PairData`` or a source (``"shapes"``, a folder
with images and captions.jsonl, or text-only ``.txt`` / image-less ``captions.jsonl`` for a
text encoder). For a run folder it defaults to the run's own calibration source (the report's
``config.calibration``), so recovery uses the user's data unless told otherwise; the result
(``RecoverResult.data``, ``recover.json``) records exactly which (source, kind, n). A
text-only source for a model that needs images is refused before any work.

With a run folder, checkpoints go to ``RUN_DIR/recover/last.pt`` (atomic; resumed with
``resume=True``), the model to ``RUN_DIR/recovered/model`` (atomic) and dense vs pruned vs
recovered accuracy (zero-shot, retrieval where the model has both towers) and fidelity to the
dense model (mean cosine of embeddings; the whole evaluation of a one-tower model) to
``RUN_DIR/recover.json``.

The learning rate and loss weights the user leaves unset come from the dense model's
**recovery recipe** when its folder ships one (``"recover_recipe"`` in its
``vlcompress.json``: ``{"lr": ..., "weights": {...}}``), else from
:data:`vlcompress.distill.DEFAULTS` (lr 5e-5, for pretrained checkpoints). The right rate
depends on the model: tiny-clip, trained from scratch at 1e-3, recovers at 1e-3 (50%
structured multiflow, 1200 steps: 99.0% of zero-shot and 98.7% of i2t R@1 retained) and
falls short at 5e-5 (97.2% / 65.9%: ``benchmarks/results/recover_quality*.json``), while real
MiniLM weights are hurt by 1e-3 and helped by 5e-5 (``benchmarks/results/real_text_recover_*``).
A recipe's lr applies to runs of at least its ``min_steps`` (tiny-clip: 100; at 1e-3 a 20-step
run lost fidelity, 60 steps gained it); shorter runs keep the default rate. What the recipe
set, and what it did not, is recorded (``RecoverResult.recipe``, ``recover.json``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import check_positive_int
from .distill import (
    CHECKPOINT,
    DEFAULTS,
    LOSS_WEIGHTS,
    check_pattern,
    check_schedule,
    check_weights,
    train_student,
    zero_masks,
)
from .errors import ConfigError, ModelError
from .progress import NULL, Progress


@dataclass
class RecoverResult:
    """What :func:`recover` did. ``losses`` holds the loss of every step run by this call
    (from ``start_step``); ``metrics`` dense / pruned / recovered when evaluated."""

    steps: int
    start_step: int
    losses: list[float]
    seconds: float
    lr: float
    batch_size: int
    data: dict  # {"source", "kind" ("pairs" | "text"), "n"}: exactly what the student trained on
    masked_layers: int
    pattern_preserved: bool
    metrics: dict = field(default_factory=dict)
    schedule: str = DEFAULTS["schedule"]
    run_dir: str | None = None
    model_path: str | None = None
    checkpoint: str | None = None
    recipe: dict | None = None  # {"from": card path, "applied": {...}[, "not_applied": {...}]}
    #: held-out early stopping: {"fraction", "n", "every", "patience", "best_step",
    #: "best_score" (mean fidelity to the dense model on the held-out pairs), "history", ...}
    holdout: dict | None = None

    @property
    def resumed(self) -> bool:
        return self.start_step > 0

    def to_dict(self) -> dict:
        return {
            "steps": self.steps, "start_step": self.start_step, "resumed": self.resumed,
            "lr": self.lr, "schedule": self.schedule, "batch_size": self.batch_size,
            "data": self.data,
            "seconds": round(self.seconds, 3), "masked_layers": self.masked_layers,
            "pattern_preserved": self.pattern_preserved,
            "loss_first": self.losses[0] if self.losses else None,
            "loss_last": self.losses[-1] if self.losses else None,
            "losses": [round(x, 6) for x in self.losses],
            "metrics": self.metrics, "model_path": self.model_path, "checkpoint": self.checkpoint,
            "recipe": self.recipe, "holdout": self.holdout,
        }


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def _check_run_dir(run_dir: Path) -> dict:
    """The report of a vlcompress output folder; one-line ModelError otherwise."""
    if not run_dir.is_dir():
        raise ModelError(f"{str(run_dir)!r} is not a folder; allowed: a prune-export output folder")
    rep = run_dir / "report.json"
    if not rep.is_file() or not (run_dir / "pruned" / "model").is_dir():
        raise ModelError(f"{str(run_dir)!r} is not a vlcompress output folder (it needs "
                         "report.json and pruned/model, as `vlcompress prune-export` writes)")
    try:
        report = json.loads(rep.read_text())
        report["model"]["name"]
    except (ValueError, KeyError, TypeError):
        raise ModelError(f"{str(rep)!r} is not a vlcompress report (no model.name)") from None
    return report


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ConfigError(f"steps {steps!r} is not valid; allowed: a positive integer")
    return steps


def _data_name(data) -> str:
    from .data import PairData

    return data.source if isinstance(data, PairData) else str(data)


def _load_teacher(teacher, student, report: dict | None):
    from .models import load_model
    from .models.base import VLM

    if teacher is None:
        if report is None:
            raise ConfigError("recover on an in-memory model needs teacher= (the dense model)")
        tower = (report.get("config") or {}).get("tower")
        teacher = load_model(report["model"]["name"], tower=tower)
    elif not isinstance(teacher, VLM):
        teacher = load_model(teacher)
    if teacher.family != student.family:
        raise ModelError(f"teacher family {teacher.family!r} does not match the student's "
                         f"{student.family!r}; allowed: the dense model the student was pruned from")
    if tuple(teacher.towers) != tuple(student.towers):
        raise ModelError(f"teacher towers {', '.join(teacher.towers)} do not match the student's "
                         f"{', '.join(student.towers)}; allowed: the dense model the student was "
                         "pruned from, with the same --tower")
    return teacher


def check_holdout_fraction(fraction, n: int | None = None) -> float:
    """``fraction`` of the training data held out for early stopping, a number in [0, 1);
    with ``n`` (the training pairs), the slice must leave at least one pair to train on.
    One-line ConfigError naming what is allowed."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not 0.0 <= float(fraction) < 1.0:
        raise ConfigError(f"holdout fraction {fraction!r} is not valid; allowed: a number in "
                          "[0, 1) (0: no early stopping)")
    f = float(fraction)
    if n is not None and f > 0:
        k = _holdout_count(f, n)
        if k >= n:
            raise ConfigError(f"holdout fraction {f:g} holds out {k} of the {n} training pairs, "
                              f"leaving none to train on; allowed: a fraction below "
                              f"{(n - 1) / n:.3g}, or more training data")
    return f


def _holdout_count(fraction: float, n: int) -> int:
    return max(1, math.ceil(fraction * n))


def split_holdout(data, fraction: float, seed: int = 0):
    """``(train, held_out)``: a seeded random ``fraction`` of ``data``'s pairs (at least one)
    that the optimiser never sees, and the rest, both ``PairData`` with ``data``'s batch size;
    the source names say which is which."""
    import dataclasses
    import random as _random

    n = len(data)
    check_holdout_fraction(fraction, n)
    k = _holdout_count(fraction, n)
    held = set(_random.Random(seed).sample(range(n), k))

    def part(keep: bool, tag: str):
        idx = [i for i in range(n) if (i in held) == keep]

        def pick(v):
            return None if v is None or len(v) != n else [v[i] for i in idx]

        return dataclasses.replace(data, images=pick(data.images),
                                   captions=[data.captions[i] for i in idx],
                                   labels=pick(data.labels),
                                   retrieval_captions=pick(data.retrieval_captions),
                                   source=f"{data.source} [{tag} {len(idx)} of {n}]",
                                   meta=dict(data.meta))

    return part(False, "training"), part(True, "held out")


def holdout_scorer(teacher, student, held):
    """``score()``: mean fidelity (cosine, image and text) of ``student`` to ``teacher`` on
    the held-out pairs ``held`` (contrastive embeddings; the teacher's computed once)."""
    from .eval import embed_eval, fidelity

    dense = embed_eval(teacher, held, itm=False)

    def score() -> float:
        fid = fidelity(dense, embed_eval(student, held, itm=False))
        return sum(fid.values()) / len(fid)

    return score


def _check_lr(lr, where: str = "learning rate") -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError(f"{where} {lr!r} is not valid; allowed: a positive number")
    return float(lr)


def recovery_recipe(vlm) -> tuple[dict, str | None]:
    """``({"lr": float, "weights": {...}, "min_steps": int}, card path)`` from the
    ``recover_recipe`` of the model card in ``vlm``'s folder
    (:func:`vlcompress.models.registry.model_card`), or ``({}, None)`` when it has none.
    ``min_steps``: the shortest run its ``lr`` is for. A malformed recipe is a one-line error
    naming the file."""
    from .models.registry import MODEL_CARD, model_card

    folder = Path(vlm.source) if getattr(vlm, "source", "") else None
    if folder is None or not folder.is_dir():
        return {}, None
    raw = model_card(folder).get("recover_recipe")
    if raw is None:
        return {}, None
    where = str(folder / MODEL_CARD)
    keys = ("lr", "min_steps", "weights", "measured")
    if not isinstance(raw, dict) or set(raw) - set(keys):
        raise ModelError(f"{where!r}: recover_recipe must be an object; allowed keys: "
                         f"{', '.join(keys)}")
    out: dict = {}
    try:
        if "lr" in raw:
            out["lr"] = _check_lr(raw["lr"], "recover_recipe lr")
        if "min_steps" in raw:
            out["min_steps"] = _check_steps(raw["min_steps"])
        if raw.get("weights"):
            out["weights"] = check_weights(raw["weights"])
    except ConfigError as exc:
        raise ModelError(f"{where!r}: recover_recipe: {exc}") from None
    return out, where


def apply_recipe(teacher, lr, weights: dict, steps: int) -> tuple[float, dict, dict | None]:
    """``(lr, weights, recipe record)``: what the user set wins; the dense model's recovery
    recipe fills the rest; :data:`~vlcompress.distill.DEFAULTS` after that. The recipe's lr
    is used only for runs of at least its ``min_steps`` (a high rate needs the steps to
    anneal: tiny-clip at 1e-3 loses fidelity in 20 steps and gains it in 60); a shorter run
    keeps the default rate, and the record says so (``not_applied``)."""
    recipe, where = recovery_recipe(teacher)
    applied, not_applied = {}, {}
    if lr is None:
        lr = DEFAULTS["lr"]
        if "lr" in recipe:
            if steps >= recipe.get("min_steps", 1):
                lr = applied["lr"] = recipe["lr"]
            else:
                not_applied["lr"] = recipe["lr"]
    weights = dict(weights)
    for k, v in (recipe.get("weights") or {}).items():
        if k not in weights:
            weights[k] = applied[k] = v
    if not applied and not not_applied:
        return lr, weights, None
    record = {"from": where, "applied": applied}
    if not_applied:
        record.update(not_applied=not_applied, min_steps=recipe["min_steps"], steps=steps,
                      lr_used=lr)
    return lr, weights, record


def describe_recipe(recipe: dict) -> str:
    """What the dense model's recovery recipe set, and where it came from, in one sentence."""
    what = ", ".join(f"lr {v:g}" if k == "lr" else f"{k}={v:g}"
                     for k, v in recipe["applied"].items())
    line = (f"recovery used {what} from the dense model's recovery recipe ({recipe['from']})"
            if what else f"the dense model's recovery recipe ({recipe['from']})")
    if recipe.get("not_applied"):
        line += (f"; its lr {recipe['not_applied']['lr']:g} is for runs of at least "
                 f"{recipe['min_steps']} steps, so this {recipe['steps']}-step run used lr "
                 f"{recipe['lr_used']:g}")
    return line


def _evaluate(teacher, student, ev, dense_emb=None) -> tuple[dict, dict, object]:
    """(metrics, fidelity to the dense model, student embeddings) of ``student`` on ``ev``."""
    from .eval import embed_eval, fidelity, metrics_from_embeddings

    emb = embed_eval(student, ev)
    return metrics_from_embeddings(emb), fidelity(dense_emb, emb), emb


class _GenerativeEval:
    """Dense / pruned / recovered scores of a generative model (llava): each task's metrics
    from greedy generation (caption attribute accuracy and CIDEr, VQA exact match) and
    fidelity to the dense model (next-token KL, token agreement)."""

    RETAINED = ("attribute_accuracy", "cider", "vqa_accuracy")

    def __init__(self, teacher, eval_data, eval_size: int, max_new_tokens: int):
        from .data import generative_eval_data
        from .eval.generative import run_all

        self.sets = generative_eval_data(eval_data, n=eval_size,
                                         questions=getattr(teacher, "answers_questions", True))
        self.max_new_tokens = int(max_new_tokens)
        self.dense = run_all(teacher, self.sets, max_new_tokens=self.max_new_tokens)
        self.source = ", ".join(f"{d.source} (n={len(d)})" for d in self.sets)

    @staticmethod
    def metrics(runs) -> dict:
        from .eval.generative import generative_metrics

        return {k: v for r in runs for k, v in generative_metrics(r).items()}

    def score(self, student) -> tuple[dict, dict]:
        from .eval.generative import generative_fidelity, merged_runs, run_all

        runs = run_all(student, self.sets, max_new_tokens=self.max_new_tokens)
        return self.metrics(runs), generative_fidelity(merged_runs(self.dense), merged_runs(runs))


def recover(target, *, steps: int, data=None, n: int = DEFAULTS["n"],
            batch_size: int = DEFAULTS["batch_size"], lr: float | None = None, teacher=None,
            checkpoint_dir: str | Path | None = None, checkpoint_every: int = DEFAULTS["checkpoint_every"],
            resume: bool = True, seed: int = 0, evaluate: bool | None = None,
            eval_data=None, eval_size: int = 720, weights: dict | None = None,
            schedule: str = DEFAULTS["schedule"], holdout_fraction: float = 0.0,
            holdout_every: int = 25, patience: int = 0,
            progress: Progress = NULL) -> RecoverResult:
    """Distil the dense teacher into the pruned student (see the module doc).

    ``target`` is a ``prune-export`` output folder (student ``pruned/model``, teacher the
    report's ``model.name`` unless ``teacher`` is given; writes ``recovered/model``,
    ``recover/last.pt`` and ``recover.json``) or a pruned :class:`~vlcompress.models.VLM`
    (trained in place; ``teacher`` required; checkpoints only with ``checkpoint_dir``).
    ``data``: a ``PairData`` or a source; default the run's calibration source (a run folder)
    or ``"shapes"`` (in memory). ``eval_data``: default the run's ``config.eval_data`` or
    ``"shapes"``. ``evaluate`` (default: True for a folder) measures dense / pruned /
    recovered accuracy and fidelity to the dense model. ``schedule``: the learning rate of
    each step, ``cosine`` (warm-up, then decay to 0; the default) or ``constant``
    (:func:`vlcompress.distill.lr_at`). ``lr`` and each loss weight in ``weights`` that is
    not given come from the dense model's recovery recipe, then from the defaults (see the
    module doc). ``holdout_fraction`` > 0: that share of the training pairs (seeded, at least
    one) is held out, never trained on; every ``holdout_every`` steps the student's fidelity
    to the dense model on it is measured, and the best state is kept (``patience`` > 0: stop
    after that many evaluations without improvement); ``RecoverResult.holdout`` records it.
    A slice that leaves no training pair is a one-line ConfigError before training.
    """
    from .models import load_model
    from .models.base import VLM

    t0 = time.perf_counter()
    steps = _check_steps(steps)
    holdout_fraction = check_holdout_fraction(holdout_fraction, n if isinstance(n, int) else None)
    if holdout_fraction:
        from .distill import EarlyStopping

        EarlyStopping(lambda: 0.0, holdout_every, patience)  # checks both, before any work
    for name, v in (("--batch-size", batch_size), ("--size", n), ("--eval-size", eval_size)):
        check_positive_int(v, name)
    weights = check_weights(weights)
    schedule = check_schedule(schedule)
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every {checkpoint_every!r} is not valid; allowed: a "
                          "positive integer")
    if lr is not None:
        lr = _check_lr(lr)
    run_dir = report = None
    run_cfg: dict = {}
    if isinstance(target, VLM):
        student = target
    else:
        run_dir = Path(target)
        report = _check_run_dir(run_dir)
        run_cfg = report.get("config") or {}
        student = load_model(run_dir / "pruned" / "model", tower=run_cfg.get("tower"))
        if checkpoint_dir is None:
            checkpoint_dir = run_dir / "recover"
    if data is None:
        data = run_cfg.get("calibration") or "shapes"
    evaluate = run_dir is not None if evaluate is None else evaluate
    if eval_data is None:
        eval_data = run_cfg.get("eval_data") or "shapes"
    # every data source is checked against the model before any work (no image is read)
    kind = student.check_data(data, "training data")
    if evaluate:
        student.check_data(eval_data, "eval data")
    teacher = _load_teacher(teacher, student, report)
    lr, weights, recipe = apply_recipe(teacher, lr, weights, steps)
    from .data import load_train

    train = load_train(data, n, batch_size, seed)
    held = None
    if holdout_fraction:
        train, held = split_holdout(train, holdout_fraction, seed)
    used = {"source": _data_name(train), "kind": kind, "n": len(train)}

    ev = dense_emb = gen = None
    metrics: dict = {}
    if evaluate and getattr(student, "generative", False):
        gen = _GenerativeEval(teacher, eval_data, eval_size, run_cfg.get("max_new_tokens", 24))
        metrics["dense"] = gen.metrics(gen.dense)
        metrics["pruned"], fid_pruned = gen.score(student)
    elif evaluate:
        from .data import load_eval
        from .eval import embed_eval, metrics_from_embeddings

        ev = load_eval(eval_data, n=eval_size)
        dense_emb = embed_eval(teacher, ev)
        metrics["dense"] = metrics_from_embeddings(dense_emb)
        metrics["pruned"], fid_pruned, _ = _evaluate(teacher, student, ev, dense_emb)

    masks = zero_masks(student)
    ck = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    key = {"data": used["source"], "n": len(train), "batch_size": train.batch_size,
           "weights": dict(weights or {}),
           "shapes": {k: list(v.shape) for k, v in student.model.state_dict().items()}}
    stopper = None
    if held is not None:
        from .distill import EarlyStopping

        stopper = EarlyStopping(holdout_scorer(teacher, student, held), holdout_every, patience)
    start, losses = train_student(student, teacher, train, steps=steps, lr=lr, seed=seed,
                                  masks=masks, checkpoint=ck, checkpoint_every=checkpoint_every,
                                  resume=resume, progress=progress, weights=weights, key=key,
                                  schedule=schedule, early_stopping=stopper)
    preserved = check_pattern(student, masks)
    if not preserved:  # a bug, never a user error
        raise RuntimeError("recover changed the sparsity pattern")
    if evaluate:
        if gen is not None:
            metrics["recovered"], fid_rec = gen.score(student)
        else:
            metrics["recovered"], fid_rec, _ = _evaluate(teacher, student, ev, dense_emb)
        d, p, r = metrics["dense"], metrics["pruned"], metrics["recovered"]
        keys = _GenerativeEval.RETAINED if gen is not None else ("zeroshot_top1", "i2t_r1", "t2i_r1")
        metrics["retained"] = {k: {"pruned": p[k] / d[k] if d[k] else None,
                                   "recovered": r[k] / d[k] if d[k] else None}
                               for k in keys if k in d}
        metrics["fidelity"] = {"pruned": fid_pruned, "recovered": fid_rec}
        metrics["dataset"] = gen.source if gen is not None else f"{ev.source} (n={len(ev)})"
    res = RecoverResult(steps=steps, start_step=start, losses=losses,
                        seconds=time.perf_counter() - t0, lr=lr, schedule=schedule,
                        batch_size=train.batch_size,
                        data=used, masked_layers=len(masks), pattern_preserved=preserved,
                        metrics=metrics, checkpoint=None if ck is None else str(ck),
                        recipe=recipe,
                        holdout=None if stopper is None else {
                            "fraction": holdout_fraction, "n": len(held),
                            "source": _data_name(held),
                            "metric": "mean cosine to the dense model's embeddings",
                            **stopper.to_dict()})
    if run_dir is not None:
        from .atomic import atomic_dir, atomic_write_text

        with atomic_dir(run_dir / "recovered" / "model", overwrite=True) as tmp:
            student.save(tmp)
        res.run_dir = str(run_dir)
        res.model_path = "recovered/model"
        doc = {"model": report["model"]["name"], "family": student.family,
               "prune": {k: (report.get("prune") or {}).get(k) for k in ("method", "pattern", "achieved")},
               **res.to_dict(),
               "distill_weights": {**{k: DEFAULTS[k] for k in LOSS_WEIGHTS}, **weights}}
        atomic_write_text(run_dir / "recover.json", json.dumps(doc, indent=2) + "\n")
    return res


__all__ = ["RecoverResult", "check_holdout_fraction", "describe_recipe", "holdout_scorer",
           "recover", "recovery_recipe", "split_holdout"]
