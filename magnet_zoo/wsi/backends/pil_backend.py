"""PIL backend for ordinary images (PNG, JPEG, BMP, ...): decoded once into an in-memory pyramid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from magnet_zoo.wsi.array_source import ArraySource
from magnet_zoo.wsi.errors import CorruptSlideError, UnsupportedFormatError


class PILSource(ArraySource):
    backend = "pil"

    def __init__(self, path: str | Path) -> None:
        path = str(path)
        try:
            with Image.open(path) as img:
                img.load()
                arr = self._to_array(img)
        except UnidentifiedImageError as exc:
            raise UnsupportedFormatError(f"{path}: not an image PIL can read") from exc
        except Image.DecompressionBombError as exc:
            raise UnsupportedFormatError(
                f"{path}: {exc}. For gigapixel images use a pyramidal format (TIFF/SVS) read by OpenSlide"
            ) from exc
        except OSError as exc:
            raise CorruptSlideError(f"{path}: the image is damaged or truncated ({exc})") from exc
        super().__init__(arr, name=path)

    @staticmethod
    def _to_array(img: Image.Image) -> np.ndarray:
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img).astype(np.float64)
            top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
            return (arr / top).clip(0, 1).astype(np.float32)
        if img.mode == "RGBA":
            return np.asarray(img)
        if img.mode in ("P", "PA", "LA", "CMYK", "YCbCr", "1", "F"):
            img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
        return np.asarray(img)
