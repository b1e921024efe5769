"""Shapes as signed-distance-like fields: irregular blobs, rasters of them, and per-tile masks.

A region (tissue, a hole in it, a tumour) is where a field is positive. The field is roughly the
distance in level-0 pixels to the region's border, so a margin test is a comparison. Fields are
evaluated once on a coarse raster; a tile then needs only a separable bilinear interpolation of a
few raster nodes, and the min/max of those nodes says at once whether the tile is
entirely inside, entirely outside, or on the border and needs a per-pixel mask. A periodic fine noise
added to the interpolated field roughens borders below the raster's resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from magnet_zoo.synth.texture import BANK_PAD


@dataclass(frozen=True)
class Blob:
    """An irregular star-shaped region: an ellipse whose radius varies with a few angular harmonics.

    ``harmonics`` holds ``(amplitude, frequency, phase)`` triples; radius at angle ``t`` is
    ``radius * (1 + sum(a * cos(k * t + phase)))``.
    """

    cx: float
    cy: float
    radius: float
    aspect: float = 1.0
    angle: float = 0.0
    harmonics: tuple[tuple[float, int, float], ...] = ()

    @classmethod
    def random(
        cls, rng: np.random.Generator, cx: float, cy: float, radius: float, *, roughness: float = 0.2
    ) -> Blob:
        """A random blob: aspect up to 1.5, harmonics 2..6 whose amplitudes sum to about ``roughness``."""
        ks = np.arange(2, 7)
        amps = rng.uniform(0.3, 1.0, ks.size) / ks
        amps *= roughness / amps.sum()
        phases = rng.uniform(0, 2 * math.pi, ks.size)
        harmonics = tuple((float(a), int(k), float(p)) for a, k, p in zip(amps, ks, phases, strict=True))
        return cls(cx, cy, radius, float(rng.uniform(1.0, 1.5)), float(rng.uniform(0, math.pi)), harmonics)

    def scaled(self, factor: float) -> Blob:
        """The same shape, ``factor`` times larger about its centre."""
        return Blob(self.cx, self.cy, self.radius * factor, self.aspect, self.angle, self.harmonics)

    def moved(self, cx: float, cy: float) -> Blob:
        return Blob(cx, cy, self.radius, self.aspect, self.angle, self.harmonics)

    def _radius_at(self, theta: np.ndarray) -> np.ndarray:
        r = np.ones_like(theta)
        for amp, k, phase in self.harmonics:
            r += amp * np.cos(k * theta + phase)
        return self.radius * r

    def distance(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Approximate signed distance to the border in pixels, positive inside.

        Not Euclidean: the gap along the ray from the centre in the blob's stretched frame, divided by
        the aspect ratio; within a small factor of the true distance for these smooth shapes. Callers
        use generous margins and check placements at sampled points rather than trusting it.
        """
        dx, dy = x - self.cx, y - self.cy
        ca, sa = math.cos(self.angle), math.sin(self.angle)
        u = dx * ca + dy * sa
        v = (-dx * sa + dy * ca) * self.aspect
        rho = np.hypot(u, v)
        return (self._radius_at(np.arctan2(v, u)) - rho) / self.aspect

    def outline(self, n: int = 720) -> np.ndarray:
        """Border points, shape (n, 2) as x, y."""
        theta = np.linspace(0, 2 * math.pi, n, endpoint=False)
        r = self._radius_at(theta)
        u, v = r * np.cos(theta), r * np.sin(theta) / self.aspect
        ca, sa = math.cos(self.angle), math.sin(self.angle)
        return np.stack([self.cx + u * ca - v * sa, self.cy + u * sa + v * ca], axis=1)

    def box(self) -> tuple[float, float, float, float]:
        """Bounding box of the outline as x0, y0, x1, y1."""
        pts = self.outline()
        return float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max())

    def extent(self) -> float:
        """Longest side of the bounding box."""
        x0, y0, x1, y1 = self.box()
        return max(x1 - x0, y1 - y0)


