"""OpenSlide backend: SVS, generic tiled TIFF, NDPI, MRXS, SCN, BIF, Philips TIFF, DICOM, ...

OpenSlide is thread-safe and releases the GIL while decoding, so concurrent reads scale. After an
OpenSlide error a handle returns zeros forever, so on error we reopen it before the next read.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from magnet_zoo.wsi.errors import NO_MPP_WARNING, BackendUnavailableError, CorruptSlideError, UnreadableRegionError
from magnet_zoo.wsi.protocol import BaseSource

try:
    import openslide
except ImportError as exc:  # pragma: no cover - openslide-bin is a core dependency
    raise BackendUnavailableError(
        "the OpenSlide backend needs `pip install openslide-python openslide-bin`"
    ) from exc

log = logging.getLogger(__name__)

_CACHE_BYTES = 256 * 1024 * 1024
_cache = None
_cache_lock = threading.Lock()


def _shared_cache():
    """One OpenSlide tile cache for every handle (OpenSlide >= 4 lets handles share one)."""
    global _cache
    with _cache_lock:
        if _cache is None and hasattr(openslide, "OpenSlideCache"):
            _cache = openslide.OpenSlideCache(_CACHE_BYTES)
        return _cache


def detect(path: str | Path) -> str | None:
    """OpenSlide's vendor name for ``path``, or ``None`` if OpenSlide cannot read it."""
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        return None


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """OpenSlide's RGBA (transparent where there is no tissue scan) -> RGB on black."""
    if rgba.shape[-1] == 3:
        return rgba
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return rgba[..., :3]
    return (rgba[..., :3].astype(np.uint16) * alpha // 255).astype(np.uint8)


class OpenSlideSource(BaseSource):
    backend = "openslide"

    def __init__(self, path: str | Path, *, tile_cache_bytes: int | None = None) -> None:
        """``tile_cache_bytes=None`` shares one process-wide tile cache; a number gives this handle its own."""
        self._path = str(path)
        self._private_cache = (
            openslide.OpenSlideCache(tile_cache_bytes)
            if tile_cache_bytes is not None and hasattr(openslide, "OpenSlideCache")
            else None
        )
        self._name = self._path
        self._lock = threading.Lock()
        self._slide = self._open()
        s = self._slide
        self._dims = tuple((int(w), int(h)) for w, h in s.level_dimensions)
        self._downsamples = tuple(float(d) for d in s.level_downsamples)
        self.vendor = s.properties.get(openslide.PROPERTY_NAME_VENDOR)
        try:
            mx = float(s.properties[openslide.PROPERTY_NAME_MPP_X])
            my = float(s.properties[openslide.PROPERTY_NAME_MPP_Y])
            self._mpp = (mx, my) if mx > 0 and my > 0 else None
        except (KeyError, ValueError):
            self._mpp = None
        if self._mpp is None:
            log.warning("%s: %s", self._path, NO_MPP_WARNING)

    def _open(self):
        try:
            slide = openslide.OpenSlide(self._path)
        except openslide.OpenSlideUnsupportedFormatError as exc:
            from magnet_zoo.wsi.errors import UnsupportedFormatError

            raise UnsupportedFormatError(f"{self._path}: OpenSlide does not recognise this file ({exc})") from exc
        except openslide.OpenSlideError as exc:
            raise CorruptSlideError(
                f"{self._path}: OpenSlide could not open it ({exc}); the file may be truncated or damaged - "
                "re-export or re-copy it"
            ) from exc
        cache = self._private_cache if self._private_cache is not None else _shared_cache()
        if cache is not None:
            slide.set_cache(cache)
        return slide

    @property
    def associated_images(self) -> list[str]:
        return list(self._slide.associated_images)

    def associated_image(self, name: str) -> np.ndarray | None:
        img = self._slide.associated_images.get(name)
        return None if img is None else rgba_to_rgb(np.asarray(img))

    def _read_level(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        ds = self._downsamples[level]
        slide = self._slide
        try:
            img = slide.read_region((int(round(x * ds)), int(round(y * ds))), level, (w, h))
        except openslide.OpenSlideError as exc:
            with self._lock:  # the handle is now poisoned: reopen it for the next read
                if self._slide is slide:
                    try:
                        self._slide.close()
                    finally:
                        self._slide = self._open()
            raise UnreadableRegionError(
                f"{self._path}: cannot read {w}x{h} px at level {level}, ({x}, {y}) ({exc}); the file is "
                "probably damaged in that region"
            ) from exc
        return rgba_to_rgb(np.asarray(img))

    def close(self) -> None:
        with self._lock:
            if self._slide is not None:
                self._slide.close()
