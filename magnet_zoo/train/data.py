"""Slides for training: the CSV, lazily opened slides, D4 augmentation, and loading ahead of the GPU.

A MagNet decides where to read while it runs, so a batch cannot be a fixed tensor. What *can* be read
ahead is every slide's whole-slide view: the ``input_size`` image ``I`` and layer 1's ``I'``, which do
not depend on the network. :class:`SlideDataset` reads them in DataLoader worker processes (the next
batches' slides are opened and read while the current batch trains); :class:`PrefetchedFetcher` serves
them to the network and reads every deeper region on demand (concurrently, through
:class:`~magnet_zoo.wsi.SlideFetcher`'s thread pool).

Augmentation is D4 applied to the *slide as a whole* (:class:`~magnet_zoo.wsi.OrientedSource`): every
read of a sample agrees with its orientation. Orientation and order come from
:class:`ResumableSampler`, a pure function of ``(seed, epoch)``, so a resumed run sees the same data in
the same order and no DataLoader worker RNG is involved.

CSV format (``labels.csv`` of ``magnet-zoo synth`` works as is)::

    path,label,category,split
    slides/a.svs,1,macro,train
    slides/b.svs,0,normal,val

``path`` (or ``slide``/``image``/``filename``) is relative to the CSV's folder; ``label`` is 0/1, or a
class name of the model (``normal``/``tumour``); ``category`` (optional, defaults to the class name)
groups slides for per-category metrics; ``split`` (optional) is ``train``, ``val`` or ``test``.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from magnet_zoo.nn.fetcher import Fetched, Square
from magnet_zoo.nn.tree import root_square
from magnet_zoo.wsi.fetch import SlideFetcher
from magnet_zoo.wsi.open import SlideCache
from magnet_zoo.wsi.orient import OrientedSource
from magnet_zoo.wsi.protocol import RegionSource

logger = logging.getLogger(__name__)

PATH_COLUMNS = ("path", "slide", "image", "filename")
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


class DataError(ValueError):
    """The training CSV (or a slide it lists) cannot be used; the message says which row and why."""


# --------------------------------------------------------------------------- the CSV
@dataclass(frozen=True)
class SlideRecord:
    """One row of the training CSV."""

    path: str
    label: int
    category: str
    split: str = "train"


def parse_label(value: str, labels: Sequence[str] = ("normal", "tumour")) -> int:
    """``"1"``, ``"0"``, ``"1.0"``, ``"true"`` or a class name (case-insensitive) -> 0 or 1."""
    text = str(value).strip().lower()
    names = [name.lower() for name in labels]
    if text in names:
        return names.index(text)
    if text in ("true", "yes", "positive"):
        return 1
    if text in ("false", "no", "negative"):
        return 0
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if number in (0.0, 1.0):
        return int(number)
    raise DataError(f"label {value!r} is neither 0/1 nor one of the class names {list(labels)}")


def read_slide_csv(path: str | os.PathLike[str], labels: Sequence[str] = ("normal", "tumour")) -> list[SlideRecord]:
    """Rows of a training CSV with absolute paths; every listed slide must exist."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such CSV file")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        path_col = next((c for c in PATH_COLUMNS if c in columns), None)
        if path_col is None:
            raise DataError(f"{path}: needs a column named {', '.join(PATH_COLUMNS)}; found {columns}")
        if "label" not in columns:
            raise DataError(f"{path}: needs a 'label' column (0/1 or {'/'.join(labels)}); found {columns}")
        records = []
        missing = []
        for line, row in enumerate(reader, start=2):
            raw = (row.get(path_col) or "").strip()
            if not raw:
                raise DataError(f"{path}:{line}: empty {path_col!r}")
            slide = Path(raw) if Path(raw).is_absolute() else path.parent / raw
            try:
                label = parse_label(row["label"], labels)
            except DataError as exc:
                raise DataError(f"{path}:{line}: {exc}") from None
            category = (row.get("category") or "").strip() or labels[label]
            split_raw = (row.get("split") or "").strip().lower()
            if split_raw not in SPLIT_ALIASES:
                raise DataError(f"{path}:{line}: split {split_raw!r} is not train, val or test")
            if not slide.exists():
                missing.append(str(slide))
            records.append(SlideRecord(str(slide.resolve()), label, category, SPLIT_ALIASES[split_raw]))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(f"{path}: {len(missing)} listed slide(s) do not exist: {shown}")
    if not records:
        raise DataError(f"{path}: lists no slides")
    return records


