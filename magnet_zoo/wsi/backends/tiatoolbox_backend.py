"""Adapter for TIAToolbox's ``WSIReader.open``: anything TIAToolbox reads, MagNet reads.

TIAToolbox already speaks openslide's conventions (``(x, y)`` level-0 locations, ``(w, h)`` sizes,
``(h, w, c)`` arrays). Importing it takes seconds, so this module is only imported when used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from magnet_zoo.wsi.errors import BackendUnavailableError, CorruptSlideError, UnreadableRegionError
from magnet_zoo.wsi.protocol import BaseSource


class TiatoolboxSource(BaseSource):
    backend = "tiatoolbox"

    def __init__(self, path_or_reader: str | Path | Any) -> None:
        try:
            from tiatoolbox.wsicore.wsireader import WSIReader
        except ImportError as exc:
            raise BackendUnavailableError(
                "the TIAToolbox backend needs `pip install 'magnet-zoo[tiatoolbox]'`"
            ) from exc
        if isinstance(path_or_reader, WSIReader):
            self._reader = path_or_reader
            self._path = str(getattr(path_or_reader, "input_path", None) or "tiatoolbox-reader")
        else:
            self._path = str(path_or_reader)
            try:
                self._reader = self._open(self._path)
            except Exception as exc:
                raise CorruptSlideError(f"{self._path}: TIAToolbox could not open it ({exc})") from exc
        self._name = self._path
        info = self._reader.info
        self._dims = tuple((int(w), int(h)) for w, h in info.level_dimensions)
        self._downsamples = tuple(float(d) for d in info.level_downsamples)
        mpp = info.mpp
        self._mpp = (float(mpp[0]), float(mpp[1])) if mpp is not None and all(mpp) else None

    @staticmethod
    def _open(path: str) -> Any:
        """``WSIReader.open``, except that a pyramid it would load whole into memory as a
        ``VirtualWSIReader`` (TIAToolbox 2.1 does that for generic tiled TIFFs) goes to its OpenSlide
        reader, which sees every level."""
        from tiatoolbox.wsicore.wsireader import OpenSlideWSIReader, VirtualWSIReader, WSIReader

        reader = WSIReader.open(path, post_proc=None)
        if isinstance(reader, VirtualWSIReader):
            from magnet_zoo.wsi.backends.openslide_backend import detect

            if detect(path) is not None:
                reader = OpenSlideWSIReader(path, post_proc=None)
        return reader

    @property
    def reader(self) -> Any:
        return self._reader

    def _read_level(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        ds = self._downsamples[level]
        try:
            arr = self._reader.read_rect(
                (int(round(x * ds)), int(round(y * ds))), (w, h), resolution=level, units="level"
            )
        except Exception as exc:
            raise UnreadableRegionError(
                f"{self._path}: TIAToolbox could not read level {level} at ({x}, {y}): {exc}"
            ) from exc
        arr = np.asarray(arr)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        return arr.astype(np.uint8, copy=False)

    def close(self) -> None:
        close = getattr(self._reader, "close", None)
        if callable(close):
            close()
