"""MONAI integration: train and evaluate a MagNet with ``monai.data`` and ``monai.engines``.

A MagNet reads its slide while it runs, so a MONAI batch carries *slide sources*, not image tensors:

* :class:`LoadSlided` turns the ``image`` path of a data dictionary into a slide source
  (:class:`~magnet_zoo.train.data.SlideRef`: opened lazily in whichever process reads it, picklable,
  so it works with DataLoader workers); :class:`RandSlideOrientd` is D4 augmentation of the whole slide.
* :func:`collate_slides` keeps the sources as a list and stacks the labels (MONAI's default collate
  only knows tensors).
* :class:`MagNetPrepareBatch` (``prepare_batch=``) gives the network one region fetcher per slide, with
  the model's grey filter (pass the model, its config or the threshold);
  :class:`MagNetLoss` wraps the paper's loss for ``loss_function=``; :class:`MagNetInferer` makes the
  evaluator's prediction a ``(B,)`` probability tensor that MONAI's metrics (``ROCAUC``) understand
  (``trees=K``: pooled over ``K`` sampled zoom trees, :mod:`magnet_zoo.nn.trees`).
* :class:`SavePretrained` (an ignite handler) writes hub checkpoints atomically, the best one by the
  evaluator's key metric; :class:`PredictionWriter` writes per-slide predictions to a CSV.

Use ``decollate=False`` in both engines: a MagNet's output is not a batch of tensors to split.

Example::

    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedTrainer
    from monai.transforms import Compose
    from magnet_zoo.integrations.monai import (
        LoadSlided, MagNetLoss, MagNetPrepareBatch, RandSlideOrientd, collate_slides, datalist_from_csv)

    model = magnet_zoo.create_model("magnet2_tiny")
    data = Dataset(datalist_from_csv("labels.csv"), Compose([LoadSlided("image"), RandSlideOrientd("image")]))
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=5,
        train_data_loader=DataLoader(data, batch_size=4, shuffle=True, collate_fn=collate_slides),
        network=model, optimizer=torch.optim.Adam(model.parameters(), 3e-5),
        loss_function=MagNetLoss(model), prepare_batch=MagNetPrepareBatch(model=model), decollate=False)
    trainer.run()
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.config import KeysCollection
from monai.engines.utils import PrepareBatch
from monai.inferers import Inferer
from monai.transforms import MapTransform, RandomizableTransform
from torch import nn

from magnet_zoo.atomic import atomic_write_text
from magnet_zoo.config import MagNetConfig
from magnet_zoo.nn.losses import loss_settings, output_loss
from magnet_zoo.nn.magnet import MagNet, MagNetOutput
from magnet_zoo.nn.trees import (
    DEFAULT_TEMPERATURE,
    INFERENCE_SOURCE,
    INFERENCE_UNIFORM,
    PooledOutput,
    pooled_forward,
)
from magnet_zoo.train.checkpointing import atomic_directory
from magnet_zoo.train.data import SlideRef, read_slide_csv
from magnet_zoo.wsi.fetch import as_fetcher
from magnet_zoo.wsi.orient import OrientedSource
from magnet_zoo.wsi.protocol import RegionSource

logger = logging.getLogger(__name__)

__all__ = [
    "LoadSlided",
    "MagNetInferer",
    "MagNetLoss",
    "MagNetPrepareBatch",
    "PredictionWriter",
    "RandSlideOrientd",
    "SavePretrained",
    "collate_slides",
    "datalist_from_csv",
    "datalist_from_slides",
    "prepare_magnet_batch",
    "training_mpp",
]


# --------------------------------------------------------------------------- data
def datalist_from_csv(path: str | os.PathLike[str], split: str | None = None) -> list[dict[str, Any]]:
    """MONAI data dictionaries ``{"image": path, "label": 0/1, "category": str}`` from a slide CSV.

    ``split`` keeps the rows of one split (``train``, ``val``, ``test``); ``None`` keeps every row.
    """
    records = read_slide_csv(path)
    if split is not None:
        records = [r for r in records if r.split == split]
    return [{"image": r.path, "label": r.label, "category": r.category} for r in records]


def training_mpp(path: str | os.PathLike[str]) -> float | None:
    """Median level-0 µm per pixel of a slide CSV: its ``mpp`` column where it has one (SynthMets CSVs
    do), else read from (up to 16 of) its slides; ``None`` when nothing says."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    values = sorted(float(r["mpp"]) for r in rows if (r.get("mpp") or "").strip())
    if values:
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
    from magnet_zoo.wsi.open import median_mpp

    return median_mpp([r.path for r in read_slide_csv(path)])


