"""Cost and gradient quality of the MagNet samplers: bilinear vs linearized multi-sampling.

Two measurements, printed as tables and written to ``benchmarks/results/sampler_cost.json``:

1. **Cost.** Median wall time of forward + backward (gradient with respect to ``theta`` only, as in
   MagNet) at the two shapes MagNet uses: 56x56 crops from 112x112 images (batch 64) and 224x224
   crops from 448x448 images (batch 18), on the CPU with ``--threads`` threads and on CUDA when
   present. Bilinear and linearized runs are interleaved so that load from other processes hits
   both alike; the ratio linearized / bilinear is what matters (target: at most 4).
2. **Gradient quality (paper Fig. 4).** A multi-scale texture (equal energy per octave, from 1 to 16
   source pixels, like natural and histology images) is cropped at 1x, 4x and 8x down-scaling
   (the crop covers ``size * k`` source pixels). At many random positions ``t`` the loss is the MSE
   between the crop at ``t`` and the crop at a nearby ``t*`` (2-4 output pixels away, random
   direction). Each sampler's gradient with respect to ``(tx, ty)`` is compared, by cosine
   similarity, with a finite-difference slope of the *true* loss landscape: central differences
   with a step of one output pixel (the scale at which the crop actually changes) on crops of the
   texture pre-blurred with a Gaussian of ``k / 2`` source pixels, i.e. properly antialiased.

The test suite (``tests/test_sampler.py``) imports :func:`gradient_quality` from here, so the table
this script prints is the one the tests assert on.

Usage::

    PYTHONPATH=. python benchmarks/sampler_cost.py            # full run, ~1 minute on 2 CPU threads
    PYTHONPATH=. python benchmarks/sampler_cost.py --quick    # smoke run, a few seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from magnet_zoo.nn.sampler import MODES, sample

RESULTS = Path(__file__).resolve().parent / "results" / "sampler_cost.json"
FIG4_FACTORS = (1, 4, 8)
COST_CASES = (
    {"name": "56 from 112", "batch": 64, "source": 112, "size": 56},
    {"name": "224 from 448", "batch": 18, "source": 448, "size": 224},
)


# --------------------------------------------------------------------------------------------------
# Gradient quality (paper Fig. 4)
# --------------------------------------------------------------------------------------------------


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Periodic Gaussian blur of ``image`` (..., H, W) with standard deviation ``sigma`` pixels (FFT)."""
    if sigma <= 0:
        return image
    height, width = image.shape[-2:]
    fy = torch.fft.fftfreq(height, dtype=image.dtype, device=image.device)[:, None]
    fx = torch.fft.rfftfreq(width, dtype=image.dtype, device=image.device)[None, :]
    transfer = torch.exp(-2 * math.pi**2 * sigma**2 * (fx**2 + fy**2))
    return torch.fft.irfft2(torch.fft.rfft2(image) * transfer, s=(height, width))


def texture(size: int, channels: int = 3, seed: int = 0, scales: Sequence[float] = (1, 2, 4, 8, 16)) -> torch.Tensor:
    """A (1, channels, size, size) texture with equal energy at each of ``scales`` (in pixels).

    Sum of white noise blurred at every scale, each normalised to unit variance: structure from
    single pixels up to tens of pixels, which is what makes bilinear gradients alias when the crop
    is down-scaled.
    """
    gen = torch.Generator().manual_seed(seed)
    image = torch.zeros(1, channels, size, size)
    for scale in scales:
        layer = gaussian_blur(torch.randn(1, channels, size, size, generator=gen), scale)
        image += layer / layer.std()
    return image / image.std()


def _theta(t: torch.Tensor, scale: float) -> torch.Tensor:
    theta = torch.zeros(t.shape[0], 2, 3, dtype=t.dtype)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = t
    return theta