@dataclass(frozen=True)
class RasterField:
    """A field sampled on a regular grid of level-0 pixel positions ``(x0 + j * step, y0 + i * step)``.

    Values between nodes are bilinear; outside the grid they extend the border nodes.
    """

    x0: float
    y0: float
    step: float
    values: np.ndarray

    @classmethod
    def covering(cls, x0: float, y0: float, x1: float, y1: float, step: float) -> RasterField:
        """An all-zero raster whose nodes cover ``[x0, x1] x [y0, y1]`` (one node beyond each side)."""
        nx = int(math.ceil((x1 - x0) / step)) + 2
        ny = int(math.ceil((y1 - y0) / step)) + 2
        return cls(x0 - step * 0.5, y0 - step * 0.5, step, np.zeros((ny, nx), np.float32))

    def node_coords(self) -> tuple[np.ndarray, np.ndarray]:
        """Level-0 x (shape (1, nx)) and y (shape (ny, 1)) of the nodes, for evaluating shapes on them."""
        ny, nx = self.values.shape
        xs = self.x0 + self.step * np.arange(nx, dtype=np.float64)
        ys = self.y0 + self.step * np.arange(ny, dtype=np.float64)
        return xs[None, :], ys[:, None]

    def _axis(self, start: float, length: int, origin: float, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Lower node index and fraction towards the next node for pixel centres along one axis."""
        g = (start + 0.5 + np.arange(length) - origin) / self.step
        lower = np.clip(np.floor(g).astype(np.int64), 0, count - 2)
        return lower, np.clip(g - lower, 0.0, 1.0).astype(np.float32)

    def tile(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """The interpolated field at the pixel centres of ``[x, x + w) x [y, y + h)``, shape (h, w).

        Separable: interpolate the few node rows along x, then those rows along y (no BLAS call,
        which for these small products is slower than plain indexing under thread contention).
        """
        ny, nx = self.values.shape
        jx, fx = self._axis(x, w, self.x0, nx)
        iy, fy = self._axis(y, h, self.y0, ny)
        r0, r1 = int(iy[0]), int(iy[-1]) + 2
        rows = self.values[r0:r1]
        along_x = rows[:, jx] * (1 - fx) + rows[:, jx + 1] * fx
        local = iy - r0
        return along_x[local] * (1 - fy)[:, None] + along_x[local + 1] * fy[:, None]

    def bounds(self, x: int, y: int, w: int, h: int) -> tuple[float, float]:
        """Min and max of the field over a pixel rectangle (exact bounds of the bilinear values)."""
        ny, nx = self.values.shape
        jx, _ = self._axis(x, w, self.x0, nx)
        iy, _ = self._axis(y, h, self.y0, ny)
        block = self.values[int(iy[0]) : int(iy[-1]) + 2, int(jx[0]) : int(jx[-1]) + 2]
        return float(block.min()), float(block.max())

    def sample(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Bilinear values at arbitrary level-0 points (same shapes as ``x`` and ``y``)."""
        ny, nx = self.values.shape
        gx = np.clip((np.asarray(x, np.float64) - self.x0) / self.step, 0, nx - 1)
        gy = np.clip((np.asarray(y, np.float64) - self.y0) / self.step, 0, ny - 1)
        j0 = np.minimum(np.floor(gx).astype(np.int64), nx - 2)
        i0 = np.minimum(np.floor(gy).astype(np.int64), ny - 2)
        fx, fy = gx - j0, gy - i0
        v = self.values
        return (
            v[i0, j0] * (1 - fx) * (1 - fy)
            + v[i0, j0 + 1] * fx * (1 - fy)
            + v[i0 + 1, j0] * (1 - fx) * fy
            + v[i0 + 1, j0 + 1] * fx * fy
        )


@dataclass(frozen=True)
class Region:
    """A raster field plus border roughness: the region is ``field + jitter * noise > 0``.

    ``noise`` is a padded periodic array in [-1, 1]; ``noise_offset`` decorrelates regions sharing it.
    """

    field: RasterField
    jitter: float
    noise: np.ndarray
    noise_offset: tuple[int, int]
    box: tuple[int, int, int, int]
    """Pixels outside ``[x0, x1) x [y0, y1)`` are certainly outside the region."""

    def intersects(self, x: int, y: int, w: int, h: int) -> bool:
        x0, y0, x1, y1 = self.box
        return x < x1 and x + w > x0 and y < y1 and y + h > y0

    def classify(self, x: int, y: int, w: int, h: int) -> int:
        """1 if the whole rectangle is inside, -1 if all outside, 0 if it needs a per-pixel mask."""
        if not self.intersects(x, y, w, h):
            return -1
        lo, hi = self.field.bounds(x, y, w, h)
        if lo > self.jitter:
            return 1
        if hi < -self.jitter:
            return -1
        return 0

    def mask(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Boolean mask of the region over a pixel rectangle."""
        values = self.field.tile(x, y, w, h)
        if self.jitter > 0:
            period = self.noise.shape[0] - BANK_PAD
            nx = (x + self.noise_offset[0]) % period
            ny = (y + self.noise_offset[1]) % period
            if w <= BANK_PAD and h <= BANK_PAD:  # a tile: the padded noise makes this a plain slice
                noise = self.noise[ny : ny + h, nx : nx + w]
            else:
                noise = self.noise[np.ix_((ny + np.arange(h)) % period, (nx + np.arange(w)) % period)]
            values += self.jitter * noise
        return values > 0
