"""A minimal in-memory trainer for tasks such as FindIt (issue 7); the slide trainer comes later.

Adam with separate learning rates for the attention stacks (the magnifying layers) and for the rest
(classifier and auxiliary heads), linear warm-up then cosine annealing, gradient clipping, and the
schedules the learn-to-look ablations need:

* a *scale prior*: ``scale_weight * mean(relu(s - target_l)^2)`` over the learned crops of layer ``l``
  (pressure to zoom; the crop itself is still chosen by the attention map);
* an annealed ``max_scale`` (the clamp's upper bound falls from ``max_scale_start`` to the config's
  ``max_scale`` over the first ``anneal_frac`` of training) and an annealed entmax temperature;
* a curriculum on object size: the object starts ``curriculum_start`` times larger and shrinks to
  the task's size over the first ``curriculum_frac`` of training;
* *branch revival*: at the fractions ``revive_at`` of training, a first-layer patch whose per-patch
  auxiliary loss (running mean) is worse than the best patch's by more than ``revive_margin`` gets
  the best patch's attention stacks, its whole subtree included (:meth:`MagNet.copy_branch`). With
  sparse (entmax) attention a patch whose map never covered the evidence gets no gradient towards
  it and stays "dead"; this is the learned-attention analogue of resetting dead codebook entries.
  It uses the slide labels only.

Training images are fresh draws every step (seeds ``seed * 10**6 + step * batch + i``); evaluation
uses a disjoint, fixed set of seeds.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from magnet_zoo.nn.magnet import MagNet
from magnet_zoo.tasks.findit import EvalResult, FindItSpec, evaluate, make_batch

logger = logging.getLogger(__name__)

EVAL_SEED_BASE = 7_000_000_000
"""Evaluation images use seeds from here on; training seeds stay far below."""


@dataclass
class TrainSettings:
    """How to train one run. Defaults are the learn-to-look recipe (docs/learn_to_look.md)."""

    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    """Learning rate of the classifier and auxiliary heads."""
    attention_lr: float | None = 3e-3
    """Learning rate of the magnifying layers' attention stacks (``None``: same as ``lr``)."""
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_clip: float = 5.0
    scale_weight: float = 0.0
    """Weight of the scale prior (0: off)."""
    scale_target: tuple[float, ...] = (0.3, 0.3)
    """Per-layer scale above which the prior pushes back (last entry repeats for deeper layers)."""
    max_scale_start: float | None = 1.0
    """Anneal the clamp's upper bound from this to the config's ``max_scale`` (``None``: no anneal)."""
    temperature_start: float | None = None
    """Anneal the entmax temperature from this to the config's (``None``: no anneal)."""
    anneal_frac: float = 0.3
    curriculum_start: float = 1.0
    """Initial object size multiplier (1: no curriculum)."""
    curriculum_frac: float = 0.5
    jitter: tuple[float, ...] = (0.0,)
    """Per layer (the last entry repeats for deeper layers): standard deviation of the noise added to
    the learned crop centres (normalised units of the layer's view) at the start; it falls to zero
    (cosine) over the first ``jitter_frac`` of training."""
    jitter_frac: float = 0.6
    revive_at: tuple[float, ...] = (0.35, 0.5, 0.65)
    """Fractions of training at which dead first-layer branches are revived (empty: never). Needs
    per-patch auxiliary logits on layer 1; without them it is switched off with a warning."""
    revive_margin: float = 0.15
    """A branch is dead when its running per-patch auxiliary BCE exceeds the best branch's by this."""
    time_limit_s: float | None = None
    """Stop early (cosine schedule as planned) when training exceeds this many seconds."""
    seed: int = 0
    threads: int | None = 2
    device: str = "cpu"
    log_every: int = 50
    eval_every: int = 0
    """Evaluate on ``eval_every_n`` images every this many steps (0: only at the end)."""
    eval_every_n: int = 32

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scale_target"] = list(self.scale_target)
        d["revive_at"] = list(self.revive_at)
        d["jitter"] = list(self.jitter)
        return d


@dataclass
class TrainResult:
    steps_done: int
    train_seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    revived: list[dict[str, Any]] = field(default_factory=list)
    """One row per revival: step, source and revived branch, their running losses."""