def stratified_split(
    records: Sequence[SlideRecord], fraction: float, seed: int
) -> tuple[list[SlideRecord], list[SlideRecord]]:
    """Hold out about ``fraction`` of each label (at least one slide per label when it has two or more)."""
    if not 0 < fraction < 1:
        raise DataError(f"the validation fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng([int(seed), 0x5E1])
    train, val = [], []
    for label in (0, 1):
        group = [r for r in records if r.label == label]
        order = rng.permutation(len(group))
        n_val = min(max(1, round(fraction * len(group))), len(group) - 1) if len(group) >= 2 else 0
        val += [group[i] for i in order[:n_val]]
        train += [group[i] for i in order[n_val:]]
    keep = {id(r) for r in train}
    return [r for r in records if id(r) in keep], [r for r in records if id(r) not in keep]


# --------------------------------------------------------------------------- slides opened lazily
_CACHES: dict[int, SlideCache] = {}
_OPEN_SLIDES = 32


def set_open_slides(capacity: int) -> None:
    """How many slides each process keeps open (default 32), for this process and workers started later.

    An open slide keeps its computed coarse levels (``magnet_zoo.wsi.coarse``, up to ~17 MB for a slide
    whose pyramid stops above 512 px); reopening one rebuilds them (~0.1 s). A trainer whose training set
    fits in memory should keep it all open: otherwise every batch pays that cost again for each slide.
    """
    global _OPEN_SLIDES
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    _OPEN_SLIDES = int(capacity)
    for cache in _CACHES.values():
        cache.capacity = _OPEN_SLIDES


def process_slide_cache() -> SlideCache:
    """This process's cache of open slides.

    Keyed by process id: a DataLoader worker forked from the trainer must not share the parent's file
    handles (their file offsets are shared between processes), so every process opens its own.
    """
    pid = os.getpid()
    cache = _CACHES.get(pid)
    if cache is None:
        cache = _CACHES[pid] = SlideCache(_OPEN_SLIDES)
    return cache


class SlideRef:
    """A slide source that opens its file on first use, in whichever process uses it.

    It implements :class:`~magnet_zoo.wsi.RegionSource` (``orientation`` ``k`` in ``0..7`` applies
    :class:`~magnet_zoo.wsi.OrientedSource`), and pickles as ``(path, backend, orientation)``, so it can
    travel from a DataLoader worker or a MONAI transform to the training process. Handles live in
    :func:`process_slide_cache`; :meth:`close` leaves them open for the next use.
    """

    def __init__(self, path: str | os.PathLike[str], backend: str = "auto", orientation: int = 0) -> None:
        if orientation not in range(8):
            raise ValueError(f"orientation must be in 0..7, got {orientation}")
        self.path = str(path)
        self.backend = backend
        self.orientation = int(orientation)
        self._source: RegionSource | None = None

    def open(self) -> RegionSource:
        if self._source is None:
            base = process_slide_cache().get(self.path, self.backend)
            self._source = OrientedSource(base, self.orientation) if self.orientation else base
        return self._source

    def oriented(self, k: int) -> SlideRef:
        """The same slide in orientation ``k`` (composition is not implied: ``k`` replaces the current one)."""
        return SlideRef(self.path, self.backend, k)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "backend": self.backend, "orientation": self.orientation}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["backend"], state["orientation"])  # type: ignore[misc]

    @property
    def name(self) -> str:
        return self.path

    @property
    def level_count(self) -> int:
        return self.open().level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self.open().level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self.open().level_downsamples

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.open().dimensions

    @property
    def mpp(self) -> tuple[float, float] | None:
        return self.open().mpp

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        return self.open().read_region(location, level, size)

    def close(self) -> None:
        """Forget this reference's handle (the process cache keeps the file open for reuse)."""
        self._source = None

    def __enter__(self) -> SlideRef:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SlideRef({self.path!r}, backend={self.backend!r}, orientation={self.orientation})"


