"""``recover()``: knowledge distillation from the dense model into the pruned one.

    res = recover("build/run", steps=200)           # a prune-export output folder
    res = recover(pruned_vlm, steps=50, teacher=dense_vlm)   # in memory

The student (the pruned model) is trained on image-text pairs with

    loss = w_contrastive * CLIP loss (symmetric InfoNCE with the student's logit scale)
         + w_embed * mean(1 - cos(student, teacher)) of image and text embeddings
         + w_logits * T^2 * KL(teacher || student) of the image-text logits (both directions)

The sparsity pattern is preserved exactly: the masks are the student's zero pattern at the
start (``weight == 0``) of every prunable layer that has zeros; gradients of masked weights are
zeroed and the masks are re-applied after every optimizer step (so unstructured zeros stay
zero and 2:4 stays 2:4). A structurally pruned (sliced) model is trained as it is: its shapes
never change.

With a run folder, checkpoints (model weights, optimizer, step, RNG state) are written
atomically into ``RUN_DIR/recover/last.pt`` every ``checkpoint_every`` steps and on Ctrl-C
(then the interrupt is re-raised); a later call with ``resume=True`` continues from the saved
step (the data order is a function of the step, so the result equals an uninterrupted run).
At the end the model goes to ``RUN_DIR/recovered/model`` (atomic) and dense vs pruned vs
recovered accuracy (zero-shot, retrieval) to ``RUN_DIR/recover.json``.
"""

from __future__ import annotations

import copy
import io
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import ConfigError, ModelError, OutputError
from .progress import NULL, Progress

CHECKPOINT = "last.pt"
CHECKPOINT_FORMAT = "vlcompress-recover"
DEFAULTS = {"n": 4096, "batch_size": 32, "lr": 5e-5, "checkpoint_every": 25,
            "w_contrastive": 1.0, "w_embed": 1.0, "w_logits": 1.0, "temperature": 1.0}


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
    data: str
    masked_layers: int
    pattern_preserved: bool
    metrics: dict = field(default_factory=dict)
    run_dir: str | None = None
    model_path: str | None = None
    checkpoint: str | None = None

    @property
    def resumed(self) -> bool:
        return self.start_step > 0

    def to_dict(self) -> dict:
        return {
            "steps": self.steps, "start_step": self.start_step, "resumed": self.resumed,
            "lr": self.lr, "batch_size": self.batch_size, "data": self.data,
            "seconds": round(self.seconds, 3), "masked_layers": self.masked_layers,
            "pattern_preserved": self.pattern_preserved,
            "loss_first": self.losses[0] if self.losses else None,
            "loss_last": self.losses[-1] if self.losses else None,
            "losses": [round(x, 6) for x in self.losses],
            "metrics": self.metrics, "model_path": self.model_path, "checkpoint": self.checkpoint,
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


def _train_data(data, n: int, batch_size: int, seed: int):
    from .data import folder_pairs, shapes_pairs
    from .data.pairs import PairData

    if isinstance(data, PairData):
        return data
    if str(data) == "shapes":
        return shapes_pairs("train", n, batch_size, seed)
    return folder_pairs(data, n, batch_size)


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
    if len(student.towers) < 2 or tuple(teacher.towers) != tuple(student.towers):
        raise ModelError(f"recover distils image-text models with two towers; student towers: "
                         f"{', '.join(student.towers)}, teacher: {', '.join(teacher.towers)}")
    return teacher


# --------------------------------------------------------------------------------------------
# masks and loss
# --------------------------------------------------------------------------------------------
def zero_masks(vlm) -> dict[str, torch.Tensor]:
    """``{layer name: Bool kept}`` for every prunable layer with zero weights."""
    out = {}
    for ly in vlm.prunable_layers():
        w = ly.weight.detach()
        if bool((w == 0).any()):
            out[ly.name] = w != 0
    return out


def _outputs(vlm, enc):
    out = vlm.model(**vlm.model_inputs(enc), return_loss=True)
    if getattr(out, "logits_per_image", None) is None or getattr(out, "image_embeds", None) is None:
        raise ModelError(f"recover needs a contrastive image-text model; {vlm.family} gives no "
                         "image-text logits")
    return out


def distill_loss(s_out, t_out, *, w_contrastive: float = 1.0, w_embed: float = 1.0,
                 w_logits: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """Contrastive loss + embedding cosine distance + logit KL (both directions)."""
    loss = w_contrastive * s_out.loss if w_contrastive else 0.0
    if w_embed:
        emb = 0.0
        for a, b in ((s_out.image_embeds, t_out.image_embeds), (s_out.text_embeds, t_out.text_embeds)):
            emb = emb + (1 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean()
        loss = loss + w_embed * emb
    if w_logits:
        T = float(temperature)
        kl = 0.0
        for s, t in ((s_out.logits_per_image, t_out.logits_per_image),
                     (s_out.logits_per_image.t(), t_out.logits_per_image.t())):
            kl = kl + F.kl_div(F.log_softmax(s.float() / T, -1), F.log_softmax(t.float() / T, -1),
                               log_target=True, reduction="batchmean")
        loss = loss + w_logits * (T * T) * kl / 2
    return loss


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])


def _save_checkpoint(path: Path, model, opt, step: int, losses: list[float], key: dict) -> None:
    from .atomic import atomic_write_bytes

    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "step": step, "key": key,
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "rng": _rng_state(), "losses": list(losses)}, buf)
    atomic_write_bytes(path, buf.getvalue(), fsync=False)