def _ramp(step: int, total: int, frac: float, start: float, end: float) -> float:
    """Cosine interpolation from ``start`` to ``end`` over the first ``frac`` of ``total`` steps."""
    span = max(int(total * frac), 1)
    t = min(step / span, 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def set_crop_jitter(model: MagNet, jitter: Sequence[float], t: float) -> None:
    """Set every layer's crop-centre noise: ``jitter`` per layer (the last entry repeats), falling to zero
    along a cosine as ``t`` (the share of the jitter schedule done) goes from 0 to 1."""
    fade = 0.5 * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))
    for i, layer in enumerate(model.layers):
        start = jitter[min(i, len(jitter) - 1)] if jitter else 0.0
        layer.jitter = start * fade if start > 0 else 0.0


def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def scale_prior(model: MagNet, affines: list[Any], targets: tuple[float, ...]) -> torch.Tensor:
    """``mean(relu(s - target)^2)`` over every learned crop of every layer."""
    terms = []
    for layer_idx, (layer, aff) in enumerate(zip(model.layers, affines, strict=True)):
        target = targets[min(layer_idx, len(targets) - 1)]
        learned = (layer.slot >= 0).view(1, layer.num_nodes, layer.num_patches)
        excess = torch.relu(aff.scale - target) ** 2
        terms.append(excess.masked_select(learned.expand_as(excess)))
    flat = torch.cat(terms) if terms else torch.zeros(1)
    return flat.mean() if flat.numel() else flat.sum()


def build_optimizer(model: MagNet, settings: TrainSettings) -> torch.optim.Optimizer:
    attention = [p for p in model.layers.parameters() if p.requires_grad]
    ids = {id(p) for p in attention}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    att_lr = settings.lr if settings.attention_lr is None else settings.attention_lr
    return torch.optim.Adam(
        [
            {"params": attention, "lr": att_lr, "base_lr": att_lr},
            {"params": rest, "lr": settings.lr, "base_lr": settings.lr},
        ],
        weight_decay=settings.weight_decay,
    )


class BranchReviver:
    """Keeps a running mean of every first-layer patch's auxiliary BCE and revives dead branches.

    At each revival point (fractions ``revive_at`` of training *progress*: steps done / steps planned,
    or whatever measure of progress the caller uses; each fires once), a first-layer patch whose
    running BCE exceeds the best first-layer patch's by more than ``margin`` gets the best patch's
    attention stacks, its whole subtree included (:meth:`MagNet.copy_branch`).
    """

    def __init__(self, model: MagNet, revive_at: Sequence[float], margin: float, momentum: float = 0.9) -> None:
        cfg = model.config
        self.pending = sorted(float(f) for f in revive_at)
        if self.pending and (cfg.aux_pooling not in ("per_patch", "max") or 1 not in cfg.active_aux_layers):
            logger.warning(
                "branch revival needs per-patch auxiliary logits on layer 1 (aux_pooling 'per_patch' or 'max', "
                "1 in aux_layers); it is off for this model"
            )
            self.pending = []
        self.margin = margin
        self.momentum = momentum
        self.running: torch.Tensor | None = None

    def observe(self, out: Any, labels: torch.Tensor) -> None:
        """Update the running per-patch BCE of layer 1 from one training batch's output."""
        if not self.pending or 1 not in out.aux_patch_logits:
            return
        logits = out.aux_patch_logits[1].detach().float()
        target = labels.to(logits)[:, None].expand_as(logits)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(0).cpu()
        self.running = bce if self.running is None else self.momentum * self.running + (1 - self.momentum) * bce

    def maybe_revive(
        self, progress: float, step: int, model: MagNet, opt: torch.optim.Optimizer
    ) -> list[dict[str, Any]]:
        """Revive dead branches if a revival point has been reached; returns one row per revival."""
        if not self.pending or progress < self.pending[0] or self.running is None:
            return []
        while self.pending and progress >= self.pending[0]:
            self.pending.pop(0)
        running = self.running
        best = int(running.argmin())
        rows = []
        for k in range(running.numel()):
            if k != best and float(running[k] - running[best]) > self.margin:
                model.copy_branch(best, k, opt)
                row = {"step": step, "from": best, "to": k, "loss_from": float(running[best]),
                       "loss_to": float(running[k])}  # fmt: skip
                rows.append(row)
                running[k] = running[best]
                logger.info(
                    "step %d: revived branch %d from branch %d (aux BCE %.3f vs %.3f)",
                    step, k, best, row["loss_to"], row["loss_from"],
                )  # fmt: skip
        return rows


def eval_seeds(n: int, offset: int = 0) -> list[int]:
    return [EVAL_SEED_BASE + offset + i for i in range(n)]


