"""The slide source protocol every backend implements, in openslide's conventions.

Locations are ``(x, y)`` in level-0 pixels, sizes ``(w, h)`` in pixels of the level read, arrays are
``(h, w, 3)`` uint8 RGB. Parts of a region outside the slide are black. (Row/column order is converted
exactly once, inside each backend adapter.)
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


class SlideError(Exception):
    """Base class of every slide-reading error magnet_zoo raises."""


class UnreadableRegionError(SlideError):
    """A region could not be read from an otherwise open slide."""


@runtime_checkable
class RegionSource(Protocol):
    """A slide (or any large image) that can be read region by region at several resolutions."""

    @property
    def name(self) -> str:
        """A human-readable name (the file path for files), used in messages and outputs."""

    @property
    def level_count(self) -> int: ...

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """``(width, height)`` of every level, finest first."""

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample factor of every level relative to level 0 (1.0 first)."""

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)``."""

    @property
    def mpp(self) -> tuple[float, float] | None:
        """Microns per pixel ``(x, y)`` at level 0, or ``None`` when the file does not say."""

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Pixels of ``size`` ``(w, h)`` at ``level`` whose top-left is ``location`` in level-0 pixels."""

    def close(self) -> None: ...
