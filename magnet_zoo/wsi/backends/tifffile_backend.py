"""tifffile backend: OME-TIFF, pyramids OpenSlide refuses, other codecs (through imagecodecs).

Tiled levels are read tile by tile (bytes under a lock, decoding outside it, so threads overlap) with
decoded tiles kept in the shared tile cache. Stripped (untiled) levels are decoded whole, once, and
kept: they are small in practice, since large images are always tiled. A file whose untiled level
*claims* more than :data:`MAX_WHOLE_DECODE_BYTES` decoded is refused when it is opened
(:class:`~magnet_zoo.wsi.errors.ImplausibleSlideError`), not when numpy fails to allocate it.
Both sample layouts tifffile reads are accepted: contiguous (RGBRGB...) and planar-separate (one plane
per colour, ``PlanarConfiguration = 2``).
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

import numpy as np

from magnet_zoo.wsi.array_source import as_rgb_uint8
from magnet_zoo.wsi.cache import handle_token, shared_tile_cache
from magnet_zoo.wsi.errors import (
    NO_MPP_WARNING,
    BackendUnavailableError,
    CorruptSlideError,
    ImplausibleSlideError,
    UnreadableRegionError,
)
from magnet_zoo.wsi.protocol import BaseSource

try:
    import tifffile
except ImportError as exc:  # pragma: no cover - tifffile is a core dependency
    raise BackendUnavailableError("the tifffile backend needs `pip install tifffile imagecodecs`") from exc

log = logging.getLogger(__name__)

MAX_WHOLE_DECODE_BYTES = 2 << 30
"""Largest untiled (stripped) level decoded whole: 2 GiB, a 26k x 26k RGB image. Real slides are tiled."""
SEPARATE = 2
"""TIFF PlanarConfiguration of planar-separate files (one plane per sample)."""


def _mpp_from_page(page) -> tuple[float, float] | None:
    """Microns per pixel from Aperio's description (``MPP = 0.499``) or the TIFF resolution tags."""
    match = re.search(r"\bMPP\s*=\s*([0-9.]+)", page.description or "")
    if match and float(match.group(1)) > 0:
        return float(match.group(1)), float(match.group(1))
    try:
        tags = page.tags
        unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else 2
        xr = tags["XResolution"].value
        yr = tags["YResolution"].value
    except (KeyError, AttributeError):
        return None
    per = {2: 25400.0, 3: 10000.0}.get(int(unit))
    if per is None:
        return None
    xres = xr[0] / xr[1] if xr[1] else 0
    yres = yr[0] / yr[1] if yr[1] else 0
    if xres <= 1 or yres <= 1:  # 1 px/unit is the "unknown" default many writers leave
        return None
    return per / xres, per / yres


