"""Train a MagNet on a CSV of slides: ``magnet-zoo train`` and :func:`train`.

The slides of the CSV become a :class:`~magnet_zoo.train.sources.SlideData` (DataLoader workers read
each slide's whole-slide views ahead; D4 augmentation of the whole slide; a resumable, per-epoch order
sharded over DDP ranks) and a :class:`~magnet_zoo.train.sources.SlideValidator`; the one training loop
(:mod:`magnet_zoo.train.loop`) trains with the run's recipe (default: ``learn_to_look_mil``, for slide labels;
``paper`` for the paper's section 3.3).

Output folder::

    OUT/train_config.json         the run: settings, resolved recipe, network config, batch plan
    OUT/metrics.csv               one row per validation (step 0: the untrained model), rewritten atomically
    OUT/tensorboard/              TensorBoard event files (when the tensorboard package is installed)
    OUT/checkpoints/last/         hub checkpoint (config.json with the recipe, model.safetensors, README.md)
    OUT/checkpoints/best/         the same, for the best validation score (``monitor``)
    OUT/checkpoints/state/        train_state.safetensors + train_state.json: what ``resume`` needs

Batches: the recipe's ``batch_size`` is the number of slides per optimizer step over all processes;
``micro_batch`` the number per forward pass per process. Gradients are accumulated in between.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from magnet_zoo.nn.magnet import MagNet
from magnet_zoo.train.data import DataError, SlideRecord, read_slide_csv, stratified_split
from magnet_zoo.train.loop import TrainResult, fit
from magnet_zoo.train.settings import TrainConfig, build_model, seed_everything
from magnet_zoo.train.sources import SlideData, SlideValidator

logger = logging.getLogger(__name__)

__all__ = ["TrainResult", "split_records", "train"]


def split_records(config: TrainConfig, labels: tuple[str, ...]) -> tuple[list[SlideRecord], list[SlideRecord]]:
    """Training and validation slides: ``--val-data``, else the CSV's split column, else a stratified split."""
    records = read_slide_csv(config.data, labels)
    train_rows = [r for r in records if r.split == "train"]
    if config.val_data:
        val_rows = read_slide_csv(config.val_data, labels)
    elif any(r.split == "val" for r in records):
        val_rows = [r for r in records if r.split == "val"]
    elif config.val_fraction > 0:
        train_rows, val_rows = stratified_split(train_rows, config.val_fraction, config.seed)
    else:
        val_rows = []
    if not train_rows:
        raise DataError(f"{config.data}: no training slides (rows with split 'train' or no split)")
    if not val_rows:
        logger.warning("no validation slides: no validation metrics, and no 'best' checkpoint")
    return train_rows, val_rows


def _reproduce(config: TrainConfig) -> str:
    args = [f"--data {Path(config.data).name}", f"--model {config.model}", f"--recipe {config.recipe}"]
    for key, value in config.recipe_overrides.items():
        args.append(f"--set {key}={json.dumps(value)}")
    for name in ("epochs", "steps", "time_limit"):
        if getattr(config, name):
            args.append(f"--{name.replace('_', '-')} {getattr(config, name)}")
    for key, value in config.model_overrides.items():
        args.append(f"--model-override {key}={json.dumps(value)}")
    args.append(f"--seed {config.seed}")
    return "magnet-zoo train " + " ".join(args)


def train(config: TrainConfig, *, model: MagNet | None = None) -> TrainResult:
    """Train a MagNet on ``config.data`` as ``config`` says (the Python API of ``magnet-zoo train``).

    ``model`` optionally gives the network to train (otherwise built from ``config.model`` with the
    recipe's and the run's ``model_overrides``); it is ignored when resuming, where the network comes from
    the saved state. Under ``torchrun`` call it on every rank: only rank 0 writes files.
    """
    if not config.data or not config.out:
        raise DataError("training on a slide CSV needs both data (the CSV) and out (the output folder)")
    config = dataclasses.replace(
        config,
        data=str(Path(config.data).resolve()),
        out=str(Path(config.out).resolve()),
        val_data=str(Path(config.val_data).resolve()) if config.val_data else None,
    )
    recipe = config.resolved_recipe()

    def build() -> MagNet:
        seed_everything(config.seed + int(os.environ.get("RANK", "0")))  # the same weights in every run
        return build_model(config.model, config.model_settings())

    network = model if model is not None else (None if config.resume else build())
    labels = (network.config if network is not None else _saved_config(config)).labels
    train_rows, val_rows = split_records(config, tuple(labels))
    data = SlideData(train_rows, backend=config.backend, num_workers=config.num_workers,
                     prefetch_factor=config.prefetch_factor)
    validator = None
    if val_rows:
        from magnet_zoo.train.exploration import mil_inference

        trees, policy = mil_inference(recipe) or (None, None)  # a tree_mil recipe validates as it is used
        validator = SlideValidator(val_rows, batch_size=config.eval_batch_size or config.micro_batch or 4,
                                   backend=config.backend, num_workers=config.num_workers,
                                   prefetch_factor=config.prefetch_factor, trees=trees, tree_policy=policy)
    card = {"training_data": f"slides listed in {Path(config.data).name}", "reproduce": _reproduce(config)}
    return fit(network, data, config, recipe, validator, build=build, card=card)


def _saved_config(config: TrainConfig) -> object:
    """The network config of the run being resumed (for its class names), or the default one."""
    from magnet_zoo.config import MagNetConfig

    path = Path(config.out) / "train_config.json"
    try:
        return MagNetConfig.from_dict(json.loads(path.read_text(encoding="utf-8"))["model"])
    except (OSError, KeyError, ValueError):
        return MagNetConfig()
