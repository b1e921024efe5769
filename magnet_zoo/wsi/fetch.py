"""Reading for the network: square ROI -> level -> area resize -> black outside the slide -> grey filter.

:class:`SlideFetcher` implements :class:`magnet_zoo.nn.fetcher.RegionFetcher` over any
:class:`~magnet_zoo.wsi.protocol.RegionSource`. Only the part of a square that overlaps the slide is
read (a ROI hanging off the edge costs nothing extra); all squares of one call are read concurrently.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from magnet_zoo.nn.fetcher import Fetched, Square
from magnet_zoo.wsi.grey import grey_filter
from magnet_zoo.wsi.levels import select_level
from magnet_zoo.wsi.protocol import RegionSource

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def default_workers() -> int:
    return min(16, (os.cpu_count() or 2) * 2)


def shared_pool() -> ThreadPoolExecutor:
    """One process-wide thread pool for region reads (decoders release the GIL)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=default_workers(), thread_name_prefix="magnet-read")
        return _POOL


def read_square(source: RegionSource, square: Square, size: int, level: int) -> tuple[np.ndarray, int]:
    """``(size, size, 3)`` uint8 pixels of ``square`` from ``level``, and the pixels decoded.

    Area resize (PIL's box filter over the exact, sub-pixel source box) of the part that overlaps the
    slide, pasted at its place in a black canvas.
    """
    ds = float(source.level_downsamples[level])
    lw, lh = source.level_dimensions[level]
    lx, ly, lside = square.x / ds, square.y / ds, square.side / ds
    k = size / lside  # output pixels per level pixel
    out = np.zeros((size, size, 3), dtype=np.uint8)
    # Output pixels that see any part of the slide.
    ox0 = max(0, math.floor((0 - lx) * k))
    oy0 = max(0, math.floor((0 - ly) * k))
    ox1 = min(size, math.ceil((lw - lx) * k))
    oy1 = min(size, math.ceil((lh - ly) * k))
    if ox1 <= ox0 or oy1 <= oy0:
        return out, 0
    # Their source box in level pixels, and the integer region covering it.
    sx0, sy0 = lx + ox0 / k, ly + oy0 / k
    sx1, sy1 = lx + ox1 / k, ly + oy1 / k
    rx0, ry0 = math.floor(sx0), math.floor(sy0)
    rx1, ry1 = max(math.ceil(sx1), rx0 + 1), max(math.ceil(sy1), ry0 + 1)
    region = source.read_region((round(rx0 * ds), round(ry0 * ds)), level, (rx1 - rx0, ry1 - ry0))
    img = Image.fromarray(np.ascontiguousarray(region[..., :3]))
    box = (sx0 - rx0, sy0 - ry0, sx1 - rx0, sy1 - ry0)
    resized = img.resize((ox1 - ox0, oy1 - oy0), Image.Resampling.BOX, box=box)
    out[oy0:oy1, ox0:ox1] = np.asarray(resized)
    return out, (rx1 - rx0) * (ry1 - ry0)


class SlideFetcher:
    """Feeds a MagNet from a slide source: the network's only door to pixels.

    ``grey_threshold`` is the paper's grey filter (15); ``executor`` runs the reads of one call
    concurrently (a shared thread pool by default; pass ``None``-equivalent ``serial=True`` to read one
    by one, e.g. for benchmarks).
    """

    def __init__(
        self,
        source: RegionSource,
        grey_threshold: int = 15,
        *,
        executor: Executor | None = None,
        serial: bool = False,
    ) -> None:
        self.source = source
        self.grey_threshold = grey_threshold
        self._executor = executor
        self.serial = serial

    @property
    def slide_size(self) -> tuple[int, int]:
        w, h = self.source.dimensions
        return int(w), int(h)

    def level_for(self, square: Square, size: int) -> int:
        return select_level(self.source.level_downsamples, square.side, size)

    def _one(self, square: Square, size: int) -> tuple[np.ndarray, int, int]:
        level = self.level_for(square, size)
        pixels, read = read_square(self.source, square, size, level)
        grey_filter(pixels, self.grey_threshold)
        return pixels, level, read

    def fetch(self, squares: Sequence[Square], size: int) -> Fetched:
        if self.serial or len(squares) == 1:
            results = [self._one(sq, size) for sq in squares]
        else:
            pool = self._executor or shared_pool()
            results = list(pool.map(lambda sq: self._one(sq, size), squares))
        stack = np.stack([r[0] for r in results])
        images = torch.from_numpy(stack).permute(0, 3, 1, 2).float().div_(255)
        return Fetched(images=images, levels=[r[1] for r in results], pixels_read=sum(r[2] for r in results))


def as_fetcher(obj: object, grey_threshold: int = 15) -> SlideFetcher:
    """A :class:`SlideFetcher` for a fetcher, a source or a numpy image."""
    if isinstance(obj, SlideFetcher):
        return obj
    if isinstance(obj, np.ndarray):
        from magnet_zoo.wsi.array_source import ArraySource

        return SlideFetcher(ArraySource(obj), grey_threshold)
    if isinstance(obj, RegionSource):
        return SlideFetcher(obj, grey_threshold)
    raise TypeError(
        f"expected a slide source (e.g. magnet_zoo.ArraySource or magnet_zoo.open_slide(path)), "
        f"a SlideFetcher or an RGB numpy array, got {type(obj).__name__}"
    )
