"""Adapter for MONAI's ``monai.data.WSIReader``: anything MONAI reads (cuCIM, OpenSlide, tifffile).

MONAI speaks ``(row, col)`` locations and ``(height, width)`` sizes with channel-first patches; this
adapter converts to ``(x, y)`` / ``(w, h)`` / channel-last exactly once, here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from magnet_zoo.wsi.errors import BackendUnavailableError, CorruptSlideError, UnreadableRegionError
from magnet_zoo.wsi.protocol import BaseSource


class MonaiSource(BaseSource):
    backend = "monai"

    def __init__(self, path: str | Path, reader: Any = None, *, monai_backend: str = "openslide") -> None:
        try:
            from monai.data import WSIReader
        except ImportError as exc:  # pragma: no cover - monai is a core dependency
            raise BackendUnavailableError("the MONAI backend needs `pip install monai`") from exc
        self._path = str(path)
        self._name = self._path
        self._reader = reader if reader is not None else WSIReader(backend=monai_backend, channel_dim=0)
        try:
            self._wsi = self._reader.read(self._path)
        except Exception as exc:
            raise CorruptSlideError(f"{self._path}: MONAI's WSIReader could not open it ({exc})") from exc
        r = self._reader
        count = int(r.get_level_count(self._wsi))
        dims = []
        for level in range(count):
            h, w = r.get_size(self._wsi, level)  # (row, col) order in MONAI
            dims.append((int(w), int(h)))
        self._dims = tuple(dims)
        self._downsamples = tuple(float(r.get_downsample_ratio(self._wsi, lv)) for lv in range(count))
        try:
            my, mx = r.get_mpp(self._wsi, 0)  # MONAI returns (y, x)
            self._mpp = (float(mx), float(my)) if mx and my else None
        except Exception:  # no resolution metadata
            self._mpp = None
        self._channel_dim = getattr(r, "channel_dim", 0)

    def _read_level(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        ds = self._downsamples[level]
        try:
            patch, _ = self._reader.get_data(
                self._wsi, location=(int(round(y * ds)), int(round(x * ds))), size=(h, w), level=level, mode="RGB"
            )
        except Exception as exc:
            raise UnreadableRegionError(
                f"{self._path}: MONAI could not read level {level} at ({x}, {y}): {exc}"
            ) from exc
        arr = np.asarray(patch)
        if self._channel_dim == 0 or (arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4)):
            arr = np.moveaxis(arr, 0, -1)
        return arr.astype(np.uint8, copy=False)

    def close(self) -> None:
        close = getattr(self._wsi, "close", None)
        if callable(close):
            close()
