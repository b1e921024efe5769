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

MONITORS = ("auroc", "accuracy", "loss")
RESUME_FREE_FIELDS = frozenset(
    {"resume", "num_workers", "prefetch_factor", "progress", "threads", "device", "eval_batch_size"}
)
"""Settings a resumed run may change: they do not change what is computed."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (see the module docstring for the recipe)."""

    data: str
    """CSV of slides (``path,label[,category][,split]``)."""
    out: str
    """Output folder."""
    model: str = "magnet3_inception_v3"
    """A registered name, a checkpoint folder or a hub repo (``org/name``) to fine-tune."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """:class:`~magnet_zoo.config.MagNetConfig` fields to change, e.g. ``{"sampler": "bilinear"}``."""
    val_data: str | None = None
    """Validation CSV; otherwise the CSV's ``split`` column, otherwise a stratified ``val_fraction``."""
    val_fraction: float = 0.2
    epochs: int = 200
    lr: float = 3e-5
    weight_decay: float = 0.0
    min_lr: float = 0.0
    """Floor of the cosine annealing."""
    batch_size: int | None = None
    """Slides per optimizer step over all processes; ``None``: 16 up to three layers, 8 for four or more."""
    micro_batch: int | None = None
    """Slides per forward pass per process; ``None``: ``batch_size / world_size`` (no accumulation)."""
    eval_batch_size: int | None = None
    grad_clip: float | None = None
    augment: bool = True
    """D4 augmentation (flips and quarter turns) of the whole slide."""
    amp: str = "auto"
    device: str = "auto"
    num_workers: int = 2
    """DataLoader worker processes that open slides and read their whole-slide views ahead."""
    prefetch_factor: int = 2
    seed: int = 0
    save_every: int = 25
    """Optimizer steps between resume states within an epoch (0: at epoch ends only)."""
    monitor: str = "auroc"
    """Validation score that picks ``best``: ``auroc`` (ties and NaN fall back to the loss), ``accuracy``
    or ``loss``."""
    baseline_eval: bool = True
    """Validate the untrained model first (row ``epoch 0`` of the metrics)."""
    activation_checkpointing: bool = False
    """Recompute the backbones' activations in the backward pass (less memory, more time)."""
    backend: str = "auto"
    threads: int | None = None
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        for name in ("batch_size", "micro_batch", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.monitor not in MONITORS:
            raise ConfigError(f"monitor must be one of {', '.join(MONITORS)}, got {self.monitor!r}")
        if self.save_every < 0:
            raise ConfigError(f"save_every must be >= 0, got {self.save_every}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

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


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["sampler=bilinear", "patches=[2,2]", "max_scale=0.4"]`` -> a dict (values parsed as JSON when possible)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--model-override expects KEY=VALUE, got {item!r}")
        out[key.strip()] = _parse_value(value.strip())
    return out