# --------------------------------------------------------------------------- prefetched views
class PrefetchedFetcher:
    """A :class:`~magnet_zoo.nn.fetcher.RegionFetcher` whose whole-slide views were read ahead.

    Requests for the root square at a prefetched size are answered from ``views``; every other request
    is read from ``source`` (concurrently, by a :class:`~magnet_zoo.wsi.SlideFetcher`).
    """

    def __init__(
        self,
        source: RegionSource,
        views: dict[int, Fetched],
        slide_size: tuple[int, int],
        grey_threshold: int = 15,
    ) -> None:
        self.source = source
        self.views = views
        self._slide_size = (int(slide_size[0]), int(slide_size[1]))
        self._root = root_square(*self._slide_size)
        self._reader = SlideFetcher(source, grey_threshold)

    @property
    def slide_size(self) -> tuple[int, int]:
        return self._slide_size

    def fetch(self, squares: Sequence[Square], size: int) -> Fetched:
        if len(squares) == 1 and squares[0] == self._root and size in self.views:
            return self.views[size]
        return self._reader.fetch(squares, size)


def read_views(
    source: RegionSource, sizes: Sequence[int], grey_threshold: int
) -> tuple[dict[int, Fetched], tuple[int, int]]:
    """The whole-slide square of ``source`` at each of ``sizes``, read one by one (safe in any process)."""
    reader = SlideFetcher(source, grey_threshold, serial=True)
    slide_size = reader.slide_size
    root = root_square(*slide_size)
    return {int(s): reader.fetch([root], int(s)) for s in sorted(set(sizes))}, slide_size


# --------------------------------------------------------------------------- dataset, batches
@dataclass
class SlideSample:
    """One slide ready for the network: its lazy source, prefetched views, label and category."""

    index: int
    source: SlideRef
    label: int
    category: str
    views: dict[int, Fetched] = field(default_factory=dict)
    slide_size: tuple[int, int] = (0, 0)

    def fetcher(self, grey_threshold: int = 15) -> PrefetchedFetcher:
        return PrefetchedFetcher(self.source, self.views, self.slide_size, grey_threshold)


@dataclass
class SlideBatch:
    """A collated batch: the samples and their labels as a float tensor ``(B,)``."""

    samples: list[SlideSample]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def indices(self) -> list[int]:
        return [s.index for s in self.samples]

    @property
    def categories(self) -> list[str]:
        return [s.category for s in self.samples]

    def fetchers(self, grey_threshold: int = 15) -> list[PrefetchedFetcher]:
        return [s.fetcher(grey_threshold) for s in self.samples]


def collate_samples(samples: Sequence[SlideSample]) -> SlideBatch:
    """DataLoader ``collate_fn``: keep the samples as objects, stack only the labels."""
    return SlideBatch(list(samples), torch.tensor([float(s.label) for s in samples], dtype=torch.float32))


class SlideDataset(Dataset):
    """Slides of a CSV; ``dataset[(index, orientation)]`` opens the slide and reads its whole-slide views.

    ``sizes`` are the view sizes read ahead (``I``'s read size and layer 1's ``I'`` of the model:
    :func:`prefetch_sizes`). An int key means orientation 0.
    """

    def __init__(
        self,
        records: Sequence[SlideRecord],
        sizes: Sequence[int],
        grey_threshold: int = 15,
        backend: str = "auto",
    ) -> None:
        self.records = list(records)
        self.sizes = tuple(int(s) for s in sizes)
        self.grey_threshold = grey_threshold
        self.backend = backend

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> SlideSample:
        index, orientation = (key, 0) if isinstance(key, int) else (int(key[0]), int(key[1]))
        rec = self.records[index]
        ref = SlideRef(rec.path, self.backend, orientation)
        try:
            views, slide_size = read_views(ref, self.sizes, self.grey_threshold)
        except Exception as exc:
            raise DataError(f"{rec.path}: cannot read the slide ({type(exc).__name__}: {exc})") from exc
        ref.close()
        return SlideSample(index, ref, rec.label, rec.category, views, slide_size)

    @property
    def labels(self) -> list[int]:
        return [r.label for r in self.records]

    @property
    def categories(self) -> list[str]:
        return [r.category for r in self.records]


