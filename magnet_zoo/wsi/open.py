"""``open_slide(path, backend="auto")``: one entry point for every slide format and backend."""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from magnet_zoo.wsi.coarse import CoarseLevelSource, needs_coarse_level
from magnet_zoo.wsi.errors import (
    BackendUnavailableError,
    CorruptSlideError,
    ImplausibleSlideError,
    SlideError,
    SlideNotFoundError,
    UnsupportedFormatError,
)
from magnet_zoo.wsi.protocol import RegionSource

log = logging.getLogger(__name__)

BACKENDS: dict[str, tuple[str, str]] = {
    "openslide": ("magnet_zoo.wsi.backends.openslide_backend", "OpenSlideSource"),
    "tifffile": ("magnet_zoo.wsi.backends.tifffile_backend", "TiffFileSource"),
    "pil": ("magnet_zoo.wsi.backends.pil_backend", "PILSource"),
    "monai": ("magnet_zoo.wsi.backends.monai_backend", "MonaiSource"),
    "tiatoolbox": ("magnet_zoo.wsi.backends.tiatoolbox_backend", "TiatoolboxSource"),
}
MAX_SLIDE_SIDE = 1 << 20
"""Largest level-0 side accepted (1,048,576 px: 100 mm at 0.1 µm/px; real scans stay below 250k)."""
PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
TIFF_SUFFIXES = {".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".btf", ".qptiff"}


def backend_class(name: str) -> type:
    try:
        module_name, cls_name = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailableError(f"backend {name!r} is not available: {exc}") from exc
    return getattr(module, cls_name)


def _check_path(path: Path) -> None:
    if not path.exists():
        raise SlideNotFoundError(f"{path}: no such file; check the path (relative paths start at {Path.cwd()})")
    if path.is_dir():
        raise SlideNotFoundError(
            f"{path}: is a directory; pass one slide file (for DICOM, one .dcm file of the series; for MIRAX, "
            "the .mrxs file). To predict a whole folder use `magnet-zoo predict FOLDER`"
        )
    if path.stat().st_size == 0:
        raise CorruptSlideError(f"{path}: the file is empty (0 bytes); the copy or download probably failed")


def _looks_like_tiff(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _auto(path: Path) -> RegionSource:
    suffix = path.suffix.lower()
    if suffix in PIL_SUFFIXES:
        return backend_class("pil")(path)
    errors: list[str] = []
    try:
        from magnet_zoo.wsi.backends.openslide_backend import detect

        if detect(path) is not None:
            return backend_class("openslide")(path)
        errors.append("openslide: format not recognised")
    except BackendUnavailableError as exc:
        errors.append(f"openslide: {exc}")
    if _looks_like_tiff(path):
        return backend_class("tifffile")(path)
    errors.append("tifffile: not a TIFF file")
    try:
        return backend_class("pil")(path)
    except UnsupportedFormatError:
        errors.append("pil: not an image")
    raise UnsupportedFormatError(
        f"{path}: no backend can read this file ({'; '.join(errors)}). Supported: whatever OpenSlide 4 "
        "reads (SVS, NDPI, MRXS, SCN, BIF, Philips TIFF, DICOM, generic tiled TIFF), OME/other TIFFs via "
        "tifffile, PNG/JPEG via PIL; or pass backend='monai' / 'tiatoolbox'"
    )


def open_slide(
    path: str | os.PathLike,
    backend: str | type | Any = "auto",
    *,
    coarse_view: bool = True,
) -> RegionSource:
    """Open a slide for reading.

    ``backend`` is ``"auto"``, a name (``openslide``, ``tifffile``, ``pil``, ``monai``, ``tiatoolbox``), a
    source class (called with the path), or a reader instance from MONAI (``monai.data.WSIReader``) or
    TIAToolbox (an opened ``WSIReader``, used as is). Slides whose coarsest level is still large get a
    computed coarse level (``coarse_view``), so the whole-slide view never decodes level 0 twice.
    """
    p = Path(path)
    if not (isinstance(backend, str) and backend == "tiatoolbox-reader"):
        _check_path(p)
    if isinstance(backend, str):
        source = _auto(p) if backend == "auto" else backend_class(backend)(p)
    elif isinstance(backend, type):
        source = backend(p)
    else:
        module = type(backend).__module__
        if module.startswith("monai."):
            source = backend_class("monai")(p, reader=backend)
        elif module.startswith("tiatoolbox."):
            source = backend_class("tiatoolbox")(backend)
        else:
            raise TypeError(
                f"backend must be a name, a source class, or a MONAI/TIAToolbox reader; got {type(backend).__name__}"
            )
    _check_plausible(source)
    if coarse_view and needs_coarse_level(source):
        source = CoarseLevelSource(source)
    return source


def _check_plausible(source: RegionSource) -> None:
    """Refuse a slide whose claimed size no scanner produces, before anything is decoded."""
    bad = [
        (i, w, h)
        for i, (w, h) in enumerate(source.level_dimensions)
        if not (0 < w <= MAX_SLIDE_SIDE and 0 < h <= MAX_SLIDE_SIDE)
    ]
    if bad:
        level, w, h = bad[0]
        source.close()
        raise ImplausibleSlideError(
            f"{source.name}: level {level} claims {w} x {h} px; magnet_zoo accepts sides of 1 to {MAX_SLIDE_SIDE:,} px "
            "(the largest whole-slide scans are about 250,000 px). The file's size tags are probably damaged"
        )


class SlideCache:
    """Keep the most recently used slides open (opening an SVS costs milliseconds; a DICOM far more)."""

    def __init__(self, capacity: int = 32) -> None:
        self.capacity = capacity
        self._open: OrderedDict[tuple[str, str], RegionSource] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str | os.PathLike, backend: str = "auto") -> RegionSource:
        key = (str(Path(path).resolve()), backend)
        with self._lock:
            src = self._open.get(key)
            if src is not None:
                self._open.move_to_end(key)
                return src
        src = open_slide(path, backend)
        with self._lock:
            self._open[key] = src
            while len(self._open) > self.capacity:
                _, old = self._open.popitem(last=False)
                try:
                    old.close()
                except SlideError:  # pragma: no cover - closing a broken handle
                    log.debug("error closing %s", old.name)
        return src

    def close(self) -> None:
        with self._lock:
            for src in self._open.values():
                src.close()
            self._open.clear()


def median_mpp(paths: list[str | os.PathLike], limit: int = 16) -> float | None:
    """Median level-0 microns per pixel of (up to ``limit`` of) ``paths``, or ``None`` if none says.

    What a checkpoint records as the resolution its training slides had (``save_pretrained(...,
    slide_mpp=...)``). Unreadable slides are skipped.
    """
    values: list[float] = []
    for path in list(paths)[:limit]:
        try:
            with open_slide(path, coarse_view=False) as src:
                if src.mpp is not None:
                    values.append((float(src.mpp[0]) + float(src.mpp[1])) / 2)
        except (SlideError, OSError, ValueError):
            continue
    if not values:
        return None
    values.sort()
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
