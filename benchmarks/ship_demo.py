"""Ship a SynthMets run's MagNet as the demo model: its checkpoint, re-saved with its model card.

``benchmarks/synthmets.py --save-checkpoint DIR`` writes a trained MagNet with a card built from that run's
result. Several seeds of one command give several such folders; the demo ships the one with the best
*validation* AUROC (never chosen on the test split). This script takes the runs' result JSONs, picks that
run, checks that its checkpoint is the network the result describes, and writes it with its card (plus an
optional sentence, ``--note``) to ``magnet_zoo/demo/checkpoint``:

    python benchmarks/ship_demo.py benchmarks/results/synthmets_30min_onemap_edges_s{0,1_paired,2,3}.json \\
        --note "..."

Each result names its checkpoint folder (``"checkpoint"``; ``--checkpoints`` gives them when they moved).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines.checkpoint import save_demo_checkpoint  # noqa: E402

from magnet_zoo.hub import load_pretrained  # noqa: E402

DEMO_FOLDER = Path(__file__).resolve().parents[1] / "magnet_zoo" / "demo" / "checkpoint"


def validation_auroc(result: dict) -> float:
    return float(result["methods"]["magnet"]["training"]["best_val_auroc"])


def load_results(paths: list[Path]) -> list[dict]:
    results = [json.loads(path.read_text()) for path in paths]
    for path, result in zip(paths, results, strict=True):
        if "magnet" not in result.get("methods", {}):
            raise SystemExit(f"{path}: no MagNet in this result")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path, help="result JSONs of benchmarks/synthmets.py runs")
    ap.add_argument("--checkpoints", nargs="*", type=Path, default=None,
                    help="their checkpoint folders, in the same order (default: each result's 'checkpoint')")
    ap.add_argument("--note", default="", help="sentence added to the card's summary")
    ap.add_argument("--out", type=Path, default=DEMO_FOLDER, help=f"where to write it (default {DEMO_FOLDER})")
    args = ap.parse_args(argv)
    if args.checkpoints is not None and len(args.checkpoints) != len(args.results):
        ap.error("--checkpoints needs one folder per result")

    results = load_results(args.results)
    scores = [validation_auroc(r) for r in results]
    index = scores.index(max(scores))  # the best validation AUROC (ties: the first given)
    path, result = args.results[index], results[index]
    folder = args.checkpoints[index] if args.checkpoints else Path(result["checkpoint"])
    model = load_pretrained(folder)
    ran = result["methods"]["magnet"]["settings"]["config"]
    if json.loads(json.dumps(model.config.to_dict())) != ran:
        raise SystemExit(f"{folder} holds a network other than the one {path} describes")
    for i, (other, score) in enumerate(zip(args.results, scores, strict=True)):
        print(f"{'->' if i == index else '  '} {other.name}: validation AUROC {score:.4f}")

    # Written beside the target, then swapped in: a failure leaves the shipped model as it was.
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out.parent) as tmp:
        staged = save_demo_checkpoint(model, Path(tmp) / "checkpoint", result, args.note)
        if args.out.exists():
            shutil.rmtree(args.out)
        shutil.move(str(staged), args.out)
    print(f"shipped {folder} ({path.name}) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
