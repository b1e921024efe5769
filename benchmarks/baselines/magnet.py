"""The method under test: a small MagNet, trained and evaluated under the same rules as the baselines.

Training runs through the product's one training loop (:func:`magnet_zoo.train.fit`) with a recipe
(default ``learn_to_look``, the recommended one; ``--recipe paper`` for the paper's) plus single-field
overrides: the training slides are a :class:`~magnet_zoo.train.SlideData` whose open-slide cache keeps
every slide's coarse levels between epochs, validation is a :class:`~magnet_zoo.train.SlideValidator`
every ``val_every`` steps, the wall-clock budget is the loop's ``time_limit`` (the schedules follow
progress, the larger of ``step / steps`` and ``elapsed / budget``, so a run that hits its budget still
completes its schedule), and the weights of the best validation AUROC (ties: lower loss) after the
anneals are kept. Head pre-training, head warm-up and head-guided attention are recipe fields
(docs/synthmets_magnet.md).

Evaluation opens each test slide, runs the network once and records the probability, the values fed to
the networks, the pixels read and the wall time, plus the final patches' boxes for the localisation
metric (:func:`localisation`).
"""

from __future__ import annotations

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
from magnet_zoo.nn.trees import TreePolicy, pooled_forward
from magnet_zoo.synth import tumour_mask
from magnet_zoo.train import SlideData, SlideRecord, SlideValidator, TrainConfig, fit, get_recipe
from magnet_zoo.train.exploration import mil_inference
from magnet_zoo.train.recipe import Recipe
from magnet_zoo.wsi import SlideFetcher, open_slide

from .common import MethodReport, Slide, SlideResult, seed_everything, tissue_view

logger = logging.getLogger(__name__)

RECIPE_FIELDS = {
    "batch_size": "batch_size", "lr": "lr", "attention_lr": "attention_lr", "warmup_frac": "warmup",
    "grad_clip": "grad_clip", "max_scale_start": "max_scale_start", "anneal_frac": "anneal_frac",
    "scale_weight": "scale_weight", "revive_at": "revive_at", "jitter": "jitter",
    "head_warmup_frac": "head_warmup", "guidance_weight": "guidance_weight",
    "guidance_temperature": "guidance_temperature", "head_pretrain_windows": "head_pretrain_windows",
}
"""Benchmark options that are recipe fields (option name -> recipe field)."""


@dataclass
class MagnetOptions:
    """How the benchmark builds and trains its MagNet: a recipe, with options that override its fields."""

    model: str = "magnet2_tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    """MagNetConfig fields applied after the recipe's (e.g. backbones)."""
    recipe: str = "learn_to_look"
    recipe_overrides: dict[str, Any] = field(default_factory=dict)
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
    """Share of training spent training the heads on random tissue crops first (``magnet_zoo.train.warmup``)."""
    guidance_weight: float | None = None
    """Weight of head-guided attention (``magnet_zoo.train.guidance``), in the warm-up and after; 0: off."""
    guidance_temperature: float | None = None
    head_pretrain_windows: int | None = None
    """Random tissue windows per training slide read once to pre-train the heads on; 0: off."""
    val_every: int = 25
    workers: int = 1
    seed: int = 0
    log_every: int = 10
    device: str = "cpu"
    """Where the MagNet trains and predicts (``cuda``: AMP bf16 where supported, as the loop's ``amp="auto"``)."""

    def resolved_recipe(self) -> Recipe:
        """The recipe with these options on top (model overrides included)."""
        changes = dict(self.recipe_overrides)
        for option, name in RECIPE_FIELDS.items():
            value = getattr(self, option)
            if value is not None:
                changes[name] = value
        recipe = get_recipe(self.recipe, **changes)
        return recipe.replace(model_overrides=self.overrides) if self.overrides else recipe


def _records(slides: Sequence[Slide], split: str) -> list[SlideRecord]:
    return [SlideRecord(s.path, s.label, s.category, split) for s in slides]


