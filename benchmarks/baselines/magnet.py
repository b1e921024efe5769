"""The method under test: a small MagNet, trained and evaluated under the same rules as the baselines.

Training follows the learn-to-look recipe (``magnet_zoo.tasks.train``: ``RECIPE_CONFIG`` for the network,
``TrainSettings`` defaults for the optimiser and schedules) on slides: Adam with its own learning rate for
the attention stacks, linear warm-up then cosine annealing, gradient clipping, ``max_scale`` annealed from
``max_scale_start`` to the config's value, D4 augmentation of the whole slide, whole-slide views read ahead
by DataLoader workers (``magnet_zoo.train.data``). The schedules run on *progress*, the larger of
``step / steps`` and ``elapsed / budget``, so a run that hits its wall-clock budget still completes its
schedule. Validation every ``val_every`` steps (with the final ``max_scale``); after the anneal the state
with the best validation AUROC (ties: lower loss) is kept.

Optional, off by default, all inside the budget (docs/synthmets_magnet.md): head pre-training on windows
read once (:func:`pretrain_heads`), a head warm-up on random zoom trees (:func:`warm_up_heads`) and
head-guided attention (``magnet_zoo.train.guidance``).

Evaluation opens each test slide, runs the network once and records the probability, the values fed to
the networks, the pixels read and the wall time, plus the final patches' boxes for the localisation
metric (:func:`localisation`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from magnet_zoo.factory import create_model
from magnet_zoo.nn.magnet import MagNet
from magnet_zoo.synth import tumour_mask
from magnet_zoo.train.data import (
    ResumableSampler,
    SlideDataset,
    SlideRecord,
    make_loader,
    prefetch_sizes,
    set_open_slides,
)
from magnet_zoo.train.evaluate import predict_loader, report_from_rows
from magnet_zoo.wsi import SlideFetcher, open_slide

from .common import Budget, MethodReport, Slide, SlideResult, seed_everything, tissue_view

logger = logging.getLogger(__name__)


def recipe_defaults() -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config overrides, trainer settings)`` of the learn-to-look recipe, read from ``magnet_zoo.tasks``."""
    from magnet_zoo.tasks.train import RECIPE_CONFIG, TrainSettings

    s = TrainSettings()
    settings = {
        "lr": s.lr,
        "attention_lr": s.attention_lr,
        "warmup_frac": s.warmup_steps / max(s.steps, 1),
        "grad_clip": s.grad_clip,
        "max_scale_start": s.max_scale_start,
        "anneal_frac": s.anneal_frac,
        "scale_weight": s.scale_weight,
        "scale_target": list(s.scale_target),
        "batch_size": s.batch_size,
        "revive_at": list(s.revive_at),
        "revive_margin": s.revive_margin,
        "jitter": list(s.jitter),
        "jitter_frac": s.jitter_frac,
        "head_warmup_frac": 0.0,
        "head_warmup_trees": 4,
        "guidance_weight": 0.0,
        "guidance_temperature": 1.0,
        "guidance_slides": 4,
        "head_pretrain_windows": 0,
        "head_pretrain_steps": 600,
        "head_pretrain_side": [0.025, 0.1],
    }
    return dict(RECIPE_CONFIG), settings


