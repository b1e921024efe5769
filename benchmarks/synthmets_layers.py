"""SynthMets localisation layer by layer: does each attention, shown tumour, look at it?

``synthmets.py`` scores a MagNet's *final* patches against random placement. For the two-layer models of
the benchmark (``magnet2_micro``: patches ``(1, 2)``, ``(2, 2)`` until 2026-12-07; ``magnet2_tiny``:
``(2, 2)``; the second layer's first patch the identity) half of the final patches are the first layer's crops
themselves, and a learned second-layer crop can only land inside its parent. So that number mixes two
questions. This script separates them, from a run's JSON (its test predictions keep every final box) and
the test slides' sidecars:

* layer 1: the share of first-layer crops on tumour against squares of the same sides placed uniformly
  on the slide;
* layer 2, under parents on tumour only: the share of learned second-layer crops on tumour against
  squares of the same sides placed uniformly inside the parent (the second layer's whole choice), and the
  tumour share of their area against the same.

Each also against squares centred on random *tissue* pixels (moved inside the slide or the parent): a
glass-free attention (``attention_tissue_only``) can only centre its crops on tissue, so that is its fair
baseline. A ratio near 1 means that layer's attention places its crops as a random draw would.

    python benchmarks/synthmets_layers.py                                   # the 30-minute runs
    python benchmarks/synthmets_layers.py --runs RUN.json --data /tmp/synthmets_quick --out /tmp/layers.json

Prints a table and writes ``--out`` (JSON) and the same name with ``.md``. Needs the slides' sidecars:
the data folder each run was made on (``synthmets.py`` regenerates it from the same seeds).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info  # noqa: E402
from baselines.common import Slide, load_split, tissue_view  # noqa: E402
from baselines.magnet import layer_localisation  # noqa: E402
from synthmets_seeds import recipe_fields  # noqa: E402

from magnet_zoo.wsi import open_slide  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_RUNS = ("synthmets_30min.json", "synthmets_30min_s1.json", "synthmets_30min_explore4_s0.json",
                "synthmets_30min_treemil_epyc_s0.json", "synthmets_30min_treemil_epyc_s1_idle.json",
                "synthmets_30min_treemil_epyc_s2.json", "synthmets_30min_treemil_epyc_s3.json",
                "synthmets_30min_guide1_s0.json", "synthmets_30min_guide1z_s0.json",
                "synthmets_30min_attmil_s0.json", "synthmets_30min_attpre_s0.json")
LAYERS = ("layer1", "layer2_on_tumour")
THUMBNAILS: dict[str, tuple[Any, float]] = {}
"""Each test slide's grey-filtered view by its path, read once for all the runs."""


class LayersError(ValueError):
    """The run cannot be scored layer by layer (another architecture, slides missing)."""


def held_out_slides(root: Path) -> dict[tuple[str, int], Slide]:
    """The ``test`` and ``test_large`` slides of a ``synthmets.py`` data folder, by ``(file name, size)``: what
    a run's predictions record (the two splits reuse the names)."""
    slides: dict[tuple[str, int], Slide] = {}
    for split in ("test", "test_large"):
        csv_path = root / split / "labels.csv"
        if csv_path.is_file():
            slides.update({(Path(s.path).name, s.size): s for s in load_split(csv_path, split)})
    if not slides:
        raise LayersError(f"no test slides under {root}; generate them with benchmarks/synthmets.py (same seeds)")
    return slides


def check_architecture(config: dict[str, Any], source: str) -> None:
    patches = list(config.get("patches", []))
    if len(patches) != 2 or patches[1] != 2 or not config.get("frozen_patch", True):
        raise LayersError(f"{source}: layer-by-layer scoring needs two layers with (N, 2) patches and the identity "
                          f"second-layer patch; this MagNet has patches {patches}")


