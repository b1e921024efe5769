"""Per-slide inference speed of MagNets vs the dense patch pipeline, on one generated 100k x 100k slide.

* MagNet: ``magnet3_inception_v3`` and ``magnet4_inception_v3`` (untrained weights: the work is the same;
  attention made sharp so that ROIs zoom as a trained model's do), median of ``--runs`` predictions,
  split into slide reads and compute. 2 CPU threads.
* Dense patch pipeline (the CLAM / DSMIL paradigm): every tissue tile of 224x224 at level 0 through
  MONAI's ``MILModel`` (ResNet-50, attention MIL). Time per tile is measured on a real batch of tiles
  read from the slide, then multiplied by the slide's tissue tile count (a full run would take hours).

    python benchmarks/speed.py            # generates /tmp/magnet_read_100000.tiff once if missing
    python benchmarks/speed.py --quick    # an 8k slide, 2 runs (CI smoke test; numbers not reported)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info  # noqa: E402

import magnet_zoo  # noqa: E402
from magnet_zoo.wsi import SlideFetcher, grey_filter, open_slide  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TILE = 224


class TimedFetcher(SlideFetcher):
    """Adds up the wall time spent in reads."""

    read_seconds = 0.0

    def fetch(self, squares, size):
        start = time.perf_counter()
        try:
            return super().fetch(squares, size)
        finally:
            self.read_seconds += time.perf_counter() - start


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_magnet(name: str, slide: Path, runs: int) -> dict:
    torch.manual_seed(0)
    model = magnet_zoo.create_model(
        name, backbone_pretrained=False, attention_init="random", attention_temperature=0.05
    ).eval()
    start = time.perf_counter()
    src = open_slide(slide)
    if hasattr(src, "coarse_views"):
        src.coarse_views()
    open_seconds = time.perf_counter() - start
    totals, reads, scales, pixels = [], [], [], []
    for i in range(runs + 1):  # the first run warms up the kernels and is not counted
        fetcher = TimedFetcher(src)
        t = time.perf_counter()
        with torch.inference_mode():
            out = model([fetcher])
        elapsed = time.perf_counter() - t
        if i == 0:
            continue
        totals.append(elapsed)
        reads.append(fetcher.read_seconds)
        pixels.append(out.accounting[0]["pixels_read"])
        scales += [float(a.scale.mean()) for a in out.affines]
    src.close()
    total, read = statistics.median(totals), statistics.median(reads)
    return {
        "model": name,
        "seconds_per_slide": total,
        "read_seconds": read,
        "compute_seconds": total - read,
        "open_and_coarse_views_seconds": open_seconds,
        "values_fed": out.accounting[0]["values_fed"],
        "pixels_read": statistics.median(pixels),
        "mean_scale": float(np.mean(scales)),
        "runs": totals,
        "peak_rss_mb": peak_rss_mb(),
    }


def tissue_tiles(src, level: int = 0) -> tuple[int, int]:
    """(tissue tiles, all tiles) of TILE x TILE at ``level``, from the grey-filtered coarsest view."""
    coarse_level = src.level_count - 1
    cw, ch = src.level_dimensions[coarse_level]
    view = grey_filter(src.read_region((0, 0), coarse_level, (cw, ch)).copy())
    tissue = view.any(axis=-1)
    lw, lh = src.level_dimensions[level]
    nx, ny = lw // TILE, lh // TILE
    scale = src.level_downsamples[coarse_level] / src.level_downsamples[level]
    count = 0
    for ty in range(ny):
        y0, y1 = int(ty * TILE / scale), max(int((ty + 1) * TILE / scale), int(ty * TILE / scale) + 1)
        row = tissue[y0:y1]
        for tx in range(nx):
            x0, x1 = int(tx * TILE / scale), max(int((tx + 1) * TILE / scale), int(tx * TILE / scale) + 1)
            if row[:, x0:x1].mean() >= 0.5:
                count += 1
    return count, nx * ny


def bench_dense(slide: Path, tiles_measured: int) -> dict:
    from monai.networks.nets import MILModel

    torch.manual_seed(0)
    model = MILModel(num_classes=1, mil_mode="att", pretrained=False).eval()
    src = open_slide(slide)
    n_tissue, n_all = tissue_tiles(src)
    # A real batch: tissue tiles read from level 0 (positions on the tissue mask), then MILModel.
    w, h = src.dimensions
    rng = np.random.default_rng(0)
    coarse_level = src.level_count - 1
    cw, ch = src.level_dimensions[coarse_level]
    mask = grey_filter(src.read_region((0, 0), coarse_level, (cw, ch)).copy()).any(axis=-1)
    ys, xs = np.nonzero(mask)
    pick = rng.choice(len(xs), size=tiles_measured, replace=len(xs) < tiles_measured)
    ds = src.level_downsamples[coarse_level]
    locations = [(min(int(xs[i] * ds), w - TILE), min(int(ys[i] * ds), h - TILE)) for i in pick]
    with torch.inference_mode():
        warm = torch.rand(1, 4, 3, TILE, TILE)
        model(warm)
        start = time.perf_counter()
        tiles = np.stack([src.read_region(loc, 0, (TILE, TILE)) for loc in locations])
        read = time.perf_counter() - start
        batch = torch.from_numpy(tiles).permute(0, 3, 1, 2).float().div(255).unsqueeze(0)
        model(batch)
        total = time.perf_counter() - start
    src.close()
    per_tile = total / tiles_measured
    return {
        "pipeline": "dense 224x224 tiles at level 0 -> MONAI MILModel (ResNet-50, attention MIL)",
        "tissue_tiles": n_tissue,
        "all_tiles": n_all,
        "tiles_measured": tiles_measured,
        "seconds_per_tile": per_tile,
        "read_seconds_per_tile": read / tiles_measured,
        "seconds_per_slide_estimated": per_tile * n_tissue,
        "values_fed": n_tissue * 3 * TILE * TILE,
        "pixels_read": n_tissue * TILE * TILE,
        "peak_rss_mb": peak_rss_mb(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", type=Path,
                    help="slide; generated there (a SynthMets macro slide of --size) if missing "
                         "(default /tmp/magnet_read_SIZE.tiff)")
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tiles", type=int, default=64, help="tiles in the dense pipeline's measured batch")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "speed.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.quick:
        args.size, args.runs, args.tiles = 8192, 1, 8
        args.out = args.out.with_name("speed_quick.json")
    slide = args.slide or Path(f"/tmp/magnet_read_{args.size}.tiff")
    if not slide.exists():
        from magnet_zoo.synth import generate_slide

        generate_slide(slide, size=args.size, category="macro", seed=0, progress=True)
    magnets = [bench_magnet(n, slide, args.runs) for n in ("magnet3_inception_v3", "magnet4_inception_v3")]
    dense = bench_dense(slide, args.tiles)
    with open_slide(slide) as src:
        dims = src.dimensions
    for m in magnets:
        m["speedup_vs_dense"] = dense["seconds_per_slide_estimated"] / m["seconds_per_slide"]
        m["values_ratio_vs_dense"] = dense["values_fed"] / m["values_fed"]
    sampler = RESULTS / "sampler_cost.json"
    result = {
        "benchmark": "speed",
        "slide": str(slide),
        "slide_dimensions": dims,
        "threads": torch.get_num_threads(),
        "magnet": magnets,
        "dense": dense,
        "sampler_cost": json.loads(sampler.read_text()).get("cost") if sampler.exists() else None,
        "machine": machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"slide {dims[0]} x {dims[1]}, {torch.get_num_threads()} CPU threads")
    head = ("pipeline", "s/slide", "read s", "compute s", "M values", "M px read", "speed-up")
    print(f"{head[0]:<24}{head[1]:>10}{head[2]:>9}{head[3]:>11}{head[4]:>10}{head[5]:>11}{head[6]:>10}")
    for m in magnets:
        print(f"{m['model']:<24}{m['seconds_per_slide']:>10.2f}{m['read_seconds']:>9.2f}{m['compute_seconds']:>11.2f}"
              f"{m['values_fed'] / 1e6:>10.2f}{m['pixels_read'] / 1e6:>11.2f}{m['speedup_vs_dense']:>9.0f}x")
    print(f"{'dense MIL (estimated)':<24}{dense['seconds_per_slide_estimated']:>10.0f}{'':>9}{'':>11}"
          f"{dense['values_fed'] / 1e6:>10.0f}{dense['pixels_read'] / 1e6:>11.0f}{'1':>9}x")
    print(f"dense: {dense['tissue_tiles']} tissue tiles of {TILE}x{TILE} at level 0, "
          f"{dense['seconds_per_tile'] * 1000:.0f} ms per tile (read + ResNet-50 MIL)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
