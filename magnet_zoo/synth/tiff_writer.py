"""Streaming writer of tiled JPEG pyramidal TIFFs that OpenSlide reads as ``generic-tiff``.

The whole slide never lives in memory. Level 0 is produced one row of tiles at a time by a callback,
in a thread pool (NumPy copies and libjpeg encoding release the GIL), and handed to tifffile as
already-encoded tiles. While level 0 streams to disk, every lower level is built from the level above
by 2 x 2 area averaging, tile by tile, and its encoded tiles are spooled to a temporary file; they are
written after level 0, each level as its own top-level TIFF page (OpenSlide's generic TIFF driver
walks the main IFD chain, not SubIFDs), marked as reduced-resolution images.

Two size tricks: tiles share one JPEGTables tag (quantisation and Huffman tables stored once, not in
every tile), and background tiles, which are most of a slide, are one pre-encoded blank tile (with
its own tiny optimised Huffman tables) written wherever a tile is empty.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

MAX_COARSEST = 2048
"""Levels halve until the coarsest level's longer side is at most this many pixels."""

_SOI, _EOI, _SOS, _DQT, _DHT = b"\xff\xd8", b"\xff\xd9", b"\xff\xda", b"\xff\xdb", b"\xff\xc4"

Halves = list["np.ndarray | None"]
"""Half-resolution versions of one row of tiles (``None`` for background)."""


def _segments(jpeg: bytes) -> tuple[list[bytes], bytes]:
    """Split a JPEG stream into its marker segments before the scan, and the scan itself (SOS..EOI)."""
    if jpeg[:2] != _SOI:
        raise ValueError("not a JPEG stream")
    segments = []
    i = 2
    while i + 4 <= len(jpeg):
        marker = jpeg[i : i + 2]
        if marker == _SOS:
            return segments, jpeg[i:]
        length = int.from_bytes(jpeg[i + 2 : i + 4], "big")
        segments.append(jpeg[i : i + 2 + length])
        i += 2 + length
    raise ValueError("JPEG stream has no scan")


def _is_table(segment: bytes) -> bool:
    return segment[:2] in (_DQT, _DHT)


def _is_app(segment: bytes) -> bool:
    return 0xE0 <= segment[1] <= 0xEF


class JpegEncoder:
    """Encodes RGB tiles as YCbCr 4:2:0 baseline JPEG, the flavour TIFF readers handle best.

    ``tables`` is the JPEGTables tag value; encoded tiles omit those tables (abbreviated streams).
    libjpeg(-turbo) through imagecodecs, which tifffile needs anyway to write JPEG-compressed TIFFs;
    every tile's tables are checked against ``tables``.
    """

    def __init__(self, quality: int, tile: int) -> None:
        if not 1 <= quality <= 100:
            raise ValueError(f"quality must be in [1, 100], got {quality}")
        try:
            import imagecodecs
        except ImportError as err:
            raise ImportError(
                "writing JPEG TIFFs needs the 'imagecodecs' package: pip install imagecodecs"
            ) from err
        self.quality = quality
        self._encoder = imagecodecs.jpeg8_encode
        probe = np.random.default_rng(0).integers(0, 256, (tile, tile, 3), dtype=np.uint8)
        segments, _ = _segments(self._encode_full(probe))
        self.tables = _SOI + b"".join(s for s in segments if _is_table(s)) + _EOI

    def _encode_full(self, tile: np.ndarray, optimize: bool = False) -> bytes:
        return bytes(
            self._encoder(
                tile,
                level=self.quality,
                colorspace="RGB",
                outcolorspace="YCBCR",
                subsampling=(2, 2),
                optimize=optimize,
            )
        )

    def encode(self, tile: np.ndarray) -> bytes:
        """An abbreviated stream (no tables) for one tile."""
        segments, scan = _segments(self._encode_full(tile))
        tables = _SOI + b"".join(s for s in segments if _is_table(s)) + _EOI
        if tables != self.tables:
            raise RuntimeError("the JPEG encoder produced tables that differ from the JPEGTables tag")
        return _SOI + b"".join(s for s in segments if not _is_table(s) and not _is_app(s)) + scan

    def encode_uniform(self, tile: np.ndarray) -> bytes:
        """A stream for a flat tile, with its own optimised Huffman tables (a few hundred bytes)."""
        segments, scan = _segments(self._encode_full(tile, optimize=True))
        return _SOI + b"".join(s for s in segments if s[:2] != _DQT and not _is_app(s)) + scan


