"""``ArraySource``: an in-memory slide implementing :class:`~magnet_zoo.wsi.protocol.RegionSource`.

Useful for tests, for images already in memory (a PNG tile, a synthetic task) and as the reference
the file backends are compared against. Without a given pyramid it builds one by 2x2 area averaging
until the coarsest level fits in ``coarsest`` pixels, as a scanner would.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from magnet_zoo.wsi.protocol import BaseSource, SlideError


class InvalidImageError(SlideError, ValueError):
    """An array cannot be used as a slide."""


def as_rgb_uint8(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Coerce grayscale / RGBA / 16-bit / float ``[0, 1]`` arrays to ``(H, W, 3)`` uint8 RGB.

    RGBA is composited onto black (transparent means "no slide here", like padding).
    """
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise InvalidImageError(
            f"{name}: expected an (H, W), (H, W, 3) or (H, W, 4) image, got shape {tuple(np.shape(image))}"
        )
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InvalidImageError(f"{name}: the image is empty (shape {arr.shape})")
    if arr.dtype == np.uint8:
        pass
    elif arr.dtype == np.uint16:
        arr = (arr.astype(np.uint32) * 255 // 65535).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise InvalidImageError(f"{name}: the float image holds NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0 or hi > 1:
            raise InvalidImageError(f"{name}: float images must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]")
        arr = np.round(arr * 255).astype(np.uint8)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    else:
        raise InvalidImageError(f"{name}: unsupported dtype {arr.dtype}; use uint8, uint16 or float in [0, 1]")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] == 4:
        alpha = arr[..., 3:4].astype(np.uint16)
        arr = (arr[..., :3].astype(np.uint16) * alpha // 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def area_halve(image: np.ndarray) -> np.ndarray:
    """2x2 area average (odd edges are averaged with what exists)."""
    h, w = image.shape[:2]
    h2, w2 = max(h // 2, 1), max(w // 2, 1)
    a = image[: h2 * 2 if h > 1 else 1, : w2 * 2 if w > 1 else 1].astype(np.float32)
    if h > 1:
        a = (a[0::2] + a[1::2]) / 2
    if w > 1:
        a = (a[:, 0::2] + a[:, 1::2]) / 2
    return np.round(a).astype(np.uint8)


class ArraySource(BaseSource):
    """An RGB array as a slide: ``ArraySource(image, pyramid=None, mpp=None)``.

    ``pyramid`` optionally gives the coarser levels (finest first, *without* ``image`` itself).
    """

    def __init__(
        self,
        image: np.ndarray,
        *,
        pyramid: Sequence[np.ndarray] | None = None,
        mpp: float | tuple[float, float] | None = None,
        name: str = "array",
        coarsest: int = 512,
    ) -> None:
        self._name = name
        levels = [as_rgb_uint8(image, name)]
        if pyramid is not None:
            levels += [as_rgb_uint8(p, f"{name} pyramid level {i + 1}") for i, p in enumerate(pyramid)]
        else:
            while max(levels[-1].shape[:2]) > coarsest and min(levels[-1].shape[:2]) > 1:
                levels.append(area_halve(levels[-1]))
        self._levels = levels
        h0, w0 = levels[0].shape[:2]
        self._dims = tuple((lv.shape[1], lv.shape[0]) for lv in levels)
        self._downsamples = tuple(((w0 / w) + (h0 / h)) / 2 for w, h in self._dims)
        if any(b < a for a, b in zip(self._downsamples, self._downsamples[1:], strict=False)):
            raise InvalidImageError(f"{name}: pyramid levels must get coarser, got sizes {self._dims}")
        if mpp is None or isinstance(mpp, tuple):
            self._mpp = mpp
        else:
            self._mpp = (float(mpp), float(mpp))

    def _read_level(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        return self._levels[level][y : y + h, x : x + w]

    def __repr__(self) -> str:
        return f"ArraySource({self._name!r}, dimensions={self.dimensions}, levels={self.level_count})"
