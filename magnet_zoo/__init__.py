"""magnet_zoo: Magnifying Networks (MagNets) for whole-slide images.

>>> import magnet_zoo
>>> model = magnet_zoo.create_model("magnet3_inception_v3", backbone_pretrained=False)
>>> pred = magnet_zoo.predict_slide(model, magnet_zoo.ArraySource(rgb_array))
"""

from magnet_zoo.config import CONFIG_VERSION, ConfigError, MagNetConfig
from magnet_zoo.factory import create_model
from magnet_zoo.infer.predict import Prediction, predict_slide
from magnet_zoo.nn.magnet import MagNet, MagNetOutput
from magnet_zoo.registry import UnknownModelError, get_config, list_models
from magnet_zoo.wsi.array_source import ArraySource
from magnet_zoo.wsi.fetch import SlideFetcher

__version__ = "0.1.0"

__all__ = [
    "CONFIG_VERSION",
    "ArraySource",
    "ConfigError",
    "MagNet",
    "MagNetConfig",
    "MagNetOutput",
    "Prediction",
    "SlideFetcher",
    "UnknownModelError",
    "__version__",
    "create_model",
    "get_config",
    "list_models",
    "predict_slide",
]
