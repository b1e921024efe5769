"""SynthMets: the attention pre-training phase over seeds, one row per setting.

The phase (``pretrain_attention``, run alone by ``synthmets_attention_pretrain.py`` or at the start of a
``synthmets.py`` run whose first map it then fixes) either finds the tumours in the 56 px whole-slide view
or stays on its ln 2 plateau, and which it does depends on the seed (docs/synthmets_magnet.md, "The phase's
plateau"). Each first map is scored by ``synthmets_visibility.py --sizes 56 --checkpoint ...`` on the
validation split; this script puts those scores side by side, per setting and seed: the pixel AUROC, the
validation tumour slides whose top pixel is on tumour, and whether the map *found the tumours* — its top
pixel on tumour in at least :data:`FOUND_SHARE` of them (a rule fixed before the runs it judges; the maps that
found them so far scored 12-16 of 25, the stuck ones 1-3, and a half-way one 8). A setting is compared by
how many of its seeds found the tumours, and by their pixel AUROCs' range.

    python benchmarks/synthmets_phase_seeds.py             # the reported settings
    python benchmarks/synthmets_phase_seeds.py --setting name=vis_s0.json,vis_s1.json --out /tmp/phase.json

Prints the table and writes ``--out`` (JSON) and the same name with ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FOUND_SHARE = 0.4
"""A map found the tumours when its top pixel is on tumour in at least this share of the validation tumour slides."""
_VIS = "synthmets_visibility_pretrain_one_map_edges_{}_s{}.json"
DEFAULT_SETTINGS: dict[str, list[str]] = {
    "the former recipe's phase (learn_to_look_mil until 2026-12-07: edge towards 0 from the first step)": [
        "synthmets_visibility_pretrain_one_map_edges_s0.json", "synthmets_visibility_pretrain_one_map_edges_s1.json",
        "synthmets_visibility_pretrain_one_map_edges_s2.json", "synthmets_visibility_30min_onemap_edges_s3.json",
        "synthmets_visibility_30min_mil_onemap_s4.json", "synthmets_visibility_30min_mil_onemap_s5.json"],
    "pooled share from 1 narrowed to 0.1 and the edge pushed from step 500 (top_start=1, edge_start=0.5)": [
        _VIS.format("both", s) for s in (0, 1, 4, 5)],
    "the edge only a margin below the pooled logit (attention_mil_edges=below)": [
        _VIS.format("below", s) for s in range(6)],
    "both: the edge a margin below, the pooled share from 1 narrowed to 0.1 (edges=below, top_start=1; "
    "learn_to_look_mil since 2026-12-07)": [
        _VIS.format("widebelow", s) for s in range(6)],
    "the same in 30-minute runs with the plain command (magnet2_micro as registered), seeds 6-8": [
        "synthmets_visibility_30min_mil_default_s6.json", "synthmets_visibility_30min_mil_default_s7.json",
        "synthmets_visibility_30min_mil_restart_s8.json"],
    "the same, and a second phase for the same map when the first ends on the plateau (attention_pretrain_restarts=1, "
    "restart_from=continue; learn_to_look_mil since 2026-12-08: seeds 0-5 and 7-8 never reach it)": [
        *(_VIS.format("widebelow", s) for s in range(6)), "synthmets_visibility_30min_mil_continue_s6.json",
        "synthmets_visibility_30min_mil_default_s7.json", "synthmets_visibility_30min_mil_restart_s8.json"],
}


class PhaseSeedsError(ValueError):
    """A scored map that cannot be read or is not a first-map score of the validation split."""


def map_row(path: Path) -> dict[str, Any]:
    """One first map's validation scores from a ``synthmets_visibility.py --checkpoint`` JSON."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PhaseSeedsError(f"{path}: cannot read it ({err})") from err
    rows = data.get("rows") or []
    if not rows or "val" not in rows[0]:
        raise PhaseSeedsError(f"{path}: no validation scores (is it a synthmets_visibility.py JSON?)")
    if "--checkpoint" not in data.get("command", ""):
        raise PhaseSeedsError(f"{path}: scores a probe, not a trained first map (no --checkpoint in its command)")
    val = rows[0]["val"]
    checkpoint = data["command"].split("--checkpoint", 1)[1].split()[0]
    seed = seed_of(checkpoint)
    return {"file": path.name, "checkpoint": checkpoint, "seed": seed, "pixel_auroc": val["pixel_auroc"],
            "top_on_tumour": round(val["argmax_hit"] * val["slides"]), "tumour_slides": val["slides"],
            "top_on_edge": val["argmax_on_edge"], "found": val["argmax_hit"] >= FOUND_SHARE}


def seed_of(name: str) -> int | None:
    """The seed in a checkpoint's name (``..._s4``), or None."""
    tail = name.rstrip("/").rsplit("_s", 1)
    return int(tail[1]) if len(tail) == 2 and tail[1].isdigit() else None


def summarise(settings: dict[str, list[Path]]) -> list[dict[str, Any]]:
    out = []
    for name, paths in settings.items():
        maps = sorted((map_row(p) for p in paths), key=lambda r: (r["seed"] is None, r["seed"]))
        areas = [m["pixel_auroc"] for m in maps]
        out.append({"setting": name, "maps": maps, "seeds": [m["seed"] for m in maps],
                    "found": sum(m["found"] for m in maps), "of": len(maps),
                    "pixel_auroc_range": [min(areas), max(areas)]})
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| setting | seeds | found the tumours | pixel AUROC per seed | top pixel on tumour per seed |",
             "|---|---|---|---|---|"]
    for r in rows:
        seeds = " / ".join(str(s) for s in r["seeds"])
        areas = " / ".join(f"{m['pixel_auroc']:.2f}" for m in r["maps"])
        tops = " / ".join(f"{m['top_on_tumour']}/{m['tumour_slides']}" for m in r["maps"])
        lines.append(f"| {r['setting']} | {seeds} | {r['found']} of {r['of']} | {areas} | {tops} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", action="append", default=[], metavar="NAME=A.json,B.json",
                    help="a setting and its scored maps (paths, or names under benchmarks/results); repeatable; "
                    "default: the reported settings")
    ap.add_argument("--out", default=str(RESULTS / "synthmets_phase_seeds.json"))
    args = ap.parse_args(argv)
    raw: dict[str, list[str]] = {}
    for item in args.setting:
        name, sep, files = item.partition("=")
        if not sep or not files:
            ap.error(f"--setting wants NAME=A.json,B.json, got {item!r}")
        raw[name] = files.split(",")
    raw = raw or DEFAULT_SETTINGS
    settings = {name: [Path(f) if Path(f).exists() else RESULTS / f for f in files] for name, files in raw.items()}
    try:
        rows = summarise(settings)
    except PhaseSeedsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = markdown(rows)
    print(table)
    out = Path(args.out)
    out.write_text(json.dumps({"what": "the attention pre-training phase's first maps over seeds (validation split)",
                               "found_share": FOUND_SHARE, "settings": rows, "machine": machine_info()}, indent=1))
    out.with_suffix(".md").write_text(
        "# SynthMets: the attention pre-training phase over seeds\n\n"
        f"`python benchmarks/synthmets_phase_seeds.py`; a map *found the tumours* when its top pixel is on tumour "
        f"in at least {FOUND_SHARE:.0%} of the validation tumour slides.\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
