"""Where things are on a slide: tissue pieces, holes in them, and tumour regions by size category.

The layout is drawn from two independent random streams derived from the slide's seed: one for the
tissue, one for the tumours. The tissue therefore does not depend on the category, so a slide
generated as ``"normal"`` is the exact tumour-free twin of the same seed generated as ``"itc"``,
``"micro"`` or ``"macro"`` (the tests use that to show that an ITC is invisible at 56 x 56).

Tumour sizes follow the Camelyon/TNM definitions by their longest extent: ITC < 0.2 mm, micro
0.2-2 mm, macro > 2 mm. Each region is placed entirely inside tissue, away from holes and from the
other regions. When a slide is too small to hold a region of nominal size, the region is shrunk to
what fits (a macro region on a 2 mm slide cannot be 2 mm long) and the sidecar records its real size.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from magnet_zoo.synth.fields import Blob, RasterField, Region
from magnet_zoo.synth.texture import BANK_PAD, periodic_noise

logger = logging.getLogger(__name__)

CATEGORIES = ("normal", "macro", "micro", "itc")
TUMOUR_CATEGORIES = ("macro", "micro", "itc")

SIZE_RANGES_UM = {"macro": (2200.0, 6000.0), "micro": (300.0, 1900.0), "itc": (40.0, 180.0)}
"""Nominal longest extent of a tumour region in microns, inside the TNM bounds with a safety margin."""
FIT_FRACTION = {"macro": (0.75, 1.0), "micro": (0.3, 0.5), "itc": (0.05, 0.2)}
"""Fallback range as fractions of the largest extent that fits in the tissue, for small slides."""

_SALT = 0x5D_A7_E7


@dataclass(frozen=True)
class Tumour:
    """One tumour region: its category, nominal shape and the region used to draw it."""

    category: str
    blob: Blob
    region: Region


@dataclass(frozen=True)
class Layout:
    """Geometry of a slide in level-0 pixels: the tissue region and the tumour regions inside it."""

    width: int
    height: int
    mpp: float
    tissue: Region
    tumours: tuple[Tumour, ...]


def stream(seed: int, name: str) -> np.random.Generator:
    """A named random stream of a slide: independent of the other streams of the same seed."""
    tag = {"tissue": 1, "tumours": 2, "style": 3}[name]
    return np.random.default_rng([_SALT, int(seed), tag])


def _tissue(rng: np.random.Generator, width: int, height: int, mpp: float, noise: np.ndarray) -> Region:
    """One to three irregular tissue pieces with a few holes, kept away from the slide's edges."""
    count = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
    long_axis_x = width >= height
    long_side, short_side = (width, height) if long_axis_x else (height, width)
    cell = long_side / count
    blobs: list[Blob] = []
    for i in range(count):
        centre_long = cell * (i + 0.5) + rng.uniform(-0.05, 0.05) * cell
        centre_short = short_side * (0.5 + rng.uniform(-0.06, 0.06))
        cell_long, cell_short = max(cell, short_side), min(cell, short_side)
        radius = rng.uniform(0.36, 0.44) * cell_long
        aspect = float(np.clip(cell_long / cell_short * rng.uniform(0.9, 1.15), 1.0, 3.0))
        # the blob's long axis follows the cell's long side
        cell_long_is_x = (cell >= short_side) == long_axis_x
        angle = (0.0 if cell_long_is_x else math.pi / 2) + rng.uniform(-0.3, 0.3)
        cx, cy = (centre_long, centre_short) if long_axis_x else (centre_short, centre_long)
        shape = Blob.random(rng, cx, cy, radius, roughness=0.22)
        blobs.append(Blob(cx, cy, radius, aspect, angle, shape.harmonics))

    step = max(8.0, max(width, height) / 1024.0)
    field = RasterField.covering(0, 0, width, height, step)
    xs, ys = field.node_coords()
    values = np.max([b.distance(xs, ys) for b in blobs], axis=0)
    mean_minor = float(np.mean([b.radius / b.aspect for b in blobs]))
    rough = periodic_noise(rng, values.shape, max(1.0, 0.12 * mean_minor / step))
    values = values + 0.06 * mean_minor * rough
    for b in blobs:  # holes: fat, vessels, sinuses
        for _ in range(int(rng.integers(0, 5))):
            minor = b.radius / b.aspect
            hole_r = rng.uniform(0.04, 0.1) * minor
            ang, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.6) * minor
            hole = Blob.random(rng, b.cx + dist * math.cos(ang), b.cy + dist * math.sin(ang), hole_r)
            # only near the hole: farther away the tissue field need not be an exact distance
            hx0, hy0, hx1, hy1 = hole.box()
            reach = hole.extent() + 2 * step
            cols = slice(
                max(0, int((hx0 - reach - field.x0) / step)), max(0, int((hx1 + reach - field.x0) / step) + 2)
            )
            rows = slice(
                max(0, int((hy0 - reach - field.y0) / step)), max(0, int((hy1 + reach - field.y0) / step) + 2)
            )
            values[rows, cols] = np.minimum(values[rows, cols], -hole.distance(xs[:, cols], ys[rows, :]))
    jitter = min(30.0 / mpp, 0.03 * mean_minor)
    border = np.minimum(np.minimum(xs, width - xs), np.minimum(ys, height - ys)) - (2 * jitter + 4)
    values = np.minimum(values, border).astype(np.float32)
    offset = (
        int(rng.integers(0, noise.shape[1] - BANK_PAD)),
        int(rng.integers(0, noise.shape[0] - BANK_PAD)),
    )
    return Region(
        RasterField(field.x0, field.y0, step, values), float(jitter), noise, offset, (0, 0, width, height)
    )


