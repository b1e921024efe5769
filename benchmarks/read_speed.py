"""Read time of a 3-layer MagNet's slide reads, concurrent vs serial, on a generated 100k x 100k slide.

The network decides where to read while it runs, so its reads cannot be planned ahead; what can be
done is to issue all reads of one layer at once. This benchmark draws the reads of
``magnet3_inception_v3``'s tree (1 + 3 + 6 nodes; ROIs placed at random at the scales the paper reports
for trained MagNets) and performs them with a fresh slide handle and tile cache, serially and through
the thread pool.

    python benchmarks/read_speed.py                 # generates /tmp/magnet_read_100k.tiff once (minutes)
    python benchmarks/read_speed.py --quick         # an 8k slide, for CI
    python benchmarks/read_speed.py --slide my.svs  # any slide (a missing path: generated there)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info  # noqa: E402

import magnet_zoo  # noqa: E402
from magnet_zoo.nn.tree import child_square, root_square  # noqa: E402
from magnet_zoo.wsi import CoarseLevelSource, SlideFetcher, open_slide  # noqa: E402
from magnet_zoo.wsi.backends.openslide_backend import OpenSlideSource  # noqa: E402
from magnet_zoo.wsi.coarse import needs_coarse_level  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def tree_calls(dims: tuple[int, int], seed: int, name: str = "magnet3_inception_v3") -> list[tuple[list, int]]:
    """The reads of one slide through ``name``'s tree, with ROIs drawn at random at the scales the paper
    reports for trained MagNets (layer 1 about 0.2-0.3, later layers about 0.5 +- 0.2)."""
    cfg = magnet_zoo.get_config(name)
    rng = random.Random(seed)
    squares = [root_square(*dims)]
    calls = [(squares, cfg.input_size), (squares, cfg.iprime_size(1))]
    for layer in range(1, cfg.num_layers):
        children = []
        for parent in squares:
            for patch in range(cfg.patches[layer - 1]):
                if cfg.is_frozen(layer, patch):
                    s, tx, ty = 1.0, 0.0, 0.0
                else:
                    s = min(max(rng.gauss(0.25 if layer == 1 else 0.5, 0.1 if layer == 1 else 0.2), 0.05), 1.0)
                    tx, ty = (rng.uniform(-(1 - s), 1 - s) for _ in range(2))
                children.append(child_square(parent, s, tx, ty))
        squares = children
        calls.append((squares, cfg.iprime_size(layer + 1)))
    return calls


def replay(slide: Path, calls, serial: bool) -> tuple[float, int, float]:
    """Reads of one tree on a freshly opened slide: (read seconds, pixels decoded, coarse-view seconds)."""
    start = time.perf_counter()
    src = OpenSlideSource(slide, tile_cache_bytes=256 * 1024 * 1024)  # fresh handle, fresh cache
    if needs_coarse_level(src):
        src = CoarseLevelSource(src)
        src.coarse_views()  # once per opened slide; reported separately
    coarse_seconds = time.perf_counter() - start
    fetcher = SlideFetcher(src, serial=serial)
    pixels = 0
    start = time.perf_counter()
    for squares, size in calls:
        pixels += fetcher.fetch(squares, size).pixels_read
    elapsed = time.perf_counter() - start
    src.close()
    return elapsed, pixels, coarse_seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", type=Path,
                    help="slide to read; generated there (a SynthMets slide of --size) if missing "
                         "(default /tmp/magnet_read_SIZE.tiff)")
    ap.add_argument("--size", type=int, default=100_000, help="side of the generated slide")
    ap.add_argument("--quick", action="store_true", help="8k slide, few repeats (CI smoke test)")
    ap.add_argument("--trees", type=int, default=5, help="different random trees (seeds)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "read_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.quick:
        args.size, args.trees, args.repeats = 8192, 2, 1
        args.out = args.out.with_name("read_speed_quick.json")
    slide = args.slide or Path(f"/tmp/magnet_read_{args.size}.tiff")
    gen_seconds = None
    if not slide.exists():
        from magnet_zoo.synth import generate_slide

        t = time.perf_counter()
        generate_slide(slide, size=args.size, category="macro", seed=0, progress=True)
        gen_seconds = time.perf_counter() - t
    with open_slide(slide) as src:
        dims, levels = src.dimensions, src.level_count
    rows = []
    for seed in range(args.trees):
        calls = tree_calls(dims, seed)
        for _ in range(args.repeats):
            for serial in (True, False):
                seconds, pixels, coarse = replay(slide, calls, serial)
                rows.append({"tree": seed, "serial": serial, "seconds": seconds, "pixels_read": pixels,
                             "open_and_coarse_views_seconds": coarse, "reads": sum(len(c[0]) for c in calls)})
    serial_s = statistics.median(r["seconds"] for r in rows if r["serial"])
    conc_s = statistics.median(r["seconds"] for r in rows if not r["serial"])
    result = {
        "benchmark": "read_speed",
        "slide": str(slide),
        "slide_dimensions": dims,
        "slide_levels": levels,
        "model": "magnet3_inception_v3 tree (3, 2, 3); ROIs at random at the paper's reported scales",
        "reads_per_slide": rows[0]["reads"],
        "median_pixels_read": statistics.median(r["pixels_read"] for r in rows),
        "serial_seconds_median": serial_s,
        "concurrent_seconds_median": conc_s,
        "speedup": serial_s / conc_s,
        "open_and_coarse_views_seconds_median": statistics.median(r["open_and_coarse_views_seconds"] for r in rows),
        "read_workers": magnet_zoo.wsi.fetch.default_workers(),
        "slide_generation_seconds": gen_seconds,
        "runs": rows,
        "machine": machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"slide {dims[0]}x{dims[1]}, {levels} levels; {result['reads_per_slide']} reads per slide, "
          f"{result['median_pixels_read'] / 1e6:.2f} M pixels decoded")
    print(f"{'mode':<12}{'seconds/slide (median)':>24}")
    print(f"{'serial':<12}{serial_s:>24.3f}")
    print(f"{'concurrent':<12}{conc_s:>24.3f}")
    print(f"{'speed-up':<12}{serial_s / conc_s:>24.2f}x")
    print(f"(opening the slide and computing its coarse views, once per slide: "
          f"{result['open_and_coarse_views_seconds_median']:.3f} s)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
