"""Attention pre-training on SynthMets as the training loop runs it, alone: does it teach the first map?

Builds a registered MagNet (fresh weights, any ``--magnet-override``), runs
:func:`magnet_zoo.train.attention_mil.pretrain_attention` on the training split's slides (the recipe
field ``attention_pretrain_steps`` calls exactly this before the loop), saves the model as a checkpoint
folder and writes the loss curve (means of 50-step blocks) to JSON. Score the saved first map with
``synthmets_visibility.py --checkpoint DIR`` (the same views and scores as the standalone maps).

    python benchmarks/synthmets_attention_pretrain.py --steps 1000 --save /tmp/mz/pre_uniform
    python benchmarks/synthmets_attention_pretrain.py --steps 1000 --save /tmp/mz/pre_random \\
        --magnet-override 'attention_init=["random", "uniform"]'
    python benchmarks/synthmets_visibility.py --sizes 56 --checkpoint /tmp/mz/pre_random --out /tmp/v.json

The data is the benchmark's (``python benchmarks/synthmets.py`` writes it under ``/tmp/synthmets``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _machine import machine_info  # noqa: E402
from baselines.common import jsonable, load_split  # noqa: E402
from synthmets import parse_overrides  # noqa: E402

import magnet_zoo  # noqa: E402
from magnet_zoo.hub import load_pretrained, save_pretrained  # noqa: E402
from magnet_zoo.train.attention_mil import pretrain_attention  # noqa: E402
from magnet_zoo.train.recipe import ATTENTION_MIL_EDGES, PRETRAIN_AUGMENTS, RESTART_FROM  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("/tmp/synthmets"), help="the benchmark's slides")
    ap.add_argument("--magnet-model", default="magnet2_micro")
    ap.add_argument("--magnet-override", action="append", default=[], metavar="KEY=VALUE",
                    help="a MagNetConfig field, VALUE as JSON (repeatable)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (the loop passes the recipe's lr)")
    ap.add_argument("--top", type=float, default=0.1, help="attention_mil_top")
    ap.add_argument("--top-start", type=float, default=None,
                    help="attention_pretrain_top_start: the pooled share at the first step, narrowed to --top over "
                         "the first half")
    ap.add_argument("--edge-start", type=float, default=0.0,
                    help="attention_pretrain_edge_start: the share of the steps before the edge term counts")
    ap.add_argument("--negatives", choices=("top", "all"), default="top",
                    help="attention_mil_negatives: a normal slide's pooled logit or every tissue pixel towards 0")
    ap.add_argument("--augment", choices=PRETRAIN_AUGMENTS, default="d4",
                    help="attention_pretrain_augment: each batch's orientation from the eight D4 ones or the four "
                         "mirrorings")
    ap.add_argument("--edges", choices=ATTENTION_MIL_EDGES, default="pool",
                    help="attention_mil_edges: the tissue's edge pooled, or left out and trained towards 0 "
                    "(negative) or a margin below the pooled logit (below)")
    ap.add_argument("--candidates", type=int, default=1,
                    help="attention_pretrain_candidates: maps trained side by side, the best on held-out slides kept")
    ap.add_argument("--restarts", type=int, default=0,
                    help="attention_pretrain_restarts: further phases when the loss ends on its plateau")
    ap.add_argument("--plateau", type=float, default=0.68, help="attention_pretrain_plateau")
    ap.add_argument("--restart-from", choices=RESTART_FROM, default="fresh",
                    help="attention_pretrain_restart_from: fresh maps or the same map trained on")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="a checkpoint folder (e.g. a synthmets.py run's --save-checkpoint) whose model the phase "
                         "goes on training, instead of a fresh --magnet-model: does a map left on the plateau leave "
                         "it with more steps?")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-train", type=int, default=None, help="use at most this many training slides")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", type=Path, required=True, help="checkpoint folder to write")
    ap.add_argument("--also-running", default="", help="what else shared the machine (written in the JSON)")
    ap.add_argument("--out", type=Path, default=None, help="JSON to write (default: SAVE/pretrain.json)")
    args = ap.parse_args(argv)

    labels_csv = args.data / "train" / "labels.csv"
    if not labels_csv.is_file():
        ap.error(f"no {labels_csv}: generate the data first (python benchmarks/synthmets.py --methods mean_rgb)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    overrides = parse_overrides(args.magnet_override)
    if args.init_from is not None:
        if overrides:
            ap.error("--init-from takes the checkpoint's configuration: no --magnet-override")
        model = load_pretrained(args.init_from)
        args.magnet_model = str(args.init_from)
    else:
        model = magnet_zoo.create_model(args.magnet_model, **overrides)
    slides = load_split(labels_csv, "train")[: args.max_train]
    result = pretrain_attention(model, [s.path for s in slides], [s.label for s in slides], steps=args.steps,
                                lr=args.lr, top=args.top, seed=args.seed, batch=args.batch,
                                negatives=args.negatives, augment=args.augment, candidates=args.candidates,
                                edges=args.edges, top_start=args.top_start,
                                edge_start=args.edge_start, restarts=args.restarts, plateau=args.plateau,
                                restart_from=args.restart_from)
    save_pretrained(model, args.save)
    blocks = result["loss_per_50_steps"]
    out = {
        "what": "attention pre-training (pretrain_attention) alone on the training split; the first map is "
                "scored by synthmets_visibility.py --checkpoint",
        "command": shlex.join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "model": args.magnet_model, "overrides": overrides,
        "attention_init": model.config.attention_init, "attention_padding": model.config.attention_padding,
        "slides": len(slides), "steps": args.steps, "lr": args.lr, "top": args.top, "top_start": args.top_start,
        "edge_start": args.edge_start, "negatives": args.negatives,
        "augment": args.augment, "candidates": args.candidates, "edges": args.edges,
        "restarts": args.restarts, "plateau": args.plateau, "restart_from": args.restart_from,
        "init_from": str(args.init_from) if args.init_from is not None else None,
        "batch": args.batch,
        "seed": args.seed, "result": result,
        "checkpoint": str(args.save), "machine": machine_info(), "also_running": args.also_running or "nothing",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    path = args.out or args.save / "pretrain.json"
    path.write_text(json.dumps(jsonable(out), indent=1, allow_nan=False) + "\n")
    print(f"loss per 50 steps: {' '.join(f'{v:.3f}' for v in blocks)}")
    print(f"wrote {path} and the checkpoint {args.save} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
