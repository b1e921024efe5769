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

Cost and memory of the linearized gradient: the forward pass is one bilinear sampling and keeps
the grid (2 values per output pixel), a copy of the output (``C``) and the jitter pattern
(``2 (K-1)`` values per output *position*, shared by the batch): about 1 MB per 3x224x224 crop in
float32, plus 2.8 MB per batch. The backward pass samples the ``K - 1`` jittered points block by
block (see :func:`_grid_gradient`), so its transient memory is bounded whatever the batch. On two
CPU threads forward + backward costs about 3-3.5 times bilinear sampling's
(``benchmarks/sampler_cost.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

MODES = ("bilinear", "linearized")
"""Sampler names accepted by :func:`sample`."""

DEFAULT_JITTER_OUTPUT_PX = 0.25
"""Default jitter standard deviation, part 1: this fraction of one output pixel's spacing."""
DEFAULT_JITTER_SOURCE_PX = 1.0
"""Default jitter standard deviation, part 2: this many source pixels (added to part 1)."""

_CPU_BLOCK_POINTS = 1 << 16
"""On a CPU, blocks of ~64 K output points keep each block's samples in cache between the kernels
that write and read them; measured 1.8-2x faster than whole-batch passes at MagNet's shapes."""
_DEVICE_BLOCK_POINTS = 1 << 22
"""On accelerators, blocks only bound the transient memory (~4 M points, ~200 MB at C=3)."""


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


def _plane_weights(pattern: torch.Tensor) -> torch.Tensor:
    """Least-squares weights ``(K, h, w, 2)`` that turn the K samples of a pixel into a plane slope.

    ``pattern`` (K-1, h, w, 2) holds the unit-variance offsets ``z_k`` of the jittered points;
    the query point is ``z_0 = 0``. Fitting ``v_k ~ a + g . z_k`` by ordinary least squares gives,
    with centred offsets ``c_k = z_k - mean(z)`` and ``M = sum_k c_k c_k^T`` (2x2 per pixel),
    ``g = sum_k W_k v_k`` with ``W_k = M^-1 c_k``. The weights depend only on the offsets, so they
    are computed once per pixel position and shared by every channel and crop; entry 0 is the
    query point's.
    """
    num = pattern.shape[0] + 1
    mean = pattern.sum(dim=0) / num
    centred = torch.cat([-mean[None], pattern - mean], dim=0)
    cx, cy = centred[..., 0], centred[..., 1]
    mxx = (cx * cx).sum(dim=0)
    mxy = (cx * cy).sum(dim=0)
    myy = (cy * cy).sum(dim=0)
    inv_det = (mxx * myy - mxy * mxy).clamp_min(torch.finfo(pattern.dtype).tiny).reciprocal()
    return torch.stack([(myy * cx - mxy * cy) * inv_det, (mxx * cy - mxy * cx) * inv_det], dim=-1)


def _block_points(device: torch.device) -> int:
    """Output points per block of the linearized backward pass (see :func:`_grid_gradient`)."""
    return _CPU_BLOCK_POINTS if device.type == "cpu" else _DEVICE_BLOCK_POINTS


def _grid_gradient(
    image: torch.Tensor,
    grid: torch.Tensor,
    centre: torch.Tensor,
    sigma: torch.Tensor,
    pattern: torch.Tensor,
    grad_out: torch.Tensor,
) -> torch.Tensor:
    """Gradient ``(N, h, w, 2)`` of the loss with respect to ``grid``, from fitted plane slopes.

    The jittered points are ``grid + sigma * z_k`` (``z_k = pattern[k - 1]``, shared by the crops
    of the batch). With ``delta = sigma * z`` the plane slope in normalised coordinates is the
    ``z``-slope divided by ``sigma``: ``g_c = sum_k W_k v_kc / sigma`` with the weights of
    :func:`_plane_weights`. The loss gradient ``sum_c grad_out_c g_c`` is contracted over channels
    *before* the sum over ``k``, ``sum_k W_k d_k / sigma`` with ``d_k = sum_c grad_out_c v_kc``,
    so only one set of samples is alive at a time and the query point's ``d_0`` comes from the
    saved forward value. The work is vectorised over the whole batch and tiled over blocks of
    output rows (all crops at once) purely for cache locality and bounded memory.
    """
    n, h, w, _ = grid.shape
    rows = max(1, _block_points(grid.device) // (n * w))
    sig = sigma.to(grid.dtype).view(n, 1, 1, 2)
    grad = torch.empty_like(grid)
    for top in range(0, h, rows):
        band = slice(top, top + rows)
        weights = _plane_weights(pattern[:, band])
        block_grid = grid[:, band]
        block_out = grad_out[:, :, band]
        acc = torch.linalg.vecdot(block_out, centre[:, :, band], dim=1).unsqueeze(-1) * weights[0]
        for k in range(1, weights.shape[0]):
            jittered = torch.addcmul(block_grid, sig, pattern[k - 1, band])
            values = F.grid_sample(image, jittered, mode="bilinear", padding_mode="zeros", align_corners=False)
            acc.addcmul_(torch.linalg.vecdot(block_out, values, dim=1).unsqueeze(-1), weights[k])
        grad[:, band] = acc.div_(sig)
    return grad


class LinearizedGridSample(torch.autograd.Function):
    """Bilinear ``grid_sample`` forward with a linearized multi-sampling gradient for the grid.

    ``forward(image, grid, sigma, pattern)``: ``image`` (N, C, H, W), ``grid`` (N, h, w, 2),
    ``sigma`` (N, 2) the jitter's standard deviation in normalised coordinates (x, y), ``pattern``
    (K-1, h, w, 2) unit-variance jitter offsets, one set per output pixel position. Returns
    (N, C, h, w), the bilinear value at each grid point (``align_corners=False``, zero padding).

    The grid's gradient is the least-squares plane slope through the query point and the ``K-1``
    jittered points (:func:`_grid_gradient`). It is computed in the backward pass, so a forward
    pass costs one bilinear sampling and keeps only the grid and a copy of the output (kept apart
    so that callers may modify the output in place). If the image requires a gradient it gets
    bilinear sampling's exact one; ``sigma`` and ``pattern`` get none.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, image: torch.Tensor, grid: torch.Tensor, sigma: torch.Tensor, pattern: torch.Tensor
    ) -> torch.Tensor:
        out = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        need_image, need_grid = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        centre = out.detach().clone() if need_grid else None
        ctx.save_for_backward(
            image if (need_image or need_grid) else None,
            grid if (need_image or need_grid) else None,
            centre,
            sigma if need_grid else None,
            pattern if need_grid else None,
        )
        return out

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        image, grid, centre, sigma, pattern = ctx.saved_tensors
        grad_image = grad_grid = None
        if ctx.needs_input_grad[1]:
            with torch.no_grad():
                grad_grid = _grid_gradient(image, grid, centre, sigma, pattern, grad_out)
        if ctx.needs_input_grad[0]:
            with torch.enable_grad():
                leaf = image.detach().requires_grad_(True)
                value = F.grid_sample(leaf, grid.detach(), mode="bilinear", padding_mode="zeros", align_corners=False)
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
    if jitter_output_px < 0 or jitter_source_px < 0 or jitter_output_px + jitter_source_px == 0:
        raise ValueError(
            "jitter_output_px and jitter_source_px must be >= 0 and not both 0, got "
            f"{jitter_output_px} and {jitter_source_px}"
        )
    autocast = _autocast_enabled(image.device.type)
    work = torch.float64 if image.dtype == torch.float64 else torch.float32
    out_dtype = torch.float32 if autocast or not image.is_floating_point() else image.dtype
    with torch.autocast(device_type=image.device.type, enabled=False):
        theta_w = theta.to(work)
        grid = affine_grid(theta_w, size)
        sigma = jitter_sigma(theta_w, size, (image.shape[-2], image.shape[-1]), jitter_output_px, jitter_source_px)
        # Jitter is drawn only when a gradient will flow to theta, so inference consumes no RNG.
        draws = num_samples - 1 if (torch.is_grad_enabled() and theta.requires_grad) else 0
        pattern = torch.randn(draws, size, size, 2, dtype=work, device=image.device)
        out = LinearizedGridSample.apply(image.to(work), grid, sigma, pattern)
    return out.to(out_dtype)