def _tumour_region(rng: np.random.Generator, blob: Blob, mpp: float, noise: np.ndarray) -> Region:
    """Rasterise a tumour blob finely enough that its interpolated border follows the shape.

    The region's box must contain every pixel the mask can ever set (tiles outside it are skipped),
    so it is taken from the raster itself: the cells with a node above ``-jitter``, which bound the
    bilinear values, on a raster grown until its outer nodes are all below ``-jitter``.
    """
    extent = blob.extent()
    jitter = min(0.05 * extent, 8.0 / mpp)
    step = max(1.0, extent / 48.0)
    x0, y0, x1, y1 = blob.box()
    margin = 2 * jitter + 3 * step
    while True:
        field = RasterField.covering(x0 - margin, y0 - margin, x1 + margin, y1 + margin, step)
        xs, ys = field.node_coords()
        values = blob.distance(xs, ys).astype(np.float32)
        rim = np.concatenate([values[0], values[-1], values[:, 0], values[:, -1]])
        if rim.max() < -jitter:
            break
        margin *= 2
    rows, cols = np.nonzero(values > -jitter)
    box = (
        int(math.floor(field.x0 + (cols.min() - 1) * step)),
        int(math.floor(field.y0 + (rows.min() - 1) * step)),
        int(math.ceil(field.x0 + (cols.max() + 1) * step)) + 1,
        int(math.ceil(field.y0 + (rows.max() + 1) * step)) + 1,
    )
    offset = (
        int(rng.integers(0, noise.shape[1] - BANK_PAD)),
        int(rng.integers(0, noise.shape[0] - BANK_PAD)),
    )
    return Region(RasterField(field.x0, field.y0, step, values), float(jitter), noise, offset, box)


