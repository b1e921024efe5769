"""What the one training loop trains on: data sources, and validators that score the network.

A *data source* hands the loop micro-batches (objects with ``labels`` and ``fetchers(grey_threshold)``,
like :class:`~magnet_zoo.train.data.SlideBatch`) for a given epoch and position, so a resumed run
continues exactly where it stopped:

* :class:`SlideData`: slides (records of a CSV, a SynthMets split) read ahead by DataLoader workers, a
  per-epoch shuffled, D4-oriented order sharded over DDP ranks (:class:`ResumableSampler`);
* :class:`SourceData`: slides already open (in-memory :class:`~magnet_zoo.ArraySource`, any
  ``RegionSource``), cycled endlessly: benchmarks that time steps;
* FindIt images drawn per step live with their task (:class:`magnet_zoo.tasks.findit.FindItData`).

A *validator* scores the network and returns flat metrics (``auroc``, ``accuracy``, ``loss``, ...) that the
loop logs, writes to ``metrics.csv`` and monitors for the best checkpoint and early stopping.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from magnet_zoo.train.data import (
    ResumableSampler,
    SlideDataset,
    SlideRecord,
    make_loader,
    prefetch_sizes,
    set_open_slides,
)
from magnet_zoo.train.distributed import DistInfo

logger = logging.getLogger(__name__)


class TrainData(Protocol):
    """What the loop needs of its training data."""

    def setup(self, model_config: Any, micro: int, info: DistInfo, seed: int, augment: bool, total_steps: int,
              accumulation: int) -> None:
        """Build loaders for micro-batches of ``micro`` slides on this rank."""

    def micro_batches_per_epoch(self) -> int | None:
        """Micro-batches in one epoch on this rank (``None``: endless data, the loop counts steps)."""

    def samples_in_epoch(self) -> int | None:
        """Slides in one epoch on this rank (``None`` for endless data)."""

    def batches(self, epoch: int, start: int) -> Iterator[Any]:
        """Micro-batches of ``epoch`` from micro-batch ``start`` on."""


# --------------------------------------------------------------------------- slides from files
class SlideData:
    """Slides listed as records, read by DataLoader workers that prefetch each slide's whole-slide views.

    ``open_slides`` keeps that many slides open per process between epochs (0: the default cache):
    worth it when the same few hundred slides are read again and again, as in SynthMets.
    """

    def __init__(self, records: Sequence[SlideRecord], *, backend: str = "auto", num_workers: int = 2,
                 prefetch_factor: int = 2, open_slides: int = 0) -> None:
        if not records:
            raise ValueError("no training slides")
        self.records = list(records)
        self.backend = backend
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.open_slides = open_slides

    def setup(self, model_config: Any, micro: int, info: DistInfo, seed: int, augment: bool, total_steps: int,
              accumulation: int) -> None:
        if self.open_slides:
            set_open_slides(self.open_slides)
        self.dataset = SlideDataset(self.records, prefetch_sizes(model_config), model_config.grey_threshold,
                                    self.backend)
        self.sampler = ResumableSampler(len(self.dataset), seed=seed, shuffle=True, augment=augment,
                                        rank=info.rank, world_size=info.world_size)
        self.micro = micro
        self.loader = make_loader(self.dataset, self.sampler, micro, num_workers=self.num_workers,
                                  prefetch_factor=self.prefetch_factor, seed=seed)

    def micro_batches_per_epoch(self) -> int:
        return math.ceil(self.sampler.per_rank() / self.micro)

    def samples_in_epoch(self) -> int:
        return self.sampler.per_rank()

    def batches(self, epoch: int, start: int) -> Iterator[Any]:
        self.sampler.set_epoch(epoch, start=start * self.micro)
        return iter(self.loader)

    @property
    def paths(self) -> list[str]:
        return [r.path for r in self.records]

    def slide_mpp(self) -> float | None:
        """Median level-0 microns per pixel of the training slides (the checkpoint's resolution contract)."""
        if not hasattr(self, "_mpp"):
            from magnet_zoo.wsi.open import median_mpp

            self._mpp = median_mpp(self.paths)
        return self._mpp

    @property
    def labels(self) -> list[int]:
        return [r.label for r in self.records]


@dataclass
class FetcherBatch:
    """A micro-batch of slides given as fetcher factories (``grey_threshold -> RegionFetcher``)."""

    makers: list[Callable[[int], Any]]
    labels: torch.Tensor
    meta: list[Any] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.makers)

    def fetchers(self, grey_threshold: int = 15) -> list[Any]:
        return [make(grey_threshold) for make in self.makers]


