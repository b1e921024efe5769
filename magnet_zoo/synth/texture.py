"""Periodic H&E-like texture banks: normal tissue and tumour whose mean colours match.

Why a bank: a 100,000 x 100,000 slide has 10^10 pixels, far too many to synthesise one by one in
Python. Instead each texture is rendered once, at 2048 x 2048, *periodically* (everything wraps
around the edges), and a slide reads its tissue as ``bank[(y + oy) % P, (x + ox) % P]``: one array
copy per tile, no seams at tile borders, and nuclei never cut in half.

Colour comes from a Beer-Lambert stain model: per pixel a haematoxylin amount ``h`` (nuclei, purple)
and an eosin amount ``e`` (stroma, pink) give ``RGB = I0 * exp(-(h * H + e * E))`` with the usual
Ruifrok-Johnston stain vectors. The two textures differ in what a pathologist would look at:

- normal: small, round, dark, evenly spaced lymphocyte-like nuclei in fibrous pink stroma;
- tumour: large pleomorphic vesicular nuclei (pale centre, dark rim, nucleolus), crowded into
  clumps with pale cytoplasm, separated by stroma.

The tumour has more nuclear area, so it starts out darker; its stroma is then lightened and a small
per-channel offset added until its mean RGB equals the normal texture's mean (to well under one grey
level). Colour averages therefore cannot tell the classes apart; texture can.

A few fixed *variants* (different random nuclei and fibres) exist; a slide picks one, a D4
orientation, a texture offset and a stain tint (a per-channel optical-density gain), and the tumour
is re-matched to the normal mean after the tint so the invariant holds on every slide.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

BANK_PERIOD = 2048
"""Side of one period of every texture bank, in pixels."""
BANK_PAD = 512
"""Extra wrapped rows/columns stored after each period so any tile up to this size is a plain slice."""
N_VARIANTS = 2
"""Distinct bank renderings; slides also vary by orientation, offset and stain tint."""

STAIN_H = np.array([0.5626, 0.7201, 0.4062])
STAIN_E = np.array([0.2159, 0.8012, 0.5581])
"""Optical density per unit of stain (Macenko's reference H&E vectors): purple and pink."""
ILLUMINANT = np.array([252.0, 250.0, 252.0])

_BANK_SEED = 0x5EED_BA4C
"""Root seed of the variant renderings: the banks are part of the generator, not of a slide's seed."""


def periodic_noise(
    rng: np.random.Generator,
    shape: tuple[int, int],
    sigma: float,
    *,
    anisotropy: float = 1.0,
    angle: float = 0.0,
) -> np.ndarray:
    """Gaussian-filtered white noise that wraps around both axes, zero mean and unit std (float32).

    ``sigma`` is the correlation length in pixels along the main axis; ``anisotropy`` > 1 shortens it
    across ``angle`` (radians), which draws fibre-like streaks.
    """
    white = rng.standard_normal(shape)
    spectrum = np.fft.rfft2(white)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    fu = fx * math.cos(angle) + fy * math.sin(angle)
    fv = -fx * math.sin(angle) + fy * math.cos(angle)
    two_pi_sigma = 2.0 * math.pi * sigma
    spectrum *= np.exp(-0.5 * two_pi_sigma**2 * ((fu * anisotropy) ** 2 + fv**2))
    spectrum[0, 0] = 0.0
    out = np.fft.irfft2(spectrum, s=shape)
    std = out.std()
    return (out / (std if std > 0 else 1.0)).astype(np.float32)


def _wrap_pad(image: np.ndarray, pad: int) -> np.ndarray:
    """Append ``pad`` wrapped rows and columns so crops near the period's end need no modulo."""
    return np.pad(image, ((0, pad), (0, pad)) + ((0, 0),) * (image.ndim - 2), mode="wrap")


class _Canvas:
    """Two periodic float maps (nuclear stain ``h`` and coverage ``alpha``) that sprites are stamped on.

    Sprites are drawn on a canvas with a margin and the margins are folded back onto the opposite
    edges, so a nucleus straddling the period's edge appears on both sides.
    """

    def __init__(self, period: int, margin: int) -> None:
        self.period = period
        self.margin = margin
        size = period + 2 * margin
        self.h = np.zeros((size, size), np.float32)
        self.alpha = np.zeros((size, size), np.float32)

    def stamp(self, cx: float, cy: float, h: np.ndarray, alpha: np.ndarray) -> None:
        """Combine one sprite (``h`` and ``alpha`` patches centred at ``cx, cy``) by per-pixel max."""
        ph, pw = alpha.shape
        x0 = int(math.floor(cx)) - pw // 2 + self.margin
        y0 = int(math.floor(cy)) - ph // 2 + self.margin
        region = (slice(y0, y0 + ph), slice(x0, x0 + pw))
        np.maximum(self.h[region], h, out=self.h[region])
        np.maximum(self.alpha[region], alpha, out=self.alpha[region])

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """The period-sized maps with the margins wrapped onto the opposite edges."""
        return self._fold(self.h), self._fold(self.alpha)

    def _fold(self, canvas: np.ndarray) -> np.ndarray:
        p, m = self.period, self.margin
        out = canvas[m : m + p, m : m + p].copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy == 0 and dx == 0:
                    continue
                # the part of the canvas that lies one period away in direction (dy, dx)
                ys = slice(m + dy * p, m + dy * p + p)
                xs = slice(m + dx * p, m + dx * p + p)
                src_y0, src_y1 = max(ys.start, 0), min(ys.stop, canvas.shape[0])
                src_x0, src_x1 = max(xs.start, 0), min(xs.stop, canvas.shape[1])
                if src_y0 >= src_y1 or src_x0 >= src_x1:
                    continue
                dst = out[src_y0 - ys.start : src_y1 - ys.start, src_x0 - xs.start : src_x1 - xs.start]
                np.maximum(dst, canvas[src_y0:src_y1, src_x0:src_x1], out=dst)
        return out


def _nucleus_sprite(
    rng: np.random.Generator,
    rx: float,
    ry: float,
    angle: float,
    darkness: float,
    grain: np.ndarray,
    *,
    vesicular: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one nucleus: an anti-aliased ellipse with chromatin grain, returning (h, alpha) patches.

    Vesicular nuclei (tumour) have a pale centre, a dark rim and one or two nucleoli.
    """
    half = int(math.ceil(max(rx, ry))) + 2
    coords = np.arange(-half, half + 1, dtype=np.float32) + np.float32(rng.uniform(-0.5, 0.5))
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    ca, sa = math.cos(angle), math.sin(angle)
    u = xx * ca + yy * sa
    v = -xx * sa + yy * ca
    rho = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    alpha = np.clip((1.0 - rho) * min(rx, ry) + 0.5, 0.0, 1.0)
    gy = int(rng.integers(0, grain.shape[0] - alpha.shape[0]))
    gx = int(rng.integers(0, grain.shape[1] - alpha.shape[1]))
    texture = grain[gy : gy + alpha.shape[0], gx : gx + alpha.shape[1]]
    if vesicular:
        rim = np.clip((rho - 0.55) / 0.35, 0.0, 1.0)
        stain = 0.5 + 0.5 * rim + 0.22 * texture
        for _ in range(int(rng.integers(1, 3))):
            nx, ny = rng.uniform(-0.35, 0.35) * rx, rng.uniform(-0.35, 0.35) * ry
            radius = max(1.0, 0.16 * min(rx, ry))
            stain += 0.9 * np.exp(-((xx - nx) ** 2 + (yy - ny) ** 2) / (2 * radius**2))
    else:
        stain = 1.0 + 0.18 * texture
    h = (darkness * np.clip(stain, 0.2, 2.0) * alpha).astype(np.float32)
    return h, alpha.astype(np.float32)


@dataclass(frozen=True)
class _Scale:
    """Pixel sizes of tissue structures at a given resolution (structures are defined in microns)."""

    px_per_um: float

    def __call__(self, microns: float) -> float:
        return microns * self.px_per_um


def _stroma(rng: np.random.Generator, p: int, s: _Scale) -> tuple[np.ndarray, np.ndarray]:
    """Eosin and background-haematoxylin maps of fibrous stroma with a few pale gaps."""
    fibres = np.zeros((p, p), np.float32)
    for _ in range(2):
        angle = rng.uniform(0, math.pi)
        streak = periodic_noise(rng, (p, p), s(6.0), anisotropy=0.18, angle=angle)
        fibres += 0.5 * np.abs(streak)
    coarse = periodic_noise(rng, (p, p), s(40.0))
    gaps = np.clip((periodic_noise(rng, (p, p), s(12.0)) - 1.6) * 1.5, 0.0, 1.0)
    eosin = 0.42 * (0.65 + 0.45 * fibres + 0.08 * coarse) * (1.0 - 0.75 * gaps)
    h_bg = 0.07 + 0.02 * coarse
    return eosin.astype(np.float32), h_bg.astype(np.float32)


def _jittered_grid(rng: np.random.Generator, p: int, spacing: float, jitter: float = 0.45) -> np.ndarray:
    """Roughly evenly spaced points over one period (a jittered square grid), shape (n, 2) as x, y."""
    n = max(1, int(round(p / spacing)))
    step = p / n
    gy, gx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    pts = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.float64) + 0.5
    pts += rng.uniform(-jitter, jitter, pts.shape)
    return (pts * step) % p


def _normal_nuclei(rng: np.random.Generator, p: int, s: _Scale, grain: np.ndarray) -> _Canvas:
    """Small round dark lymphocyte-like nuclei, evenly spaced, plus a few spindle fibroblast nuclei."""
    margin = int(s(12.0)) + 4
    canvas = _Canvas(p, margin)
    density = periodic_noise(rng, (p, p), s(60.0))
    for x, y in _jittered_grid(rng, p, s(11.0)):
        local = density[int(y), int(x)]
        if rng.random() > 0.72 + 0.12 * local:
            continue
        r = s(rng.uniform(2.9, 3.7))
        h, a = _nucleus_sprite(
            rng,
            r * rng.uniform(1.0, 1.2),
            r,
            rng.uniform(0, math.pi),
            rng.uniform(1.0, 1.35),
            grain,
            vesicular=False,
        )
        canvas.stamp(x, y, h, a)
    for x, y in rng.uniform(0, p, (int((p / s(45.0)) ** 2), 2)):
        h, a = _nucleus_sprite(
            rng,
            s(rng.uniform(5.0, 7.0)),
            s(rng.uniform(1.3, 1.8)),
            rng.uniform(0, math.pi),
            rng.uniform(0.8, 1.05),
            grain,
            vesicular=False,
        )
        canvas.stamp(x, y, h, a)
    return canvas


def _tumour_nuclei(
    rng: np.random.Generator, p: int, s: _Scale, grain: np.ndarray
) -> tuple[_Canvas, np.ndarray]:
    """Large pleomorphic vesicular nuclei crowded in clumps; also returns the clump (cytoplasm) map."""
    margin = int(s(30.0)) + 4
    canvas = _Canvas(p, margin)
    clumps = _Canvas(p, margin)
    for cx, cy in _jittered_grid(rng, p, s(34.0), jitter=0.3):
        radius = s(rng.uniform(9.0, 14.0))
        # the clump's pale cytoplasm: a soft disc under its nuclei
        half = int(radius * 1.4) + 2
        coords = np.arange(-half, half + 1, dtype=np.float32)
        yy, xx = np.meshgrid(coords, coords, indexing="ij")
        disc = np.clip((radius * 1.15 - np.sqrt(xx**2 + yy**2)) / max(2.0, 0.2 * radius), 0.0, 1.0)
        clumps.stamp(cx, cy, np.zeros_like(disc), disc.astype(np.float32))
        count = int(rng.integers(4, 9))
        angles = rng.uniform(0, 2 * math.pi, count)
        dists = radius * np.sqrt(rng.uniform(0.0, 0.8, count))
        for ang, dist in zip(angles, dists, strict=True):
            r = s(rng.uniform(4.4, 6.4))
            h, a = _nucleus_sprite(
                rng,
                r * rng.uniform(1.05, 1.55),
                r,
                rng.uniform(0, math.pi),
                rng.uniform(0.85, 1.2),
                grain,
                vesicular=True,
            )
            canvas.stamp(cx + dist * math.cos(ang), cy + dist * math.sin(ang), h, a)
    _, clump_alpha = clumps.folded()
    return canvas, clump_alpha


def _to_rgb(h: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Beer-Lambert: stain amounts to float RGB in [0, 255]."""
    od = h[..., None] * STAIN_H.astype(np.float32) + e[..., None] * STAIN_E.astype(np.float32)
    return ILLUMINANT.astype(np.float32) * np.exp(-od)


@dataclass(frozen=True)
class BankVariant:
    """One rendered variant: normal and tumour textures (uint8, one period each) and their histograms."""

    normal: np.ndarray
    tumour: np.ndarray
    normal_hist: np.ndarray
    tumour_hist: np.ndarray


def _histograms(rgb: np.ndarray) -> np.ndarray:
    """Per-channel 256-bin histograms, shape (3, 256): enough to get the mean after any LUT."""
    return np.stack([np.bincount(rgb[..., c].ravel(), minlength=256) for c in range(3)]).astype(np.int64)


@functools.lru_cache(maxsize=N_VARIANTS)
def bank_variant(variant: int, mpp: float) -> BankVariant:
    """Render (once per process, then cached) normal and tumour textures for one variant and resolution.

    The tumour is mean-matched to the normal texture: its stroma eosin is scaled by bisection until the
    grey levels agree, then the remaining per-channel difference is added as an offset.
    """
    if not 0 <= variant < N_VARIANTS:
        raise ValueError(f"variant must be in [0, {N_VARIANTS}), got {variant}")
    rng = np.random.default_rng([_BANK_SEED, variant])
    p = BANK_PERIOD
    s = _Scale(1.0 / mpp)
    grain = periodic_noise(rng, (256, 256), max(0.6, s(0.5)))

    # both textures share the stroma, so it continues across a tumour's border
    eosin, h_bg = _stroma(rng, p, s)
    nuc_h, nuc_a = _normal_nuclei(rng, p, s, grain).folded()
    normal = _to_rgb(h_bg * (1 - nuc_a) + nuc_h, eosin * (1 - 0.7 * nuc_a) + 0.06 * nuc_a)

    canvas, clump = _tumour_nuclei(rng, p, s, grain)
    t_h, t_a = canvas.folded()
    t_hbg = h_bg * (1 - clump) + 0.12 * clump  # lilac cytoplasm inside the clumps
    t_e = eosin * (1 - clump) + 0.22 * clump

    def tumour_rgb(k: float, sub: int = 1) -> np.ndarray:
        a = t_a[::sub, ::sub]
        return _to_rgb(
            t_hbg[::sub, ::sub] * (1 - a) + t_h[::sub, ::sub], t_e[::sub, ::sub] * k * (1 - 0.7 * a)
        )

    # eosin scale k of the tumour's stroma and cytoplasm making its grey level equal the normal's
    target = float(normal.mean())
    lo, hi = 0.05, 2.5
    for _ in range(16):
        mid = 0.5 * (lo + hi)
        if float(tumour_rgb(mid, sub=4).mean()) > target:
            lo = mid  # too light: more eosin
        else:
            hi = mid
    tumour = tumour_rgb(0.5 * (lo + hi))
    normal_u8 = np.clip(np.rint(normal), 0, 255).astype(np.uint8)
    want = normal_u8.mean(axis=(0, 1))
    shift = np.zeros(3)
    for _ in range(4):  # per-channel offset, repeated because clipping at 0/255 eats part of it
        tumour_u8 = np.clip(np.rint(tumour + shift), 0, 255).astype(np.uint8)
        shift += want - tumour_u8.mean(axis=(0, 1))
    logger.debug(
        "bank variant %d at %.3f mpp: normal mean %s, tumour mean %s",
        variant,
        mpp,
        normal_u8.mean(axis=(0, 1)),
        tumour_u8.mean(axis=(0, 1)),
    )
    return BankVariant(normal_u8, tumour_u8, _histograms(normal_u8), _histograms(tumour_u8))


def _stain_lut(gains: np.ndarray) -> np.ndarray:
    """Per-channel LUTs scaling optical density by ``gains``: a stain that is stronger or weaker."""
    v = np.arange(256, dtype=np.float64)
    od = -np.log(np.clip(v, 1.0, 255.0) / 255.0)
    return 255.0 * np.exp(-od[None, :] * gains[:, None])


def _lut_mean(hist: np.ndarray, lut: np.ndarray) -> np.ndarray:
    return (hist * lut).sum(axis=1) / hist.sum(axis=1)


def _orient(image: np.ndarray, orientation: int) -> np.ndarray:
    """One of the 8 D4 orientations (rotations by 90 degrees, optionally transposed)."""
    out = np.rot90(image, orientation % 4)
    if orientation >= 4:
        out = out.transpose(1, 0, 2)
    return out


@dataclass(frozen=True)
class TextureBank:
    """The two textures one slide draws from, padded for slicing: ``crop`` returns views, not copies."""

    normal: np.ndarray
    tumour: np.ndarray
    offset: tuple[int, int]
    period: int = BANK_PERIOD

    def crop(self, which: str, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Texture at level-0 pixels ``[y, y + h) x [x, x + w)`` (a view; ``w, h <= BANK_PAD``)."""
        bank = self.normal if which == "normal" else self.tumour
        bx = (x + self.offset[0]) % self.period
        by = (y + self.offset[1]) % self.period
        return bank[by : by + h, bx : bx + w]


def slide_bank(rng: np.random.Generator, mpp: float) -> TextureBank:
    """Draw a slide's texture bank: variant, orientation, offset and stain tint from ``rng``.

    After tinting, the tumour LUT gets a per-channel shift so the tumour's mean equals the normal's
    mean again (computed exactly from the variant's histograms).
    """
    variant = int(rng.integers(0, N_VARIANTS))
    orientation = int(rng.integers(0, 8))
    offset = (int(rng.integers(0, BANK_PERIOD)), int(rng.integers(0, BANK_PERIOD)))
    gains = rng.uniform(0.88, 1.12, 3)
    base = bank_variant(variant, round(float(mpp), 4))
    lut = _stain_lut(gains)
    shift = _lut_mean(base.normal_hist, lut) - _lut_mean(base.tumour_hist, lut)
    lut_n = np.clip(np.rint(lut), 0, 255).astype(np.uint8)
    lut_t = np.clip(np.rint(lut + shift[:, None]), 0, 255).astype(np.uint8)
    for _ in range(3):  # absorb rounding and clipping: nudge until the integer LUT means agree
        residual = _lut_mean(base.normal_hist, lut_n.astype(np.float64)) - _lut_mean(
            base.tumour_hist, lut_t.astype(np.float64)
        )
        if np.all(np.abs(residual) < 0.05):
            break
        shift = shift + residual
        lut_t = np.clip(np.rint(lut + shift[:, None]), 0, 255).astype(np.uint8)

    def prepare(image: np.ndarray, luts: np.ndarray) -> np.ndarray:
        tinted = np.empty_like(image)
        for c in range(3):
            tinted[..., c] = luts[c][image[..., c]]
        return np.ascontiguousarray(_wrap_pad(_orient(tinted, orientation), BANK_PAD))

    return TextureBank(prepare(base.normal, lut_n), prepare(base.tumour, lut_t), offset)


@functools.lru_cache(maxsize=2)
def edge_noise(mpp: float) -> np.ndarray:
    """Periodic fine noise in [-1, 1] (float32, padded like the banks) that roughens mask edges."""
    rng = np.random.default_rng([_BANK_SEED, 99])
    p = 1024
    fine = periodic_noise(rng, (p, p), max(1.0, 3.0 / mpp))
    coarse = periodic_noise(rng, (p, p), max(2.0, 12.0 / mpp))
    noise = np.clip((0.55 * fine + 0.45 * coarse) / 2.2, -1.0, 1.0).astype(np.float32)
    return np.ascontiguousarray(_wrap_pad(noise, BANK_PAD))
