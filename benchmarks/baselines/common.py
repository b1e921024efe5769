"""What every SynthMets method shares: the slide list, the result records, budgets, views and augmentation.

Every method (MagNet and each baseline) is trained on the ``train`` split, picks its epoch / step / hyper-
parameters on the ``val`` split, and is evaluated once on the ``test`` split, one slide at a time, from the
slide file to a probability. A :class:`SlideResult` per test slide records the probability and the cost of
getting it (values fed to networks, pixels read from the slide, wall seconds); :class:`MethodReport` bundles
them with what the training did.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from magnet_zoo.nn.tree import root_square
from magnet_zoo.synth import read_labels
from magnet_zoo.train.head_pretrain import d4, tissue_view  # noqa: F401 - the baselines import them from here
from magnet_zoo.train.head_pretrain import random_crops as _random_crops
from magnet_zoo.wsi import grey_filter, read_square, select_level
from magnet_zoo.wsi.protocol import RegionSource

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Slide:
    """One SynthMets slide of a split (a row of its ``labels.csv``)."""

    path: str
    label: int
    category: str
    width: int
    height: int
    split: str

    @property
    def sidecar(self) -> Path:
        return Path(self.path).with_suffix(".json")

    @property
    def size(self) -> int:
        return max(self.width, self.height)


def data_key(data_info: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two ``synthmets.py`` results comparable: the generator version and each split's
    ``(name, n, size, seed)`` (their ``"data"`` entry)."""
    splits = data_info["splits"]
    return (data_info.get("generator_version"),
            tuple(sorted((k, v["n"], v["size"], v["seed"]) for k, v in splits.items())))


def load_split(labels_csv: str | Path, split: str) -> list[Slide]:
    """The slides listed in a ``labels.csv`` written by :func:`magnet_zoo.synth.generate_dataset`."""
    return [
        Slide(r["path"], int(r["label"]), r["category"], int(r["width"]), int(r["height"]), split)
        for r in read_labels(labels_csv)
    ]


@dataclass
class SlideResult:
    """One test slide through one method."""

    path: str
    label: int
    category: str
    size: int
    probability: float
    values_fed: int
    """Numbers given to the method's networks (or classifier) for this slide."""
    pixels_read: int
    """Pixels decoded from the slide file, at the levels read."""
    seconds: float
    """Wall time from the slide's path to its probability (opening and reading included)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = Path(self.path).name
        return d


@dataclass
class MethodReport:
    """A method's test results and what its training did."""

    name: str
    description: str
    results: list[SlideResult]
    training: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


class Budget:
    """A wall-clock budget: ``elapsed`` and ``fraction`` used; ``seconds=None`` means no time limit."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def fraction(self) -> float:
        if not self.seconds:
            return 0.0
        return min(self.elapsed / self.seconds, 1.0)

    @property
    def over(self) -> bool:
        return bool(self.seconds) and self.elapsed >= self.seconds


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - seeds the legacy RNG third-party code may use
    torch.manual_seed(seed)


def whole_slide_view(source: RegionSource, size: int, grey_threshold: int = 15) -> tuple[np.ndarray, int]:
    """The slide's square canvas at ``size`` x ``size`` (MagNet's input protocol: longer side resized,
    black padding, grey filter), read from the coarsest sufficient level; and the pixels decoded."""
    w, h = source.dimensions
    square = root_square(w, h)
    level = select_level(source.level_downsamples, square.side, size)
    pixels, read = read_square(source, square, size, level)
    return grey_filter(pixels, grey_threshold), read


def random_crops(slides: Sequence[Slide], n: int, side: float | tuple[float, float], size: int, seed: int,
                 grey_threshold: int = 15) -> torch.Tensor:
    """:func:`magnet_zoo.train.head_pretrain.random_crops` of benchmark slides."""
    return _random_crops([s.path for s in slides], n, side, size, seed, grey_threshold)


def category_counts(slides: Sequence[Slide]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in slides:
        counts[s.category] = counts.get(s.category, 0) + 1
    return dict(sorted(counts.items()))


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN: undefined numbers are written as ``null``."""
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def ratio_ceiling(group: dict[str, Any]) -> float:
    """``1 / random_hit`` of a localisation group: the largest ``hit / random_hit`` that patches of these sides
    can reach (every one on tumour); NaN where random placement never hits. Computed from ``random_hit`` when
    the group comes from a JSON older than its ``ratio_ceiling`` entry."""
    if group.get("ratio_ceiling") is not None:
        return group["ratio_ceiling"]
    random_hit = group.get("random_hit")
    return 1.0 / random_hit if random_hit and math.isfinite(random_hit) else math.nan


def jsonable(obj: Any) -> Any:
    """``obj`` with NaN/inf replaced by ``None`` and numpy scalars made plain, recursively."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return finite_or_none(obj)
    return obj