def train(
    model: MagNet,
    spec: FindItSpec,
    settings: TrainSettings,
    callback: Callable[[int, MagNet], None] | None = None,
) -> TrainResult:
    """Train ``model`` on FindIt images of ``spec``; returns the loss history and interim evaluations."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    model.to(settings.device)
    model.train()
    opt = build_optimizer(model, settings)
    cfg = model.config
    result = TrainResult(steps_done=0, train_seconds=0.0)
    reviver = BranchReviver(model, settings.revive_at, settings.revive_margin)
    started = time.perf_counter()
    for step in range(settings.steps):
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, settings.steps, settings.warmup_steps)
        if settings.max_scale_start is not None:
            ms = _ramp(step, settings.steps, settings.anneal_frac, settings.max_scale_start, cfg.max_scale)
            for layer in model.layers:
                layer.max_scale = ms
        if settings.temperature_start is not None:
            temp = _ramp(
                step, settings.steps, settings.anneal_frac, settings.temperature_start, cfg.attention_temperature
            )
            for layer in model.layers:
                layer.temperature = temp
        set_crop_jitter(model, settings.jitter, step / max(int(settings.steps * settings.jitter_frac), 1))
        mult = _ramp(step, settings.steps, settings.curriculum_frac, settings.curriculum_start, 1.0)
        step_spec = spec if mult == 1.0 else spec.replace(object_frac=min(spec.object_frac * mult, 0.4))
        base = settings.seed * 10**6 + step * settings.batch_size
        fetchers, labels, _ = make_batch(step_spec, range(base, base + settings.batch_size), cfg.grey_threshold)
        out = model(fetchers)
        terms = model.loss(out, labels)
        loss = terms.total
        prior = loss.new_zeros(())
        if settings.scale_weight > 0:
            prior = scale_prior(model, out.affines, settings.scale_target)
            loss = loss + settings.scale_weight * prior
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        reviver.observe(out, labels)
        result.revived += reviver.maybe_revive((step + 1) / settings.steps, step + 1, model, opt)
        result.steps_done = step + 1
        row = {
            "step": step,
            **terms.as_floats(),
            "prior": float(prior),
            "scales": [float(a.scale.detach().mean()) for a in out.affines],
            "object_frac": step_spec.object_frac,
        }
        result.history.append(row)
        if settings.log_every and step % settings.log_every == 0:
            logger.info(
                "step %d loss %.3f cls %.3f aux %.3f par %.3f prior %.4f scales %s obj %.3f (%.0fs)",
                step,
                row["total"],
                row["classifier"],
                row["auxiliary"],
                row["paradoxical"],
                row["prior"],
                [round(s, 3) for s in row["scales"]],
                row["object_frac"],
                time.perf_counter() - started,
            )
        if settings.eval_every and (step + 1) % settings.eval_every == 0 and step + 1 < settings.steps:
            ev, _ = evaluate(model, spec, eval_seeds(settings.eval_every_n, offset=10**6))
            result.evals.append({"step": step + 1, **ev.as_dict()})
            logger.info("eval step %d acc %.3f hit %.3f", step + 1, ev.accuracy, ev.hit_rate)
            model.train()
        if callback is not None:
            callback(step, model)
        if settings.time_limit_s is not None and time.perf_counter() - started > settings.time_limit_s:
            logger.info("time limit reached after %d steps", step + 1)
            break
    result.train_seconds = time.perf_counter() - started
    # Leave schedules at their final values.
    for layer in model.layers:
        layer.max_scale = cfg.max_scale
        layer.temperature = cfg.attention_temperature
        layer.jitter = 0.0
    return result


def train_and_evaluate(
    model: MagNet, spec: FindItSpec, settings: TrainSettings, n_eval: int = 128
) -> tuple[TrainResult, EvalResult]:
    """Train, then evaluate on ``n_eval`` held-out images."""
    res = train(model, spec, settings)
    ev, _ = evaluate(model, spec, eval_seeds(n_eval))
    return res, ev


RECIPE_CONFIG: dict[str, Any] = {
    "translation": "clamp",
    "max_scale": 0.35,
    "min_scale": 0.1,
    "attention_init": "random",
    "aux_pooling": "per_patch",
}
"""Config overrides of the learn-to-look recipe on top of ``magnet2_tiny`` (see docs/learn_to_look.md)."""

RECIPE_SETTINGS: dict[str, Any] = {
    "steps": 300,
    "batch_size": 8,
    "lr": 1e-3,
    "attention_lr": 3e-3,
    "max_scale_start": 1.0,
    "anneal_frac": 0.3,
    "curriculum_start": 1.0,
    "revive_at": (0.35, 0.5, 0.65),
}
"""Trainer settings of the recipe."""