@dataclass
class MagnetOptions:
    """How the benchmark builds and trains its MagNet (defaults: ``recipe_defaults`` + small backbones)."""

    model: str = "magnet2_tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    """MagNetConfig fields applied after the recipe's (e.g. backbones)."""
    steps: int = 2000
    """Most optimiser steps; the wall-clock ``budget_s`` usually ends the run first."""
    budget_s: float | None = 1800.0
    batch_size: int | None = None
    lr: float | None = None
    attention_lr: float | None = None
    warmup_frac: float | None = None
    grad_clip: float | None = None
    max_scale_start: float | None = None
    anneal_frac: float | None = None
    scale_weight: float | None = None
    revive_at: list[float] | None = None
    jitter: list[float] | None = None
    head_warmup_frac: float | None = None
    """Share of the budget spent training the heads on random tissue crops first (``magnet_zoo.train.warmup``)."""
    guidance_weight: float | None = None
    """Weight of head-guided attention (``magnet_zoo.train.guidance``), in the warm-up and after; 0: off."""
    guidance_temperature: float | None = None
    """Softmax temperature of the head's window scores in the guidance target (default 1)."""
    head_pretrain_windows: int | None = None
    """Random tissue windows per training slide read once to pre-train the heads on (``pretrain_heads``); 0: off."""
    val_every: int = 25
    workers: int = 1
    seed: int = 0
    log_every: int = 10

    def resolved(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(config overrides, trainer settings)``: the recipe, then these options on top."""
        config, settings = recipe_defaults()
        config.update(self.overrides)
        for key in settings:
            value = getattr(self, key, None)
            if value is not None:
                settings[key] = value
        return config, settings


def _cosine(progress: float, start: float, end: float) -> float:
    t = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def _lr_factor(progress: float, warmup: float) -> float:
    if warmup > 0 and progress < warmup:
        return max(progress / warmup, 0.02)
    return _cosine((progress - warmup) / max(1 - warmup, 1e-9), 1.0, 0.0)


def _set_max_scale(model: MagNet, value: float) -> None:
    for layer in model.layers:
        layer.max_scale = value


def _records(slides: Sequence[Slide], split: str) -> list[SlideRecord]:
    return [SlideRecord(s.path, s.label, s.category, split) for s in slides]


def train_magnet(
    train: Sequence[Slide], val: Sequence[Slide], opts: MagnetOptions
) -> tuple[MagNet, dict[str, Any], dict[str, Any]]:
    """Train a MagNet; returns ``(model in eval mode, training record, resolved settings)``."""
    from magnet_zoo.tasks.train import BranchReviver, TrainSettings, build_optimizer, scale_prior, set_crop_jitter

    seed_everything(opts.seed)
    config_overrides, st = opts.resolved()
    model = create_model(opts.model, **config_overrides)
    cfg = model.config
    model.train()
    opt = build_optimizer(model, TrainSettings(lr=st["lr"], attention_lr=st["attention_lr"]))
    base_lrs = [g["lr"] for g in opt.param_groups]
    batch = int(st["batch_size"])
    reviver = BranchReviver(model, st["revive_at"], st["revive_margin"])
    revived: list[dict[str, Any]] = []

    set_open_slides(max(32, len(train) + len(val)))  # keep every slide's coarse levels between epochs
    sizes = prefetch_sizes(cfg)
    train_set = SlideDataset(_records(train, "train"), sizes, cfg.grey_threshold)
    val_set = SlideDataset(_records(val, "val"), sizes, cfg.grey_threshold)
    sampler = ResumableSampler(len(train_set), seed=opts.seed, shuffle=True, augment=True)
    loader = make_loader(train_set, sampler, batch, num_workers=opts.workers, seed=opts.seed)
    val_sampler = ResumableSampler(len(val_set), shuffle=False, augment=False, pad=False)
    val_loader = make_loader(val_set, val_sampler, 8, num_workers=opts.workers, seed=opts.seed)

    history: list[dict[str, Any]] = []
    pre = pretrain_heads(model, train, st, opts)
    warm = warm_up_heads(model, loader, sampler, opt, st, opts, cfg.grey_threshold, history, spent=pre["seconds"])
    budget = Budget(None if opts.budget_s is None else max(opts.budget_s - pre["seconds"] - warm["seconds"], 0.0))
    evals: list[dict[str, Any]] = []
    best_state: dict[str, torch.Tensor] | None = None
    best_key = (-math.inf, -math.inf)
    step, epoch = 0, 0
    sums: dict[str, float] = {}

    def progress() -> float:
        return max(step / opts.steps, budget.fraction)

    def validate() -> None:
        nonlocal best_state, best_key
        _set_max_scale(model, cfg.max_scale)
        rows, losses = predict_loader(model, val_loader, device=torch.device("cpu"))
        report = report_from_rows(rows, losses)
        auc, loss = report.metrics["auroc"], losses["total"]
        annealed = st["max_scale_start"] is None or progress() >= st["anneal_frac"]
        row = {"step": step, "seconds": round(budget.elapsed, 1), "val_auroc": auc, "val_accuracy":
               report.metrics["accuracy"], "val_loss": loss, "eligible": annealed}
        evals.append(row)
        key = (auc if math.isfinite(auc) else -math.inf, -loss if math.isfinite(loss) else -math.inf)
        if annealed and key > best_key:
            best_key, best_state = key, copy.deepcopy(model.state_dict())
        logger.info("magnet step %d: val AUROC %.3f acc %.3f loss %.3f (%.0f s)", step, auc,
                    report.metrics["accuracy"], loss, budget.elapsed)
        model.train()

    epoch = warm["epochs_started"]
    while step < opts.steps and not budget.over:
        sampler.set_epoch(epoch)
        for b in loader:
            p = progress()
            factor = _lr_factor(p, st["warmup_frac"])
            for group, base in zip(opt.param_groups, base_lrs, strict=True):
                group["lr"] = base * factor
            if st["max_scale_start"] is not None:
                ms = _cosine(p / max(st["anneal_frac"], 1e-9), st["max_scale_start"], cfg.max_scale)
                _set_max_scale(model, ms)
            set_crop_jitter(model, st["jitter"], p / max(st["jitter_frac"], 1e-9))
            fetchers = b.fetchers(cfg.grey_threshold)
            out = model(fetchers)
            terms = model.loss(out, b.labels)
            loss = terms.total
            if st["guidance_weight"]:
                loss = loss + _guidance(model, out, fetchers, b.labels, st, sums)
            if st["scale_weight"]:
                loss = loss + st["scale_weight"] * scale_prior(model, out.affines, tuple(st["scale_target"]))
            _optimise(model, opt, loss, st["grad_clip"])
            step += 1
            reviver.observe(out, b.labels)
            revived += reviver.maybe_revive(progress(), step, model, opt)
            for key, value in terms.as_floats().items():
                sums[key] = sums.get(key, 0.0) + value
            if step % opts.log_every == 0:
                row = {"step": step, "seconds": round(budget.elapsed, 1), "lr_factor": round(factor, 4),
                       **{k: v / opts.log_every for k, v in sums.items()},
                       "scales": [round(float(a.scale.detach().mean()), 4) for a in out.affines]}
                history.append(row)
                sums = {}
                logger.info("magnet step %d loss %.3f cls %.3f scales %s (%.0f s)", step, row["total"],
                            row["classifier"], row["scales"], budget.elapsed)
            if step % opts.val_every == 0:
                validate()
            if step >= opts.steps or budget.over:
                break
        epoch += 1
    if not evals or evals[-1]["step"] != step:
        validate()
    stopped = "budget" if budget.over else "steps"
    if best_state is None:  # the run ended before its anneal: keep the last state
        best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    _set_max_scale(model, cfg.max_scale)
    for layer in model.layers:
        layer.jitter = 0.0
    model.eval()
    best = max((e for e in evals if e["eligible"]), default=evals[-1],
               key=lambda e: (e["val_auroc"] if math.isfinite(e["val_auroc"]) else -1, -e["val_loss"]))
    record = {
        "seconds": pre["seconds"] + warm["seconds"] + budget.elapsed,
        "head_pretrain": pre,
        "head_warmup": {k: v for k, v in warm.items() if k != "epochs_started"},
        "steps": step,
        "epochs_started": epoch,
        "stopped_by": stopped,
        "best_step": best["step"],
        "best_val_auroc": best["val_auroc"],
        "revived": revived,
        "history": history,
        "validation": evals,
    }
    settings = {
        "model": opts.model,
        "config": cfg.to_dict(),
        "trainer": {**st, "steps": opts.steps, "budget_s": opts.budget_s, "val_every": opts.val_every,
                    "workers": opts.workers, "seed": opts.seed,
                    "schedule": "warm-up then cosine over progress = max(step / steps, elapsed / budget)",
                    "augmentation": "D4 of the whole slide"},
        "parameters": sum(p.numel() for p in model.parameters()),
        "counts": model.counts(),
    }
    return model, record, settings


def _optimise(model: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float | None) -> None:
    """One optimiser step on ``loss``, with the gradient norm clipped to ``grad_clip`` when it is set."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()


def _guidance(model: MagNet, out: Any, fetchers: Sequence[Any], labels: torch.Tensor, st: dict[str, Any],
              sums: dict[str, float]) -> torch.Tensor:
    """Head-guided attention plus the head's window MIL, weighted; their values are added to ``sums``."""
    from magnet_zoo.train.guidance import guidance_loss

    terms = guidance_loss(model, out, fetchers, labels, temperature=st["guidance_temperature"],
                          slides=int(st["guidance_slides"]))
    sums["guidance"] = sums.get("guidance", 0.0) + float(terms.attention.detach())
    sums["window_mil"] = sums.get("window_mil", 0.0) + float(terms.window_mil.detach())
    return st["guidance_weight"] * terms.total


def pretrain_heads(model: MagNet, train: Sequence[Slide], st: dict[str, Any], opts: MagnetOptions) -> dict[str, Any]:
    """Pre-train the last layer's auxiliary head on windows read once, then copy it into the other heads.

    ``head_pretrain_windows`` random tissue squares per training slide (side uniform in
    ``head_pretrain_side`` times the slide's side, read at the final patch size: the scale of the final
    patches and of the guidance windows) are read once; the head is trained on them as
    ``benchmarks/synthmets_mil_probe.py`` trains its probe (8 slides x 4 windows per step, D4, the slide
    logit is the largest window logit, Adam at the heads' learning rate) for ``head_pretrain_steps`` steps.
    The other auxiliary heads and, when the backbones match, the classifier's backbone start from it.
    Reading and training count against the MagNet's budget. Returns what it did."""
    n = int(st.get("head_pretrain_windows") or 0)
    if n <= 0:
        return {"seconds": 0.0, "steps": 0}
    from magnet_zoo.train.guidance import scoring_head

    from .common import d4, random_crops

    start = time.perf_counter()
    cfg = model.config
    head = scoring_head(model)
    x = random_crops(train, n, tuple(st["head_pretrain_side"]), cfg.final_patch_size, opts.seed + 31,
                     cfg.grey_threshold)
    read_s = time.perf_counter() - start
    y = torch.tensor([float(s.label) for s in train])
    opt = torch.optim.Adam(head.parameters(), lr=st["lr"])
    gen = torch.Generator().manual_seed(opts.seed + 37)
    steps, losses = int(st["head_pretrain_steps"]), []
    head.train()
    for _ in range(steps):
        idx = torch.randint(0, len(train), (8,), generator=gen)
        sub = torch.stack([torch.randperm(n, generator=gen)[:4] for _ in range(8)])
        batch = d4(x[idx[:, None], sub], int(torch.randint(0, 8, (1,), generator=gen)))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head.patch_logits(batch).amax(1), y[idx])
        _optimise(head, opt, loss, None)
        losses.append(float(loss.detach()))
    for other in model.aux_heads.values():
        if other is not head:
            other.load_state_dict(head.state_dict())
    copied = cfg.classifier_backbone == cfg.aux_backbone
    if copied:
        model.classifier.backbone.load_state_dict(head.backbone.state_dict())
    seconds = time.perf_counter() - start
    logger.info("magnet head pre-training: %d windows per slide read in %.0f s, %d steps, loss %.3f (%.0f s)", n,
                read_s, steps, float(np.mean(losses[-50:])), seconds)
    return {"seconds": seconds, "read_seconds": read_s, "windows_per_slide": n, "steps": steps,
            "loss_last_50": float(np.mean(losses[-50:])), "classifier_backbone_copied": copied}


