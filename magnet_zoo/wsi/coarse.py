"""Coarse views for every slide: a few small levels computed once, so zoomed-out reads stay cheap.

The network's first reads are the whole slide at 56x56 and 112x112, and its first ROIs are large. A
read costs the pixels of the level it comes from, and scanners stop their pyramids at 1-3k pixels (a
single-level SVS has no pyramid at all): a 56x56 view would decode millions of pixels, every time.
This wrapper computes, once per open slide, extra levels below the coarsest one — the first by block-wise
area averaging (bounded memory, even from a 100k-pixel single level), then by halving — down to about
``smallest`` pixels, and serves them as ordinary levels. Other reads pass through unchanged.
"""

from __future__ import annotations

import logging
import math
import threading

import numpy as np
from PIL import Image

from magnet_zoo.wsi.array_source import area_halve
from magnet_zoo.wsi.protocol import BaseSource, RegionSource

log = logging.getLogger(__name__)

COARSE_FROM = 512
"""Slides whose coarsest level is longer than this (on its longer side) get computed coarse levels."""
FIRST_MAX_SIDE = 2048
"""The first computed level is at most this long: it is read from the slide's coarsest level."""
SMALLEST = 256
_BLOCK = 4096


def needs_coarse_level(source: RegionSource, threshold: int = COARSE_FROM) -> bool:
    return max(source.level_dimensions[-1]) > threshold


class CoarseLevelSource(BaseSource):
    """``source`` plus computed coarse levels (see module docstring)."""

    def __init__(self, source: RegionSource, *, first_max_side: int = FIRST_MAX_SIDE, smallest: int = SMALLEST) -> None:
        self.inner = source
        self._name = source.name
        self._base_level = source.level_count - 1
        bw, bh = source.level_dimensions[self._base_level]
        self._factor = 2 ** max(1, math.ceil(math.log2(max(bw, bh) / first_max_side)))
        dims = [(-(-bw // self._factor), -(-bh // self._factor))]
        while max(dims[-1]) > smallest and min(dims[-1]) > 1:
            w, h = dims[-1]
            dims.append((max(w // 2, 1), max(h // 2, 1)))
        w0, h0 = source.dimensions
        self._inner_levels = source.level_count
        self._dims = (*source.level_dimensions, *dims)
        self._downsamples = (*source.level_downsamples, *(((w0 / w) + (h0 / h)) / 2 for w, h in dims))
        self._mpp = source.mpp
        self._views: list[np.ndarray] | None = None
        self._lock = threading.Lock()

    @property
    def backend(self) -> str:
        return getattr(self.inner, "backend", type(self.inner).__name__)

    def _first_view(self) -> np.ndarray:
        bw, bh = self.inner.level_dimensions[self._base_level]
        f = self._factor
        ds = self.inner.level_downsamples[self._base_level]
        cw, ch = self._dims[self._inner_levels]
        out = np.zeros((ch, cw, 3), np.uint8)
        block = max(f, (_BLOCK // f) * f)
        log.debug("%s: computing coarse views (1/%d of level %d)", self._name, f, self._base_level)
        for y in range(0, bh, block):
            for x in range(0, bw, block):
                w, h = min(block, bw - x), min(block, bh - y)
                px = self.inner.read_region((int(round(x * ds)), int(round(y * ds))), self._base_level, (w, h))
                small = np.asarray(Image.fromarray(np.ascontiguousarray(px[..., :3])).reduce(f))
                out[y // f : y // f + small.shape[0], x // f : x // f + small.shape[1]] = small
        return out

    def coarse_views(self) -> list[np.ndarray]:
        """The computed levels, finest first (computed on first use, then kept)."""
        with self._lock:
            if self._views is None:
                views = [self._first_view()]
                for w, h in self._dims[self._inner_levels + 1 :]:
                    views.append(area_halve(views[-1])[:h, :w])
                self._views = views
            return self._views

    def coarse_view(self) -> np.ndarray:
        return self.coarse_views()[0]

    def _read_level(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        if level < self._inner_levels:
            ds = self._downsamples[level]
            return self.inner.read_region((int(round(x * ds)), int(round(y * ds))), level, (w, h))
        return self.coarse_views()[level - self._inner_levels][y : y + h, x : x + w]

    def close(self) -> None:
        self.inner.close()
