"""How fast SynthMets writes a gigapixel slide, and how big the file is.

Generates one ``macro`` slide (the category with the most tumour area, so the slowest) of
``--size`` x ``--size`` pixels under ``--out-dir`` (``/tmp`` by default, never the repository), times
it, checks that OpenSlide opens it and reads a region at every level, prints a table and writes JSON
with the machine's description. The texture banks are built before timing starts and reported apart
(they are built once per process and shared by every slide it writes).

    PYTHONPATH=. python benchmarks/synth_speed.py            # 100,000 x 100,000
    PYTHONPATH=. python benchmarks/synth_speed.py --quick    # 8,192 x 8,192 smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from magnet_zoo.synth import generate_slide, plan_slide

RESULTS = Path(__file__).resolve().parent / "results" / "synth_speed.json"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20  # kilobytes on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _load() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine slows the run down."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _machine() -> dict[str, object]:
    import openslide

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "tifffile": _version("tifffile"),
        "imagecodecs": _version("imagecodecs"),
        "openslide_python": _version("openslide-python"),
        "openslide_library": openslide.__library_version__,
    }


def _check(path: Path, meta: dict) -> dict[str, object]:
    """Open with OpenSlide and read one 256 x 256 region at every level, centred on the tumour."""
    import openslide

    with openslide.OpenSlide(str(path)) as slide:
        x, y, w, h = meta["boxes"][0] if meta["boxes"] else (0, 0, meta["width"], meta["height"])
        cx, cy = x + w // 2, y + h // 2
        reads = []
        for level, down in enumerate(slide.level_downsamples):
            start = time.perf_counter()
            region = np.asarray(
                slide.read_region((int(cx - 128 * down), int(cy - 128 * down)), level, (256, 256))
            )
            reads.append(
                {"level": level, "ms": 1e3 * (time.perf_counter() - start), "mean": float(region.mean())}
            )
        return {
            "vendor": slide.properties.get("openslide.vendor"),
            "level_count": slide.level_count,
            "level_dimensions": [list(d) for d in slide.level_dimensions],
            "mpp_x": float(slide.properties.get("openslide.mpp-x", "nan")),
            "reads": reads,
        }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=100_000, help="level-0 side in pixels (default 100000)")
    parser.add_argument("--quick", action="store_true", help="smoke run at 8192 px (overrides --size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tile", type=int, default=256, choices=(256, 512))
    parser.add_argument("--quality", type=int, default=85)
    parser.add_argument("--workers", type=int, default=None, help="threads (default: up to 4)")
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp"), help="where the slide is written")
    parser.add_argument("--keep", action="store_true", help="keep the slide (deleted by default)")
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    args = parser.parse_args()
    size = 8192 if args.quick else args.size

    load_start = _load()
    start = time.perf_counter()
    plan_slide(size, "macro", args.seed)  # builds (and caches) this slide's texture bank
    bank_s = time.perf_counter() - start

    path = args.out_dir / f"synth_speed_{size}.tif"
    cpu0, start = time.process_time(), time.perf_counter()
    meta = generate_slide(
        path,
        size=size,
        category="macro",
        seed=args.seed,
        tile=args.tile,
        quality=args.quality,
        workers=args.workers,
        progress=sys.stderr.isatty(),
    )
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    file_bytes = path.stat().st_size
    check = _check(path, meta)
    if not args.keep:
        path.unlink()
        path.with_suffix(".json").unlink()

    result = {
        "benchmark": "synth_speed",
        "size": size,
        "category": "macro",
        "seed": args.seed,
        "tile": args.tile,
        "quality": args.quality,
        "workers": args.workers or min(4, os.cpu_count() or 1),
        "wall_s": wall,
        "cpu_s": cpu,
        "bank_build_s": bank_s,
        "megapixels_per_s": size * size / wall / 1e6,
        "file_bytes": file_bytes,
        "bits_per_pixel": 8 * file_bytes / (size * size),
        "tissue_fraction": meta["tissue_fraction"],
        "peak_rss_mb": _peak_rss_mb(),
        "tumours": meta["tumours"],
        "target_s": 300.0,
        "meets_target": wall < 300.0 if size >= 100_000 else None,
        "openslide": check,
        "load_average_start": load_start,
        "load_average_end": _load(),
        "machine": _machine(),
    }
    rows = [
        ("slide", f"{size} x {size} px ({size * size / 1e9:.2f} Gpx), {check['level_count']} levels"),
        ("wall time", f"{wall:.1f} s  (cpu {cpu:.1f} s, {result['workers']} threads)"),
        ("throughput", f"{result['megapixels_per_s']:.0f} Mpx/s"),
        ("texture bank (once)", f"{bank_s:.1f} s"),
        ("file size", f"{file_bytes / 1e6:.0f} MB ({result['bits_per_pixel']:.3f} bit/px)"),
        ("tissue fraction", f"{meta['tissue_fraction']:.2f}"),
        ("load average", f"{load_start[0]:.1f} at start on {os.cpu_count()} cores" if load_start else "n/a"),
        ("peak memory", f"{result['peak_rss_mb']:.0f} MB" if result["peak_rss_mb"] else "n/a"),
        ("openslide", f"{check['vendor']}, mpp {check['mpp_x']}, all levels read"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
