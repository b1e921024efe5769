"""The settings of a training run (:class:`TrainConfig`) and the pieces that turn them into a network.

:class:`TrainConfig` is what ``magnet-zoo train`` parses its arguments into and what a resumed run
compares against the interrupted one; :func:`build_model` makes the network from ``TrainConfig.model``
(a registered name, a checkpoint folder or a hub repo).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from magnet_zoo.config import ConfigError, MagNetConfig
from magnet_zoo.nn.heads import Backbone
from magnet_zoo.nn.magnet import MagNet
from magnet_zoo.train.recipe import DEFAULT_RECIPE

MONITORS = ("auroc", "accuracy", "loss")
RESUME_FREE_FIELDS = frozenset(
    {"resume", "num_workers", "prefetch_factor", "progress", "threads", "device", "eval_batch_size", "tensorboard",
     "log_every"}
)
"""Settings a resumed run may change: they do not change what is computed."""


@dataclass
class TrainConfig:
    """Everything that defines a training run besides the network's weights: the data, the recipe (how the
    network learns: :mod:`magnet_zoo.train.recipe`, by name plus single-field overrides), and the run's
    length, machine and files. ``magnet-zoo train`` parses its arguments into one."""

    data: str | None = None
    """CSV of slides (``path,label[,category][,split]``); ``None`` when the caller passes a data source."""
    out: str | None = None
    """Output folder (``None``: nothing written, no resume; the best weights are kept in memory)."""
    model: str = "magnet3_inception_v3"
    """A registered name, a checkpoint folder or a hub repo (``org/name``) to fine-tune."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """:class:`~magnet_zoo.config.MagNetConfig` fields to change, on top of the recipe's ``model_overrides``."""
    recipe: str = DEFAULT_RECIPE
    """A registered recipe (``magnet-zoo train --list-recipes``)."""
    recipe_overrides: dict[str, Any] = field(default_factory=dict)
    """Single recipe fields to change, e.g. ``{"lr": 1e-4, "revive_at": []}``."""
    val_data: str | None = None
    """Validation CSV; otherwise the CSV's ``split`` column, otherwise a stratified ``val_fraction``."""
    val_fraction: float = 0.2
    epochs: int | None = None
    """Passes over the training slides (``None``: the recipe's)."""
    steps: int | None = None
    """Optimizer steps, instead of epochs (``None``: the recipe's, if it has any)."""
    time_limit: float | None = None
    """Wall-clock seconds; the schedules follow the clock when it runs out first (progress = the larger of
    steps done / planned and seconds used / limit), and the run stops at it."""
    micro_batch: int | None = None
    """Slides per forward pass per process; ``None``: ``batch_size / world_size`` (no accumulation)."""
    eval_batch_size: int | None = None
    eval_every: int = 0
    """Validate every this many optimizer steps (0: at the end of every epoch, or of the run)."""
    monitor: str = "auroc"
    """Validation score that picks ``best`` and drives early stopping: ``auroc`` (ties and NaN fall back to
    the loss), ``accuracy`` or ``loss``."""
    patience: int | None = None
    """Stop after this many validations without a better ``monitor`` score (``None``: never)."""
    amp: str = "auto"
    device: str = "auto"
    num_workers: int = 2
    """DataLoader worker processes that open slides and read their whole-slide views ahead."""
    prefetch_factor: int = 2
    seed: int = 0
    save_every: int = 25
    """Optimizer steps between resume states between validations (0: at validations only)."""
    baseline_eval: bool = True
    """Validate the untrained model first (row ``step 0`` of the metrics)."""
    activation_checkpointing: bool = False
    """Recompute the backbones' activations in the backward pass (less memory, more time)."""
    backend: str = "auto"
    threads: int | None = None
    resume: bool = False
    progress: bool = True
    log_every: int = 10
    """Optimizer steps between training-loss log rows (0: none)."""
    tensorboard: bool = True
    """Write TensorBoard event files to ``OUT/tensorboard`` when the ``tensorboard`` package is installed."""

    def __post_init__(self) -> None:
        for name in ("epochs", "steps", "micro_batch", "eval_batch_size", "patience"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.time_limit is not None and self.time_limit <= 0:
            raise ConfigError(f"time_limit must be > 0 seconds, got {self.time_limit}")
        if self.monitor not in MONITORS:
            raise ConfigError(f"monitor must be one of {', '.join(MONITORS)}, got {self.monitor!r}")
        for name in ("save_every", "eval_every", "log_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    def resolved_recipe(self) -> Any:
        """The :class:`~magnet_zoo.train.recipe.Recipe` this run trains with."""
        from magnet_zoo.train.recipe import get_recipe

        return get_recipe(self.recipe, **self.recipe_overrides)

    def model_settings(self) -> dict[str, Any]:
        """MagNetConfig overrides the run builds its network with: the recipe's, then the run's own."""
        return {**self.resolved_recipe().model_overrides, **self.model_overrides}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def default_batch_size(config: MagNetConfig) -> int:
    """The paper's batch: 16 slides for up to three magnifying layers, 8 for four or more."""
    return 16 if config.num_layers <= 3 else 8


def build_model(name: str, overrides: Mapping[str, Any] | None = None) -> MagNet:
    """A registered model (``create_model``), or a checkpoint folder / hub repo to fine-tune.

    For a checkpoint, ``overrides`` may change settings that keep the weights' shapes (sampler, scale
    bounds, loss terms, ...).
    """
    from magnet_zoo.registry import UnknownModelError, resolve

    overrides = dict(overrides or {})
    is_registered = True
    try:
        resolve(name)
    except UnknownModelError:
        is_registered = False
    if is_registered and not Path(name).is_dir():
        from magnet_zoo.factory import create_model

        return create_model(name, **overrides)
    from magnet_zoo.hub import load_pretrained

    model = load_pretrained(name)
    if not overrides:
        return model.train()
    rebuilt = MagNet(model.config.replace(**overrides, backbone_pretrained=False))
    try:
        rebuilt.load_state_dict(model.state_dict(), strict=True)
    except RuntimeError as exc:
        raise ConfigError(
            f"--model-override {', '.join(sorted(overrides))} changes the shape of {name}'s network, so its "
            f"weights no longer fit; fine-tune without it or train a registered model from scratch ({exc})"
        ) from exc
    return rebuilt.train()


def set_activation_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Turn activation checkpointing of every timm backbone on or off; returns how many were set."""
    count = 0
    for module in model.modules():
        if isinstance(module, Backbone):
            module.checkpointing = enabled
            count += 1
    return count


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - seeds the legacy global RNG that third-party code uses
    torch.manual_seed(seed)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(items: list[str] | None, flag: str = "--model-override") -> dict[str, Any]:
    """``["sampler=bilinear", "patches=[2,2]", "max_scale=0.4"]`` -> a dict (values parsed as JSON when possible)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = _parse_value(value.strip())
    return out
