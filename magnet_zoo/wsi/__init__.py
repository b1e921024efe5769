"""Slide reading: the source protocol, level selection, the grey filter and the network's fetcher.

Backends for slide files are imported lazily, only when a file is opened.
"""

from magnet_zoo.wsi.array_source import ArraySource, InvalidImageError
from magnet_zoo.wsi.coarse import CoarseLevelSource
from magnet_zoo.wsi.errors import (
    BackendUnavailableError,
    CorruptSlideError,
    ImplausibleSlideError,
    SlideNotFoundError,
    UnsupportedFormatError,
)
from magnet_zoo.wsi.fetch import SlideFetcher, as_fetcher, read_square
from magnet_zoo.wsi.grey import grey_filter
from magnet_zoo.wsi.levels import paper_level, select_level
from magnet_zoo.wsi.open import SlideCache, open_slide
from magnet_zoo.wsi.orient import OrientedSource
from magnet_zoo.wsi.protocol import BaseSource, RegionSource, SlideError, UnreadableRegionError

__all__ = [
    "ArraySource",
    "BackendUnavailableError",
    "BaseSource",
    "CoarseLevelSource",
    "CorruptSlideError",
    "ImplausibleSlideError",
    "OrientedSource",
    "SlideCache",
    "SlideNotFoundError",
    "UnsupportedFormatError",
    "open_slide",
    "InvalidImageError",
    "RegionSource",
    "SlideError",
    "SlideFetcher",
    "UnreadableRegionError",
    "as_fetcher",
    "grey_filter",
    "paper_level",
    "read_square",
    "select_level",
]