def gradient_quality(
    image: torch.Tensor,
    size: int,
    factor: int,
    positions: int = 256,
    seed: int = 0,
    modes: Sequence[str] = MODES,
) -> dict[str, torch.Tensor]:
    """Cosine similarity, per random position, of each sampler's translation gradient with the truth.

    ``image`` (1, C, W, W); the crop is ``size`` pixels covering ``size * factor`` source pixels.
    Returns ``{mode: (positions,) cosines}``. See the module docstring for the protocol.
    """
    gen = torch.Generator().manual_seed(seed * 1000 + factor)
    width = image.shape[-1]
    scale = size * factor / width
    out_px = 2.0 * factor / width  # one output pixel in normalised source coordinates
    reach = 1.0 - scale - 6 * out_px  # keep t, t* and the FD steps inside the image
    if reach <= 0:
        raise ValueError(f"image of {width} px too small for {size} px crops at {factor}x")
    t = (torch.rand(positions, 2, generator=gen) * 2 - 1) * reach
    angle = torch.rand(positions, generator=gen) * 2 * math.pi
    dist = (2 + 2 * torch.rand(positions, generator=gen)) * out_px
    t_star = t + torch.stack([angle.cos(), angle.sin()], dim=1) * dist[:, None]
    images = image.expand(positions, -1, -1, -1)

    # Reference: finite differences of the loss between antialiased crops.
    smooth = gaussian_blur(image, factor / 2 if factor > 1 else 0.0).expand(positions, -1, -1, -1)
    with torch.no_grad():
        target_ref = sample(smooth, _theta(t_star, scale), size, "bilinear")

        def ref_loss(tt: torch.Tensor) -> torch.Tensor:
            crop = sample(smooth, _theta(tt, scale), size, "bilinear")
            return ((crop - target_ref) ** 2).mean(dim=(1, 2, 3))

        fd = torch.zeros(positions, 2)
        for axis in range(2):
            step = torch.zeros(2)
            step[axis] = out_px
            fd[:, axis] = (ref_loss(t + step) - ref_loss(t - step)) / (2 * out_px)
        target = sample(images, _theta(t_star, scale), size, "bilinear")

    result = {}
    for mode in modes:
        theta = _theta(t, scale).requires_grad_(True)
        crop = sample(images, theta, size, mode)
        loss = ((crop - target) ** 2).mean(dim=(1, 2, 3)).sum()
        (grad,) = torch.autograd.grad(loss, theta)
        result[mode] = F.cosine_similarity(grad[:, :, 2], fd, dim=1)
    return result


def fig4_table(
    size: int = 32,
    width: int = 512,
    positions: int = 256,
    seed: int = 0,
    factors: Sequence[int] = FIG4_FACTORS,
) -> list[dict[str, float]]:
    """Rows ``{factor, <mode>_mean, <mode>_median}`` of gradient cosine similarity vs finite differences."""
    torch.manual_seed(seed)
    image = texture(width, 3, seed)
    rows = []
    for factor in factors:
        cosines = gradient_quality(image, size, factor, positions, seed)
        row: dict[str, float] = {"factor": factor}
        for mode, cos in cosines.items():
            row[f"{mode}_mean"] = round(cos.mean().item(), 4)
            row[f"{mode}_median"] = round(cos.median().item(), 4)
        rows.append(row)
    return rows


