"""D4 orientation: the slide as a whole flipped and/or rotated by multiples of 90 degrees.

Training augmentation must rotate the *slide*, not each read: every read of an oriented source is
exactly the corresponding read of the original, transformed. Orientation ``k`` in ``0..7``: bit 2 is
a horizontal flip (applied first), ``k % 4`` counter-clockwise quarter turns (``numpy.rot90``).
"""

from __future__ import annotations

import numpy as np

from magnet_zoo.wsi.protocol import BaseSource, RegionSource

ORIENTATIONS = tuple(range(8))


def _forward_point(c: int, r: int, w: int, h: int, flip: bool, turns: int) -> tuple[int, int, int, int]:
    """Pixel ``(col, row)`` of a ``w x h`` image -> its place after flip then ``turns`` CCW turns."""
    if flip:
        c = w - 1 - c
    for _ in range(turns):
        c, r, w, h = r, w - 1 - c, h, w
    return c, r, w, h


def _inverse_point(c: int, r: int, w: int, h: int, flip: bool, turns: int) -> tuple[int, int]:
    """Pixel ``(col, row)`` of the oriented image (size ``w x h`` *of the original*) -> original pixel."""
    # Sizes after each forward step, to undo them in reverse order.
    sizes = [(w, h)]
    for _ in range(turns):
        sizes.append((sizes[-1][1], sizes[-1][0]))
    for step in range(turns, 0, -1):
        pw, _ = sizes[step - 1]  # size before this turn
        # forward: (c', r') = (r, pw - 1 - c)  =>  inverse: c = pw - 1 - r', r = c'
        c, r = pw - 1 - r, c
    if flip:
        c = w - 1 - c
    return c, r


def orient_array(arr: np.ndarray, k: int) -> np.ndarray:
    if k & 4:
        arr = arr[:, ::-1]
    return np.rot90(arr, k % 4)


class OrientedSource(BaseSource):
    """``source`` seen in orientation ``k`` (see module docstring); ``k=0`` is the identity."""

    def __init__(self, source: RegionSource, k: int) -> None:
        if k not in ORIENTATIONS:
            raise ValueError(f"orientation must be in 0..7, got {k}")
        self.inner = source
        self.k = k
        self._flip = bool(k & 4)
        self._turns = k % 4
        self._name = source.name
        swap = self._turns % 2 == 1
        self._dims = tuple((h, w) if swap else (w, h) for w, h in source.level_dimensions)
        self._downsamples = tuple(source.level_downsamples)
        mpp = source.mpp
        self._mpp = (mpp[1], mpp[0]) if mpp is not None and swap else mpp

    def _read_level(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        ow, oh = self.inner.level_dimensions[level]
        corners = [
            _inverse_point(c, r, ow, oh, self._flip, self._turns) for c, r in ((x, y), (x + w - 1, y + h - 1))
        ]
        c0, c1 = sorted(p[0] for p in corners)
        r0, r1 = sorted(p[1] for p in corners)
        ds = self.inner.level_downsamples[level]
        block = self.inner.read_region((int(round(c0 * ds)), int(round(r0 * ds))), level, (c1 - c0 + 1, r1 - r0 + 1))
        return np.ascontiguousarray(orient_array(block, self.k))

    def close(self) -> None:
        self.inner.close()
