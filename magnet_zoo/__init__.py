"""magnet_zoo: Magnifying Networks (MagNets) for whole-slide images.

>>> import magnet_zoo
>>> model = magnet_zoo.create_model("magnet3_inception_v3", backbone_pretrained=False)
>>> pred = magnet_zoo.predict_slide(model, magnet_zoo.ArraySource(rgb_array))

Top-level names are imported lazily, so ``import magnet_zoo.nn`` loads neither the slide readers
nor anything above the network.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "CONFIG_VERSION": "magnet_zoo.config",
    "ConfigError": "magnet_zoo.config",
    "MagNetConfig": "magnet_zoo.config",
    "BackboneWeightsUnavailableError": "magnet_zoo.factory",
    "create_model": "magnet_zoo.factory",
    "load_pretrained": "magnet_zoo.hub.pretrained",
    "push_to_hub": "magnet_zoo.hub.remote",
    "save_pretrained": "magnet_zoo.hub.checkpoint",
    "Prediction": "magnet_zoo.infer.predict",
    "predict_slide": "magnet_zoo.infer.predict",
    "MagNet": "magnet_zoo.nn.magnet",
    "MagNetOutput": "magnet_zoo.nn.magnet",
    "UnknownModelError": "magnet_zoo.registry",
    "get_config": "magnet_zoo.registry",
    "list_models": "magnet_zoo.registry",
    "ArraySource": "magnet_zoo.wsi.array_source",
    "SlideFetcher": "magnet_zoo.wsi.fetch",
    "open_slide": "magnet_zoo.wsi.open",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'magnet_zoo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
