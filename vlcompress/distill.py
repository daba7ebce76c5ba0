"""The one distillation loop: a dense teacher into a pruned student, sparsity pattern kept.

``recover`` (after pruning) and the retraining of UPop / EfficientVLM use it. It is
family-agnostic: both models give their differentiable outputs through the adapter hook
``VLM.features(encoded) -> dict`` (see ``models/base.py``), and the loss combines whatever the
family provides:

    loss = w_contrastive * the student's own contrastive loss        (``loss``: CLIP, SigLIP, BLIP ITC)
         + w_embed * mean(1 - cos(student, teacher)) per tower output (``vision``, ``text``; per
           token for [B, T, D] vision-tower features, per sentence for a text encoder)
         + w_logits * T^2 * KL(teacher || student) of the image-text logits, both directions
           (``logits``), of the ITM match logits (``itm``: BLIP), and of the next-token
           logits at each target position, mean over positions (``tokens``: a generative
           model, LLaVA: logit distillation on the user's training sequences)
         + w_relation * mean squared difference of the in-batch cosine-similarity matrices,
           image-image and text-text (``vision``, ``text`` embeddings of shape [B, D]; off by
           default): relation distillation, the batch's geometry rather than each embedding

so a one-tower model (a vision tower, a BERT text encoder) distils its embeddings, and a new
family gets recovery by implementing ``features`` in its one file. Nothing here reads the
bundled shapes data: the caller passes the data (image-caption pairs or, for text encoders,
text only).

The sparsity pattern is preserved exactly: the masks are the student's zero pattern at the
start (``weight == 0``) of every prunable layer that has zeros; gradients of masked weights are
zeroed and the masks re-applied after every optimizer step (unstructured zeros stay zero, 2:4
stays 2:4). A structurally pruned (sliced) model trains as it is: its shapes never change.

Checkpoints (model weights, optimizer, step, RNG state) are written atomically every
``checkpoint_every`` steps and on Ctrl-C (then the interrupt is re-raised); with ``resume`` a
later call continues from the saved step (the data order is a function of the step, so the
result equals an uninterrupted run).
"""

from __future__ import annotations

import copy
import io
import math
import random
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import ConfigError, ModelError, OutputError
from .progress import NULL, Progress

CHECKPOINT = "last.pt"
CHECKPOINT_FORMAT = "vlcompress-recover"
DEFAULTS = {"n": 4096, "batch_size": 32, "lr": 5e-5, "checkpoint_every": 25, "schedule": "cosine",
            "w_contrastive": 1.0, "w_embed": 1.0, "w_logits": 1.0, "temperature": 1.0,
            "w_relation": 0.0}
LOSS_WEIGHTS = ("w_contrastive", "w_embed", "w_logits", "temperature", "w_relation")
EMBEDDINGS = ("vision", "text")


def check_weights(weights) -> dict[str, float]:
    """Loss weights (``w_relation=1``, ``temperature=2`` ...) as floats, each one of
    :data:`LOSS_WEIGHTS` and >= 0 (temperature > 0); ConfigError naming what is allowed.
    Accepts a mapping or ``["key=value", ...]`` (the CLI's ``--distill-weight``)."""
    if weights is None:
        return {}
    items = weights.items() if isinstance(weights, dict) else \
        (str(w).partition("=")[::2] for w in weights)
    allowed = ", ".join(f"{k} (default {DEFAULTS[k]:g})" for k in LOSS_WEIGHTS)
    out = {}
    for k, v in items:
        k = str(k).strip()
        if k not in LOSS_WEIGHTS:
            raise ConfigError(f"unknown distillation weight {k!r}; allowed: {allowed}")
        try:
            x = float(v)
        except (TypeError, ValueError):
            x = float("nan")
        if not x >= (1e-12 if k == "temperature" else 0.0) or x == float("inf"):
            raise ConfigError(f"distillation weight {k}={v!r} is not valid; allowed: a number "
                              + ("> 0" if k == "temperature" else ">= 0"))
        out[k] = x
    return out


# --------------------------------------------------------------------------------------------
# masks, teacher
# --------------------------------------------------------------------------------------------
def zero_masks(vlm) -> dict[str, torch.Tensor]:
    """``{layer name: Bool kept}`` for every prunable layer with zero weights."""
    out = {}
    for ly in vlm.prunable_layers():
        w = ly.weight.detach()
        if bool((w == 0).any()):
            out[ly.name] = w != 0
    return out


