"""The slide source protocol every backend implements, in openslide's conventions.

Locations are ``(x, y)`` in level-0 pixels, sizes ``(w, h)`` in pixels of the level read, arrays are
``(h, w, 3)`` uint8 RGB. Parts of a region outside the slide are black. (Row/column order is converted
exactly once, inside each backend adapter.)
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from magnet_zoo.wsi.errors import SlideError, UnreadableRegionError

__all__ = ["BaseSource", "RegionSource", "SlideError", "UnreadableRegionError"]


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


class BaseSource:
    """Shared machinery for backends: clipping, black padding and the context manager.

    A backend implements :meth:`_read_level` for a rectangle that lies *inside* the level, in that
    level's own pixel coordinates; :meth:`read_region` converts from level-0 ``(x, y)``, clips to the
    level and pads the rest with black, once for every backend.
    """

    _name: str = "slide"
    _dims: tuple[tuple[int, int], ...] = ()
    _downsamples: tuple[float, ...] = ()
    _mpp: tuple[float, float] | None = None

    @property
    def name(self) -> str:
        return self._name

    @property
    def level_count(self) -> int:
        return len(self._dims)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._dims

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._downsamples

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._dims[0]

    @property
    def mpp(self) -> tuple[float, float] | None:
        return self._mpp

    def _read_level(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        raise NotImplementedError

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self._name}: level {level} does not exist (levels 0..{self.level_count - 1})")
        w, h = int(size[0]), int(size[1])
        if w < 0 or h < 0:
            raise ValueError(f"size must be non-negative, got {size}")
        ds = self._downsamples[level]
        x = int(round(location[0] / ds))
        y = int(round(location[1] / ds))
        lw, lh = self._dims[level]
        out = np.zeros((h, w, 3), dtype=np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, lw), min(y + h, lh)
        if x1 > x0 and y1 > y0:
            pixels = self._read_level(x0, y0, x1 - x0, y1 - y0, level)
            out[y0 - y : y1 - y, x0 - x : x1 - x] = pixels[..., :3]
        return out

    def close(self) -> None:
        """Release file handles (idempotent)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self._name!r}, dimensions={self.dimensions}, levels={self.level_count}, "
            f"mpp={self._mpp})"
        )