def format_fig4(rows: list[dict[str, float]]) -> str:
    """The Fig. 4 rows as a text table."""
    lines = [
        "gradient vs finite differences, cosine similarity (mean / median over positions)",
        f"{'down-scaling':>12} | {'bilinear':>15} | {'linearized':>15}",
    ]
    for row in rows:
        cells = [f"{row[f'{m}_mean']:.3f} / {row[f'{m}_median']:.3f}" for m in ("bilinear", "linearized")]
        lines.append(f"{str(int(row['factor'])) + 'x':>12} | {cells[0]:>15} | {cells[1]:>15}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Cost
# --------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_case(
    batch: int,
    source: int,
    size: int,
    device: torch.device,
    repeats: int,
    warmup: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median ms of forward + backward (grad wrt theta) per mode, interleaved; plus their ratio.

    ``clock`` is wall time by default; ``time.thread_time`` (CPU time of this thread, meaningful
    with one torch thread) is robust to other processes sharing the CPU.
    """
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(batch, 3, source, source, generator=gen).to(device)
    scale = 0.25 + 0.5 * torch.rand(batch, generator=gen)
    t = (torch.rand(batch, 2, generator=gen) * 2 - 1) * (1 - scale[:, None])
    theta0 = _theta(t, 0.0)
    theta0[:, 0, 0] = scale
    theta0[:, 1, 1] = scale
    theta0 = theta0.to(device)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for rep in range(warmup + repeats):
        for mode in MODES:
            theta = theta0.clone().requires_grad_(True)
            _sync(device)
            start = clock()
            crop = sample(image, theta, size, mode)
            crop.square().mean().backward()
            _sync(device)
            if rep >= warmup:
                times[mode].append(clock() - start)
    result = {f"{mode}_ms": round(statistics.median(v) * 1e3, 3) for mode, v in times.items()}
    result["ratio"] = round(result["linearized_ms"] / result["bilinear_ms"], 3)
    return result


def cost_table(
    device: torch.device, repeats: int, clock: Callable[[], float] = time.perf_counter
) -> list[dict[str, float | str | int]]:
    """One row per MagNet shape on ``device``."""
    rows: list[dict[str, float | str | int]] = []
    for case in COST_CASES:
        row: dict[str, float | str | int] = dict(case)
        row.update(time_case(case["batch"], case["source"], case["size"], device, repeats, clock=clock))
        rows.append(row)
    return rows


def cuda_big_batch(device: torch.device, batch: int = 300, repeats: int = 3) -> dict[str, float]:
    """Peak CUDA memory and time of forward + backward for ``batch`` 224x224 crops from 448x448 images.

    The images alone take ``batch * 3 * 448 * 448 * 4`` bytes; the peak above that is the sampler's.
    """
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(batch, 3, 448, 448, generator=gen).to(device)
    scale = 0.25 + 0.5 * torch.rand(batch, generator=gen)
    theta0 = _theta(torch.zeros(batch, 2), 0.0)
    theta0[:, 0, 0] = scale
    theta0[:, 1, 1] = scale
    theta0 = theta0.to(device)
    result: dict[str, float] = {"batch": batch, "images_mb": round(image.numel() * 4 / 1024**2, 1)}
    for mode in MODES:
        times = []
        for _ in range(repeats + 1):
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            theta = theta0.clone().requires_grad_(True)
            start = time.perf_counter()
            sample(image, theta, 224, mode).square().mean().backward()
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            peak = torch.cuda.max_memory_allocated(device) - base
        result[f"{mode}_ms"] = round(statistics.median(times[1:]) * 1e3, 3)
        result[f"{mode}_peak_mb"] = round(peak / 1024**2, 1)
    result["ratio"] = round(result["linearized_ms"] / result["bilinear_ms"], 3)
    return result


def format_cost(rows: list[dict[str, float | str | int]], device_name: str) -> str:
    """Cost rows as a text table."""
    lines = [
        f"forward + backward (grad wrt theta), median ms on {device_name}",
        f"{'case':>14} | {'batch':>5} | {'bilinear':>9} | {'linearized':>10} | {'ratio':>5}",
    ]
    for row in rows:
        lines.append(
            f"{row['name']:>14} | {row['batch']:>5} | {row['bilinear_ms']:>9.2f} | "
            f"{row['linearized_ms']:>10.2f} | {row['ratio']:>5.2f}"
        )
    return "\n".join(lines)


def linearized_memory(channels: int, size: int, batch: int, num_samples: int = 8) -> dict[str, float]:
    """MB the linearized sampler keeps between forward and backward (float32), per crop and per batch.

    Per crop: the sampling grid (2 values per output pixel) and a copy of the output (C values).
    Per batch: the jitter pattern (2 (K-1) values per output position, shared by all crops).
    The backward pass's transient buffers are bounded by its block size (a few MB on a CPU).
    """
    pixels = size * size
    per_crop = 4 * pixels * (2 + channels)
    per_batch = 4 * pixels * 2 * (num_samples - 1)
    mb = 1024.0**2
    return {
        "per_crop_mb": round(per_crop / mb, 3),
        "pattern_per_batch_mb": round(per_batch / mb, 3),
        f"batch_{batch}_total_mb": round((batch * per_crop + per_batch) / mb, 1),
        "output_per_crop_mb": round(4 * pixels * channels / mb, 3),
    }


# --------------------------------------------------------------------------------------------------


def machine(device: torch.device) -> dict[str, str | int | float | None]:
    """Where the numbers come from (the load average tells whether other work shared the CPU)."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "load_average_1m_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats and positions (smoke run)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per mode (default 15, quick 3)")
    parser.add_argument("--positions", type=int, default=None, help="Fig. 4 positions (default 256, quick 64)")
    parser.add_argument("--no-cuda", action="store_true", help="skip CUDA timings even if a GPU is present")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 15)
    positions = args.positions or (64 if args.quick else 256)

    report: dict = {"quick": args.quick, "repeats": repeats, "positions": positions}
    cpu = torch.device("cpu")
    report["machine"] = machine(cpu)
    report["linearized_memory_3x224x224"] = linearized_memory(3, 224, batch=300)

    rows = fig4_table(positions=positions)
    report["fig4"] = {
        "protocol": "32 px crops of a 512 px multi-scale texture; cosine of d loss / d (tx, ty) with central "
        "finite differences (step one output pixel) of the loss on crops antialiased by a Gaussian of "
        "k/2 source pixels; target 2-4 output pixels away",
        "rows": rows,
    }
    print(format_fig4(rows))
    print()

    report["cost"] = {"cpu": {"device": "cpu", "threads": args.threads, "rows": cost_table(cpu, repeats)}}
    print(format_cost(report["cost"]["cpu"]["rows"], f"cpu, {args.threads} threads, wall time"))
    # CPU time of one thread: unlike wall time with several threads, it barely moves when other
    # processes share the cores, so its ratio is the one to trust on a busy machine.
    torch.set_num_threads(1)
    report["cost"]["cpu_1thread_cputime"] = {
        "device": "cpu",
        "threads": 1,
        "clock": "thread_time",
        "rows": cost_table(cpu, repeats, clock=time.thread_time),
    }
    torch.set_num_threads(args.threads)
    print()
    print(format_cost(report["cost"]["cpu_1thread_cputime"]["rows"], "cpu, 1 thread, CPU time"))
    if torch.cuda.is_available() and not args.no_cuda:
        cuda = torch.device("cuda")
        name = torch.cuda.get_device_name(cuda)
        report["cost"]["cuda"] = {"device": name, "rows": cost_table(cuda, repeats)}
        print()
        print(format_cost(report["cost"]["cuda"]["rows"], name))
        big = cuda_big_batch(cuda, batch=32 if args.quick else 300)
        report["cost"]["cuda"]["big_batch_224_from_448"] = big
        print(
            f"{big['batch']} crops 224 from 448 on {name}: bilinear {big['bilinear_ms']:.1f} ms, "
            f"{big['bilinear_peak_mb']:.0f} MB peak; linearized {big['linearized_ms']:.1f} ms, "
            f"{big['linearized_peak_mb']:.0f} MB peak (images {big['images_mb']:.0f} MB, not counted)"
        )

    if hasattr(os, "getloadavg"):
        report["machine"]["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return report


if __name__ == "__main__":
    main()
