"""Evaluation: per-slide probabilities, the validation loss, and AUROC/accuracy overall and per category.

:func:`predict_loader` is shared by the trainer's validation pass and by ``magnet-zoo evaluate``. It runs
the network in eval mode with the auxiliary heads on (the loss needs them), under ``torch.no_grad``, so
it draws no random numbers (the linearized sampler jitters only when a gradient flows). Under
``torchrun`` every rank predicts its own shard and the records are gathered on every rank.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from magnet_zoo.nn.magnet import MagNet
from magnet_zoo.nn.trees import TreePolicy, check_trees, pooled_forward
from magnet_zoo.train.data import (
    DataError,
    ResumableSampler,
    SlideDataset,
    SlideRecord,
    make_loader,
    prefetch_sizes,
    read_slide_csv,
)
from magnet_zoo.train.distributed import DistInfo, all_gather_objects, setup_distributed
from magnet_zoo.train.metrics import classification_metrics

logger = logging.getLogger(__name__)

LOSS_TERMS = ("total", "paradoxical", "auxiliary", "classifier")


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` (``auto``, ``off``, ``bf16``, ``fp16``) on ``device``; ``None``: no AMP.

    ``auto`` is bfloat16 on CUDA devices that support it, float16 on older ones, and off on the CPU.
    """
    amp = amp.lower()
    if amp in ("off", "none", "no", "false", "fp32"):
        return None
    if device.type != "cuda":
        if amp == "auto":
            return None
        raise ValueError(f"--amp {amp} needs a CUDA device (training on {device}); use --amp off")
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp in ("bf16", "bfloat16"):
        return torch.bfloat16
    if amp in ("fp16", "float16", "half"):
        return torch.float16
    raise ValueError(f"unknown --amp {amp!r}; choose auto, off, bf16 or fp16")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class EvalReport:
    """What an evaluation returns: metrics (overall and per category), mean loss terms, per-slide rows."""

    metrics: dict[str, Any]
    loss: dict[str, float]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    sampling: dict[str, Any] | None = None
    """With sampled trees: ``{"trees": K, "seed": S}`` (``None``: the expected crop, one tree per slide)."""

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "loss": self.loss, "predictions": self.predictions,
                "sampling": self.sampling}