def downsample2(tile: np.ndarray) -> np.ndarray:
    """2 x 2 area average of an (H, W, 3) uint8 tile with even H and W, rounded to nearest."""
    t = tile.astype(np.uint16)
    total = t[0::2, 0::2] + t[1::2, 0::2] + t[0::2, 1::2] + t[1::2, 1::2] + 2
    return (total >> 2).astype(np.uint8)


def level_sizes(width: int, height: int, max_coarsest: int = MAX_COARSEST) -> list[tuple[int, int]]:
    """Level sizes: halving (rounding up) until the longer side is at most ``max_coarsest``."""
    sizes = [(width, height)]
    while max(sizes[-1]) > max_coarsest:
        w, h = sizes[-1]
        sizes.append(((w + 1) // 2, (h + 1) // 2))
    return sizes


class _Spool:
    """Encoded tiles of the lower levels, parked in a temporary file until their page is written."""

    def __init__(self, directory: Path) -> None:
        self._file = tempfile.TemporaryFile(dir=directory, prefix=".synth-spool-")
        self._end = 0

    def put(self, data: bytes) -> tuple[int, int]:
        self._file.seek(self._end)
        self._file.write(data)
        entry = (self._end, len(data))
        self._end += len(data)
        return entry

    def get(self, entry: tuple[int, int]) -> bytes:
        self._file.seek(entry[0])
        return self._file.read(entry[1])

    def close(self) -> None:
        self._file.close()


@dataclass
class _Level:
    """Build state of one lower level: its spooled tiles so far and a pending upper half row."""

    cols: int
    tiles: list[tuple[int, int] | None] = field(default_factory=list)
    top: Halves | None = None


class _Cascade:
    """Builds levels 1.. from the half-resolution tiles of the level above as their rows arrive."""

    def __init__(
        self,
        sizes: Sequence[tuple[int, int]],
        tile: int,
        encoder: JpegEncoder,
        background: np.ndarray,
        spool: _Spool,
    ) -> None:
        self.tile = tile
        self.encoder = encoder
        self.background = background
        self.spool = spool
        self.rows = [math.ceil(h / tile) for _, h in sizes]
        self.levels = [_Level(math.ceil(w / tile)) for w, _ in sizes[1:]]

    def feed(self, level: int, row: int, halves: Halves) -> None:
        """Take row ``row`` of level ``level - 1`` (as half tiles); build a row of ``level`` when ready."""
        if level > len(self.levels):
            return
        state = self.levels[level - 1]
        last = row == self.rows[level - 1] - 1
        if row % 2 == 0 and not last:
            state.top = halves
            return
        top, bottom = (state.top, halves) if row % 2 else (halves, None)
        state.top = None
        if top is None:
            raise RuntimeError("pyramid rows arrived out of order")
        half = self.tile // 2
        below: Halves = []
        for col in range(state.cols):
            quads = [
                (dy, dx, source[2 * col + dx])
                for dy, source in ((0, top), (1, bottom))
                if source is not None
                for dx in (0, 1)
                if 2 * col + dx < len(source) and source[2 * col + dx] is not None
            ]
            if not quads:
                state.tiles.append(None)
                below.append(None)
                continue
            assembled = np.empty((self.tile, self.tile, 3), np.uint8)
            assembled[...] = self.background
            for dy, dx, quad in quads:
                assembled[dy * half : (dy + 1) * half, dx * half : (dx + 1) * half] = quad
            state.tiles.append(self.spool.put(self.encoder.encode(assembled)))
            below.append(downsample2(assembled) if level < len(self.levels) else None)
        self.feed(level + 1, row // 2, below)


def _row_job(
    render_row: Callable[[int], list[np.ndarray | None]], encoder: JpegEncoder, blank: bytes, row: int
) -> tuple[list[bytes], Halves]:
    tiles = render_row(row)
    encoded = [blank if t is None else encoder.encode(t) for t in tiles]
    halves: Halves = [None if t is None else downsample2(t) for t in tiles]
    return encoded, halves


def write_pyramid(
    path: str | os.PathLike[str],
    width: int,
    height: int,
    render_row: Callable[[int], list[np.ndarray | None]],
    *,
    tile: int = 256,
    quality: int = 85,
    mpp: float = 0.5,
    background: tuple[int, int, int] = (255, 255, 255),
    description: str | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> list[tuple[int, int]]:
    """Write a pyramidal TIFF whose level-0 tile rows come from ``render_row(row)``; return level sizes.

    ``render_row`` must be thread-safe and return ``ceil(width / tile)`` tiles of shape
    ``(tile, tile, 3)`` uint8 (pixels beyond the slide's edge are stored but never shown), or ``None``
    for a tile of plain ``background``. Rows are rendered concurrently by ``workers`` threads.
    """
    import tifffile

    if tile % 16 or tile < 16:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    path = Path(path)
    sizes = level_sizes(width, height)
    rows0, cols0 = math.ceil(height / tile), math.ceil(width / tile)
    encoder = JpegEncoder(quality, tile)
    bg = np.asarray(background, np.uint8)
    blank = encoder.encode_uniform(np.broadcast_to(bg, (tile, tile, 3)).copy())
    workers = workers or min(4, os.cpu_count() or 1)
    spool = _Spool(path.parent)
    cascade = _Cascade(sizes, tile, encoder, bg, spool)
    bigtiff = sum(w * h * 3 for w, h in sizes) > 2**32

    def level0(pool: ThreadPoolExecutor, bar: Any) -> Iterator[bytes]:
        # tifffile stops pulling after the last tile, so a row's side effects (cascade, progress)
        # happen before its tiles are yielded
        pending: collections.deque[Future[tuple[list[bytes], Halves]]] = collections.deque()
        submitted = 0
        for row in range(rows0):
            while submitted < rows0 and len(pending) < 2 * workers:
                pending.append(pool.submit(_row_job, render_row, encoder, blank, submitted))
                submitted += 1
            encoded, halves = pending.popleft().result()
            if len(encoded) != cols0:
                raise ValueError(f"render_row({row}) returned {len(encoded)} tiles, expected {cols0}")
            cascade.feed(1, row, halves)
            if bar is not None:
                bar.update()
            yield from encoded

    def lower(level: int) -> Iterator[bytes]:
        for entry in cascade.levels[level - 1].tiles:
            yield blank if entry is None else spool.get(entry)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=rows0, desc=path.name, unit="row", leave=False)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="synth")
    try:
        with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
            for level, (w, h) in enumerate(sizes):
                level_mpp = mpp * width / w
                tw.write(
                    level0(pool, bar) if level == 0 else lower(level),
                    shape=(h, w, 3),
                    dtype=np.uint8,
                    tile=(tile, tile),
                    compression="jpeg",
                    photometric="rgb",
                    subsampling=(2, 2),
                    jpegtables=encoder.tables,
                    resolution=(1e4 / level_mpp, 1e4 / level_mpp),
                    resolutionunit="CENTIMETER",
                    subfiletype=0 if level == 0 else 1,
                    description=description if level == 0 else None,
                    software="magnet_zoo.synth",
                    metadata=None,
                )
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        spool.close()
        if bar is not None:
            bar.close()
    return sizes