def warm_up_heads(model: MagNet, loader: Any, sampler: ResumableSampler, opt: torch.optim.Optimizer,
                  st: dict[str, Any], opts: MagnetOptions, grey_threshold: int, history: list[dict[str, Any]],
                  spent: float = 0.0) -> dict[str, Any]:
    """Train the heads on random zoom trees for ``head_warmup_frac`` of the budget (or of the steps, without
    a budget); the heads' learning rate is constant. The attention is untouched, unless head-guided
    attention is on: then it learns from the exploring trees' windows as well. Returns what it did."""
    from magnet_zoo.train.warmup import warmup_step

    frac = float(st.get("head_warmup_frac") or 0.0)
    budget = Budget(None if opts.budget_s is None else max(frac * opts.budget_s - spent, 0.0))
    max_steps = int(frac * opts.steps) if opts.budget_s is None else opts.steps
    generator = torch.Generator().manual_seed(opts.seed + 7919)
    step, epoch, sums = 0, 0, {}
    while frac > 0 and step < max_steps and not budget.over:
        sampler.set_epoch(epoch)
        for b in loader:
            fetchers = b.fetchers(grey_threshold)
            terms, tree = warmup_step(model, fetchers, b.labels, generator, trees=int(st["head_warmup_trees"]))
            loss = terms.total
            if st["guidance_weight"]:
                loss = loss + _guidance(model, tree, fetchers, b.labels, st, sums)
            _optimise(model, opt, loss, st["grad_clip"])
            step += 1
            for key, value in terms.as_floats().items():
                sums[key] = sums.get(key, 0.0) + value
            if step % opts.log_every == 0:
                history.append({"warmup_step": step, "seconds": round(budget.elapsed, 1),
                                **{k: v / opts.log_every for k, v in sums.items()}})
                sums = {}
                logger.info("magnet head warm-up step %d loss %.3f cls %.3f aux %.3f (%.0f s)", step,
                            history[-1]["total"], history[-1]["classifier"], history[-1]["auxiliary"],
                            budget.elapsed)
            if step >= max_steps or budget.over:
                break
        epoch += 1
    return {"steps": step, "seconds": budget.elapsed if frac > 0 else 0.0, "epochs_started": epoch}


