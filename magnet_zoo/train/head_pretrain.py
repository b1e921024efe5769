"""Head pre-training: train the last auxiliary head on random tissue windows read once, before the loop.

``windows`` random tissue squares per training slide (side uniform in ``side`` times the slide's longer
side, read at the final patch size: the scale of the final patches) are read once; the head is trained
on them as multiple-instance learning (8 slides x 4 windows per step, D4, the slide logit is the largest
window logit, Adam at the recipe's ``lr``) for ``steps`` steps. The other auxiliary heads and, when the
backbones match, the classifier's backbone start from it. It is a phase of the one training loop
(:mod:`magnet_zoo.train.loop`): its time counts against the run's time limit (the loop's schedules, head warm-up
included, share the time left) and its completion is part of the resume state. Slide labels only; no masks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from magnet_zoo.nn.magnet import MagNet

logger = logging.getLogger(__name__)


def d4(images: torch.Tensor, k: int) -> torch.Tensor:
    """Orientation ``k`` in 0..7 of ``(..., H, W)`` images: ``k % 4`` quarter turns, then a flip if ``k >= 4``."""
    out = torch.rot90(images, k % 4, dims=(-2, -1))
    return out.flip(-1) if k >= 4 else out


def tissue_view(source: Any, target: int = 1024, grey_threshold: int = 15) -> tuple[np.ndarray, float, int]:
    """A whole-slide view whose longer side is at least ``target`` px, grey-filtered (glass is black):
    ``(rgb, downsample from level 0, pixels read)``. Reads the coarsest level that is large enough."""
    from magnet_zoo.wsi import grey_filter
    from magnet_zoo.wsi.levels import select_level

    w, h = source.dimensions
    level = select_level(source.level_downsamples, max(w, h), target)
    lw, lh = source.level_dimensions[level]
    rgb = np.ascontiguousarray(source.read_region((0, 0), level, (lw, lh))[..., :3])
    grey_filter(rgb, grey_threshold)
    return rgb, float(source.level_downsamples[level]), lw * lh


def random_crops(paths: Sequence[str], n: int, side: float | tuple[float, float], size: int, seed: int,
                 grey_threshold: int = 15) -> torch.Tensor:
    """``(len(paths), n, 3, size, size)`` squares centred on random tissue pixels of each slide, of side
    ``side`` times the slide's longer side (or uniform in ``side = (lo, hi)``), read at ``size`` px through
    the grey filter, as a MagNet reads."""
    from magnet_zoo.nn.fetcher import Square
    from magnet_zoo.wsi import SlideFetcher, open_slide

    lo, hi = (side, side) if isinstance(side, int | float) else side
    rng = np.random.default_rng(seed)
    out = []
    for path in paths:
        with open_slide(path) as src:
            rgb, ds, _ = tissue_view(src, 256, grey_threshold)
            ys, xs = np.nonzero(rgb.any(axis=-1))
            if not len(xs):
                ys, xs = np.nonzero(np.ones(rgb.shape[:2], bool))
            pick = rng.integers(0, len(xs), n)
            lengths = (np.full(n, lo) if lo == hi else rng.uniform(lo, hi, n)) * max(src.dimensions)
            squares = [Square((xs[i] + 0.5) * ds - d / 2, (ys[i] + 0.5) * ds - d / 2, d)
                       for i, d in zip(pick, lengths, strict=True)]
            out.append(SlideFetcher(src, grey_threshold).fetch(squares, size).images)
    return torch.stack(out)


def pretrain_heads(
    model: MagNet,
    paths: Sequence[str],
    labels: Sequence[int],
    *,
    windows: int,
    steps: int,
    side: tuple[float, float],
    lr: float,
    seed: int,
) -> dict[str, Any]:
    """Pre-train the last layer's auxiliary head on windows read once, then copy it into the other heads.

    Returns what it did (seconds, reading seconds, steps, the last losses, whether the classifier's
    backbone was copied too)."""
    from magnet_zoo.train.guidance import scoring_head

    if windows <= 0:
        return {"seconds": 0.0, "steps": 0}
    start = time.perf_counter()
    cfg = model.config
    head = scoring_head(model)
    device = next(model.parameters()).device
    x = random_crops(paths, windows, tuple(side), cfg.final_patch_size, seed + 31, cfg.grey_threshold)
    read_s = time.perf_counter() - start
    y = torch.tensor([float(v) for v in labels])
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 37)
    per_step = min(8, len(paths))
    losses = []
    head.train()
    for _ in range(steps):
        idx = torch.randint(0, len(paths), (per_step,), generator=gen)
        sub = torch.stack([torch.randperm(windows, generator=gen)[: min(4, windows)] for _ in range(per_step)])
        batch = d4(x[idx[:, None], sub], int(torch.randint(0, 8, (1,), generator=gen)))
        logit = head.patch_logits(batch.to(device)).amax(1)
        loss = F.binary_cross_entropy_with_logits(logit, y[idx].to(logit))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    opt.zero_grad(set_to_none=True)  # the loop's first step must not add the phase's last gradient
    for other in model.aux_heads.values():
        if other is not head:
            other.load_state_dict(head.state_dict())
    copied = cfg.classifier_backbone == cfg.aux_backbone
    if copied:
        model.classifier.backbone.load_state_dict(head.backbone.state_dict())
    seconds = time.perf_counter() - start
    last = float(np.mean(losses[-50:])) if losses else float("nan")
    logger.info("head pre-training: %d windows per slide read in %.0f s, %d steps, loss %.3f (%.0f s)",
                windows, read_s, steps, last, seconds)
    return {"seconds": seconds, "read_seconds": read_s, "windows_per_slide": windows, "steps": steps,
            "loss_last_50": last, "classifier_backbone_copied": copied}