def prefetch_sizes(config: Any) -> tuple[int, int]:
    """The view sizes a MagNet reads of the whole slide: ``I`` (at ``view_oversample`` times ``input_size``)
    and layer 1's ``I'``."""
    return (int(config.view_read_size()), int(config.iprime_size(1)))


# --------------------------------------------------------------------------- order and orientation
class ResumableSampler(Sampler):
    """Yields ``(index, orientation)`` keys: a per-epoch order and D4 orientation, sharded over ranks.

    Everything is a pure function of ``(seed, epoch)``: :meth:`set_epoch` ``(epoch, start)`` picks the
    epoch and skips its first ``start`` keys of this rank, which is how a resumed run continues in the
    middle of an epoch. With ``world_size > 1`` the list is padded (repeating its start) to a multiple of
    the world size, as :class:`torch.utils.data.DistributedSampler` does, and rank ``r`` takes every
    ``world_size``-th key from ``r``; ``pad=False`` (evaluation) gives disjoint, unpadded shards.
    """

    def __init__(
        self,
        n: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        augment: bool = True,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
    ) -> None:
        if n < 1:
            raise ValueError("a sampler needs at least one item")
        self.n = n
        self.seed = int(seed)
        self.shuffle = shuffle
        self.augment = augment
        self.rank = rank
        self.world_size = world_size
        self.pad = pad
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = int(epoch)
        self.start = int(start)

    def epoch_keys(self, epoch: int) -> list[tuple[int, int]]:
        """Every rank's keys of ``epoch`` before sharding."""
        gen = torch.Generator()
        gen.manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n, generator=gen).tolist() if self.shuffle else list(range(self.n))
        orient = torch.randint(0, 8, (self.n,), generator=gen).tolist() if self.augment else [0] * self.n
        keys = [(i, k) for i, k in zip(order, orient, strict=True)]
        if self.pad and self.world_size > 1 and len(keys) % self.world_size:
            extra = self.world_size - len(keys) % self.world_size
            keys += (keys * math.ceil(extra / len(keys)))[:extra]
        return keys

    def rank_keys(self, epoch: int) -> list[tuple[int, int]]:
        return self.epoch_keys(epoch)[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.rank_keys(self.epoch)[self.start :])

    def __len__(self) -> int:
        return max(len(self.rank_keys(self.epoch)) - self.start, 0)

    def per_rank(self) -> int:
        """Keys per rank in a whole epoch."""
        if self.world_size == 1:
            return self.n
        return math.ceil(self.n / self.world_size) if self.pad else len(range(self.rank, self.n, self.world_size))


def _worker_init(worker_id: int) -> None:
    """Seed NumPy and Python's RNGs of a DataLoader worker from torch's per-worker seed (hygiene: the
    dataset itself draws no random numbers)."""
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)  # noqa: NPY002 - seeds the legacy global RNG that third-party code uses
    random.seed(seed)
    torch.set_num_threads(1)


def make_loader(
    dataset: SlideDataset,
    sampler: ResumableSampler,
    batch_size: int,
    *,
    num_workers: int = 2,
    prefetch_factor: int = 2,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader whose workers open slides and read their whole-slide views ahead of the trainer.

    It has its own ``torch.Generator``, so creating its iterator never draws from the global RNG that
    the network's sampler uses (that is what keeps a resumed run bit-identical).
    """
    gen = torch.Generator()
    gen.manual_seed(int(seed) + 0x10AD)
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(
            prefetch_factor=prefetch_factor,
            persistent_workers=True,
            worker_init_fn=_worker_init,
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_samples,
        generator=gen,
        **kwargs,
    )
