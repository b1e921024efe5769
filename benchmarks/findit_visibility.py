"""Can the first attention map see the FindIt object at all? Object pixels left in the whole-image view.

A MagNet's first attention map sees the whole image as one ``input_size`` x ``input_size`` view, read
from the pyramid (area-averaged) and then grey-filtered (the paper's filter: a pixel whose channel
spread is under 15 turns black). An object much smaller than one view pixel is averaged into the grey
background, and the filter then blacks its pixel out: the view is black everywhere and the attention
has nothing to go on. This script counts, per object size and view size, the view pixels that survive
the filter (on FindIt's grey background everything else is black), over ``--n`` generated images.

With ``view_oversample = k`` (a MagNet config field) the view is read at ``k`` times its size, filtered
there and area-averaged, so the glass is black before the averaging and a small object leaves a dark
but coloured pixel; ``--oversample`` measures each ``k`` (the ``brightest`` column is the strongest
channel of the brightest visible pixel, 0-255, median over images that have one).

    python benchmarks/findit_visibility.py                         # 3 % and 1 %, views of 56, 112, 168 px
    python benchmarks/findit_visibility.py --n 4 --out /tmp/vis.json   # a quick run

Prints a table and writes ``benchmarks/results/findit_visibility.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch.nn.functional as F  # noqa: E402
from _machine import machine_info  # noqa: E402

from magnet_zoo.nn.fetcher import Square  # noqa: E402
from magnet_zoo.tasks.findit import FindItSpec, make_fetcher, make_image  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


GREY_THRESHOLD = 15
"""The paper's grey filter, as every MagNet uses it."""


def visible_pixels(spec: FindItSpec, seed: int, settings: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(non-black pixels, brightest channel 0-255)`` of image ``seed``'s whole-image view for each
    ``(view size, oversample)`` in ``settings``: read at ``view x oversample``, grey-filtered, area-averaged
    to ``view`` (as :meth:`magnet_zoo.nn.magnet.MagNet.whole_slide_view` makes it)."""
    fetcher = make_fetcher(make_image(spec, seed), GREY_THRESHOLD)
    whole = [Square(0, 0, spec.image_size)]
    out = []
    for view, k in settings:
        image = F.avg_pool2d(fetcher.fetch(whole, view * k).images, k)[0]
        out.append((int((image.sum(0) > 0).sum()), round(float(image.max()) * 255)))
    return out


def measure(fracs: list[float], views: list[int], n: int, image_size: int,
            oversample: list[int] = (1,)) -> list[dict[str, Any]]:
    settings = [(view, k) for k in oversample for view in views]
    rows = []
    for frac in fracs:
        spec = FindItSpec(image_size=image_size, object_frac=frac)
        per_seed = [visible_pixels(spec, seed, settings) for seed in range(n)]  # each image generated once
        for (view, k), got in zip(settings, zip(*per_seed, strict=True), strict=True):
            counts = [c for c, _ in got]
            bright = [b for c, b in got if c > 0]
            rows.append({
                "object_frac": frac, "object_px": spec.object_px, "view": view, "oversample": k,
                "object_view_px": spec.object_px * view / image_size,
                "visible_min": min(counts), "visible_median": statistics.median(counts),
                "visible_max": max(counts), "images_with_none": sum(c == 0 for c in counts), "n": n,
                "brightest_median": statistics.median(bright) if bright else None,
            })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| object (share of side) | object px | view px | oversample | object in view px | visible view pixels "
             "min / median / max | images with none | brightest |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bright = "–" if r.get("brightest_median") is None else f"{r['brightest_median']:g}"
        lines.append(f"| {r['object_frac']:.0%} | {r['object_px']:.0f} | {r['view']} | {r.get('oversample', 1)} | "
                     f"{r['object_view_px']:.2f} | {r['visible_min']} / {r['visible_median']:g} / {r['visible_max']} | "
                     f"{r['images_with_none']} of {r['n']} | {bright} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fracs", type=float, nargs="+", default=[0.03, 0.01], help="object side / image side")
    ap.add_argument("--views", type=int, nargs="+", default=[56, 112, 168], help="view sizes (input_size)")
    ap.add_argument("--oversample", type=int, nargs="+", default=[1, 2, 4],
                    help="view_oversample values: read at view x k, grey-filter, area-average")
    ap.add_argument("--n", type=int, default=20, help="images per setting (FindIt seeds 0..n-1)")
    ap.add_argument("--image-size", type=int, default=896)
    ap.add_argument("--out", type=Path, default=RESULTS / "findit_visibility.json")
    args = ap.parse_args(argv)
    if (args.n < 1 or any(v < 1 for v in args.views) or any(not 0 < f < 0.5 for f in args.fracs)
            or any(k < 1 for k in args.oversample)):
        ap.error("need --n >= 1, views >= 1, --oversample >= 1 and fractions in (0, 0.5)")
    t0 = time.perf_counter()
    rows = measure(args.fracs, args.views, args.n, args.image_size, args.oversample)
    text = table(rows)
    print(text)
    result = {"benchmark": "findit_visibility", "image_size": args.image_size, "grey_threshold": GREY_THRESHOLD,
              "rows": rows, "seconds": time.perf_counter() - t0, "machine": machine_info()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