def _load_checkpoint(path: Path, key: dict) -> dict | None:
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
def train_student(student, teacher, data, *, steps: int, lr: float, seed: int = 0,
                  masks: dict[str, torch.Tensor] | None = None, checkpoint: Path | None = None,
                  checkpoint_every: int = 25, resume: bool = True, progress: Progress = NULL,
                  weights: dict | None = None, key: dict | None = None) -> tuple[int, list[float]]:
    """Distil ``teacher`` into ``student`` in place for ``steps`` optimizer steps (from a
    checkpoint's step when resuming). Returns ``(start step, losses of the steps run)``."""
    weights = {k: DEFAULTS[k] for k in ("w_contrastive", "w_embed", "w_logits", "temperature")} \
        | dict(weights or {})
    masks = zero_masks(student) if masks is None else masks
    model = student.model
    named = dict(model.named_parameters())
    mask_of = {named[f"{name}.weight"]: m for name, m in masks.items() if f"{name}.weight" in named}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    key = dict(key or {}, lr=lr, seed=seed)  # not steps: a longer run continues a shorter one

    start, losses = 0, []
    if checkpoint is not None and resume:
        ck = _load_checkpoint(checkpoint, key)
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
    model.train()
    try:
        with progress.task("recover (distil)", total=steps) as task:
            if start:
                task.advance(start)
            while step < steps:
                enc = batch_at(step)
                with torch.no_grad():
                    t_out = _outputs(teacher, enc)
                s_out = _outputs(student, enc)
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
                task.update(description=f"recover (loss {losses[-1]:.4f})")
                if checkpoint is not None and (step % checkpoint_every == 0 or step == steps):
                    _save_checkpoint(checkpoint, model, opt, step, losses, key)
    except KeyboardInterrupt:
        if checkpoint is not None:
            _save_checkpoint(checkpoint, model, opt, step, losses, key)
        raise
    finally:
        model.train(was_training)
    model.eval()
    return start, losses


def check_pattern(student, masks: dict[str, torch.Tensor]) -> bool:
    """Every masked weight of ``student`` is still zero."""
    named = dict(student.model.named_parameters())
    return all(not bool(named[f"{n}.weight"].detach()[~m].any()) for n, m in masks.items())


