"""Where a prediction came from: the model (name, revision, weights hash), magnet_zoo's version and the
settings, written into every output and used to decide what a rerun may skip.

A cohort run's *run key* is a hash of everything that changes a slide's result: the weights, the network
config and the prediction settings (threshold, backend). Two runs with the same key give the same
numbers, so a rerun skips slides whose JSON carries that key and predicts the others again; another
model, another revision or another threshold is new work.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch

import magnet_zoo

SOURCE_ATTR = "pretrained_source"
"""Attribute ``load_pretrained`` sets on the models it returns: what was asked for and what was loaded."""


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of the model's state (names, dtypes, shapes and bytes, in name order).

    The same weights give the same hash whatever file, folder or device they came from.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _sha256_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def model_identity(model: torch.nn.Module) -> dict[str, Any]:
    """``name`` (what was asked for), ``source`` (registered / folder / hub / in-memory), ``revision``
    (the Hub commit), ``path``, ``weights_sha256`` and ``config_sha256`` of ``model``."""
    source: Mapping[str, Any] = getattr(model, SOURCE_ATTR, None) or {}
    config = model.config.to_dict() if hasattr(model, "config") else {}
    return {
        "name": source.get("name"),
        "source": source.get("source", "in-memory"),
        "revision": source.get("revision"),
        "path": source.get("path"),
        "weights_sha256": weights_sha256(model),
        "config_sha256": _sha256_json(config),
    }


def provenance(model: torch.nn.Module, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The provenance block of an output: magnet_zoo version, model identity, settings and run key."""
    identity = model_identity(model)
    return {
        "magnet_zoo_version": magnet_zoo.__version__,
        "torch_version": torch.__version__,
        "model": identity,
        "settings": dict(settings),
        "run_key": run_key(identity, settings),
    }


def run_key(identity: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """16 hex digits naming the weights, the network config and the settings that shape the result."""
    keyed = {
        "weights": identity["weights_sha256"],
        "config": identity["config_sha256"],
        "settings": dict(settings),
    }
    return _sha256_json(keyed)[:16]