def predict_loader(
    model: MagNet,
    loader: DataLoader,
    *,
    device: torch.device,
    dtype: torch.dtype | None = None,
    info: DistInfo | None = None,
    progress: bool = False,
    desc: str = "evaluate",
    trees: int | None = None,
    tree_seed: int = 0,
    tree_policy: TreePolicy | None = None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per-slide rows ``{index, probability, label, category, path}`` (sorted by index) and mean losses.

    ``model`` is the bare :class:`MagNet` (not a DDP wrapper): evaluation needs no gradient sync.
    ``trees`` ``K > 1``: each slide's probability is pooled over ``K`` sampled zoom trees
    (:func:`magnet_zoo.nn.trees.pooled_forward`, seeded by ``tree_seed``), and its loss terms the mean of
    the trees'. Slides then run one at a time, so a slide gets the trees ``predict_slide(..., trees=K,
    seed=tree_seed)`` gives it, whatever it is batched with. ``tree_policy`` says how the trees are drawn
    and pooled (default :class:`~magnet_zoo.nn.trees.TreePolicy`: entmax maps, mean of the probabilities).
    """
    from tqdm.auto import tqdm

    policy = (tree_policy or TreePolicy()).kwargs()
    info = info or DistInfo(device=device)
    was_training = model.training
    model.eval()
    rows: list[dict[str, Any]] = []
    sums = dict.fromkeys(LOSS_TERMS, 0.0)
    count = 0
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not (progress and info.is_main))
    try:
        with torch.no_grad():
            for batch in bar:  # SlideBatch
                fetchers, labels = batch.fetchers(model.config.grey_threshold), batch.labels.to(device)
                with autocast(device, dtype):
                    if trees is None:
                        out = model(fetchers, auxiliary=True)
                        per_slide = [(model.loss(out, labels).as_floats(), len(batch))]
                        probs = out.probs.float().cpu().tolist()
                    else:
                        per_slide, probs = [], []
                        for i, fetcher in enumerate(fetchers):
                            pooled = pooled_forward(model, [fetcher], trees=trees, seed=tree_seed, auxiliary=True,
                                                    **policy)
                            tree_terms = [model.loss(o, labels[i:i + 1]).as_floats() for o in pooled.outputs]
                            per_slide.append(({k: sum(t[k] for t in tree_terms) / trees for k in tree_terms[0]}, 1))
                            probs.append(float(pooled.probs[0]))
                for floats, n in per_slide:
                    for key, value in floats.items():
                        sums[key] += value * n
                count += len(batch)
                for sample, prob in zip(batch.samples, probs, strict=True):
                    rows.append(
                        {
                            "index": sample.index,
                            "path": sample.source.path,
                            "label": sample.label,
                            "category": sample.category,
                            "probability": float(prob),
                        }
                    )
    finally:
        model.train(was_training)
    gathered = all_gather_objects(info, (rows, sums, count))
    rows = sorted((r for part in gathered for r in part[0]), key=lambda r: r["index"])
    total = sum(part[2] for part in gathered)
    losses = {
        key: (sum(part[1][key] for part in gathered) / total) if total else math.nan for key in LOSS_TERMS
    }
    return rows, losses


def report_from_rows(rows: Sequence[dict[str, Any]], losses: dict[str, float], threshold: float = 0.5) -> EvalReport:
    metrics = classification_metrics(
        [r["probability"] for r in rows],
        [r["label"] for r in rows],
        [r["category"] for r in rows],
        threshold=threshold,
    )
    return EvalReport(metrics=metrics, loss=losses, predictions=list(rows))


def select_split(records: Sequence[SlideRecord], split: str | None) -> list[SlideRecord]:
    """Rows of ``split`` (``train``, ``val``, ``test``; ``None`` or ``all``: every row)."""
    if split in (None, "all"):
        return list(records)
    chosen = [r for r in records if r.split == split]
    if not chosen:
        present = sorted({r.split for r in records})
        raise DataError(f"no slides with split {split!r}; the CSV has: {', '.join(present)} (or use --split all)")
    return chosen


def eval_loader(records: Sequence[SlideRecord], model_config: Any, info: DistInfo, *, batch_size: int,
                num_workers: int = 2, prefetch_factor: int = 2, backend: str = "auto") -> DataLoader:
    """Slides in a fixed order, no augmentation, disjoint unpadded shards per rank: what evaluation reads."""
    dataset = SlideDataset(records, prefetch_sizes(model_config), model_config.grey_threshold, backend)
    sampler = ResumableSampler(
        len(dataset), shuffle=False, augment=False, rank=info.rank, world_size=info.world_size, pad=False
    )
    return make_loader(dataset, sampler, batch_size, num_workers=num_workers, prefetch_factor=prefetch_factor)


def evaluate(
    model: MagNet,
    data: str | os.PathLike[str] | Sequence[SlideRecord],
    *,
    split: str | None = None,
    batch_size: int = 4,
    num_workers: int = 2,
    device: str | torch.device = "auto",
    amp: str = "auto",
    backend: str = "auto",
    threshold: float = 0.5,
    progress: bool = True,
    trees: int | None = None,
    tree_seed: int = 0,
    tree_policy: TreePolicy | None = None,
) -> EvalReport:
    """Evaluate ``model`` on the slides of a CSV (or records): AUROC and accuracy overall and per category.

    ``trees`` ``K > 1`` scores each slide by ``K`` sampled zoom trees pooled, as ``predict_slide(...,
    trees=K, seed=tree_seed)`` does (``None`` or 1: the expected crop, one tree), drawn and pooled as
    ``tree_policy`` says (default: :class:`~magnet_zoo.nn.trees.TreePolicy`). Under ``torchrun`` the
    slides are sharded over the ranks and every rank returns the full report.
    """
    trees = check_trees(trees)
    info = setup_distributed(device)
    records = (
        read_slide_csv(data, model.config.labels) if isinstance(data, str | os.PathLike) else list(data)
    )
    records = select_split(records, split)
    model = model.to(info.device)
    loader = eval_loader(records, model.config, info, batch_size=batch_size, num_workers=num_workers, backend=backend)
    rows, losses = predict_loader(
        model, loader, device=info.device, dtype=amp_dtype(amp, info.device), info=info, progress=progress,
        trees=trees, tree_seed=tree_seed, tree_policy=tree_policy,
    )
    report = report_from_rows(rows, losses, threshold)
    if trees is not None:
        policy = tree_policy or TreePolicy()
        report.sampling = {"trees": trees, "seed": int(tree_seed), **policy.kwargs(),
                           "pooling": f"{policy.pool} of the trees' probabilities"}
    return report