def predict(model: MagNet, slides: Sequence[Slide]) -> list[SlideResult]:
    """Each slide from its file to a probability, one at a time, timed; final patch boxes kept."""
    cfg = model.config
    model.eval()
    if slides:  # warm-up: the first forward passes set up kernels and are not timed
        with open_slide(slides[0].path) as src, torch.inference_mode():
            for _ in range(2):
                model([SlideFetcher(src, cfg.grey_threshold)])
    results = []
    for s in slides:
        start = time.perf_counter()
        with open_slide(s.path) as src, torch.inference_mode():
            out = model([SlideFetcher(src, cfg.grey_threshold)])
        seconds = time.perf_counter() - start
        tree = out.trees[0]
        finals = [n for n in tree if n.layer == cfg.num_layers]
        acc = out.accounting[0]
        results.append(
            SlideResult(
                s.path, s.label, s.category, s.size, float(out.probs[0]), int(acc["values_fed"]),
                int(acc["pixels_read"]), seconds,
                {
                    "final_boxes": [[round(v, 1) for v in n.box[:3]] for n in finals],
                    "final_levels": [n.level for n in finals],
                    "scales_by_layer": [
                        round(float(np.mean([n.scale for n in tree if n.layer == k])), 4)
                        for k in range(1, cfg.num_layers + 1)
                    ],
                },
            )
        )
    return results


