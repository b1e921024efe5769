"""A coarse view for slides without a small enough level (single-level SVS/TIFF, big PNGs).

The network's first read is the whole slide at 56x56 (and 112x112). On a pyramid that is a read of
the coarsest level; on a single-level 100k-pixel file it would decode every pixel, every time. This
wrapper computes a coarse level once, block by block (area averaging, so memory stays bounded), and
serves it as an extra level; all other reads pass through.
"""

from __future__ import annotations

import logging
import math
import threading

import numpy as np
from PIL import Image

from magnet_zoo.wsi.protocol import BaseSource, RegionSource

log = logging.getLogger(__name__)

COARSE_MAX_SIDE = 2048
"""Slides whose coarsest level is longer than this on its longer side get a computed coarse level."""
_BLOCK = 4096


def needs_coarse_level(source: RegionSource, max_side: int = COARSE_MAX_SIDE) -> bool:
    return max(source.level_dimensions[-1]) > max_side


class CoarseLevelSource(BaseSource):
    """``source`` plus one computed level whose longer side is at most ``max_side / 2``... ``max_side``."""

    def __init__(self, source: RegionSource, max_side: int = COARSE_MAX_SIDE) -> None:
        self.inner = source
        self._name = source.name
        base = source.level_count - 1
        bw, bh = source.level_dimensions[base]
        factor = 2 ** max(1, math.ceil(math.log2(max(bw, bh) / max_side)))
        self._base_level = base
        self._factor = factor
        cw, ch = -(-bw // factor), -(-bh // factor)
        w0, h0 = source.dimensions
        self._dims = (*source.level_dimensions, (cw, ch))
        self._downsamples = (*source.level_downsamples, ((w0 / cw) + (h0 / ch)) / 2)
        self._mpp = source.mpp
        self._coarse: np.ndarray | None = None
        self._lock = threading.Lock()

    @property
    def backend(self) -> str:
        return getattr(self.inner, "backend", type(self.inner).__name__)

    def _compute(self) -> np.ndarray:
        bw, bh = self.inner.level_dimensions[self._base_level]
        f = self._factor
        ds = self.inner.level_downsamples[self._base_level]
        cw, ch = self._dims[-1]
        out = np.zeros((ch, cw, 3), np.uint8)
        block = max(f, (_BLOCK // f) * f)
        log.info("%s: computing a %dx%d coarse view (1/%d of level %d)", self._name, cw, ch, f, self._base_level)
        for y in range(0, bh, block):
            for x in range(0, bw, block):
                w, h = min(block, bw - x), min(block, bh - y)
                px = self.inner.read_region((int(round(x * ds)), int(round(y * ds))), self._base_level, (w, h))
                small = np.asarray(Image.fromarray(np.ascontiguousarray(px[..., :3])).reduce(f))
                out[y // f : y // f + small.shape[0], x // f : x // f + small.shape[1]] = small
        return out

    def coarse_view(self) -> np.ndarray:
        with self._lock:
            if self._coarse is None:
                self._coarse = self._compute()
            return self._coarse

    def _read_level(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        if level < len(self._dims) - 1:
            ds = self._downsamples[level]
            return self.inner.read_region((int(round(x * ds)), int(round(y * ds))), level, (w, h))
        return self.coarse_view()[y : y + h, x : x + w]

    def close(self) -> None:
        self.inner.close()