def check_pattern(student, masks: dict[str, torch.Tensor]) -> bool:
    """Every masked weight of ``student`` is still zero."""
    named = dict(student.model.named_parameters())
    return all(not bool(named[f"{n}.weight"].detach()[~m].any()) for n, m in masks.items())


def dense_copy(vlm):
    """A frozen deep copy of ``vlm`` to serve as the teacher."""
    t = copy.copy(vlm)
    t.model = copy.deepcopy(vlm.model).eval()
    return t


# --------------------------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------------------------
def features(vlm, encoded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``vlm.features(encoded)`` (differentiable), checked to hold something to distil."""
    out = vlm.features(encoded)
    if not out or not any(k in out for k in (*EMBEDDINGS, "logits", "itm", "tokens")):
        raise ModelError(f"{vlm.family} model gives no features to distil; its adapter must "
                         "implement VLM.features (tower embeddings and/or logits)")
    return out


def _kl(s: torch.Tensor, t: torch.Tensor, T: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(s.float() / T, -1), F.log_softmax(t.float() / T, -1),
                    log_target=True, reduction="batchmean")


def relation_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the in-batch cosine-similarity matrices of ``s`` and ``t``
    (both [B, D])."""
    sn, tn = F.normalize(s.float(), dim=-1), F.normalize(t.float(), dim=-1)
    return ((sn @ sn.t() - tn @ tn.t()) ** 2).mean()


def distill_loss(s_out: dict, t_out: dict, *, w_contrastive: float = 1.0, w_embed: float = 1.0,
                 w_logits: float = 1.0, temperature: float = 1.0,
                 w_relation: float = 0.0) -> torch.Tensor:
    """Student's own contrastive loss + embedding cosine distance + logit KL (+ relation
    distillation with ``w_relation``), over whichever of ``loss``, ``vision``, ``text``,
    ``logits``, ``itm`` both feature dicts hold."""
    terms = []
    if w_contrastive and s_out.get("loss") is not None:
        terms.append(w_contrastive * s_out["loss"])
    if w_embed:
        for k in EMBEDDINGS:
            if k in s_out and k in t_out:
                cos = F.cosine_similarity(s_out[k].float(), t_out[k].float(), dim=-1)
                terms.append(w_embed * (1 - cos).mean())
    if w_relation:
        for k in EMBEDDINGS:
            if k in s_out and k in t_out and s_out[k].dim() == 2 and s_out[k].shape[0] > 1:
                terms.append(w_relation * relation_loss(s_out[k], t_out[k]))
    if w_logits:
        T = float(temperature)
        if "logits" in s_out and "logits" in t_out:
            s, t = s_out["logits"], t_out["logits"]
            terms.append(w_logits * (T * T) * (_kl(s, t, T) + _kl(s.t(), t.t(), T)) / 2)
        if "itm" in s_out and "itm" in t_out:
            terms.append(w_logits * (T * T) * _kl(s_out["itm"], t_out["itm"], T))
        if "tokens" in s_out and "tokens" in t_out:  # [N target positions, vocabulary]
            terms.append(w_logits * (T * T) * _kl(s_out["tokens"], t_out["tokens"], T))
    if not terms:
        raise ModelError("nothing to distil: the student and teacher features share no "
                         f"entry ({', '.join(s_out)} vs {', '.join(t_out)}) or every weight is 0")
    return torch.stack([torch.as_tensor(x, dtype=torch.float32).reshape(()) for x in terms]).sum()


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])


def save_checkpoint(path: Path, model, opt, step: int, losses: list[float], key: dict) -> None:
    """Model, optimizer, step, RNG state and losses, written atomically to ``path``."""
    from .atomic import atomic_write_bytes

    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "step": step, "key": key,
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "rng": _rng_state(), "losses": list(losses)}, buf)
    atomic_write_bytes(path, buf.getvalue(), fsync=False)


def load_checkpoint(path: Path, key: dict) -> dict | None:
    """A checkpoint saved for the same run (same key), or None."""
    if not path.is_file():
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a corrupt file: say so, do not train over it silently
        raise OutputError(f"checkpoint {str(path)!r} cannot be read ({exc}); remove it or "
                          "pass --no-resume") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise OutputError(f"{str(path)!r} is not a vlcompress recover checkpoint")
    if ck.get("key") != key:
        return None  # another configuration: start over (the file is replaced on save)
    return ck