def train_magnet(
    train: Sequence[Slide], val: Sequence[Slide], opts: MagnetOptions
) -> tuple[MagNet, dict[str, Any], dict[str, Any]]:
    """Train a MagNet; returns ``(model in eval mode with the best weights, training record, settings)``."""
    recipe = opts.resolved_recipe()
    seed_everything(opts.seed)
    model = create_model(opts.model, **recipe.model_overrides)
    data = SlideData(_records(train, "train"), num_workers=opts.workers, open_slides=max(32, len(train) + len(val)))
    trees, policy = mil_inference(recipe) or (None, None)  # a tree_mil recipe validates as it is used
    validator = SlideValidator(_records(val, "val"), batch_size=8, num_workers=opts.workers, trees=trees,
                               tree_policy=policy)
    config = TrainConfig(model=opts.model, steps=opts.steps, time_limit=opts.budget_s, eval_every=opts.val_every,
                         seed=opts.seed, baseline_eval=False, log_every=opts.log_every, save_every=0, amp="auto",
                         device=opts.device, progress=False)
    result = fit(model, data, config, recipe, validator)
    if result.best_state is not None:
        model.load_state_dict(result.best_state)
    model.cpu().eval()  # predicted and saved from the CPU; predict() moves it where it runs
    evals = [{"step": r["step"], "seconds": r["seconds"], "val_auroc": r.get("val_auroc", math.nan),
              "val_accuracy": r.get("val_accuracy", math.nan), "val_loss": r.get("val_loss", math.nan),
              "eligible": r.get("eligible", False)} for r in result.history]
    chosen = [e for e in evals if e["eligible"]] or evals[-1:]
    best = max(chosen, key=lambda e: (e["val_auroc"] if math.isfinite(e["val_auroc"]) else -1, -e["val_loss"]))
    record = {
        "seconds": result.seconds,
        "head_pretrain": result.head_pretrain,
        "attention_pretrain": result.attention_pretrain,
        "steps": result.global_step,
        "stopped_by": "budget" if result.stopped_by == "time_limit" else result.stopped_by,
        "best_step": best["step"],
        "best_val_auroc": best["val_auroc"],
        "revived": result.revived,
        "history": result.log,
        "validation": evals,
    }
    cfg = model.config
    sampling = mil_inference(recipe)
    settings = {
        "model": opts.model,
        "config": cfg.to_dict(),
        "recipe": recipe.to_dict(),
        "trainer": {"steps": opts.steps, "budget_s": opts.budget_s, "val_every": opts.val_every,
                    "workers": opts.workers, "seed": opts.seed, "loop": "magnet_zoo.train.fit", "device": opts.device,
                    "schedule": "warm-up then cosine over progress = max(step / steps, elapsed / budget)",
                    "augmentation": "D4 of the whole slide" if recipe.augment else "none"},
        "parameters": sum(p.numel() for p in model.parameters()),
        "counts": model.counts(),
        "inference": ("the expected crop, one tree" if sampling is None else
                      {"trees": sampling[0], "seed": 0, **sampling[1].kwargs(),
                       "counts": "per tree (the test slides' values_fed and pixels_read are all trees')"}),
    }
    return model, record, settings