def datalist_from_slides(*inputs: str | os.PathLike[str], recursive: bool = False) -> list[dict[str, Any]]:
    """MONAI data dictionaries ``{"image": path}`` for *inference*: no labels needed.

    Each input is a slide file, a folder of slides (known suffixes; ``recursive`` for sub-folders) or
    a CSV with a ``path`` (or ``slide``, ``image``, ``filename``) column, as ``magnet-zoo predict`` takes.
    """
    from magnet_zoo.infer.batch import collect_slides

    if not inputs:
        raise ValueError("datalist_from_slides needs at least one slide, folder or CSV")
    slides = collect_slides([str(i) for i in inputs], recursive=recursive)
    if not slides:
        raise FileNotFoundError(f"no slides found in {', '.join(str(i) for i in inputs)}")
    return [{"image": str(p)} for p in slides]


class LoadSlided(MapTransform):
    """``d[key]`` (a slide path) -> a slide source, opened lazily (:class:`~magnet_zoo.train.data.SlideRef`).

    Sources already open (any :class:`~magnet_zoo.wsi.RegionSource`) pass through. ``backend`` is an
    :func:`~magnet_zoo.open_slide` backend name.
    """

    def __init__(self, keys: KeysCollection = "image", backend: str = "auto", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.backend = backend

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, str | os.PathLike):
                if not Path(value).exists():
                    raise FileNotFoundError(f"{value}: no such slide file")
                d[key] = SlideRef(value, self.backend)
        return d