class SourceData:
    """Slides already open (``RegionSource`` objects) with their labels, cycled endlessly in a fixed order
    (no shuffling, no augmentation): for benchmarks that time training steps on in-memory slides.

    ``wrap`` may wrap every fetcher (e.g. to time its reads)."""

    def __init__(self, sources: Sequence[Any], labels: Sequence[int],
                 wrap: Callable[[Any], Any] | None = None) -> None:
        if not sources or len(sources) != len(labels):
            raise ValueError("need one label per source, and at least one source")
        self.sources = list(sources)
        self.labels = [int(v) for v in labels]
        self.wrap = wrap

    def setup(self, model_config: Any, micro: int, info: DistInfo, seed: int, augment: bool, total_steps: int,
              accumulation: int) -> None:
        self.micro = micro

    def micro_batches_per_epoch(self) -> None:
        return None

    def samples_in_epoch(self) -> None:
        return None

    def _maker(self, i: int) -> Callable[[int], Any]:
        from magnet_zoo.wsi import SlideFetcher

        source, wrap = self.sources[i], self.wrap

        def make(grey: int) -> Any:
            fetcher = SlideFetcher(source, grey)
            return wrap(fetcher) if wrap is not None else fetcher

        return make

    def batches(self, epoch: int, start: int) -> Iterator[FetcherBatch]:
        n = len(self.sources)
        index = start
        while True:
            picks = [(index * self.micro + j) % n for j in range(self.micro)]
            yield FetcherBatch([self._maker(i) for i in picks],
                               torch.tensor([float(self.labels[i]) for i in picks]))
            index += 1


# --------------------------------------------------------------------------- validators
class Validator(Protocol):
    def __call__(self, model: Any, *, device: torch.device, dtype: torch.dtype | None, info: DistInfo,
                 progress: bool) -> dict[str, Any]:
        """Flat metrics of ``model`` (in eval mode, with final settings)."""


class SlideValidator:
    """AUROC, accuracy (overall and per category) and the loss terms on validation slides.

    Returns flat metrics (``auroc``, ``accuracy``, ``n``, per category ``auroc_macro``, ..., the mean loss
    ``loss`` and its terms ``classifier``, ``auxiliary``, ``paradoxical``) plus the full
    :class:`~magnet_zoo.train.evaluate.EvalReport` under ``"report"``. With ``trees`` ``K > 1`` every slide is
    scored by ``K`` sampled trees, drawn and pooled as ``tree_policy`` (a
    :class:`~magnet_zoo.nn.trees.TreePolicy`) says, as ``evaluate`` does (a ``tree_mil`` recipe's model
    validates so: :func:`magnet_zoo.train.exploration.mil_inference`)."""

    def __init__(self, records: Sequence[SlideRecord], *, batch_size: int = 4, backend: str = "auto",
                 num_workers: int = 2, prefetch_factor: int = 2, trees: int | None = None, tree_seed: int = 0,
                 tree_policy: Any = None) -> None:
        from magnet_zoo.nn.trees import check_trees

        self.records = list(records)
        self.trees = check_trees(trees)
        self.tree_seed = tree_seed
        self.tree_policy = tree_policy
        self.batch_size = batch_size
        self.backend = backend
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.loader: Any = None

    def _loader(self, model_config: Any, info: DistInfo) -> Any:
        if self.loader is None:
            from magnet_zoo.train.evaluate import eval_loader

            self.loader = eval_loader(self.records, model_config, info, batch_size=self.batch_size,
                                      num_workers=self.num_workers, prefetch_factor=self.prefetch_factor,
                                      backend=self.backend)
        return self.loader

    def __call__(self, model: Any, *, device: torch.device, dtype: torch.dtype | None, info: DistInfo,
                 progress: bool) -> dict[str, Any]:
        from magnet_zoo.train.evaluate import predict_loader, report_from_rows
        from magnet_zoo.train.metrics import flatten_metrics

        rows, losses = predict_loader(model, self._loader(model.config, info), device=device, dtype=dtype,
                                      info=info, progress=progress, desc="validate", trees=self.trees,
                                      tree_seed=self.tree_seed, tree_policy=self.tree_policy)
        report = report_from_rows(rows, losses)
        out: dict[str, Any] = flatten_metrics(report.metrics, "")
        for key, value in losses.items():
            out["loss" if key == "total" else key] = value
        out["report"] = report
        return out