def _fits(tissue: Region, blob: Blob, jitter: float, taken: list[tuple[float, float, float, float]]) -> bool:
    """Whether a tumour blob (with its border roughness) lies inside tissue, clear of holes and others."""
    x0, y0, x1, y1 = blob.box()
    pad = jitter + tissue.jitter + 4
    for tx0, ty0, tx1, ty1 in taken:
        if x0 - pad < tx1 and x1 + pad > tx0 and y0 - pad < ty1 and y1 + pad > ty0:
            return False
    need = tissue.jitter + 2.0
    ring = blob.scaled(1.0 + (jitter + 2.0) / max(1.0, blob.radius)).outline(360)
    if np.any(tissue.field.sample(ring[:, 0], ring[:, 1]) <= need):
        return False
    spacing = max(1.0, min(tissue.field.step / 2, blob.extent() / 8))
    gx = np.arange(x0, x1 + spacing, spacing)
    gy = np.arange(y0, y1 + spacing, spacing)
    px, py = np.meshgrid(gx, gy)
    inside = blob.distance(px, py) > -(jitter + 2.0)
    return bool(np.all(tissue.field.sample(px[inside], py[inside]) > need))


def _place(
    rng: np.random.Generator,
    tissue: Region,
    category: str,
    extent: float,
    mpp: float,
    taken: list[tuple[float, float, float, float]],
) -> Blob:
    """Find a spot in tissue for a tumour of about ``extent`` pixels, shrinking it if none is found."""
    shape = Blob.random(rng, 0.0, 0.0, 1.0, roughness=0.25)
    values = tissue.field.values
    for attempt in range(10):
        blob = shape.scaled(extent / shape.extent())
        jitter = min(0.05 * extent, 8.0 / mpp)
        candidates = np.argwhere(values > 0.3 * extent + tissue.jitter)
        for _ in range(60 if candidates.size else 0):
            i, j = candidates[int(rng.integers(0, len(candidates)))]
            cx = tissue.field.x0 + (j + rng.uniform(-0.5, 0.5)) * tissue.field.step
            cy = tissue.field.y0 + (i + rng.uniform(-0.5, 0.5)) * tissue.field.step
            moved = blob.moved(float(cx), float(cy))
            if _fits(tissue, moved, jitter, taken):
                if attempt:
                    logger.info("%s region shrunk to %.0f um to fit", category, extent * mpp)
                return moved
        extent *= 0.85
    raise RuntimeError(f"could not place a {category} region in the tissue; use a larger slide")


def _extent_range(category: str, fit: float, mpp: float) -> tuple[float, float]:
    """Longest-extent range in pixels: the nominal microns, or fractions of what fits if smaller."""
    lo_um, hi_um = SIZE_RANGES_UM[category]
    lo_f, hi_f = FIT_FRACTION[category]
    hi = min(hi_um / mpp, hi_f * fit)
    lo = min(lo_um / mpp, lo_f * fit)
    if category == "itc":
        lo = max(lo, min(8.0, hi))
    return lo, max(lo, hi)


def _tumour_categories(rng: np.random.Generator, category: str) -> list[str]:
    """The regions of a slide, largest first: the slide's category plus a few smaller foci."""
    if category == "macro":
        extra = int(rng.integers(0, 3))
        return ["macro"] + [str(c) for c in rng.choice(["micro", "itc"], extra)]
    if category == "micro":
        return ["micro"] * int(rng.integers(1, 4)) + ["itc"] * int(rng.integers(0, 3))
    if category == "itc":
        return ["itc"] * int(rng.integers(1, 4))
    return []


def plan_layout(width: int, height: int, category: str, seed: int, mpp: float, noise: np.ndarray) -> Layout:
    """Draw a slide's tissue and tumour regions. Pure: same arguments, same layout."""
    if category not in CATEGORIES:
        raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
    tissue = _tissue(stream(seed, "tissue"), width, height, mpp, noise)
    rng = stream(seed, "tumours")
    fit = 2.0 * (float(tissue.field.values.max()) - tissue.jitter - 4.0) * 0.9
    tumours: list[Tumour] = []
    taken: list[tuple[float, float, float, float]] = []
    for cat in _tumour_categories(rng, category):
        lo, hi = _extent_range(cat, fit, mpp)
        blob = _place(rng, tissue, cat, float(rng.uniform(lo, hi)), mpp, taken)
        taken.append(blob.box())
        tumours.append(Tumour(cat, blob, _tumour_region(rng, blob, mpp, noise)))
    return Layout(width, height, mpp, tissue, tuple(tumours))
