"""The tiny FindIt setting of ``tests/test_learns.py`` over several seeds: where each layer's learned crops go.

The test trains ``magnet2_tiny`` (``final_patch_size=32``) on 448 px images with a 22 px object (5 % of
the side) for 150 steps on 2 CPU threads and asserts one seed. This script runs the same setting for
each ``--seeds`` value (the model's initialisation and the training data both follow the seed; the 48
evaluation images are always the same) and reports, per seed, the share of each layer's learned crops
that contain the object centre before and after training, the same with the layer-2 attention made
flat (a crop centred in its parent), the learned scales and the accuracy: the spread a one-seed test
cannot show, and the machine it was measured on.

    python benchmarks/findit_tiny_seeds.py                                 # learn_to_look_centred, seeds 0 1 2
    python benchmarks/findit_tiny_seeds.py --recipe learn_to_look --seeds 0 --out /tmp/tiny.json

Prints a table and writes ``benchmarks/results/findit_tiny_seeds.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info  # noqa: E402

from magnet_zoo.factory import create_model  # noqa: E402
from magnet_zoo.tasks.findit import FindItSpec, evaluate, flat_attention  # noqa: E402
from magnet_zoo.tasks.train import eval_seeds, train  # noqa: E402
from magnet_zoo.train.recipe import get_recipe  # noqa: E402
from magnet_zoo.train.settings import parse_overrides  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SPEC = FindItSpec(image_size=448, object_frac=0.05)
STEPS = 150
N_EVAL = 48


def run_seed(recipe: str, seed: int, overrides: dict[str, Any] | None = None, steps: int = STEPS,
             n_eval: int = N_EVAL) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = create_model("magnet2_tiny", **{**get_recipe(recipe).model_overrides, "final_patch_size": 32,
                                            **(overrides or {})})
    before, _ = evaluate(model, SPEC, eval_seeds(n_eval))
    started = time.perf_counter()
    train(model, SPEC, recipe, steps=steps, seed=seed, threads=2, log_every=0, device="cpu")
    seconds = time.perf_counter() - started
    after, _ = evaluate(model, SPEC, eval_seeds(n_eval))
    flat2, _ = evaluate(flat_attention(model, 2), SPEC, eval_seeds(n_eval))
    return {
        "seed": seed,
        "hit_before": before.layer_hit_rate,
        "hit_after": after.layer_hit_rate,
        "hit_random": after.layer_random_hit_rate,
        "hit_layer2_flat": flat2.layer_hit_rate[2],
        "scale_mean": after.layer_scale_mean,
        "scale_std": after.layer_scale_std,
        "final_hit": after.hit_rate,
        "accuracy": after.accuracy,
        "train_seconds": round(seconds, 1),
    }


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| seed | layer 1 hit (before) | layer 2 hit (before) | layer 2 flat | layer 2 scale | accuracy | s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['hit_after'][1]:.2f} ({r['hit_before'][1]:.2f}) | "
                     f"{r['hit_after'][2]:.2f} ({r['hit_before'][2]:.2f}) | {r['hit_layer2_flat']:.2f} | "
                     f"{r['scale_mean'][2]:.2f} | {r['accuracy']:.2f} | {r['train_seconds']:.0f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="learn_to_look_centred")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--model-override", action="append", default=[], metavar="KEY=VALUE",
                    help="a MagNetConfig field on top of the recipe's (repeatable), e.g. max_scale=0.6")
    ap.add_argument("--steps", type=int, default=STEPS, help=f"training steps (default {STEPS}, the test's)")
    ap.add_argument("--n-eval", type=int, default=N_EVAL, help=f"evaluation images (default {N_EVAL}, the test's)")
    ap.add_argument("--also-running", default="", help="what else ran on the machine (recorded in the JSON)")
    ap.add_argument("--out", type=Path, default=RESULTS / "findit_tiny_seeds.json")
    args = ap.parse_args(argv)
    get_recipe(args.recipe)  # an unknown recipe fails before the first run
    overrides = parse_overrides(args.model_override)
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(args.recipe, seed, overrides, args.steps, args.n_eval))
        print(table(rows)[-1], flush=True)
    print("\n".join([f"recipe {args.recipe} {overrides or ''}, {args.steps} steps, {args.n_eval} evaluation images",
                     *table(rows)]))
    doc = {"benchmark": "findit_tiny_seeds", "recipe": args.recipe, "model_overrides": overrides,
           "steps": args.steps, "n_eval": args.n_eval,
           "task": {"image_size": SPEC.image_size, "object_frac": SPEC.object_frac}, "runs": rows,
           "machine": machine_info(), "also_running": args.also_running,
           "command": "python benchmarks/findit_tiny_seeds.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
