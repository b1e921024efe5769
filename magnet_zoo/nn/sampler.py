"""Differentiable crop-and-resample of an image under an affine transform (the MagNet "sampler").

A magnifying layer turns its attention into ``theta = [[s, 0, tx], [0, s, ty]]`` and resamples a
crop of ``I'`` through it. The crop's pixels are never trained (they come from the slide); what has
to be learnt is *where* to look, so the only gradient that matters is the one with respect to
``theta``, which flows through the sampling grid.

Two samplers share one forward value (the bilinear one, ``align_corners=False``, zeros outside the
image) and differ in the gradient they give the grid:

* ``"bilinear"``: plain :func:`torch.nn.functional.grid_sample`. Its grid gradient is the slope of
  the bilinear interpolant between the four source pixels around each sampling point. Under strong
  down-scaling (an output pixel spans many source pixels) that slope describes texture far finer
  than the crop can show, so it is close to noise with respect to how the crop really changes when
  it moves (paper Fig. 4, Jiang et al. 2019).
* ``"linearized"``: linearized multi-sampling (Jiang, Sun, Tagliasacchi, Trulls, Yi, "Linearized
  Multi-Sampling for Differentiable Image Transformation", ICCV 2019), our own implementation.
  Around every sampling point we take ``num_samples - 1`` Gaussian-jittered points, sample them
  bilinearly, fit a plane ``I ~ a + g . delta`` per output pixel and channel by least squares, and
  use the fitted slope ``g`` as the gradient of the output with respect to the grid
  (straight-through: the forward value stays the bilinear value at the query point). The jitter
  spans a quarter of an output pixel plus one source pixel, so the slope describes the image at
  the scale the crop actually resolves.

Coordinates follow PyTorch's ``align_corners=False`` convention: ``[-1, 1]`` spans the image
extent and pixel ``i`` of ``n`` has its centre at ``(2 i + 1) / n - 1``.

Memory of the linearized gradient: the forward pass keeps the fitted slopes, ``2 C`` values per
output pixel (1.2 MB per 3x224x224 crop in float32), and streams the jittered samples one offset at
a time, so its transient peak is about ``3 C + 9`` values per output pixel.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

MODES = ("bilinear", "linearized")
"""Sampler names accepted by :func:`sample`."""

DEFAULT_JITTER_OUTPUT_PX = 0.25
"""Default jitter standard deviation, part 1: this fraction of one output pixel's spacing."""
DEFAULT_JITTER_SOURCE_PX = 1.0
"""Default jitter standard deviation, part 2: this many source pixels (added to part 1)."""


def _check_theta(theta: torch.Tensor) -> None:
    if theta.dim() != 3 or theta.shape[1:] != (2, 3):
        raise ValueError(f"theta must be shaped (N, 2, 3), got {tuple(theta.shape)}")
    if not theta.is_floating_point():
        raise ValueError(f"theta must be a floating-point tensor, got {theta.dtype}")


def affine_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """Sampling grid ``(N, size, size, 2)`` of a square ``size`` x ``size`` crop under ``theta``.

    Output pixel centres at ``(2 i + 1) / size - 1`` are mapped through ``theta`` (N, 2, 3) into the
    source's normalised ``[-1, 1]`` coordinates (last dimension ``(x, y)``), exactly as
    ``F.affine_grid(theta, (N, C, size, size), align_corners=False)``. Differentiable in ``theta``.
    """
    _check_theta(theta)
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    return F.affine_grid(theta, [theta.shape[0], 1, size, size], align_corners=False)


def jitter_sigma(
    theta: torch.Tensor,
    size: int,
    image_hw: tuple[int, int],
    output_px: float = DEFAULT_JITTER_OUTPUT_PX,
    source_px: float = DEFAULT_JITTER_SOURCE_PX,
) -> torch.Tensor:
    """Per-crop standard deviation ``(N, 2)`` (x, y) of the linearized sampler's jitter.

    In normalised source coordinates: ``output_px`` output pixels plus ``source_px`` source pixels.
    One output pixel spans ``2 sqrt(|det A|) / size`` (``A`` = the linear part of ``theta``; ``2 s /
    size`` for MagNet's isotropic crops), one source pixel ``2 / W`` across and ``2 / H`` down. The
    output-pixel part lets the fitted slope see the whole footprint of a down-scaling crop; the
    source-pixel part keeps the fit well posed when the crop magnifies.
    """
    _check_theta(theta)
    height, width = image_hw
    lin = theta.detach()[:, :, :2]
    det = lin[:, 0, 0] * lin[:, 1, 1] - lin[:, 0, 1] * lin[:, 1, 0]
    out_spacing = 2.0 * det.abs().sqrt() / size
    src = torch.tensor([2.0 / width, 2.0 / height], dtype=theta.dtype, device=theta.device)
    return output_px * out_spacing[:, None] + source_px * src[None, :]