def pool(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Crop-weighted means over slides, and the ratios."""
    out: dict[str, Any] = {}
    for layer in LAYERS:
        parts = [r[layer] for r in rows if r[layer]["n"]]
        n = sum(p["n"] for p in parts)
        if not n:
            out[layer] = {"n": 0}
            continue
        mean = {k: sum(p[k] * p["n"] for p in parts) / n
                for k in ("hit", "random_hit", "random_tissue_hit", "tumour_area", "random_tumour_area")}
        mean["ratio"] = mean["hit"] / mean["random_hit"] if mean["random_hit"] > 0 else None
        mean["ratio_tissue"] = mean["hit"] / mean["random_tissue_hit"] if mean["random_tissue_hit"] > 0 else None
        mean["area_ratio"] = (mean["tumour_area"] / mean["random_tumour_area"]
                              if mean["random_tumour_area"] > 0 else None)
        out[layer] = {"n": n, "slides": len(parts), **mean}
    return out


def score_run(result: dict[str, Any], source: str, root: Path | None, seed: int) -> dict[str, Any]:
    magnet = result["methods"].get("magnet")
    if magnet is None:
        raise LayersError(f"{source}: no MagNet in this run")
    check_architecture(magnet["settings"]["config"], source)
    slides = held_out_slides(root or Path(result["data"]["root"]))
    per_slide = []
    for pred in magnet["predictions"]:
        if pred["label"] != 1:
            continue
        slide = slides.get((Path(pred["path"]).name, pred["size"]))
        if slide is None:
            raise LayersError(f"{source}: {pred['path']} ({pred['size']} px) is not among the test slides of the "
                              "data folder")
        if not slide.sidecar.is_file():
            raise LayersError(f"{source}: {slide.sidecar} is missing; regenerate the data with benchmarks/synthmets.py")
        if slide.path not in THUMBNAILS:
            with open_slide(slide.path) as src:
                rgb, view_ds, _ = tissue_view(src, 1024)
            THUMBNAILS[slide.path] = (rgb, view_ds)
        loc = layer_localisation(slide, pred["extra"]["final_boxes"], seed=seed, thumbnail=THUMBNAILS[slide.path])
        per_slide.append({"slide": Path(slide.path).name, "category": slide.category, **loc})
    by_category = {c: pool([r for r in per_slide if r["category"] == c])
                   for c in sorted({r["category"] for r in per_slide})}
    settings = magnet["settings"]
    return {"source": source, "seed": settings["trainer"]["seed"],
            "recipe": settings.get("recipe", {}).get("name") or "learn_to_look",
            "recipe_fields": recipe_fields(magnet.get("command") or result.get("command") or ""),
            "all": pool(per_slide), "by_category": by_category, "per_slide": per_slide}


def _f(value: Any, digits: int = 2, unit: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{unit}"


def tables(runs: list[dict[str, Any]]) -> list[str]:
    lines = ["| run | seed | tumours | layer-1 crops | on tumour | random | ratio | on tissue: ratio | layer-2 crops "
             "under a parent on tumour | on tumour | random inside the parent | ratio | on its tissue: ratio | "
             "tumour share of area / random |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for group, d in [("all", run["all"]), *run["by_category"].items()]:
            one, two = d["layer1"], d["layer2_on_tumour"]
            lines.append(
                f"| {run['source']} | {run['seed']} | {group} | {one.get('n', 0)} | {_f(one.get('hit'))} | "
                f"{_f(one.get('random_hit'))} | {_f(one.get('ratio'), 2, 'x')} | "
                f"{_f(one.get('ratio_tissue'), 2, 'x')} | {two.get('n', 0)} | {_f(two.get('hit'))} | "
                f"{_f(two.get('random_hit'))} | {_f(two.get('ratio'), 2, 'x')} | "
                f"{_f(two.get('ratio_tissue'), 2, 'x')} | {_f(two.get('area_ratio'), 2, 'x')} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, nargs="+", default=[RESULTS / name for name in DEFAULT_RUNS],
                    help="synthmets.py JSON files (default: the 30-minute runs of the two-layer MagNet)")
    ap.add_argument("--data", type=Path, default=None,
                    help="the data folder the runs were made on (default: the root each JSON records)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random placements (default 0)")
    ap.add_argument("--out", type=Path, default=RESULTS / "synthmets_layers.json")
    args = ap.parse_args(argv)
    missing = [str(p) for p in args.runs if not p.is_file()]
    if missing:
        print(f"error: no such run: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        runs = [score_run(json.loads(p.read_text()), p.name, args.data, args.seed) for p in args.runs]
    except LayersError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    lines = tables(runs)
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "synthmets_layers", "command": argv_text, "seed": args.seed,
                                    "machine": machine_info(), "runs": runs}, indent=1) + "\n")
    md = args.out.with_suffix(".md")
    md.write_text("# SynthMets localisation layer by layer\n\nCommand: `python benchmarks/synthmets_layers.py "
                  + argv_text + "`\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