# --------------------------------------------------------------------------------------------
# the training loop
# --------------------------------------------------------------------------------------------
SCHEDULES = ("cosine", "constant")
WARMUP = 0.05  # of the steps, at most 100: the linear warm-up of the cosine schedule


def lr_at(step: int, steps: int, lr: float, schedule: str, max_warmup: int | None = 100) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``steps``: ``constant``, or
    ``cosine`` (the default): a linear warm-up over ``WARMUP`` of the steps (at most 100),
    then a cosine decay to 0 at the last step. Measured with ``benchmarks/recover_quality.py``
    on tiny-clip, multiflow structured 50%, 600 steps, 3600 eval pairs (retained zero-shot /
    i2t R@1): at lr 2e-4 cosine 94.9 / 83.3% (``recover_quality_lr2e-4_600.json``) and constant 94.7 /
    83.0% (``recover_quality_constant_lr.json``); at lr 1e-3 cosine and constant in
    ``recover_quality_lr1e-3_cosine.json`` and ``..._constant.json`` (docs/benchmarks.md, "The
    recovery recipe, measured on the first tiny-clip"): the
    decay is what lets a higher rate be used. A resumed run continues the schedule of its own
    ``steps``. ``max_warmup=None`` lifts the 100-step cap on the warm-up (the training
    scripts of the embedded models use the uncapped schedule their shipped weights were
    trained with)."""
    if schedule == "constant" or steps <= 1:
        return lr
    warm = max(1, int(WARMUP * steps))
    if max_warmup is not None:
        warm = min(max_warmup, warm)
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def check_schedule(schedule: str) -> str:
    if schedule not in SCHEDULES:
        raise ConfigError(f"learning-rate schedule {schedule!r} is not valid; allowed: "
                          f"{', '.join(SCHEDULES)}")
    return schedule


class EarlyStopping:
    """Held-out early stopping for :func:`train_student`: ``score()`` (higher is better: the
    caller's fidelity of the student to the teacher on pairs the optimiser never sees) is taken
    at the first step of the call and every ``every`` steps (and at the last); the best
    state's weights are kept in memory and restored at the end. ``patience`` > 0 also stops
    the run after that many evaluations without a better score (0: run every step).
    ``history``: ``[(step, score), ...]``; ``best_step`` / ``best_score`` after the run."""

    def __init__(self, score: Callable[[], float], every: int = 25, patience: int = 0):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"held-out evaluation every {every!r} steps is not valid; allowed: a "
                              "positive integer")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ConfigError(f"patience {patience!r} is not valid; allowed: an integer >= 0")
        self.score, self.every, self.patience = score, every, patience
        self.history: list[tuple[int, float]] = []
        self.best_step: int | None = None
        self.best_score = float("-inf")
        self._best_state: dict | None = None
        self.stopped_at: int | None = None

    def due(self, step: int, steps: int) -> bool:
        return step % self.every == 0 or step == steps

    def check(self, step: int, model) -> bool:
        """Score the model now; True when the run should stop (patience spent)."""
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                s = float(self.score())
        finally:
            model.train(was)
        self.history.append((step, s))
        if s > self.best_score:
            self.best_score, self.best_step = s, step
            self._best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return False
        since = sum(1 for st, _ in self.history if st > self.best_step)
        return bool(self.patience) and since >= self.patience

    def restore(self, model) -> None:
        if self._best_state is not None:
            model.load_state_dict(self._best_state)
            self._best_state = None

    def to_dict(self) -> dict:
        return {"every": self.every, "patience": self.patience, "best_step": self.best_step,
                "best_score": self.best_score if self.history else None,
                "stopped_at": self.stopped_at,
                "history": [[st, round(x, 6)] for st, x in self.history]}


def train_student(student, teacher, data, *, steps: int, lr: float, seed: int = 0,
                  masks: dict[str, torch.Tensor] | None = None, checkpoint: Path | None = None,
                  checkpoint_every: int = 25, resume: bool = True, progress: Progress = NULL,
                  weights: dict | None = None, key: dict | None = None,
                  schedule: str = DEFAULTS["schedule"],
                  early_stopping: EarlyStopping | None = None) -> tuple[int, list[float]]:
    """Distil ``teacher`` into ``student`` in place for ``steps`` optimizer steps (from a
    checkpoint's step when resuming) on ``data`` (a ``PairData``: pairs, or text only for a
    text encoder), the learning rate of each step from :func:`lr_at`. Returns ``(start step,
    losses of the steps run)``. ``early_stopping``: held-out scoring, the best state restored
    at the end (:class:`EarlyStopping`; the checkpoint holds the last state, for resuming)."""
    check_schedule(schedule)
    weights = {k: DEFAULTS[k] for k in LOSS_WEIGHTS} | dict(weights or {})
    masks = zero_masks(student) if masks is None else masks
    model = student.model
    named = dict(model.named_parameters())
    mask_of = {named[f"{name}.weight"]: m for name, m in masks.items() if f"{name}.weight" in named}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # not steps: a longer run continues a shorter one
    key = dict(key or {}, lr=lr, seed=seed, schedule=schedule)

    start, losses = 0, []
    if checkpoint is not None and resume:
        ck = load_checkpoint(checkpoint, key)
        if ck is not None and int(ck["step"]) <= steps:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            _set_rng_state(ck["rng"])
            start = int(ck["step"])
    batches = list(data.batches())
    cache: dict[int, dict] = {}
    teacher.model.eval()
    for p in teacher.model.parameters():
        p.requires_grad_(False)

    orders: dict[int, list[int]] = {}

    def batch_at(step: int) -> dict:
        epoch, i = divmod(step, len(batches))
        if epoch not in orders:  # one shuffle per epoch, not per step
            orders.clear()
            orders[epoch] = list(range(len(batches)))
            random.Random(seed * 1_000_003 + epoch).shuffle(orders[epoch])
        j = orders[epoch][i]
        if j not in cache:
            with torch.no_grad():
                cache[j] = student.encode(batches[j])
        return cache[j]

    step = start
    was_training = model.training
    if early_stopping is not None:
        early_stopping.check(step, model)
    model.train()
    try:
        with progress.task("distil", total=steps) as task:
            if start:
                task.advance(start)
            while step < steps:
                enc = batch_at(step)
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, steps, lr, schedule)
                with torch.no_grad():
                    t_out = features(teacher, enc)
                s_out = features(student, enc)
                loss = distill_loss(s_out, t_out, **weights)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for p, m in mask_of.items():
                    if p.grad is not None:
                        p.grad.mul_(m)
                opt.step()
                with torch.no_grad():
                    for p, m in mask_of.items():
                        p.mul_(m)
                step += 1
                losses.append(float(loss.detach()))
                task.advance()
                task.update(description=f"distil (loss {losses[-1]:.4f})")
                if checkpoint is not None and (step % checkpoint_every == 0 or step == steps):
                    save_checkpoint(checkpoint, model, opt, step, losses, key)
                if early_stopping is not None and early_stopping.due(step, steps) \
                        and early_stopping.check(step, model):
                    early_stopping.stopped_at = step
                    break
    except KeyboardInterrupt:
        if checkpoint is not None:
            save_checkpoint(checkpoint, model, opt, step, losses, key)
        raise
    finally:
        model.train(was_training)
    if early_stopping is not None:
        early_stopping.restore(model)
    model.eval()
    return start, losses


@torch.no_grad()
def distill_gap(student, teacher, data, weights: dict | None = None) -> float:
    """Mean distillation loss of ``student`` against ``teacher`` over ``data`` (no training):
    how far the student is from the teacher, before vs after :func:`train_student`."""
    weights = {k: DEFAULTS[k] for k in LOSS_WEIGHTS} | dict(weights or {})
    total, n = 0.0, 0
    for b in data.batches():
        enc = student.encode(b)
        total += float(distill_loss(features(student, enc), features(teacher, enc), **weights))
        n += 1
    return total / max(n, 1)


__all__ = ["CHECKPOINT", "DEFAULTS", "SCHEDULES", "EarlyStopping", "check_pattern", "check_schedule",
           "check_weights",
           "dense_copy", "distill_gap",
           "distill_loss", "features", "load_checkpoint", "relation_loss", "save_checkpoint", "train_student",
           "zero_masks"]