def _plane_weights(pattern: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares weights ``(wx, wy)``, each (K-1, h, w), that turn samples into plane slopes.

    ``pattern`` (K-1, h, w, 2) holds the unit-variance offsets ``z_k`` of the jittered points; the
    query point is ``z_0 = 0``. Fitting ``v_k ~ a + g . z_k`` by ordinary least squares gives, with
    centred offsets ``c_k = z_k - mean(z)`` and ``M = sum_k c_k c_k^T`` (2x2 per pixel, ``k`` from
    0), ``g = sum_k M^-1 c_k v_k``. The weights ``M^-1 c_k`` depend only on the offsets, so they
    are computed once and shared by every channel and crop. They sum to zero over all ``k``, so
    ``g = sum_{k>=1} M^-1 c_k (v_k - v_0)``: the query point needs no weight of its own.
    """
    num = pattern.shape[0] + 1
    mean = pattern.sum(dim=0) / num
    centred = pattern - mean
    cx, cy = centred[..., 0], centred[..., 1]
    mx, my = mean[..., 0], mean[..., 1]  # the query point's centred offset is -mean
    mxx = (cx * cx).sum(dim=0) + mx * mx
    mxy = (cx * cy).sum(dim=0) + mx * my
    myy = (cy * cy).sum(dim=0) + my * my
    inv_det = (mxx * myy - mxy * mxy).clamp_min(torch.finfo(pattern.dtype).tiny).reciprocal()
    wx = (myy * cx - mxy * cy) * inv_det
    wy = (mxx * cy - mxy * cx) * inv_det
    return wx.contiguous(), wy.contiguous()


def _fit_slopes(
    image: torch.Tensor, grid: torch.Tensor, centre: torch.Tensor, sigma: torch.Tensor, num_samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares plane slopes ``(gx, gy)``, each (N, C, h, w), of ``image`` around ``grid``.

    Jittered points are ``grid + sigma * z_k`` with ``z_k ~ N(0, I)`` (k = 1 .. K-1): one pattern
    of ``z`` per output pixel position, drawn from torch's RNG on the grid's device and shared by
    the crops of the batch (a pattern per crop costs as much RNG time as the sampling itself on a
    CPU and gains nothing, as the crops' contents differ). With ``delta = sigma * z`` the slope in
    normalised coordinates is the ``z``-slope divided by ``sigma`` (see :func:`_plane_weights`).
    Samples stream one offset at a time, so only the two slope accumulators stay in memory.
    """
    n = grid.shape[0]
    pattern = torch.randn(num_samples - 1, *grid.shape[1:], dtype=grid.dtype, device=grid.device)
    wx, wy = _plane_weights(pattern)
    sig = sigma.to(grid.dtype).view(n, 1, 1, 2)
    gx = gy = centre  # placeholders, replaced at k = 1
    for k in range(num_samples - 1):
        jittered = torch.addcmul(grid, sig, pattern[k])
        u = F.grid_sample(image, jittered, mode="bilinear", padding_mode="zeros", align_corners=False)
        u.sub_(centre)
        if k == 0:
            gx, gy = u * wx[k], u * wy[k]
        else:
            gx.addcmul_(u, wx[k])
            gy.addcmul_(u, wy[k])
    gx.div_(sig[..., 0].view(n, 1, 1, 1))
    gy.div_(sig[..., 1].view(n, 1, 1, 1))
    return gx, gy


class LinearizedGridSample(torch.autograd.Function):
    """Bilinear ``grid_sample`` forward with a linearized multi-sampling gradient for the grid.

    ``forward(image, grid, sigma, num_samples)``: ``image`` (N, C, H, W), ``grid`` (N, h, w, 2),
    ``sigma`` (N, 2) jitter standard deviation in normalised coordinates. Returns (N, C, h, w), the
    bilinear value at each grid point. The grid's gradient is the fitted plane slope (see
    :func:`_fit_slopes`); it is computed in the forward pass only when the grid requires a gradient.
    If the image requires one, it gets bilinear sampling's exact image gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, image: torch.Tensor, grid: torch.Tensor, sigma: torch.Tensor, num_samples: int
    ) -> torch.Tensor:
        out = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        gx = gy = None
        if ctx.needs_input_grad[1]:
            with torch.no_grad():
                gx, gy = _fit_slopes(image, grid, out, sigma, num_samples)
        ctx.save_for_backward(gx, gy, image if ctx.needs_input_grad[0] else None, grid)
        return out

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        gx, gy, image, grid = ctx.saved_tensors
        grad_image = grad_grid = None
        if gx is not None:
            grad_grid = torch.stack([(grad_out * gx).sum(dim=1), (grad_out * gy).sum(dim=1)], dim=-1)
        if image is not None:
            with torch.enable_grad():
                leaf = image.detach().requires_grad_(True)
                value = F.grid_sample(
                    leaf, grid.detach(), mode="bilinear", padding_mode="zeros", align_corners=False
                )
                (grad_image,) = torch.autograd.grad(value, leaf, grad_out)
        return grad_image, grad_grid, None, None


def _autocast_enabled(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4 has no device argument
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return bool(torch.is_autocast_enabled())


def sample(
    image: torch.Tensor,
    theta: torch.Tensor,
    size: int,
    mode: str = "linearized",
    num_samples: int = 8,
    *,
    jitter_output_px: float = DEFAULT_JITTER_OUTPUT_PX,
    jitter_source_px: float = DEFAULT_JITTER_SOURCE_PX,
) -> torch.Tensor:
    """Crop-and-resample ``image`` (N, C, H, W) through ``theta`` (N, 2, 3) to (N, C, size, size).

    Outside the image is zero (black). ``mode="bilinear"`` is plain ``F.grid_sample`` on
    :func:`affine_grid` (``align_corners=False``, zero padding). ``mode="linearized"`` has the same
    forward value and a linearized multi-sampling gradient with respect to ``theta`` (the module
    docstring says why): ``num_samples`` points per output pixel (the query point plus
    ``num_samples - 1`` jittered ones, at least 3 in all), jitter standard deviation
    ``jitter_output_px`` output pixels plus ``jitter_source_px`` source pixels. The jitter is drawn
    from torch's RNG on the image's device, and only when ``theta`` needs a gradient, so results
    are reproducible under ``torch.manual_seed``. Linearized sampling computes in float32 (float64
    for float64 images), returns float32 under autocast and the image's dtype otherwise.
    """
    if mode not in MODES:
        raise ValueError(f"unknown sampler mode {mode!r}; expected one of {', '.join(map(repr, MODES))}")
    _check_theta(theta)
    if image.dim() != 4:
        raise ValueError(f"image must be shaped (N, C, H, W), got {tuple(image.shape)}")
    if image.shape[0] != theta.shape[0]:
        raise ValueError(f"image batch {image.shape[0]} and theta batch {theta.shape[0]} differ")
    if mode == "bilinear":
        grid = affine_grid(theta, size)
        if not _autocast_enabled(image.device.type):
            grid = grid.to(image.dtype)
        return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    if num_samples < 3:
        raise ValueError(f"linearized sampling fits a plane and needs num_samples >= 3, got {num_samples}")
    autocast = _autocast_enabled(image.device.type)
    work = torch.float64 if image.dtype == torch.float64 else torch.float32
    out_dtype = torch.float32 if autocast or not image.is_floating_point() else image.dtype
    with torch.autocast(device_type=image.device.type, enabled=False):
        theta_w = theta.to(work)
        grid = affine_grid(theta_w, size)
        sigma = jitter_sigma(theta_w, size, (image.shape[-2], image.shape[-1]), jitter_output_px, jitter_source_px)
        out = LinearizedGridSample.apply(image.to(work), grid, sigma, num_samples)
    return out.to(out_dtype)
