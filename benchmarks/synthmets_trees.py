"""SynthMets at inference with K sampled zoom trees: test AUROC of trained MagNets, one tree against K.

The paper's "more exhaustive exploration" (``--trees K``): every slide runs ``K`` trees whose learned crop
centres are drawn from each layer's sparse attention map, and the slide's probability is the mean of the
trees'. This script scores checkpoints on the SynthMets test slides (``test`` and ``test_large`` of a
``synthmets.py`` data folder) through ``magnet_zoo.train.evaluate`` (what ``magnet-zoo evaluate --trees K``
runs), for each ``K`` asked, with the time per slide and the values fed to the networks. Nothing is chosen
on these numbers: ``K`` is given on the command line, and the checkpoints were chosen on validation.

    python benchmarks/synthmets_trees.py --models magnet2_micro.synthmets_demo /tmp/mz/ckpt_centred_s0 --trees 1 8
    python benchmarks/synthmets_trees.py --data /tmp/synthmets_quick --models DIR --trees 1 2 --out /tmp/t.json

``--as-trained`` scores a checkpoint trained with tree MIL (recipe field ``tree_mil``) as it was validated:
its ``explore_trees`` trees from its training policy, max-pooled (``magnet-zoo evaluate --as-trained``);
other checkpoints keep ``--trees``. ``--uniform-centres`` adds, for every ``K >= 2``, the same trees and
pooling with each learned crop centre drawn uniformly over the positions the attention may choose (tissue
only for a glass-free model; the scales stay the attention's): the control for what the attention's
placement adds to the score.

    python benchmarks/synthmets_trees.py --models /tmp/mz/ckpt_treemil_epyc_s0 --as-trained --uniform-centres \
        --out benchmarks/results/synthmets_trees_uniform.json

Prints a table and writes ``--out`` (JSON) and the same name with ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info  # noqa: E402

from magnet_zoo.hub import load_pretrained  # noqa: E402
from magnet_zoo.nn.trees import TreePolicy  # noqa: E402
from magnet_zoo.train.data import read_slide_csv  # noqa: E402
from magnet_zoo.train.evaluate import evaluate  # noqa: E402
from magnet_zoo.train.exploration import trained_inference  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def split_records(root: Path, splits: list[str], labels: tuple[str, ...]) -> list[Any]:
    records = []
    for split in splits:
        csv_path = root / split / "labels.csv"
        if not csv_path.is_file():
            raise SystemExit(f"error: {csv_path} not found; generate the data with benchmarks/synthmets.py first")
        records += read_slide_csv(csv_path, labels)
    return records


def settings(model: Any, trees: list[int], as_trained: bool,
             uniform_centres: bool) -> list[tuple[int, TreePolicy | None]]:
    """The ``(K, policy)`` pairs to score ``model`` with (``None``: the inference default)."""
    trained = trained_inference(model) if as_trained else None
    pairs: list[tuple[int, TreePolicy | None]] = [trained] if trained else [(k, None) for k in trees]
    if uniform_centres:
        pairs += [(k, replace(policy or TreePolicy(), uniform=1.0)) for k, policy in list(pairs) if k >= 2]
    return pairs


def score(model_ref: str, root: Path, splits: list[str], trees: list[int], seed: int, *, as_trained: bool = False,
          uniform_centres: bool = False) -> dict[str, Any]:
    model = load_pretrained(model_ref, device="cpu")
    records = split_records(root, splits, tuple(model.config.labels))
    per_k = []
    for k, policy in settings(model, trees, as_trained, uniform_centres):
        start = time.perf_counter()
        report = evaluate(model, records, batch_size=4, num_workers=1, device="cpu", progress=False,
                          trees=k, tree_seed=seed, tree_policy=policy)
        seconds = time.perf_counter() - start
        metrics = report.metrics
        per_k.append({
            "trees": k, "policy": (policy or TreePolicy()).kwargs() if k >= 2 else None,
            "centres": "uniform" if policy is not None and policy.uniform == 1.0 else "attention",
            "auroc": metrics["auroc"], "accuracy": metrics["accuracy"],
            "per_category": {c: m["auroc"] for c, m in metrics["per_category"].items()},
            "seconds_per_slide": seconds / len(records),
            "values_fed_per_slide": k * model.counts()["values_fed"],
            "probabilities": [r["probability"] for r in report.predictions],
        })
    return {"model": model_ref, "n": len(records), "results": per_k}


def tables(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | K trees | centres | pooling | test AUROC | macro | micro | ITC | accuracy | "
             "values fed / slide | s / slide |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x: Any) -> str:
        return "–" if x is None else f"{x:.3f}"

    for row in rows:
        for r in row["results"]:
            cat = r["per_category"]
            centres = "expected crop" if r["trees"] == 1 else r.get("centres", "attention")
            pooling = (r.get("policy") or {}).get("pool", "–") if r["trees"] > 1 else "–"
            lines.append(f"| {row['model']} | {r['trees']} | {centres} | {pooling} | {f(r['auroc'])} | "
                         f"{f(cat.get('macro'))} | "
                         f"{f(cat.get('micro'))} | {f(cat.get('itc'))} | {f(r['accuracy'])} | "
                         f"{r['values_fed_per_slide'] / 1e3:.0f} k | {r['seconds_per_slide']:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True, help="checkpoint folders or registered names with weights")
    ap.add_argument("--data", type=Path, default=Path("/tmp/synthmets"), help="synthmets.py data folder")
    ap.add_argument("--splits", nargs="+", default=["test", "test_large"])
    ap.add_argument("--trees", type=int, nargs="+", default=[1, 8], help="K values (1: the expected crop)")
    ap.add_argument("--tree-seed", type=int, default=0)
    ap.add_argument("--as-trained", action="store_true",
                    help="score a tree-MIL checkpoint as it was validated (its K trees and policy, max-pooled)")
    ap.add_argument("--uniform-centres", action="store_true",
                    help="also score every K >= 2 with the crop centres drawn uniformly (the placement control)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--also-running", default="", help="what else shared the machine (written into the JSON)")
    ap.add_argument("--out", type=Path, default=RESULTS / "synthmets_trees.json")
    args = ap.parse_args(argv)
    if any(k < 1 for k in args.trees):
        ap.error("--trees values must be >= 1")
    splits = [s for s in args.splits if (args.data / s).is_dir()] or args.splits
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = [score(m, args.data, splits, args.trees, args.tree_seed, as_trained=args.as_trained,
                  uniform_centres=args.uniform_centres) for m in args.models]
    command = "python benchmarks/synthmets_trees.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"benchmark": "synthmets_trees", "command": command, "data": str(args.data), "splits": splits,
              "tree_seed": args.tree_seed, "rows": rows, "also_running": args.also_running,
              "total_seconds": time.perf_counter() - started, "machine": machine_info()}
    lines = tables(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    md = args.out.with_suffix(".md")
    md.write_text(f"# SynthMets with K sampled trees at inference\n\nCommand: `{command}`\n\n"
                  f"Machine: {result['machine'].get('cpu_model', '')}, {args.threads} torch threads; "
                  f"{result['machine']['date']}. Splits: {', '.join(splits)}.\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
