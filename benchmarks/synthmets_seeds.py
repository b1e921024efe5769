"""SynthMets over MagNet seeds: one table from several ``synthmets.py`` runs on the same data.

Each ``synthmets.py --methods magnet --magnet-seed S [--recipe R]`` run writes one JSON; this script puts
their MagNet rows side by side (the setting: recipe and ``--recipe-field`` changes; seed, steps, the
validation AUROC that chose the weights, test AUROC overall and per category, localisation against
random placement; the budget, the CPU and the values fed per slide, since runs from other sessions ran on
other machines), gives each setting's median and range, and adds the baselines of the reference run
(same data: checked). The seed spread is what the project's rule compares: a setting is called better
only where its range lies outside the other's.

    python benchmarks/synthmets_seeds.py                                   # the reported 30-minute runs
    python benchmarks/synthmets_seeds.py --runs a.json b.json --out /tmp/seeds.json

Prints the table and writes ``--out`` (JSON) and the same name with ``.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines.common import data_key, finite_or_none, ratio_ceiling  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_RUNS = ("synthmets_30min.json", "synthmets_30min_s1.json", "synthmets_30min_centred_s0.json",
                "synthmets_30min_centred_s1.json",
                "synthmets_30min_explore4_s0.json", "synthmets_30min_treemil_s0.json",
                "synthmets_30min_treemil_epyc_s0.json", "synthmets_30min_treemil_epyc_s1_idle.json",
                "synthmets_30min_treemil_epyc_s2.json", "synthmets_30min_treemil_epyc_s3.json",
                "synthmets_30min_guide1_s0.json", "synthmets_30min_guide1z_s0.json",
                "synthmets_30min_attmil_s0.json", "synthmets_30min_attpre_s0.json",
                "synthmets_30min_onemap_s1.json", "synthmets_30min_onemap_pretrained_s0.json",
                "synthmets_30min_onemap_pretrained_s1.json", "synthmets_30min_onemap_pretrained_s2.json",
                "synthmets_30min_onemap_edges_s0.json", "synthmets_30min_onemap_edges_s1_paired.json",
                "synthmets_30min_onemap_edges_s2.json", "synthmets_30min_onemap_edges_s3.json",
                "synthmets_30min_mil_twomaps_s0.json", "synthmets_30min_mil_twomaps_s1.json",
                "synthmets_30min_mil_scale25_s0.json", "synthmets_30min_mil_scale25_s1.json",
                "synthmets_30min_mil_onemap_s4.json", "synthmets_30min_mil_onemap_s5.json",
                "synthmets_30min_mil_widestart_s4.json", "synthmets_30min_mil_widestart_s5.json",
                "synthmets_30min_mil_widebelow_s0.json", "synthmets_30min_mil_widebelow_s5.json",
                "synthmets_30min_mil_widebelow_s1.json", "synthmets_30min_mil_widebelow_s4.json",
                "synthmets_30min_mil_widebelow_s2.json", "synthmets_30min_mil_widebelow_s3.json",
                "synthmets_30min_mil_twomaps_widebelow_s0.json", "synthmets_30min_mil_twomaps_widebelow_s1.json",
                "synthmets_30min_mil_default_s6.json", "synthmets_30min_mil_default_s7.json",
                "synthmets_30min_mil_restart_s6.json", "synthmets_30min_mil_restart_s8.json",
                "synthmets_30min_mil_continue_s6.json", "synthmets_30min_mil_continue_s9.json",
                "synthmets_30min_mil_continue_s10.json", "synthmets_30min_mil_continue_s11.json",
                "synthmets_30min_mil_continue_s12.json", "synthmets_30min_mil_continue_s13.json",
                "synthmets_30min_mil_plateau065_s12.json")
BASELINES = ("mean_rgb", "thumbnail_cnn", "dense_mil")
COLUMNS = ("auroc", "auroc_macro", "auroc_micro", "auroc_itc", "loc_micro_ratio", "loc_micro_ceiling",
           "loc_all_ratio")


class SeedsError(ValueError):
    """The runs cannot be compared (other data, no MagNet)."""


RECIPE_FLAGS = {"--guidance-temperature": "guidance_temperature", "--head-pretrain": "head_pretrain_windows"}
"""``synthmets.py`` options that set a recipe field and that the reference runs leave at their defaults."""
REFERENCE_OVERRIDES = ("crop_source=reread", "attention_tissue_only=true", "aux_pooling=max")
"""The reference runs' ``--magnet-override`` items: any other is a change of setting, named in the table."""