def predict(model: MagNet, slides: Sequence[Slide], device: str = "cpu",
            sampling: tuple[int, TreePolicy] | None = None) -> list[SlideResult]:
    """Each slide from its file to a probability, one at a time, timed; final patch boxes kept.

    ``sampling`` ``(K, policy)``: each slide scored by ``K`` sampled trees (seed 0), drawn and pooled as
    ``policy`` says, as ``evaluate`` does; the counts and seconds are the ``K`` trees' together and the
    final boxes those of every tree (``None``: the expected crop, one tree)."""
    cfg = model.config
    model.to(device).eval()

    def forward(fetcher: SlideFetcher) -> tuple[float, list[list[Any]], dict[str, Any]]:
        if sampling is None:
            out = model([fetcher])
            return float(out.probs[0]), out.trees, out.accounting[0]  # float() waits for the device
        pooled = pooled_forward(model, [fetcher], trees=sampling[0], seed=0, **sampling[1].kwargs())
        return float(pooled.probs[0]), [o.trees[0] for o in pooled.outputs], pooled.accounting()[0]

    if slides:  # warm-up: the first forward passes set up kernels and are not timed
        with open_slide(slides[0].path) as src, torch.inference_mode():
            for _ in range(2):
                forward(SlideFetcher(src, cfg.grey_threshold))
    results = []
    for s in slides:
        start = time.perf_counter()
        with open_slide(s.path) as src, torch.inference_mode():
            prob, trees, acc = forward(SlideFetcher(src, cfg.grey_threshold))
        seconds = time.perf_counter() - start
        finals = [n for tree in trees for n in tree if n.layer == cfg.num_layers]
        nodes = [n for tree in trees for n in tree]
        results.append(
            SlideResult(
                s.path, s.label, s.category, s.size, prob, int(acc["values_fed"]),
                int(acc["pixels_read"]), seconds,
                {
                    "final_boxes": [[round(v, 1) for v in n.box[:3]] for n in finals],
                    "final_levels": [n.level for n in finals],
                    "scales_by_layer": [
                        round(float(np.mean([n.scale for n in nodes if n.layer == k])), 4)
                        for k in range(1, cfg.num_layers + 1)
                    ],
                },
            )
        )
    return results


def run(train: Sequence[Slide], val: Sequence[Slide], test: Sequence[Slide], opts: MagnetOptions
        ) -> tuple[MethodReport, MagNet]:
    model, record, settings = train_magnet(train, val, opts)
    results = predict(model, test, opts.device, mil_inference(opts.resolved_recipe()))
    model.cpu()
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

    def hit(self, x: float, y: float, side: float) -> tuple[float, float]:
        """Whether the square overlaps the mask (1.0 / 0.0), and the share of its cells that are set."""
        cells, set_cells = self.count(x, y, side)
        return float(set_cells > 0), (set_cells / cells if cells else 0.0)


def tumour_integral(slide: Slide, mask_side: int = 2048) -> _Integral:
    """The summed-area table of ``slide``'s tumour mask (from its sidecar), ``mask_side`` cells on its long side."""
    w, h = slide.width, slide.height
    factor = max(w, h) / mask_side
    shape = (max(1, round(h / factor)), max(1, round(w / factor)))
    return _Integral(tumour_mask(slide.sidecar, shape), w / shape[1], h / shape[0])