def run(train: Sequence[Slide], val: Sequence[Slide], test: Sequence[Slide], opts: MagnetOptions
        ) -> tuple[MethodReport, MagNet]:
    model, record, settings = train_magnet(train, val, opts)
    results = predict(model, test)
    cfg = model.config
    report = MethodReport(
        name="magnet",
        description=(
            f"{opts.model} {tuple(cfg.patches)} patches, {cfg.classifier_backbone} classifier / {cfg.aux_backbone} "
            f"auxiliary heads from scratch, {cfg.num_final_patches} final patches of {cfg.final_patch_size} px"
        ),
        results=results,
        training=record,
        settings=settings,
    )
    return report, model


# --------------------------------------------------------------------------- localisation
class _Integral:
    """Summed-area table of a boolean mask covering the slide; a cell is ``fx`` x ``fy`` level-0 pixels."""

    def __init__(self, mask: np.ndarray, fx: float, fy: float) -> None:
        self.fx, self.fy = fx, fy
        self.h, self.w = mask.shape
        self.table = np.zeros((self.h + 1, self.w + 1), np.int64)
        self.table[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)

    def count(self, x: float, y: float, side: float) -> tuple[int, int]:
        """Mask cells touched by the square, and how many of them are set (outward rounding)."""
        fx, fy = self.fx, self.fy
        c0, r0 = max(int(math.floor(x / fx)), 0), max(int(math.floor(y / fy)), 0)
        c1, r1 = min(int(math.ceil((x + side) / fx)), self.w), min(int(math.ceil((y + side) / fy)), self.h)
        if c1 <= c0 or r1 <= r0:
            return 0, 0
        t = self.table
        return (r1 - r0) * (c1 - c0), int(t[r1, c1] - t[r0, c1] - t[r1, c0] + t[r0, c0])