def recipe_fields(command: str) -> list[str]:
    """The recipe changes of a ``synthmets.py`` command line, in order: its ``--recipe-field KEY=VALUE`` items,
    the options of :data:`RECIPE_FLAGS` as ``field=value``, and ``--magnet-override`` items beyond
    :data:`REFERENCE_OVERRIDES` (network settings the recipe did not give)."""
    words = shlex.split(command)
    out = []
    for i, w in enumerate(words[:-1]):
        if w == "--recipe-field" or (w == "--magnet-override" and words[i + 1] not in REFERENCE_OVERRIDES):
            out.append(words[i + 1])
        elif w in RECIPE_FLAGS:
            out.append(f"{RECIPE_FLAGS[w]}={words[i + 1]}")
    return out


ARCHITECTURE = ("patches", "classifier_backbone", "aux_backbone")
"""Network settings that are the benchmark's architecture, not a recipe's: a run keeps its registered recipe's name
with them changed (named in the setting)."""


def _plain(obj: Any) -> Any:
    """``obj`` as JSON gives it back (tuples as lists), so recorded and registered recipes compare equal."""
    return json.loads(json.dumps(obj))


def _key(change: str) -> str:
    """The field of a ``key=value`` change."""
    return change.partition("=")[0]


RESTART_FIELDS = ("attention_pretrain_restarts", "attention_pretrain_restart_from", "attention_pretrain_plateau")
"""Recipe fields that change a run only when its attention pre-training ended on its plateau."""


def as_compared_with(ran: dict[str, Any], phase: dict[str, Any] | None, against: dict[str, Any]) -> dict[str, Any]:
    """``ran`` (a run's recorded recipe, plain) with the :data:`RESTART_FIELDS` read as what the run did, next to the
    recipe ``against``: a phase that started again (its ``attempts``) keeps its recorded fields; one that ended
    below ``against``'s plateau trained exactly as ``against`` would have (no further phase: tests/
    test_attention_mil.py, "...exactly as without restarts"), so it takes ``against``'s; one that ended on the
    plateau without starting again is a run with no restarts (``attention_pretrain_restarts=0``)."""
    if len((phase or {}).get("attempts") or ()) > 1:
        return ran
    theirs = {k: against[k] for k in RESTART_FIELDS if k in against}
    last = (phase or {}).get("loss_last_50")
    on_plateau = (against.get("attention_pretrain_restarts", 0) > 0 and ran.get("attention_pretrain_steps")
                  and last is not None and last >= against["attention_pretrain_plateau"])
    return {**ran, **theirs, **({"attention_pretrain_restarts": 0} if on_plateau else {})}


def registered_as(ran: dict[str, Any] | None, among: dict[str, Any] | None = None,
                  phase: dict[str, Any] | None = None) -> str | None:
    """The registered recipe whose every field, and every network setting beyond :data:`ARCHITECTURE`, is ``ran``'s
    (a run's recorded recipe; a field added since the run is taken at its default; the restart fields as
    :func:`as_compared_with` reads them, given the run's attention pre-training ``phase``), or ``None``. A run that
    spelled a registered recipe as another one plus ``--recipe-field``s is then named by it. ``among``: the
    recipes to compare with, by name (default: the registry)."""
    if not ran:
        return None
    from magnet_zoo.train.recipe import RECIPES, Recipe

    defaults = _plain(Recipe(name="defaults").to_dict())
    ran = _plain(ran)
    network = {k: v for k, v in (ran.get("model_overrides") or {}).items() if k not in ARCHITECTURE}
    for name, registered in (RECIPES if among is None else among).items():
        mine = _plain(registered.to_dict())
        mine_ran = as_compared_with(ran, phase, mine)
        fields = set(mine) - {"name", "summary", "model_overrides"}
        if all(mine_ran.get(k, defaults[k]) == mine[k] for k in fields) and network == mine["model_overrides"]:
            return name
    return None


