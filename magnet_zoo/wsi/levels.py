"""Which pyramid level to read a region from: pure functions, no I/O.

The paper (section 3.2.1, "Sampling") picks ``m = max(m_max - R, 0)`` with
``R = max(floor(log2(h_0 / h_c)), floor(log2(w_0 / w_c)))`` for pyramids that halve per level.
:func:`select_level` generalises it to any pyramid (4x steps as in SVS, NDPI, irregular DICOM
downsamples, a single level): the *coarsest* level whose pixels still cover the region with at least
``target`` pixels along each side. On the paper's halving pyramid, with ``target`` set to half the
coarsest level's size, it reproduces the paper's level table (see the tests).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

_TOLERANCE = 1e-3
"""Relative slack: scanner downsamples are rarely exact (4.000297); 0.1% fewer pixels is still enough."""


def _pair(value: float | Sequence[float]) -> tuple[float, float]:
    if isinstance(value, int | float):
        return float(value), float(value)
    w, h = value
    return float(w), float(h)


def select_level(
    downsamples: Sequence[float],
    region_size: float | Sequence[float],
    target: float | Sequence[float],
) -> int:
    """The coarsest level that gives at least ``target`` pixels across ``region_size`` level-0 pixels.

    ``region_size`` and ``target`` are a side or a ``(w, h)`` pair. If even level 0 has fewer pixels
    than ``target`` (a tiny region), level 0 is returned: nothing finer exists.
    """
    if not downsamples:
        raise ValueError("a pyramid needs at least one level")
    rw, rh = _pair(region_size)
    tw, th = _pair(target)
    best = 0
    for level, ds in enumerate(downsamples):
        if rw / ds >= tw * (1 - _TOLERANCE) and rh / ds >= th * (1 - _TOLERANCE):
            if ds >= downsamples[best]:
                best = level
    return best


def paper_level(level0_size: Sequence[float], region_size: Sequence[float], max_level: int) -> int:
    """The paper's formula, verbatim, for pyramids that halve per level (for reference and tests)."""
    w0, h0 = level0_size
    wc, hc = region_size
    r = max(math.floor(math.log2(h0 / hc)), math.floor(math.log2(w0 / wc)))
    return max(max_level - r, 0)


def halving_downsamples(levels: int) -> list[float]:
    return [float(2**k) for k in range(levels)]
