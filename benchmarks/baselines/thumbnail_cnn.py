"""Thumbnail-only CNN: the whole slide at 224 x 224 (MagNet's input protocol, grey filter included) -> a CNN.

This is what a network sees if it never magnifies: at 224 px a 16k slide has about 36 microns per pixel,
so nuclei are gone and only large tumour regions could change the texture. The CNN is a timm model built
from scratch (no downloads) with one logit, trained with Adam, cosine annealing, batch 16 and D4
augmentation of the thumbnail, under the same wall-clock budget as the MagNet; the epoch with the best
validation AUROC (ties: lower validation loss) is kept.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from magnet_zoo.train.metrics import auroc
from magnet_zoo.wsi import open_slide

from .common import Budget, MethodReport, Slide, SlideResult, d4, seed_everything, whole_slide_view

logger = logging.getLogger(__name__)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def thumbnail(path: str, size: int) -> tuple[torch.Tensor, int]:
    """``(3, size, size)`` float thumbnail in [0, 1] and the pixels read."""
    with open_slide(path) as src:
        pixels, read = whole_slide_view(src, size)
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div(255), read


def build(backbone: str) -> torch.nn.Module:
    import timm

    return timm.create_model(backbone, pretrained=False, num_classes=1)


def logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model((images - IMAGENET_MEAN) / IMAGENET_STD).squeeze(-1)


def _evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        out = torch.cat([logits(model, images[i : i + 32]) for i in range(0, len(images), 32)])
    loss = float(F.binary_cross_entropy_with_logits(out, labels))
    return auroc(torch.sigmoid(out).numpy(), labels.numpy()), loss


def run(
    train: Sequence[Slide],
    val: Sequence[Slide],
    test: Sequence[Slide],
    *,
    backbone: str = "resnet10t",
    size: int = 224,
    budget_s: float | None = 600.0,
    max_epochs: int = 60,
    max_steps: int | None = None,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> MethodReport:
    seed_everything(seed)
    budget = Budget(budget_s)
    x_train = torch.stack([thumbnail(s.path, size)[0] for s in train])
    x_val = torch.stack([thumbnail(s.path, size)[0] for s in val])
    y_train = torch.tensor([float(s.label) for s in train])
    y_val = torch.tensor([float(s.label) for s in val])
    read_seconds = budget.elapsed

    model = build(backbone)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    planned = steps_per_epoch * max_epochs if max_steps is None else min(max_steps, steps_per_epoch * max_epochs)
    gen = torch.Generator().manual_seed(seed)
    best_state, best_key, history = copy.deepcopy(model.state_dict()), (-math.inf, -math.inf), []
    step, epoch = 0, 0
    while epoch < max_epochs and step < planned and not budget.over:
        model.train()
        order = torch.randperm(len(train), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            ks = torch.randint(0, 8, (len(idx),), generator=gen).tolist()
            batch = torch.stack([d4(x_train[j], k) for j, k in zip(idx.tolist(), ks, strict=True)])
            progress = max(step / planned, budget.fraction)
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * progress))
            loss = F.binary_cross_entropy_with_logits(logits(model, batch), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step >= planned or budget.over:
                break
        epoch += 1
        val_auroc, val_loss = _evaluate(model, x_val, y_val)
        history.append({"epoch": epoch, "step": step, "val_auroc": val_auroc, "val_loss": val_loss,
                        "seconds": budget.elapsed})
        key = (val_auroc if math.isfinite(val_auroc) else -math.inf, -val_loss)
        if key > best_key:
            best_key, best_state = key, copy.deepcopy(model.state_dict())
        logger.info("thumbnail epoch %d step %d: val AUROC %.3f loss %.3f", epoch, step, val_auroc, val_loss)
    model.load_state_dict(best_state)
    model.eval()
    train_seconds = budget.elapsed

    with torch.no_grad():  # warm-up, not timed
        logits(model, x_val[:1])
    results = []
    for s in test:
        start = time.perf_counter()
        image, read = thumbnail(s.path, size)
        with torch.no_grad():
            prob = float(torch.sigmoid(logits(model, image[None]))[0])
        results.append(SlideResult(s.path, s.label, s.category, s.size, prob, 3 * size * size, read,
                                   time.perf_counter() - start))
    best = max(history, key=lambda h: (h["val_auroc"] if np.isfinite(h["val_auroc"]) else -1, -h["val_loss"]),
               default=None)
    return MethodReport(
        name="thumbnail_cnn",
        description=f"whole slide at {size}x{size} (grey-filtered) -> timm {backbone} from scratch, one logit",
        results=results,
        training={
            "seconds": train_seconds,
            "thumbnail_read_seconds": read_seconds,
            "epochs": epoch,
            "steps": step,
            "stopped_by": "budget" if budget.over else "epochs/steps",
            "best_epoch": best["epoch"] if best else None,
            "best_val_auroc": best["val_auroc"] if best else None,
            "history": history,
        },
        settings={
            "backbone": backbone,
            "size": size,
            "budget_s": budget_s,
            "max_epochs": max_epochs,
            "max_steps": max_steps,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "schedule": "cosine over max(step / planned steps, elapsed / budget)",
            "augmentation": "D4 of the thumbnail",
            "parameters": sum(p.numel() for p in model.parameters()),
        },
    )
