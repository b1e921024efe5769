"""Checkpoints and the Hugging Face Hub: save, load and push MagNets; model cards.

A checkpoint is a folder with ``config.json`` (config version, magnet_zoo version, network config,
I/O contract), ``model.safetensors`` and ``README.md`` (the model card). Loading is strict and never
unpickles.

Names are imported lazily: ``from magnet_zoo.hub import CheckpointError`` loads neither torch nor
huggingface_hub, and huggingface_hub is imported only when a Hub function runs.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CARD_TEMPLATE": "magnet_zoo.hub.card",
    "CardData": "magnet_zoo.hub.card",
    "render_card": "magnet_zoo.hub.card",
    "CARD_NAME": "magnet_zoo.hub.checkpoint",
    "CONFIG_NAME": "magnet_zoo.hub.checkpoint",
    "WEIGHTS_NAME": "magnet_zoo.hub.checkpoint",
    "io_contract": "magnet_zoo.hub.checkpoint",
    "load_checkpoint_dir": "magnet_zoo.hub.checkpoint",
    "read_checkpoint_config": "magnet_zoo.hub.checkpoint",
    "save_pretrained": "magnet_zoo.hub.checkpoint",
    "CheckpointError": "magnet_zoo.hub.errors",
    "CheckpointMismatchError": "magnet_zoo.hub.errors",
    "CheckpointNotFoundError": "magnet_zoo.hub.errors",
    "HubError": "magnet_zoo.hub.errors",
    "InvalidRepoIdError": "magnet_zoo.hub.errors",
    "NoPretrainedWeightsError": "magnet_zoo.hub.errors",
    "UnsupportedCheckpointVersionError": "magnet_zoo.hub.errors",
    "load_pretrained": "magnet_zoo.hub.pretrained",
    "models_with_weights": "magnet_zoo.hub.pretrained",
    "download_checkpoint": "magnet_zoo.hub.remote",
    "parse_repo_spec": "magnet_zoo.hub.remote",
    "push_to_hub": "magnet_zoo.hub.remote",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'magnet_zoo.hub' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
