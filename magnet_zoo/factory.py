"""Build registered MagNets: ``create_model`` joins the registry (data) and the network (``nn``)."""

from __future__ import annotations

from typing import Any

from magnet_zoo.nn.magnet import MagNet
from magnet_zoo.registry import get_config


def create_model(name: str, **overrides: Any) -> MagNet:
    """Build a registered MagNet, timm style.

    ``overrides`` are :class:`~magnet_zoo.config.MagNetConfig` fields, e.g.
    ``create_model("magnet3_inception_v3", backbone_pretrained=False)`` builds it without
    downloading ImageNet weights.
    """
    return MagNet(get_config(name, **overrides))