class TiffFileSource(BaseSource):
    backend = "tifffile"

    def __init__(self, path: str | Path) -> None:
        self._path = str(path)
        self._name = self._path
        try:
            self._tif = tifffile.TiffFile(self._path)
            series = self._tif.series[0]
            pages = [lvl.keyframe for lvl in series.levels]
        except (tifffile.TiffFileError, ValueError, IndexError, OSError) as exc:
            raise CorruptSlideError(
                f"{self._path}: tifffile could not parse it ({exc}); the file is not a valid TIFF or is truncated"
            ) from exc
        if len(pages) == 1:
            pages = self._reduced_pages(pages[0])
        self._pages = pages
        self._dims = tuple((int(p.imagewidth), int(p.imagelength)) for p in pages)
        w0, h0 = self._dims[0]
        self._downsamples = tuple(((w0 / w) + (h0 / h)) / 2 for w, h in self._dims)
        self._mpp = _mpp_from_page(pages[0])
        if self._mpp is None:
            log.warning("%s: %s", self._path, NO_MPP_WARNING)
        self._io_lock = threading.Lock()
        self._whole: dict[int, np.ndarray] = {}
        self._cache = shared_tile_cache()
        self._key = (self._path, handle_token())
        self._check_claims()

    def _check_claims(self) -> None:
        """Refuse, before decoding anything, levels that would be decoded whole beyond the budget."""
        for level, page in enumerate(self._pages):
            if page.is_tiled:
                continue
            w, h, spp = int(page.imagewidth), int(page.imagelength), int(page.samplesperpixel)
            itemsize = max(1, int(getattr(page.dtype, "itemsize", 1) or 1))
            claimed = w * h * spp * itemsize
            if claimed > MAX_WHOLE_DECODE_BYTES:
                raise ImplausibleSlideError(
                    f"{self._path}: level {level} is stored in strips (untiled) and claims {w} x {h} px "
                    f"({claimed / 2**30:.1f} GiB decoded); magnet_zoo decodes untiled levels whole and refuses "
                    f"more than {MAX_WHOLE_DECODE_BYTES / 2**30:.0f} GiB. If the size is real, convert the file to "
                    "a tiled pyramid (e.g. `vips tiffsave in.tif out.tif --tile --pyramid --compression jpeg`); "
                    "if not, the file's size tags are damaged"
                )

    def _reduced_pages(self, first):
        """Single-series files whose coarser levels are separate reduced-resolution pages (SVS-like)."""
        w0, h0 = first.imagewidth, first.imagelength
        found = [first]
        for page in self._tif.pages[1:]:
            page = page.keyframe if hasattr(page, "keyframe") else page
            w, h = page.imagewidth, page.imagelength
            if w < found[-1].imagewidth and abs(w / w0 - h / h0) < 0.02 and page.is_tiled:
                found.append(page)
        return found

    def _decode_segment(self, page, level: int, index: int) -> np.ndarray | None:
        """One stored tile, decoded to ``(th, tw, samples)``; ``None`` for a sparse (never written) tile."""
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        th, tw = page.tilelength, page.tilewidth
        if count == 0:
            return None
        with self._io_lock:
            fh = self._tif.filehandle
            fh.seek(offset)
            data = fh.read(count)
        if len(data) != count:
            raise UnreadableRegionError(
                f"{self._path}: tile {index} of level {level} is cut short; the file is truncated"
            )
        try:
            decoded, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        except Exception as exc:  # codecs raise many types
            raise UnreadableRegionError(f"{self._path}: cannot decode tile {index} of level {level}: {exc}") from exc
        if decoded is None:
            raise UnreadableRegionError(f"{self._path}: tile {index} of level {level} is empty or unreadable")
        return np.asarray(decoded).reshape(th, tw, -1)

    def _decode_tile(self, page, level: int, index: int) -> np.ndarray:
        """The RGB tile ``index`` of a level: one stored tile, or one per sample plane for planar-separate
        files (plane ``s`` holds its tiles at ``s * tiles_per_plane + index``)."""
        key = (self._key, level, index)
        tile = self._cache.get(key)
        if tile is not None:
            return tile
        th, tw = page.tilelength, page.tilewidth
        if page.planarconfig == SEPARATE and page.samplesperpixel > 1:
            per_plane = len(page.dataoffsets) // page.samplesperpixel
            planes = [self._decode_segment(page, level, s * per_plane + index) for s in range(page.samplesperpixel)]
            if all(p is None for p in planes):
                tile = np.zeros((th, tw, 3), np.uint8)
            else:
                dtype = next(p.dtype for p in planes if p is not None)
                stack = [np.zeros((th, tw), dtype) if p is None else p[..., 0] for p in planes]
                tile = as_rgb_uint8(np.stack(stack, axis=-1), self._path)
        else:
            segment = self._decode_segment(page, level, index)
            tile = np.zeros((th, tw, 3), np.uint8) if segment is None else as_rgb_uint8(segment, self._path)
        self._cache.put(key, tile)
        return tile

    def _read_level(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        page = self._pages[level]
        if not page.is_tiled:
            whole = self._whole.get(level)
            if whole is None:
                try:
                    pixels = page.asarray()
                    if page.planarconfig == SEPARATE and page.samplesperpixel > 1 and pixels.ndim == 3:
                        pixels = np.moveaxis(pixels, 0, -1)  # (samples, h, w) -> (h, w, samples)
                    whole = as_rgb_uint8(pixels, self._path)
                except Exception as exc:
                    raise UnreadableRegionError(f"{self._path}: cannot decode level {level}: {exc}") from exc
                self._whole[level] = whole
            return whole[y : y + h, x : x + w]
        th, tw = page.tilelength, page.tilewidth
        across = -(-page.imagewidth // tw)
        out = np.zeros((h, w, 3), np.uint8)
        for ty in range(y // th, (y + h - 1) // th + 1):
            for tx in range(x // tw, (x + w - 1) // tw + 1):
                tile = self._decode_tile(page, level, ty * across + tx)
                # Intersection of the tile with the request, in level pixels.
                x0, y0 = max(x, tx * tw), max(y, ty * th)
                x1, y1 = min(x + w, (tx + 1) * tw), min(y + h, (ty + 1) * th)
                out[y0 - y : y1 - y, x0 - x : x1 - x] = tile[y0 - ty * th : y1 - ty * th, x0 - tx * tw : x1 - tx * tw]
        return out

    def close(self) -> None:
        self._tif.close()