def recover(target, *, steps: int, data="shapes", n: int = DEFAULTS["n"],
            batch_size: int = DEFAULTS["batch_size"], lr: float = DEFAULTS["lr"], teacher=None,
            checkpoint_dir: str | Path | None = None, checkpoint_every: int = DEFAULTS["checkpoint_every"],
            resume: bool = True, seed: int = 0, evaluate: bool | None = None,
            eval_data="shapes", eval_size: int = 720, weights: dict | None = None,
            progress: Progress = NULL) -> RecoverResult:
    """Distil the dense teacher into the pruned student (see the module doc).

    ``target`` is a ``prune-export`` output folder (student ``pruned/model``, teacher the
    report's ``model.name`` unless ``teacher`` is given; writes ``recovered/model``,
    ``recover/last.pt`` and ``recover.json``) or a pruned :class:`~vlcompress.models.VLM`
    (trained in place; ``teacher`` required; checkpoints only with ``checkpoint_dir``).
    ``evaluate`` (default: True for a folder) measures dense / pruned / recovered accuracy.
    """
    from .models import load_model
    from .models.base import VLM

    t0 = time.perf_counter()
    steps = _check_steps(steps)
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every {checkpoint_every!r} is not valid; allowed: a "
                          "positive integer")
    if not lr or lr <= 0:
        raise ConfigError(f"learning rate {lr!r} is not valid; allowed: a positive number")
    run_dir = report = None
    if isinstance(target, VLM):
        student = target
    else:
        run_dir = Path(target)
        report = _check_run_dir(run_dir)
        student = load_model(run_dir / "pruned" / "model")
        if checkpoint_dir is None:
            checkpoint_dir = run_dir / "recover"
    teacher = _load_teacher(teacher, student, report)
    train = _train_data(data, n, batch_size, seed)
    evaluate = run_dir is not None if evaluate is None else evaluate

    ev = None
    metrics: dict = {}
    if evaluate:
        from .data import load_eval
        from .eval import evaluate as eval_fn

        ev = load_eval(eval_data, n=eval_size)
        metrics["dense"] = eval_fn(teacher, ev)
        metrics["pruned"] = eval_fn(student, ev)

    masks = zero_masks(student)
    ck = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    key = {"data": getattr(train, "source", str(data)), "n": len(train), "batch_size": batch_size,
           "weights": dict(weights or {}),
           "shapes": {k: list(v.shape) for k, v in student.model.state_dict().items()}}
    start, losses = train_student(student, teacher, train, steps=steps, lr=lr, seed=seed,
                                  masks=masks, checkpoint=ck, checkpoint_every=checkpoint_every,
                                  resume=resume, progress=progress, weights=weights, key=key)
    preserved = check_pattern(student, masks)
    if not preserved:  # a bug, never a user error
        raise RuntimeError("recover changed the sparsity pattern")
    if evaluate:
        from .eval import evaluate as eval_fn

        metrics["recovered"] = eval_fn(student, ev)
        d, p, r = metrics["dense"], metrics["pruned"], metrics["recovered"]
        metrics["retained"] = {k: {"pruned": p[k] / d[k] if d[k] else None,
                                   "recovered": r[k] / d[k] if d[k] else None}
                               for k in ("zeroshot_top1", "i2t_r1", "t2i_r1") if k in d}
        metrics["dataset"] = f"{ev.source} (n={len(ev)})"
    res = RecoverResult(steps=steps, start_step=start, losses=losses,
                        seconds=time.perf_counter() - t0, lr=lr, batch_size=batch_size,
                        data=key["data"], masked_layers=len(masks), pattern_preserved=preserved,
                        metrics=metrics, checkpoint=None if ck is None else str(ck))
    if run_dir is not None:
        from .atomic import atomic_dir, atomic_write_text

        with atomic_dir(run_dir / "recovered" / "model", overwrite=True) as tmp:
            student.save(tmp)
        res.run_dir = str(run_dir)
        res.model_path = "recovered/model"
        doc = {"model": report["model"]["name"], "family": student.family,
               "prune": {k: (report.get("prune") or {}).get(k) for k in ("method", "pattern", "achieved")},
               **res.to_dict()}
        atomic_write_text(run_dir / "recover.json", json.dumps(doc, indent=2) + "\n")
    return res


def dense_copy(vlm):
    """A frozen deep copy of ``vlm`` to serve as the teacher."""
    t = copy.copy(vlm)
    t.model = copy.deepcopy(vlm.model).eval()
    return t