FORMER_FIELDS: dict[str, dict[str, Any]] = {
    "learn_to_look_mil": {"attention_mil_edges": "negative", "attention_pretrain_top_start": None,
                          "attention_pretrain_restarts": 0},
}
"""Registered recipes' fields as they were before a change (``learn_to_look_mil``: the edge and the share until
2026-12-07, no second phase on the plateau until 2026-12-08): a run recorded with the former values is named by its
recipe and those values, e.g. ``learn_to_look_mil (attention_mil_edges=negative, attention_pretrain_top_start=
null)``, never as the recipe it no longer is. A restart field is named only where it changed what the run trained
(:func:`as_compared_with`)."""


def _as_field(key: str, value: Any) -> str:
    """``key=value`` as a ``--recipe-field`` spells it."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value, separators=(',', ':'))}"


def former_changes(ran: dict[str, Any] | None, name: str, phase: dict[str, Any] | None = None,
                   keys: tuple[str, ...] | None = None) -> list[str]:
    """The fields of :data:`FORMER_FIELDS` (or ``keys``) in which ``ran`` (a run's recorded recipe, by the name
    ``name`` or spelled as another recipe; its restart fields as :func:`as_compared_with` reads them next to
    ``name`` today) differs from the registered ``name`` today, as ``key=value``."""
    from magnet_zoo.train.recipe import RECIPES, Recipe

    if not ran or (keys is None and name not in FORMER_FIELDS) or name not in RECIPES:
        return []
    defaults, now = _plain(Recipe(name="defaults").to_dict()), _plain(RECIPES[name].to_dict())
    ran = as_compared_with(_plain(ran), phase, now)
    return [_as_field(k, ran.get(k, defaults[k])) for k in (FORMER_FIELDS[name] if keys is None else keys)
            if ran.get(k, defaults[k]) != now[k]]


def registered_formerly(ran: dict[str, Any] | None, phase: dict[str, Any] | None = None) -> str | None:
    """The registered recipe that ``ran`` is with its :data:`FORMER_FIELDS`, or ``None``."""
    if not ran:
        return None
    from magnet_zoo.train.recipe import RECIPES

    for name, former in FORMER_FIELDS.items():
        if registered_as(ran, among={name: RECIPES[name].replace(**former)}, phase=phase) == name:
            return name
    return None


def tree_changes(settings: dict[str, Any]) -> list[str]:
    """``["patches=[...]"]`` when a run's recorded tree (``settings["config"]["patches"]``) differs from its model's
    as registered today, else ``[]``: a run names its tree by what it trained, not by its command line
    (``magnet2_micro`` was a (2, 2) tree until 2026-12-07 and is a (1, 2) one since). The other
    :data:`ARCHITECTURE` settings are named as the command spelled them (the benchmark's own backbone options set
    them on every run)."""
    from magnet_zoo.registry import UnknownModelError, get_config

    ran = _plain((settings.get("config") or {}).get("patches"))
    try:
        registered = _plain(list(get_config(settings.get("model") or "").patches))
    except UnknownModelError:  # a model no longer (or never) registered: nothing to compare with
        return []
    return [] if ran is None or ran == registered else [_as_field("patches", ran)]


def magnet_row(result: dict[str, Any], source: str) -> dict[str, Any]:
    """The MagNet's numbers from one ``synthmets.py`` JSON."""
    magnet = result["methods"].get("magnet")
    if magnet is None:
        raise SeedsError(f"{source}: no MagNet in this run")
    settings, training = magnet["settings"], magnet["training"]
    metrics = magnet["summary"]["metrics"]
    per_cat = metrics["per_category"]
    loc = result.get("localisation") or {}
    by_cat = loc.get("by_category", {})
    recipe = settings.get("recipe", {}).get("name") or "learn_to_look"
    spelled_changes = recipe_fields(magnet.get("command") or result.get("command") or "")
    spelled = recipe + (f" ({', '.join(spelled_changes)})" if spelled_changes else "")
    ran, phase = settings.get("recipe"), training.get("attention_pretrain")
    canonical = registered_as(ran, phase=phase)
    architecture = tree_changes(settings) + [c for c in spelled_changes
                                             if _key(c) in ARCHITECTURE and _key(c) != "patches"]
    # restart fields are named as the run used them (as_compared_with), not as spelled
    changes = [c for c in spelled_changes if _key(c) not in ARCHITECTURE and _key(c) not in RESTART_FIELDS]
    formerly = registered_formerly(ran, phase) if canonical is None else None
    if canonical is not None:  # e.g. learn_to_look + the fields that make learn_to_look_mil
        recipe, changes = canonical, architecture
    elif formerly is not None:  # the registered recipe as it was when the run trained
        recipe, changes = formerly, architecture + former_changes(ran, formerly, phase)
    else:  # a changed recipe: its spelled fields, its restart fields, and any the registry changed since the run
        changes += former_changes(ran, recipe, phase, keys=RESTART_FIELDS)
        keys = {_key(c) for c in changes}
        changes = architecture + changes + [c for c in former_changes(ran, recipe, phase) if _key(c) not in keys]
    return {
        "source": source,
        # Runs older than the --recipe option trained with the default recipe and did not record its name.
        "recipe": recipe,
        "spelled_as": spelled,
        "recipe_fields": changes,
        "setting": recipe + (f" ({', '.join(changes)})" if changes else ""),
        "seed": settings["trainer"]["seed"],
        "steps": training.get("steps"),
        "best_step": training.get("best_step"),
        "best_val_auroc": training.get("best_val_auroc"),
        "auroc": metrics.get("auroc"),
        "auroc_macro": per_cat.get("macro", {}).get("auroc"),
        "auroc_micro": per_cat.get("micro", {}).get("auroc"),
        "auroc_itc": per_cat.get("itc", {}).get("auroc"),
        "loc_micro_ratio": by_cat.get("micro", {}).get("ratio"),
        "loc_micro_ceiling": finite_or_none(ratio_ceiling(by_cat.get("micro", {}))),
        "loc_all_ratio": loc.get("all", {}).get("ratio"),
        "values_fed": magnet["summary"]["cost"]["values_fed_mean"],
        "budget_min": (settings["trainer"].get("budget_s") or 0) / 60 or None,
        "machine": result.get("machine", {}).get("cpu_model"),
        "date": result.get("machine", {}).get("date"),
        "also_running": result.get("also_running"),
        "command": magnet.get("command"),
    }


