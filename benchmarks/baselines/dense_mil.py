"""Dense patch MIL: every tissue tile of the slide at one fixed pyramid level -> MONAI's ``MILModel``.

This is the patch-based paradigm of CLAM / DSMIL (tile the tissue, embed every tile with a CNN, pool the
bag with attention), built from MONAI's :class:`monai.networks.nets.MILModel` (``mil_mode="att"``,
attention-based MIL of Ilse et al. 2018). It reads and embeds *all* tissue tiles, so it is the
expensive reference that MagNet's few magnified patches are compared with.

Choices that make it fit two CPU cores (written into the benchmark's JSON):

* tiles of 224 x 224 at level ``level`` (default 2: 4x below level 0, 2 microns per pixel for SynthMets'
  0.5 mpp; a 16k slide has about 300 tile positions there, half of them tissue); a tile is tissue when at
  least ``min_tissue`` of it survives the grey filter on a ~1024 px whole-slide view;
* the backbone is MILModel's own torchvision ResNet-18, **frozen** and randomly initialised (no ImageNet
  weights can be downloaded here), with its BatchNorm statistics estimated on ``calib_tiles`` training
  tiles (no labels used). Tile features are computed once and cached; features are standardised with the
  training tiles' mean and std;
* only MILModel's MIL head (attention 512 -> 2048 -> 1, softmax over tiles, linear classifier) is trained:
  Adam, cosine annealing, gradients accumulated over ``batch_size`` slides, best epoch by validation AUROC.

A frozen *random* backbone is weaker than CLAM's ImageNet one; random convolutional features still
describe texture (nuclear size and density), which is what SynthMets' tumours differ in.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from magnet_zoo.train.metrics import auroc
from magnet_zoo.wsi import open_slide
from magnet_zoo.wsi.fetch import shared_pool
from magnet_zoo.wsi.protocol import RegionSource

from .common import Budget, MethodReport, Slide, SlideResult, seed_everything, tissue_view

logger = logging.getLogger(__name__)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
CHUNK = 32
"""Tiles read and embedded at once (bounds memory on 64k slides with thousands of tiles)."""


# --------------------------------------------------------------------------- tiles
def tissue_tiles(source: RegionSource, level: int, tile: int, min_tissue: float) -> tuple[list[tuple[int, int]], int]:
    """Level-0 top-left corners of the ``tile`` x ``tile`` tiles at ``level`` holding at least ``min_tissue``
    tissue, and the pixels read to decide it (a ~1024 px grey-filtered view)."""
    rgb, view_ds, read = tissue_view(source, 1024)
    tissue = rgb.any(axis=-1)
    level = min(level, source.level_count - 1)
    ds = float(source.level_downsamples[level])
    lw, lh = source.level_dimensions[level]
    scale = ds / view_ds  # view pixels per level pixel
    corners = []
    for ty in range(lh // tile):
        y0 = int(ty * tile * scale)
        y1 = max(int((ty + 1) * tile * scale), y0 + 1)
        for tx in range(lw // tile):
            x0 = int(tx * tile * scale)
            x1 = max(int((tx + 1) * tile * scale), x0 + 1)
            if tissue[y0:y1, x0:x1].mean() >= min_tissue:
                corners.append((int(round(tx * tile * ds)), int(round(ty * tile * ds))))
    return corners, read


def read_tiles(source: RegionSource, corners: Sequence[tuple[int, int]], level: int, tile: int) -> torch.Tensor:
    """``(N, 3, tile, tile)`` float tiles in [0, 1], read concurrently."""
    level = min(level, source.level_count - 1)
    arrays = list(shared_pool().map(lambda c: source.read_region(c, level, (tile, tile))[..., :3], corners))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255)


# --------------------------------------------------------------------------- frozen features
class FrozenEmbedder:
    """MILModel's backbone (``model.net``), frozen, with BatchNorm statistics estimated on tiles."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.net = model.net
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.net.eval()

    def calibrate(self, tiles: torch.Tensor) -> None:
        """Estimate every BatchNorm's mean and variance on ``tiles`` (a cumulative average, no labels)."""
        for m in self.net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        self.net.train()
        with torch.no_grad():
            for i in range(0, len(tiles), CHUNK):
                self.net((tiles[i : i + CHUNK] - IMAGENET_MEAN) / IMAGENET_STD)
        self.net.eval()

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for name, t in sorted(self.net.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    @torch.no_grad()
    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.net((tiles - IMAGENET_MEAN) / IMAGENET_STD)


def slide_features(
    path: str, embedder: FrozenEmbedder, level: int, tile: int, min_tissue: float
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Features ``(N, F)`` of every tissue tile of a slide, with its cost (tiles, pixels read, seconds)."""
    start = time.perf_counter()
    with open_slide(path) as src:
        corners, read = tissue_tiles(src, level, tile, min_tissue)
        feats = []
        for i in range(0, len(corners), CHUNK):
            feats.append(embedder(read_tiles(src, corners[i : i + CHUNK], level, tile)))
    features = torch.cat(feats) if feats else torch.zeros(0, 0)
    cost = {
        "tiles": len(corners),
        "pixels_read": int(read + len(corners) * tile * tile),
        "seconds": time.perf_counter() - start,
    }
    return features, cost


class FeatureCache:
    """Tile features on disk (``.npz``; never pickles), keyed by slide and by the frozen embedder."""

    def __init__(self, directory: Path | None, key: str) -> None:
        self.directory = directory
        self.key = key
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def _file(self, path: str) -> Path | None:
        if self.directory is None:
            return None
        tag = hashlib.sha1(f"{Path(path).resolve()}|{self.key}".encode()).hexdigest()[:20]
        return self.directory / f"{Path(path).stem}_{tag}.npz"

    def get(self, path: str) -> tuple[torch.Tensor, dict[str, Any]] | None:
        file = self._file(path)
        if file is None or not file.is_file():
            return None
        with np.load(file, allow_pickle=False) as z:
            feats = torch.from_numpy(z["features"].copy())
            cost = {"tiles": int(z["tiles"]), "pixels_read": int(z["pixels_read"]), "seconds": float(z["seconds"])}
        return feats, cost

    def put(self, path: str, features: torch.Tensor, cost: dict[str, Any]) -> None:
        file = self._file(path)
        if file is None:
            return
        tmp = file.with_name(file.stem + ".part.npz")
        np.savez(tmp, features=features.numpy(), tiles=cost["tiles"], pixels_read=cost["pixels_read"],
                 seconds=cost["seconds"])
        tmp.replace(file)


# --------------------------------------------------------------------------- the run
def _calibration_tiles(slides: Sequence[Slide], n: int, level: int, tile: int, min_tissue: float,
                       seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(slides))[: max(1, min(len(slides), 16))]
    per_slide = max(1, math.ceil(n / len(order)))
    tiles = []
    for i in order:
        with open_slide(slides[int(i)].path) as src:
            corners, _ = tissue_tiles(src, level, tile, min_tissue)
            if not corners:
                continue
            pick = rng.choice(len(corners), size=min(per_slide, len(corners)), replace=False)
            tiles.append(read_tiles(src, [corners[int(j)] for j in pick], level, tile))
    return torch.cat(tiles)[:n]


def _head_logit(model: torch.nn.Module, feats: torch.Tensor) -> torch.Tensor:
    return model.calc_head(feats.unsqueeze(0)).view(())


def run(
    train: Sequence[Slide],
    val: Sequence[Slide],
    test: Sequence[Slide],
    *,
    level: int = 2,
    tile: int = 224,
    min_tissue: float = 0.25,
    backbone: str = "resnet18",
    calib_tiles: int = 256,
    budget_s: float | None = 600.0,
    max_epochs: int = 100,
    batch_size: int = 8,
    lr: float = 2e-4,
    weight_decay: float = 1e-4,
    seed: int = 0,
    cache_dir: Path | None = None,
) -> MethodReport:
    from monai.networks.nets import MILModel

    seed_everything(seed)
    model = MILModel(num_classes=1, mil_mode="att", pretrained=False, backbone=backbone)
    embedder = FrozenEmbedder(model)
    start = time.perf_counter()
    embedder.calibrate(_calibration_tiles(train, calib_tiles, level, tile, min_tissue, seed))
    calib_seconds = time.perf_counter() - start
    cache = FeatureCache(cache_dir, f"{backbone}|L{level}|T{tile}|m{min_tissue}|{embedder.fingerprint()}")

    def features_of(slides: Sequence[Slide]) -> tuple[list[torch.Tensor], list[dict[str, Any]], int]:
        feats, costs, cached = [], [], 0
        for s in slides:
            got = cache.get(s.path)
            if got is None:
                got = slide_features(s.path, embedder, level, tile, min_tissue)
                cache.put(s.path, *got)
            else:
                cached += 1
            feats.append(got[0])
            costs.append(got[1])
        return feats, costs, cached

    start = time.perf_counter()
    f_train, c_train, cached_train = features_of(train)
    f_val, _, cached_val = features_of(val)
    feature_seconds = time.perf_counter() - start
    nonempty = [f for f in f_train if len(f)]
    allf = torch.cat(nonempty)
    mu, sd = allf.mean(0), allf.std(0).clamp_min(1e-6)
    norm = lambda f: (f - mu) / sd if len(f) else f  # noqa: E731

    head = [p for n, p in model.named_parameters() if not n.startswith("net.")]
    opt = torch.optim.Adam(head, lr=lr, weight_decay=weight_decay)
    y_train = [float(s.label) for s in train]
    budget = Budget(budget_s)
    gen = torch.Generator().manual_seed(seed)
    best_state, best_key, history = copy.deepcopy(model.state_dict()), (-math.inf, -math.inf), []
    epoch = 0
    train_idx = [i for i, f in enumerate(f_train) if len(f)]
    while epoch < max_epochs and not budget.over:
        model.train()
        progress = max(epoch / max_epochs, budget.fraction)
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * progress))
        order = [train_idx[i] for i in torch.randperm(len(train_idx), generator=gen).tolist()]
        opt.zero_grad(set_to_none=True)
        for k, i in enumerate(order, start=1):
            logit = _head_logit(model, norm(f_train[i]))
            loss = F.binary_cross_entropy_with_logits(logit, torch.tensor(y_train[i])) / batch_size
            loss.backward()
            if k % batch_size == 0 or k == len(order):
                opt.step()
                opt.zero_grad(set_to_none=True)
        epoch += 1
        model.eval()
        with torch.no_grad():
            val_logits = torch.stack(
                [_head_logit(model, norm(f)) if len(f) else torch.tensor(0.0) for f in f_val]
            )
        y_val = torch.tensor([float(s.label) for s in val])
        val_loss = float(F.binary_cross_entropy_with_logits(val_logits, y_val))
        val_auroc = auroc(torch.sigmoid(val_logits).numpy(), y_val.numpy())
        history.append({"epoch": epoch, "val_auroc": val_auroc, "val_loss": val_loss, "seconds": budget.elapsed})
        key = (val_auroc if math.isfinite(val_auroc) else -math.inf, -val_loss)
        if key > best_key:
            best_key, best_state = key, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    head_seconds = budget.elapsed

    results = []
    f_test, c_test, cached_test = features_of(test)
    for s, f, cost in zip(test, f_test, c_test, strict=True):
        start = time.perf_counter()
        with torch.no_grad():
            prob = float(torch.sigmoid(_head_logit(model, norm(f)))) if len(f) else 0.5
        seconds = cost["seconds"] + time.perf_counter() - start
        results.append(
            SlideResult(s.path, s.label, s.category, s.size, prob, cost["tiles"] * 3 * tile * tile,
                        cost["pixels_read"], seconds, {"tiles": cost["tiles"]})
        )
    best = max(history, key=lambda h: (h["val_auroc"] if np.isfinite(h["val_auroc"]) else -1, -h["val_loss"]),
               default=None)
    return MethodReport(
        name="dense_mil",
        description=(
            f"every tissue tile {tile}x{tile} at level {level} -> MONAI MILModel (att), frozen random "
            f"{backbone} (BatchNorm calibrated), trained MIL head on cached features"
        ),
        results=results,
        training={
            "seconds": calib_seconds + feature_seconds + head_seconds,
            "calibration_seconds": calib_seconds,
            "feature_seconds_train_val": feature_seconds,
            "features_cached": {"train": cached_train, "val": cached_val, "test": cached_test},
            "head_seconds": head_seconds,
            "epochs": epoch,
            "stopped_by": "budget" if budget.over else "epochs",
            "best_epoch": best["epoch"] if best else None,
            "best_val_auroc": best["val_auroc"] if best else None,
            "train_tiles_per_slide_mean": float(np.mean([c["tiles"] for c in c_train])) if c_train else None,
            "history": history,
        },
        settings={
            "level": level,
            "tile": tile,
            "min_tissue": min_tissue,
            "backbone": f"torchvision {backbone} inside MILModel, random init, frozen, BatchNorm calibrated",
            "calib_tiles": calib_tiles,
            "mil_mode": "att",
            "budget_s (head)": budget_s,
            "max_epochs": max_epochs,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "feature_standardisation": "per-dimension mean/std of the training tiles",
            "augmentation": "none (features cached once)",
            "head_parameters": sum(p.numel() for p in head),
        },
    )