def layer_localisation(
    slide: Slide, boxes: Sequence[Sequence[float]], *, mask_side: int = 2048, samples: int = 256, seed: int = 0,
    thumbnail: tuple[np.ndarray, float] | None = None,
) -> dict[str, Any]:
    """Localisation of each layer of a two-layer MagNet whose second layer's first patch is the identity.

    ``boxes`` are its final patches (``[x, y, side]``, level 0) in the order the network writes them: per
    first-layer crop, its identity child (the crop itself) and then its learned children. So the first
    layer's crops are every group's first box, and each learned second-layer crop has its parent.

    Returns per layer: ``hit`` (share of the layer's learned crops that overlap tumour) and ``random_hit``
    (squares of the same sides placed uniformly: on the slide for layer 1, inside the parent crop for layer
    2, the second layer's only choice); ``random_tissue_hit``: the same squares centred on random tissue
    pixels (moved inside the slide or the parent), the fair baseline for a glass-free attention, which can
    only centre its crops on tissue. Layer 2 is scored only under parents that overlap tumour (``n`` such
    crops): there the question is whether the attention, shown tumour, looks at it; elsewhere no placement
    can hit. ``tumour_area`` / ``random_tumour_area``: the mean tumour share of the crops' area (uniform).
    ``thumbnail``: the slide's grey-filtered view and its downsample (``tissue_view``), when already read.
    """
    integral = tumour_integral(slide, mask_side)
    w, h = slide.width, slide.height
    rng = np.random.default_rng([seed, zlib.crc32(Path(slide.path).name.encode()), slide.width, 2])
    if thumbnail is None:
        with open_slide(slide.path) as src:
            rgb, view_ds, _ = tissue_view(src, 1024)
    else:
        rgb, view_ds = thumbnail
    ty, tx = np.nonzero(rgb.any(axis=-1))
    tissue_x, tissue_y = (tx + 0.5) * view_ds, (ty + 0.5) * view_ds
    group = 2
    if len(boxes) % group:
        raise ValueError(f"{len(boxes)} final boxes do not come in (identity, learned) pairs")

    hit = integral.hit

    def uniform(x0: float, y0: float, room_w: float, room_h: float, side: float) -> tuple[float, float, float]:
        """Mean hit and tumour share of squares placed uniformly in the room, and the hit of squares centred
        on its tissue pixels (uniform where it shows none)."""
        xs = x0 + rng.uniform(0, max(room_w - side, 0), samples)
        ys = y0 + rng.uniform(0, max(room_h - side, 0), samples)
        r = [hit(x, y, side) for x, y in zip(xs, ys, strict=True)]
        inside = np.flatnonzero((tissue_x >= x0) & (tissue_x < x0 + room_w)
                                & (tissue_y >= y0) & (tissue_y < y0 + room_h))
        if inside.size:
            pick = inside[rng.integers(0, inside.size, samples)]
            xs = np.clip(tissue_x[pick] - side / 2, x0, x0 + max(room_w - side, 0))
            ys = np.clip(tissue_y[pick] - side / 2, y0, y0 + max(room_h - side, 0))
            on_tissue = float(np.mean([hit(x, y, side)[0] for x, y in zip(xs, ys, strict=True)]))
        else:
            on_tissue = float(np.mean([a for a, _ in r]))
        return float(np.mean([a for a, _ in r])), float(np.mean([b for _, b in r])), on_tissue

    first: list[tuple[float, ...]] = []
    second: list[tuple[float, ...]] = []
    for i in range(0, len(boxes), group):
        px, py, ps = boxes[i]
        parent = hit(px, py, ps)
        first.append((*parent, *uniform(0.0, 0.0, w, h, ps)))
        if not parent[0]:
            continue
        for cx, cy, cs in boxes[i + 1:i + group]:
            second.append((*hit(cx, cy, cs), *uniform(px, py, ps, ps, cs)))

    def summary(rows: list[tuple[float, ...]]) -> dict[str, Any]:
        if not rows:
            return {"n": 0}
        a = np.asarray(rows, dtype=np.float64).mean(0)
        return {"n": len(rows), "hit": float(a[0]), "tumour_area": float(a[1]), "random_hit": float(a[2]),
                "random_tumour_area": float(a[3]), "random_tissue_hit": float(a[4])}

    return {"layer1": summary(first), "layer2_on_tumour": summary(second)}


def slide_localisation(
    slide: Slide, boxes: Sequence[Sequence[float]], *, mask_side: int = 2048, samples: int = 256, seed: int = 0
) -> dict[str, float]:
    """For one tumour slide: the share of ``boxes`` (``[x, y, side]`` level-0 squares) that overlap tumour,
    the mean tumour share of their area, and the same for squares of the same sides placed uniformly at
    random on the slide and centred on random tissue pixels."""
    w, h = slide.width, slide.height
    integral = tumour_integral(slide, mask_side)
    with open_slide(slide.path) as src:
        rgb, view_ds, _ = tissue_view(src, 1024)
    ty, tx = np.nonzero(rgb.any(axis=-1))
    rng = np.random.default_rng([seed, zlib.crc32(Path(slide.path).name.encode()), slide.width])

    hit = integral.hit

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
    ``hit / random_hit``; ``ratio_ceiling``: ``1 / random_hit``, the ratio if every final patch lay on tumour
    (a localisation target above it cannot be met with patches of these sides, however good the attention);
    ``tumour_area``: mean tumour share of a final patch's area; ``any_hit``: share of slides with at least
    one final patch on tumour.
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
        out["ratio_ceiling"] = 1.0 / out["random_hit"] if out["random_hit"] > 0 else math.nan
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
