"""SynthMets: MagNet vs mean-RGB, thumbnail CNN and dense patch MIL on procedural gigapixel-style slides.

Generates train / validation / test sets of SynthMets slides (balanced normal vs tumour; tumour slides
spread over macro / micro / ITC-sized regions whose mean colour matches normal tissue; the test set also
holds a few larger slides), trains every method on the CPU under the same budget rules, and evaluates
each on the test set, slide by slide, from the file to a probability. Reports per method: AUROC and
accuracy overall, per category and per slide size; values fed to networks, pixels read and seconds per
slide. For the MagNet also localisation without localisation labels: the share of final patches that
overlap tumour, beside the share that randomly placed patches of the same sizes get, and the ceiling of
their ratio (every final patch on tumour): with large final patches random placement already hits often,
so a localisation target above that ceiling is out of reach of any attention.

Budget rules (same for every method, written into the JSON): fit on ``train`` only; choose the epoch /
step / hyper-parameter on ``val`` only; evaluate once on ``test``; 2 CPU threads; each learned method's
optimisation loop gets the same wall-clock budget (``--budget-min``, validation included); one-off steps
that learn nothing (reading thumbnails, embedding tiles with a frozen backbone) are timed and reported
outside it.

    python benchmarks/synthmets.py --quick                       # CI smoke test: tiny slides, a few steps
    python benchmarks/synthmets.py                               # the reported run (hours on 2 cores)
    python benchmarks/synthmets.py --methods magnet --save-checkpoint magnet_zoo/demo/checkpoint

Writes ``benchmarks/results/synthmets.json`` and ``synthmets.md`` (``synthmets_quick.*`` with ``--quick``).
Slides go to ``--data`` (default ``/tmp/synthmets``); existing slides with matching sidecars are reused.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# Idle OpenMP threads sleep instead of spinning. On a 2-core machine shared with other jobs, spinning made
# MagNet forward passes bimodal (0.2 s or 4.6 s) and training steps 2-3x slower; it must be set before torch
# starts its thread pool. Applies to every method alike.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info  # noqa: E402
from baselines.common import (  # noqa: E402
    MethodReport,
    Slide,
    category_counts,
    data_key,
    jsonable,
    load_split,
    ratio_ceiling,
)

from magnet_zoo.synth import GENERATOR_VERSION, generate_dataset  # noqa: E402
from magnet_zoo.train.metrics import classification_metrics  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("magnet", "mean_rgb", "thumbnail_cnn", "dense_mil")
logger = logging.getLogger("synthmets")

BUDGET_RULES = {
    "fit": "train split only",
    "selection": "validation split only (best validation AUROC, ties: lower validation loss; mean-RGB: C grid)",
    "test": "evaluated once, slide by slide, from the slide file to a probability (timed end to end)",
    "threads": "torch.set_num_threads(--threads) for every method",
    "budget": "each learned method's optimisation loop (validation included) gets --budget-min of wall time",
    "outside the budget": "one-off steps that learn nothing: reading thumbnails, embedding tiles with the frozen "
    "backbone of dense MIL (timed and reported in each method's 'training')",
    "augmentation": "MagNet: D4 of the whole slide; thumbnail CNN: D4 of the thumbnail; dense MIL: none "
    "(features cached once); mean-RGB: none",
}


# --------------------------------------------------------------------------- data
def make_data(args: argparse.Namespace) -> tuple[dict[str, list[Slide]], dict[str, Any]]:
    """Generate (or reuse) the splits; returns the slides per split and what was generated."""
    root = args.data
    plan = [
        ("train", args.n_train, args.size, args.seed * 10 + 1),
        ("val", args.n_val, args.size, args.seed * 10 + 2),
        ("test", args.n_test, args.size, args.seed * 10 + 3),
    ]
    if args.n_large:
        plan.append(("test_large", args.n_large, args.large_size, args.seed * 10 + 4))
    splits: dict[str, list[Slide]] = {}
    info: dict[str, Any] = {"root": str(root), "generator_version": GENERATOR_VERSION, "splits": {}}
    for name, n, size, seed in plan:
        start = time.perf_counter()
        labels = generate_dataset(
            root / name, n=n, size=size, seed=seed, split="test" if name.startswith("test") else name,
            progress=not args.no_progress, workers=args.gen_workers,
        )
        slides = load_split(labels, name)
        splits[name] = slides
        info["splits"][name] = {
            "n": n, "size": size, "seed": seed, "categories": category_counts(slides),
            "seconds": round(time.perf_counter() - start, 1),
        }
        logger.info("%s: %d slides of %d px (%.0f s)", name, n, size, time.perf_counter() - start)
    test = splits["test"] + splits.get("test_large", [])
    return {"train": splits["train"], "val": splits["val"], "test": test}, info


# --------------------------------------------------------------------------- summaries
def summarise(report: MethodReport) -> dict[str, Any]:
    rs = report.results
    probs = [r.probability for r in rs]
    labels = [r.label for r in rs]
    cats = [r.category for r in rs]
    out: dict[str, Any] = {"metrics": classification_metrics(probs, labels, cats)}
    by_size: dict[str, Any] = {}
    for size in sorted({r.size for r in rs}):
        sub = [r for r in rs if r.size == size]
        by_size[str(size)] = {
            "metrics": classification_metrics([r.probability for r in sub], [r.label for r in sub],
                                              [r.category for r in sub]),
            "cost": cost(sub),
        }
    out["cost"] = cost(rs)
    out["by_size"] = by_size
    return out


def cost(rs: list) -> dict[str, float]:
    if not rs:
        return {}
    return {
        "values_fed_mean": statistics.fmean(r.values_fed for r in rs),
        "pixels_read_mean": statistics.fmean(r.pixels_read for r in rs),
        "seconds_mean": statistics.fmean(r.seconds for r in rs),
        "seconds_median": statistics.median(r.seconds for r in rs),
    }


def targets(methods: dict[str, Any], loc: dict[str, Any] | None) -> dict[str, Any]:
    """The issue's targets, measured (``None`` where a method or category is missing)."""
    def m(name: str, cat: str | None = None) -> float:
        if name not in methods:
            return math.nan
        met = methods[name]["summary"]["metrics"]
        if cat is None:
            return met["auroc"]
        return met["per_category"].get(cat, {}).get("auroc", math.nan)

    def values(name: str) -> float:
        return methods[name]["summary"]["cost"]["values_fed_mean"] if name in methods else math.nan

    micro = (loc or {}).get("by_category", {}).get("micro", {})
    out = {
        "magnet_auroc_macro >= 0.95": {"value": m("magnet", "macro")},
        "magnet_auroc_micro >= 0.85": {"value": m("magnet", "micro")},
        "magnet_auroc_itc (reported)": {"value": m("magnet", "itc")},
        "magnet_auroc - mean_rgb_auroc (clearly > 0)": {"value": m("magnet") - m("mean_rgb")},
        "magnet_auroc - thumbnail_cnn_auroc (clearly > 0)": {"value": m("magnet") - m("thumbnail_cnn")},
        "magnet_auroc - dense_mil_auroc (within reach)": {"value": m("magnet") - m("dense_mil")},
        "dense_mil_values / magnet_values >= 100": {"value": values("dense_mil") / values("magnet")},
        "localisation micro: hit / random_hit >= 5": {"value": micro.get("ratio", math.nan)},
        "localisation micro: ceiling of that ratio, every final patch on tumour (reported)":
            {"value": ratio_ceiling(micro)},
    }
    thresholds = {
        "magnet_auroc_macro >= 0.95": 0.95,
        "magnet_auroc_micro >= 0.85": 0.85,
        "dense_mil_values / magnet_values >= 100": 100.0,
        "localisation micro: hit / random_hit >= 5": 5.0,
    }
    for key, row in out.items():
        if key in thresholds and math.isfinite(row["value"]):
            row["met"] = row["value"] >= thresholds[key]
    return out


def fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def human(n: float) -> str:
    if not math.isfinite(n):
        return "–"
    for unit, k in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= k:
            return f"{n / k:.3g} {unit}"
    return f"{n:.3g}"


def tables(result: dict[str, Any]) -> list[str]:
    """Markdown lines: methods x metrics and costs; localisation; targets."""
    methods = result["methods"]
    cats = ["macro", "micro", "itc", "normal"]
    lines = [
        "| method | AUROC | acc | AUROC macro | AUROC micro | AUROC ITC | acc macro | acc micro | acc ITC | "
        "acc normal | values fed / slide | pixels read / slide | s / slide |",
        "|---|" + "---|" * 12,
    ]
    for name, data in methods.items():
        met = data["summary"]["metrics"]
        pc = met["per_category"]
        c = data["summary"]["cost"]
        row = [name, fmt(met["auroc"]), fmt(met["accuracy"])]
        row += [fmt(pc.get(k, {}).get("auroc")) for k in cats[:3]]
        row += [fmt(pc.get(k, {}).get("accuracy")) for k in cats]
        row += [human(c["values_fed_mean"]), human(c["pixels_read_mean"]), fmt(c["seconds_mean"], 2)]
        lines.append("| " + " | ".join(row) + " |")
    sizes = sorted({s for d in methods.values() for s in d["summary"]["by_size"]}, key=int)
    if len(sizes) > 1:
        lines += ["", "By slide size (test):", "",
                  "| method | size | n | AUROC | acc | values fed / slide | pixels read / slide | s / slide |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, data in methods.items():
            for size in sizes:
                d = data["summary"]["by_size"].get(size)
                if not d:
                    continue
                met, c = d["metrics"], d["cost"]
                lines.append(f"| {name} | {size} | {met['n']} | {fmt(met['auroc'])} | {fmt(met['accuracy'])} | "
                             f"{human(c['values_fed_mean'])} | {human(c['pixels_read_mean'])} | "
                             f"{fmt(c['seconds_mean'], 2)} |")
    loc = result.get("localisation")
    if loc:
        lines += ["", "MagNet localisation on tumour slides (no localisation labels used in training):", "",
                  "| group | slides | final patches on tumour | random placement | ratio | ceiling (all on tumour) | "
                  "random on tissue | tumour share of patch area | slides with a patch on tumour | "
                  "mean patch side (px) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        groups = [("all", loc["all"])] + list(loc["by_category"].items())
        groups += [(f"{k} px", v) for k, v in loc["by_size"].items()] if len(loc["by_size"]) > 1 else []
        for g, d in groups:
            if not d.get("n"):
                continue
            lines.append(f"| {g} | {d['n']} | {fmt(d['hit'])} | {fmt(d['random_hit'])} | {fmt(d['ratio'], 1)}x | "
                         f"{fmt(ratio_ceiling(d), 1)}x | {fmt(d['random_tissue_hit'])} | {fmt(d['tumour_area'])} | "
                         f"{fmt(d['any_hit'])} | {fmt(d['mean_side'], 0)} |")
    lines += ["", "Targets:", "", "| target | measured | met |", "|---|---|---|"]
    for key, row in result["targets"].items():
        met = row.get("met")
        lines.append(f"| {key} | {fmt(row['value'])} | {'yes' if met else ('no' if met is False else '')} |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    data = result["data"]["splits"]
    m = result["machine"]
    head = [
        f"# SynthMets benchmark{' (quick smoke test: numbers not reported)' if result['quick'] else ''}",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {m.get('cpu_model', m.get('processor'))}, {result['threads']} torch threads; torch {m['torch']}; "
        f"{m['date']}. Generator {result['data']['generator_version']}.",
        "",
        "Data: " + "; ".join(
            f"{k} {v['n']} slides of {v['size']} px ({', '.join(f'{c} {n}' for c, n in v['categories'].items())})"
            for k, v in data.items()
        ) + ".",
        "",
    ]
    notes = ["", "Training:", ""]
    for name, d in result["methods"].items():
        t = d["training"]
        extra = ""
        best = f"val AUROC {fmt(t.get('best_val_auroc'))}"
        if name == "magnet":
            extra = f", {t.get('steps')} steps, best step {t.get('best_step')} ({best})"
        elif "epochs" in t:
            extra = f", {t.get('epochs')} epochs, best epoch {t.get('best_epoch')} ({best})"
        made_by = f" Made by `{d['command']}`." if d.get("command") and d["command"] != result["command"] else ""
        notes.append(f"- **{name}**: {d['description']}; {fmt(t.get('seconds'), 0)} s{extra}.{made_by}")
    notes += ["", "Budget rules: " + "; ".join(f"{k}: {v}" for k, v in result["budget_rules"].items()) + "."]
    return "\n".join(head + tables(result) + notes) + "\n"


def merge_previous(
    args: argparse.Namespace, data_info: dict[str, Any], methods: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """With ``--merge``: add the methods of the existing ``--out`` JSON that this run did not redo (same data
    only); returns the methods in the usual order and the kept MagNet localisation, if any."""
    if not (args.merge and args.out.is_file()):
        return methods, None
    old = json.loads(args.out.read_text())
    if data_key(old["data"]) != data_key(data_info):
        raise SystemExit(f"--merge: {args.out} was made on other data; rerun every method or choose another --out")
    kept = {k: v for k, v in old["methods"].items() if k not in methods}
    logger.info("--merge: kept %s from %s", ", ".join(kept) or "nothing", args.out)
    merged = {**kept, **methods}
    loc = None
    if "magnet" in kept and old.get("localisation"):
        loc = {**old["localisation"], "per_slide": old.get("localisation_per_slide") or []}
    return {k: merged[k] for k in METHODS if k in merged}, loc


# --------------------------------------------------------------------------- main
def parse_overrides(items: list[str], option: str = "--magnet-override") -> dict[str, Any]:
    """``["patches=[3,2]", "sampler=bilinear"]`` -> ``{"patches": [3, 2], "sampler": "bilinear"}`` (JSON values
    where they parse, strings otherwise)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"{option} expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out


def magnet_options(args: argparse.Namespace, budget_s: float | None) -> Any:
    """The MagNet's :class:`baselines.magnet.MagnetOptions` from the command line."""
    from baselines import magnet as magnet_method

    overrides = {"classifier_backbone": args.classifier_backbone, "aux_backbone": args.aux_backbone,
                 **parse_overrides(args.magnet_override)}
    opts = magnet_method.MagnetOptions(
        model=args.magnet_model, overrides=overrides, steps=args.magnet_steps, budget_s=budget_s,
        recipe_overrides=parse_overrides(args.recipe_field, "--recipe-field"),
        batch_size=args.batch_size, lr=args.lr, attention_lr=args.attention_lr, val_every=args.val_every,
        recipe=args.recipe, workers=args.workers,
        seed=args.seed if args.magnet_seed is None else args.magnet_seed, revive_at=args.revive_at,
        jitter=args.jitter, device=args.device,
        head_warmup_frac=args.head_warmup, guidance_weight=args.guidance,
        guidance_temperature=args.guidance_temperature, head_pretrain_windows=args.head_pretrain,
    )
    if args.quick:
        opts.batch_size = opts.batch_size or 4
    return opts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="CI smoke test: tiny slides, a few steps (numbers not reported)",
    )
    ap.add_argument("--data", type=Path, default=None, help="folder of the slides (default /tmp/synthmets[_quick])")
    ap.add_argument("--size", type=int, default=16384, help="level-0 side of train/val/test slides (default 16384)")
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-val", type=int, default=50)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--n-large", type=int, default=6, help="extra test slides of --large-size (default 6)")
    ap.add_argument("--large-size", type=int, default=65536)
    ap.add_argument("--seed", type=int, default=0, help="seed of the data and of every method (default 0)")
    ap.add_argument("--magnet-seed", type=int, default=None,
                    help="seed of the MagNet's initialisation and training alone, on the same data (default --seed)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--budget-min", type=float, default=30.0,
                    help="wall-clock minutes for each learned method's optimisation loop (default 30)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen-workers", type=int, default=2, help="threads per generated slide")
    ap.add_argument("--magnet-model", default="magnet2_tiny")
    ap.add_argument("--classifier-backbone", default="test_resnet",
                    help="timm backbone of the MagNet classifier (small: the checkpoint must stay under 20 MB)")
    ap.add_argument("--aux-backbone", default="test_resnet", help="timm backbone of the MagNet auxiliary heads")
    ap.add_argument("--recipe", default="learn_to_look",
                    help="the MagNet's training recipe (magnet_zoo.train.recipe; default learn_to_look)")
    ap.add_argument("--magnet-override", action="append", default=[], metavar="KEY=VALUE",
                    help="MagNetConfig field on top of the recipe, e.g. patches=[3,2] (repeatable)")
    ap.add_argument("--recipe-field", action="append", default=[], metavar="KEY=VALUE",
                    help="field of the MagNet's training recipe, e.g. clip_per_group=true or explore_trees=2"
                         " (repeatable; the options below win where they overlap)")
    ap.add_argument("--magnet-steps", type=int, default=2000, help="most MagNet optimiser steps")
    ap.add_argument("--batch-size", type=int, default=None, help="MagNet batch (default: the recipe's)")
    ap.add_argument("--lr", type=float, default=None, help="MagNet heads' learning rate (default: the recipe's)")
    ap.add_argument("--attention-lr", type=float, default=None, help="default: the recipe's")
    ap.add_argument("--revive-at", type=float, nargs="*", default=None, metavar="FRAC",
                    help="progress fractions at which dead first-layer branches are revived (default: the recipe's)")
    ap.add_argument("--head-warmup", type=float, default=None, metavar="FRAC",
                    help="share of the MagNet budget spent training its heads on random crops first (default 0)")
    ap.add_argument("--guidance", type=float, default=None, metavar="WEIGHT",
                    help="weight of head-guided attention (magnet_zoo.train.guidance; default 0: off)")
    ap.add_argument("--guidance-temperature", type=float, default=None, metavar="T",
                    help="softmax temperature of the head's window scores (default 1)")
    ap.add_argument("--head-pretrain", type=int, default=None, metavar="N",
                    help="random tissue windows per training slide to pre-train the MagNet heads on first (default 0)")
    ap.add_argument("--jitter", type=float, nargs="*", default=None, metavar="STD",
                    help="per-layer crop-centre noise at the start of training (default: the recipe's)")
    ap.add_argument("--val-every", type=int, default=50, help="MagNet validation every N steps")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader processes reading slides ahead")
    ap.add_argument("--device", default="cpu", help="where the MagNet trains and predicts (cpu, cuda)")
    ap.add_argument("--thumb-backbone", default="resnet10t")
    ap.add_argument("--mil-level", type=int, default=2)
    ap.add_argument("--mil-tile", type=int, default=224)
    ap.add_argument("--mil-backbone", default="resnet18", help="torchvision name inside MONAI MILModel")
    ap.add_argument("--save-checkpoint", type=Path, default=None,
                    help="write the trained MagNet here as a checkpoint folder with its model card")
    ap.add_argument("--checkpoint-note", default="", help="sentence added to the checkpoint's model card summary")
    ap.add_argument("--out", type=Path, default=RESULTS / "synthmets.json")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other methods' results from an existing --out JSON made on the same data")
    ap.add_argument("--also-running", default="",
                    help="what else shared the machine during the run (written into the JSON)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if args.quick:
        args.size, args.n_train, args.n_val, args.n_test = 2048, 6, 4, 4
        args.n_large, args.large_size = 1, 4096
        args.budget_min, args.magnet_steps, args.val_every = 2.0, 2, 2
        args.thumb_backbone = "test_resnet"
        args.out = args.out.with_name("synthmets_quick.json")
    if args.data is None:
        args.data = Path("/tmp/synthmets_quick" if args.quick else "/tmp/synthmets")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/synthmets.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    budget_s = args.budget_min * 60
    started = time.perf_counter()
    splits, data_info = make_data(args)
    train, val, test = splits["train"], splits["val"], splits["test"]

    reports: dict[str, MethodReport] = {}
    loc = None
    model = None
    if "magnet" in args.methods:
        from baselines import magnet as magnet_method

        opts = magnet_options(args, budget_s)
        reports["magnet"], model = magnet_method.run(train, val, test, opts)
        loc = magnet_method.localisation(reports["magnet"].results, test, seed=args.seed)
        logger.info("magnet done (%.0f s)", time.perf_counter() - started)
    if "mean_rgb" in args.methods:
        from baselines import mean_rgb

        reports["mean_rgb"] = mean_rgb.run(train, val, test, seed=args.seed)
    if "thumbnail_cnn" in args.methods:
        from baselines import thumbnail_cnn

        reports["thumbnail_cnn"] = thumbnail_cnn.run(
            train, val, test, backbone=args.thumb_backbone, budget_s=budget_s, seed=args.seed,
            max_steps=3 if args.quick else None,
        )
        logger.info("thumbnail CNN done (%.0f s)", time.perf_counter() - started)
    if "dense_mil" in args.methods:
        from baselines import dense_mil

        reports["dense_mil"] = dense_mil.run(
            train, val, test, level=args.mil_level, tile=args.mil_tile, backbone=args.mil_backbone,
            budget_s=budget_s, seed=args.seed, cache_dir=args.data / "mil_features",
            calib_tiles=16 if args.quick else 256, max_epochs=2 if args.quick else 100,
        )
        logger.info("dense MIL done (%.0f s)", time.perf_counter() - started)

    methods = {
        name: {
            "description": r.description,
            "settings": r.settings,
            "training": r.training,
            "summary": summarise(r),
            "predictions": [p.to_dict() for p in r.results],
            "command": command,
        }
        for name, r in reports.items()
    }
    methods, loc_kept = merge_previous(args, data_info, methods)
    if loc is None and loc_kept is not None:
        loc = loc_kept
    result: dict[str, Any] = {
        "benchmark": "synthmets",
        "quick": args.quick,
        "command": command,
        "threads": torch.get_num_threads(),
        "data": data_info,
        "budget_rules": {**BUDGET_RULES, "budget_min": args.budget_min},
        "methods": methods,
        "localisation": {k: v for k, v in loc.items() if k != "per_slide"} if loc else None,
        "localisation_per_slide": loc["per_slide"] if loc else None,
        "targets": targets(methods, loc),
        "total_seconds": time.perf_counter() - started,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "also_running": args.also_running,
        "machine": machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    md = args.out.with_suffix(".md")

    def write() -> None:
        args.out.write_text(json.dumps(jsonable(result), indent=1) + "\n")
        md.write_text(markdown(jsonable(result)))

    write()  # the results first: a failure below must not lose hours of training and evaluation
    if model is not None and args.save_checkpoint is not None:
        from baselines.checkpoint import save_demo_checkpoint

        result["checkpoint"] = str(save_demo_checkpoint(model, args.save_checkpoint, result, args.checkpoint_note))
        write()
    print("\n".join(tables(jsonable(result))))
    print(f"wrote {args.out} and {md} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