class RandSlideOrientd(RandomizableTransform, MapTransform):
    """D4 augmentation of the whole slide: with probability ``prob`` a random orientation ``k`` in 0..7
    (identity, flips and quarter turns, uniformly; every later read of the slide agrees with it). The
    same ``k`` is used for every key of one dictionary."""

    def __init__(self, keys: KeysCollection = "image", prob: float = 1.0, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.k = 0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self.k = int(self.R.randint(0, 8)) if self._do_transform else 0

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self.k:
            return d
        for key in self.key_iterator(d):
            source = d[key]
            if isinstance(source, SlideRef):
                d[key] = source.oriented(self.k)
            elif isinstance(source, RegionSource):
                d[key] = OrientedSource(source, self.k)
            else:
                raise TypeError(f"RandSlideOrientd needs a slide source at {key!r} (use LoadSlided first), "
                                f"got {type(source).__name__}")
        return d


def collate_slides(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``collate_fn`` for dictionaries holding slide sources: lists per key, ``label`` as a float tensor."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    out: dict[str, Any] = {key: [item[key] for item in batch] for key in batch[0]}
    if "label" in out:
        out["label"] = torch.as_tensor([float(v) for v in out["label"]], dtype=torch.float32)
    return out


# --------------------------------------------------------------------------- engines
class MagNetPrepareBatch(PrepareBatch):
    """``prepare_batch`` for MONAI engines: ``batch[image_key]`` sources -> region fetchers, labels -> device.

    The fetchers apply the grey filter the model was trained with: pass ``model`` (a MagNet or its
    config) to take its ``grey_threshold``, or ``grey_threshold`` itself; one of them is required (a
    silent default could differ from the model's). Both given must agree.
    Returns ``(fetchers, labels)``; labels are ``None`` when the batch has none (inference).
    """

    def __init__(
        self,
        image_key: str = "image",
        label_key: str = "label",
        grey_threshold: int | None = None,
        *,
        model: MagNet | MagNetConfig | None = None,
    ) -> None:
        self.image_key = image_key
        self.label_key = label_key
        self.grey_threshold = _grey_threshold(model, grey_threshold)

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[list[Any], torch.Tensor | None]:
        images = batchdata[self.image_key]
        if not isinstance(images, list | tuple):
            raise TypeError(
                f"batch[{self.image_key!r}] must be a list of slide sources (collate with "
                f"magnet_zoo.integrations.monai.collate_slides), got {type(images).__name__}"
            )
        fetchers = [as_fetcher(img, self.grey_threshold) for img in images]
        labels = batchdata.get(self.label_key)
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.float32).to(device=device, non_blocking=non_blocking)
        return fetchers, labels


def _grey_threshold(model: MagNet | MagNetConfig | None, grey_threshold: int | None) -> int:
    config = getattr(model, "config", model)
    if config is not None and not isinstance(config, MagNetConfig):
        raise TypeError(f"model must be a MagNet or a MagNetConfig, got {type(model).__name__}")
    if config is None and grey_threshold is None:
        raise TypeError(
            "MagNetPrepareBatch needs the model (model=network, or its config) or grey_threshold=: the grey "
            "filter must be the one the model was trained with"
        )
    if config is not None and grey_threshold is not None and int(grey_threshold) != config.grey_threshold:
        raise ValueError(f"grey_threshold={grey_threshold} but the model's config says {config.grey_threshold}")
    return int(config.grey_threshold if config is not None else grey_threshold)


def prepare_magnet_batch(
    batchdata: Mapping[str, Any],
    device: str | torch.device | None = None,
    non_blocking: bool = False,
    *,
    grey_threshold: int | None = None,
    model: MagNet | MagNetConfig | None = None,
    **kwargs: Any,
) -> tuple[list[Any], torch.Tensor | None]:
    """Function form of :class:`MagNetPrepareBatch` (``model`` or ``grey_threshold`` required; for an
    engine's ``prepare_batch=``, bind one with ``functools.partial``)."""
    return MagNetPrepareBatch(grey_threshold=grey_threshold, model=model)(batchdata, device, non_blocking, **kwargs)


class MagNetLoss(nn.Module):
    """The paper's total loss ``L1 + L2 + L3`` as a ``loss_function(pred, target)`` for MONAI engines.

    ``model`` (a MagNet or its config) says which terms are on; ``pred`` is the network's
    :class:`~magnet_zoo.nn.magnet.MagNetOutput` (in training mode it carries the auxiliary logits).
    """

    def __init__(self, model: MagNet | MagNetConfig | None = None) -> None:
        super().__init__()
        config = model.config if isinstance(model, MagNet) else model
        self.settings = loss_settings(config if config is not None else MagNetConfig())

    def forward(self, pred: MagNetOutput, target: torch.Tensor) -> torch.Tensor:
        if not isinstance(pred, MagNetOutput):
            raise TypeError(f"MagNetLoss expects the MagNet's output (MagNetOutput), got {type(pred).__name__}")
        terms = output_loss(pred, target, **self.settings)
        return terms.total


class MagNetInferer(Inferer):
    """Run a MagNet and return ``(B,)`` probabilities (``output="probs"``), logits or the full output.

    For ``SupervisedEvaluator``: its metrics (``ROCAUC``, ``Accuracy``) want tensors, not a MagNetOutput.

    ``trees`` ``K > 1`` pools ``K`` sampled zoom trees per batch (:func:`magnet_zoo.nn.trees.pooled_forward`
    with ``seed``, ``source``, ``temperature``, ``uniform``): the probabilities are the mean of the trees', the logits
    the logit of that mean, and ``output="full"`` returns the :class:`~magnet_zoo.nn.trees.PooledOutput`.
    ``K`` times the cost; the draws of a batch depend on the whole batch. ``None`` or 1 (the default): the
    expected crop, one tree, as trained.
    """

    def __init__(
        self,
        output: str = "probs",
        trees: int | None = None,
        seed: int = 0,
        temperature: float = DEFAULT_TEMPERATURE,
        uniform: float = INFERENCE_UNIFORM,
        source: str = INFERENCE_SOURCE,
    ) -> None:
        if output not in ("probs", "logits", "full"):
            raise ValueError(f"output must be 'probs', 'logits' or 'full', got {output!r}")
        if trees is not None and (isinstance(trees, bool) or int(trees) != trees or trees < 1):
            raise ValueError(f"trees must be None or an integer >= 1, got {trees!r}")
        self.output = output
        self.trees = None if trees is None or int(trees) == 1 else int(trees)
        self.seed = int(seed)
        self.temperature = float(temperature)
        self.uniform = float(uniform)
        self.source = source

    def __call__(self, inputs: Any, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        out: MagNetOutput | PooledOutput
        if self.trees is None:
            out = network(inputs, *args, **kwargs)
        else:
            if args:
                raise TypeError("MagNetInferer(trees=K) passes keyword arguments only to the network")
            out = pooled_forward(network, inputs, trees=self.trees, seed=self.seed,
                                 temperature=self.temperature, uniform=self.uniform, source=self.source, **kwargs)
        if self.output == "full":
            return out
        return out.probs.float() if self.output == "probs" else out.logits.float()


# --------------------------------------------------------------------------- handlers
class SavePretrained:
    """Ignite handler: write ``network`` as a hub checkpoint folder (atomically) at every epoch's end.

    Attach it to the trainer for the latest weights, or to the evaluator with ``best_only=True`` to keep
    the weights of the epoch with the best key metric.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike[str],
        network: nn.Module,
        best_only: bool = False,
        slide_mpp: float | None = None,
    ) -> None:
        """``slide_mpp``: microns per pixel (level 0) of the training slides, recorded in the checkpoint's
        I/O contract (see :func:`training_mpp`)."""
        self.save_dir = Path(save_dir)
        self.network = network
        self.best_only = best_only
        self.slide_mpp = slide_mpp

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        from magnet_zoo.hub import save_pretrained

        state = engine.state
        metrics: dict[str, float] = {}
        if self.best_only:
            if getattr(state, "best_metric_epoch", -1) != state.epoch:
                return
            name = getattr(state, "key_metric_name", None) or "key_metric"
            metrics = {name: float(state.best_metric)}
        with atomic_directory(self.save_dir) as tmp:
            save_pretrained(self.network, tmp, metrics=metrics or None, training={"engine": "MONAI"},
                            slide_mpp=self.slide_mpp)
        logger.info("saved %s (epoch %d)", self.save_dir, state.epoch)


class PredictionWriter:
    """Ignite handler for an evaluator: per-slide probabilities to a CSV (written atomically at the end).

    Needs the evaluator's ``pred`` to be probabilities (:class:`MagNetInferer`) and ``decollate=False``.
    """

    def __init__(self, output_file: str | os.PathLike[str], image_key: str = "image") -> None:
        self.output_file = Path(output_file)
        self.image_key = image_key
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Any) -> None:
        self.rows = []

    def _collect(self, engine: Any) -> None:
        batch = engine.state.batch
        probs = engine.state.output["pred"]
        labels = batch.get("label")
        for i, source in enumerate(batch[self.image_key]):
            self.rows.append(
                {
                    "path": getattr(source, "name", str(source)),
                    "label": "" if labels is None else int(labels[i]),
                    "category": batch.get("category", [""] * len(probs))[i],
                    "probability": float(probs[i]),
                }
            )

    def _write(self, engine: Any) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["path", "label", "category", "probability"])
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.output_file, buffer.getvalue())
        logger.info("wrote %d predictions to %s", len(self.rows), self.output_file)