def slide_localisation(
    slide: Slide, boxes: Sequence[Sequence[float]], *, mask_side: int = 2048, samples: int = 256, seed: int = 0
) -> dict[str, float]:
    """For one tumour slide: the share of ``boxes`` (``[x, y, side]`` level-0 squares) that overlap tumour,
    the mean tumour share of their area, and the same for squares of the same sides placed uniformly at
    random on the slide and centred on random tissue pixels."""
    w, h = slide.width, slide.height
    factor = max(w, h) / mask_side
    shape = (max(1, round(h / factor)), max(1, round(w / factor)))
    integral = _Integral(tumour_mask(slide.sidecar, shape), w / shape[1], h / shape[0])
    with open_slide(slide.path) as src:
        rgb, view_ds, _ = tissue_view(src, 1024)
    ty, tx = np.nonzero(rgb.any(axis=-1))
    rng = np.random.default_rng([seed, zlib.crc32(Path(slide.path).name.encode()), slide.width])

    def hit(x: float, y: float, side: float) -> tuple[float, float]:
        cells, tumour = integral.count(x, y, side)
        return float(tumour > 0), (tumour / cells if cells else 0.0)

    found = [hit(*b) for b in boxes]
    rand_hits, rand_frac, tis_hits = [], [], []
    for _, _, side in boxes:
        xs = rng.uniform(0, max(w - side, 0), samples) if side < w else np.full(samples, (w - side) / 2)
        ys = rng.uniform(0, max(h - side, 0), samples) if side < h else np.full(samples, (h - side) / 2)
        r = [hit(x, y, side) for x, y in zip(xs, ys, strict=True)]
        rand_hits.append(np.mean([a for a, _ in r]))
        rand_frac.append(np.mean([b for _, b in r]))
        if len(tx):
            pick = rng.integers(0, len(tx), samples)
            cx, cy = (tx[pick] + 0.5) * view_ds, (ty[pick] + 0.5) * view_ds
            tis_hits.append(np.mean([hit(x - side / 2, y - side / 2, side)[0] for x, y in zip(cx, cy, strict=True)]))
    return {
        "hit": float(np.mean([a for a, _ in found])),
        "tumour_area": float(np.mean([b for _, b in found])),
        "random_hit": float(np.mean(rand_hits)),
        "random_tumour_area": float(np.mean(rand_frac)),
        "random_tissue_hit": float(np.mean(tis_hits)) if tis_hits else math.nan,
        "any_hit": float(any(a for a, _ in found)),
        "mean_side": float(np.mean([b[2] for b in boxes])),
    }


def localisation(results: Sequence[SlideResult], slides: Sequence[Slide], seed: int = 0) -> dict[str, Any]:
    """Localisation without localisation labels, per tumour category and per slide size.

    ``hit``: share of final patches that overlap tumour; ``random_hit``: the share that squares of the same
    sides placed uniformly on the slide would get (``random_tissue_hit``: centred on tissue); ``ratio``:
    ``hit / random_hit``; ``tumour_area``: mean tumour share of a final patch's area; ``any_hit``: share of
    slides with at least one final patch on tumour.
    """
    by_path = {s.path: s for s in slides}
    per_slide = []
    for r in results:
        slide = by_path[r.path]
        if slide.label != 1 or not r.extra.get("final_boxes"):
            continue
        loc = slide_localisation(slide, r.extra["final_boxes"], seed=seed)
        per_slide.append({"slide": Path(r.path).name, "category": slide.category, "size": slide.size, **loc})

    def pooled(rows: list[dict[str, Any]]) -> dict[str, Any]:
        if not rows:
            return {"n": 0}
        out: dict[str, Any] = {"n": len(rows)}
        for key in ("hit", "random_hit", "random_tissue_hit", "tumour_area", "random_tumour_area", "any_hit",
                    "mean_side"):
            vals = [r[key] for r in rows if math.isfinite(r[key])]
            out[key] = float(np.mean(vals)) if vals else math.nan
        out["ratio"] = out["hit"] / out["random_hit"] if out["random_hit"] > 0 else math.nan
        out["ratio_tissue"] = (
            out["hit"] / out["random_tissue_hit"] if out.get("random_tissue_hit", 0) > 0 else math.nan
        )
        return out

    summary: dict[str, Any] = {"all": pooled(per_slide), "by_category": {}, "by_size": {}}
    for cat in sorted({r["category"] for r in per_slide}):
        summary["by_category"][cat] = pooled([r for r in per_slide if r["category"] == cat])
    for size in sorted({r["size"] for r in per_slide}):
        summary["by_size"][str(size)] = pooled([r for r in per_slide if r["size"] == size])
    summary["per_slide"] = per_slide
    return summary


def options_dict(opts: MagnetOptions) -> dict[str, Any]:
    return asdict(opts)
