"""The region seam: how the network asks for pixels without knowing where they come from.

A MagNet decides where to look while it runs, so it cannot be fed a fixed tensor. Instead it calls a
:class:`RegionFetcher` with square boxes in level-0 pixel coordinates and an output size; the fetcher
chooses the pyramid level, reads, resizes and filters (``magnet_zoo.wsi`` implements it for slides and
in-memory arrays). Keeping this a protocol means ``magnet_zoo.nn`` imports no slide library.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class Square:
    """A square region in level-0 pixels: top-left ``(x, y)`` and ``side``; may extend past the slide."""

    x: float
    y: float
    side: float

    @property
    def centre(self) -> tuple[float, float]:
        return self.x + self.side / 2, self.y + self.side / 2


@dataclass
class Fetched:
    """The pixels of a batch of squares."""

    images: torch.Tensor
    """``(N, 3, size, size)`` float32 in ``[0, 1]``; outside the slide and grey pixels are black."""
    levels: list[int]
    """Pyramid level each square was read from."""
    pixels_read: int
    """Pixels decoded from the source at the levels read (the I/O cost)."""


@runtime_checkable
class RegionFetcher(Protocol):
    """What a MagNet needs from a slide."""

    @property
    def slide_size(self) -> tuple[int, int]:
        """Level-0 ``(width, height)``."""

    def fetch(self, squares: Sequence[Square], size: int) -> Fetched:
        """Read every square, resized to ``size x size``; reads may run concurrently."""
