"""MagNet building blocks, tensors only (no slide library is imported here).

``branch`` (the paper's Branch, grouped), ``attention`` (entmax-1.5 -> affine), ``sampler`` (bilinear and
linearized multi-sampling), ``magnify`` (a magnifying layer), ``heads`` (classifier and auxiliary
heads), ``losses``, ``tree`` (ROI names and geometry), ``fetcher`` (the region seam), ``magnet``.
"""

from magnet_zoo.nn.attention import Affine, attention_to_affine
from magnet_zoo.nn.fetcher import Fetched, RegionFetcher, Square
from magnet_zoo.nn.losses import LossTerms, magnet_loss
from magnet_zoo.nn.magnet import MagNet, MagNetOutput
from magnet_zoo.nn.tree import RoiNode

__all__ = [
    "Affine",
    "Fetched",
    "LossTerms",
    "MagNet",
    "MagNetOutput",
    "RegionFetcher",
    "RoiNode",
    "Square",
    "attention_to_affine",
    "magnet_loss",
]