def summarise(runs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Rows per run, per-recipe median and range, and the baselines (from the first run that has them)."""
    if not runs:
        raise SeedsError("no runs given")
    key = data_key(runs[0][1]["data"])
    for source, result in runs[1:]:
        if data_key(result["data"]) != key:
            raise SeedsError(f"{source} was made on other data than {runs[0][0]}; compare runs on the same data")
    rows = [magnet_row(result, source) for source, result in runs]
    for r in rows:  # a run under another budget than the reference run's is another setting
        if r["budget_min"] != rows[0]["budget_min"] and r["budget_min"] is not None:
            r["setting"] += f" [{r['budget_min']:.0f} min]"
        # so is one on another CPU: the same wall-time budget buys another number of steps
        if r["machine"] != rows[0]["machine"] and r["machine"]:
            r["setting"] += f" [{r['machine']}]"
    recipes: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == name]
        stats = {}
        for col in COLUMNS:
            values = [r[col] for r in mine if r[col] is not None]
            stats[col] = ({"median": statistics.median(values), "min": min(values), "max": max(values)}
                          if values else None)
        recipes[name] = {"seeds": [r["seed"] for r in mine], "n": len(mine), **stats}
    baselines = {}
    for source, result in runs:
        for name in BASELINES:
            if name in result["methods"] and name not in baselines:
                metrics = result["methods"][name]["summary"]["metrics"]
                baselines[name] = {"source": source, "auroc": metrics.get("auroc"),
                                   "auroc_macro": metrics["per_category"].get("macro", {}).get("auroc"),
                                   "auroc_micro": metrics["per_category"].get("micro", {}).get("auroc"),
                                   "auroc_itc": metrics["per_category"].get("itc", {}).get("auroc")}
    return {"benchmark": "synthmets_seeds", "data": runs[0][1]["data"], "runs": rows, "recipes": recipes,
            "baselines": baselines}


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _spread(stats: dict[str, float] | None, digits: int = 2, unit: str = "") -> str:
    """``median (min-max)`` of one column over a recipe's seeds."""
    if stats is None:
        return "–"
    return f"{stats['median']:.{digits}f}{unit} ({stats['min']:.{digits}f}-{stats['max']:.{digits}f})"


def tables(summary: dict[str, Any]) -> list[str]:
    lines = ["| setting (recipe, --recipe-field) | seed | budget (min) | CPU | steps | values fed / slide | "
             "val AUROC (chosen) | test AUROC | macro | micro | ITC | "
             "micro tumours: final patches on tumour / random | its ceiling (all on tumour) | all tumours: same |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["runs"]:
        lines.append(f"| {r['setting']} | {r['seed']} | {_fmt(r.get('budget_min'), 0)} | {_fmt(r.get('machine'))} | "
                     f"{_fmt(r['steps'])} | {_fmt(r['values_fed'] / 1000, 0)} k | {_fmt(r['best_val_auroc'])} | "
                     f"{_fmt(r['auroc'])} | {_fmt(r['auroc_macro'])} | {_fmt(r['auroc_micro'])} | "
                     f"{_fmt(r['auroc_itc'])} | {_fmt(r['loc_micro_ratio'], 1)}x | "
                     f"{_fmt(r['loc_micro_ceiling'], 1)}x | {_fmt(r['loc_all_ratio'], 1)}x |")
    lines += ["", "| setting | seeds | test AUROC median (range) | macro | micro | ITC | micro localisation | "
              "its ceiling |", "|---|---|---|---|---|---|---|---|"]
    for name, rec in summary["recipes"].items():
        cells = [_spread(rec[col]) for col in ("auroc", "auroc_macro", "auroc_micro", "auroc_itc")]
        lines.append(f"| {name} | {', '.join(map(str, rec['seeds']))} | {' | '.join(cells)} | "
                     f"{_spread(rec['loc_micro_ratio'], 1, 'x')} | {_spread(rec['loc_micro_ceiling'], 1, 'x')} |")
    if summary["baselines"]:
        lines += ["", "| baseline (same data) | test AUROC | macro | micro | ITC |", "|---|---|---|---|---|"]
        for name, b in summary["baselines"].items():
            lines.append(f"| {name} | {_fmt(b['auroc'])} | {_fmt(b['auroc_macro'])} | {_fmt(b['auroc_micro'])} | "
                         f"{_fmt(b['auroc_itc'])} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, nargs="+", default=[RESULTS / name for name in DEFAULT_RUNS],
                    help="synthmets.py JSON files on the same data (default: the 30-minute runs)")
    ap.add_argument("--out", type=Path, default=RESULTS / "synthmets_30min_seeds.json")
    args = ap.parse_args(argv)
    missing = [str(p) for p in args.runs if not p.is_file()]
    if missing:
        print(f"error: no such run: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        summary = summarise([(p.name, json.loads(p.read_text())) for p in args.runs])
    except SeedsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    lines = tables(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    md = args.out.with_suffix(".md")
    md.write_text("# SynthMets over MagNet seeds\n\nCommand: `python benchmarks/synthmets_seeds.py "
                  + " ".join(a for a in (argv if argv is not None else sys.argv[1:])) + "`\n\n"
                  + "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
