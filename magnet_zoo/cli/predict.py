"""``magnet-zoo predict`` (a cohort, resumable, sharded under torchrun) and ``magnet-zoo explain``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="predict slides, folders of slides or CSV lists; one JSON per slide, predictions.csv, errors.csv",
    )
    p.add_argument("inputs", nargs="+", help="slide files, folders, or CSV files with a 'path' column")
    _model_args(p)
    p.add_argument(
        "--out", required=True,
        help="output folder (created; a rerun skips slides done by the same model, weights and settings)",
    )
    p.add_argument("--batch-size", type=int, default=1, help="slides per forward pass (default 1)")
    p.add_argument("--workers", type=int, default=4, help="threads opening the next slides ahead (default 4)")
    p.add_argument("--backend", default="auto", help="slide backend: auto, openslide, tifffile, pil, monai, tiatoolbox")
    p.add_argument("--recursive", action="store_true", help="look for slides in sub-folders too")
    p.add_argument("--explain", action="store_true", help="also write the explanation PNG and GeoJSON per slide")
    p.add_argument("--retry-errors", action="store_true", help="try again the slides listed in errors.csv")
    p.add_argument("--force", action="store_true", help="predict every slide again, whatever the folder holds")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="probability from which a slide gets the positive label (default 0.5)")
    _tree_args(p)
    p.set_defaults(func=run_predict)

    p = sub.add_parser("explain", help="explanation PNG (ROIs on the slide + final patches) and QuPath GeoJSON")
    p.add_argument("slide", help="a slide file")
    _model_args(p)
    p.add_argument("--out", default=".", help="output folder (default: here)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--thumb-size", type=int, default=1024, help="side of the slide picture in pixels")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="probability from which the slide gets the positive label (default 0.5)")
    _tree_args(p)
    p.set_defaults(func=run_explain)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _tree_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trees", type=_positive_int, default=1, metavar="K",
        help="pool K sampled zoom trees per slide (every learned crop centre drawn from its layer's sparse "
             "attention map; the probability is the mean of the K trees'): K times the compute and about K "
             "times the reads, "
             "slides run one at a time; measured worse than the expected crop on FindIt. Default 1: the "
             "expected crop, one tree",
    )
    p.add_argument("--tree-seed", type=_seed, default=0, metavar="S",
                   help="seed of the sampled trees (with --trees K > 1; default 0): same seed, same trees")
    p.add_argument("--as-trained", action="store_true",
                   help="score each slide as the checkpoint's recipe validated it: for a tree_mil recipe, its "
                        "explore_trees sampled trees, drawn from its training policy, max-pooled (with "
                        "--tree-seed); for any other recipe the expected crop. Not with --trees")


def tree_inference(model: Any, args: argparse.Namespace, command: str) -> tuple[int | None, Any]:
    """``(trees, tree_policy)`` for ``magnet-zoo COMMAND``: ``--trees`` as given (the inference default
    policy), or with ``--as-trained`` the checkpoint recipe's
    (:func:`~magnet_zoo.train.exploration.trained_inference`). A ``tree_mil`` checkpoint scored another way
    gets a warning: its validation numbers were not made so."""
    from magnet_zoo.train.exploration import trained_inference

    trained = trained_inference(model)
    if args.as_trained:
        if args.trees != 1:
            raise SystemExit(f"magnet-zoo {command}: error: --as-trained sets the trees itself; drop --trees")
        if trained is None:
            print(f"magnet-zoo {command}: the checkpoint records no tree-MIL recipe in its config.json (none, or "
                  "one that validates with the expected crop, one tree): --as-trained changes nothing",
                  file=sys.stderr)
            return None, None
        print(f"magnet-zoo {command}: as trained: {trained[0]} sampled trees, {trained[1].kwargs()}",
              file=sys.stderr)
        return trained
    if trained is not None:
        print(f"magnet-zoo {command}: warning: this checkpoint was trained with tree_mil and validated on "
              f"{trained[0]} sampled trees, max-pooled; this run uses "
              f"{'the expected crop, one tree' if args.trees == 1 else f'{args.trees} trees, mean-pooled'}, "
              "so its numbers are not comparable with the validation's (--as-trained scores it as validated)",
              file=sys.stderr)
    return args.trees, None


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="registered name with weights, hub repo (org/name) or checkpoint folder"
    )
    p.add_argument("--revision", default=None, help="hub revision (commit, tag or branch) for --model")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")


def load_model(args: argparse.Namespace):
    from magnet_zoo.hub import load_pretrained

    return load_pretrained(args.model, revision=args.revision, device=args.device).eval()


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, world


def run_predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from magnet_zoo.infer.batch import collect_slides, merge_rank_outputs, predict_many

    rank, world = _distributed()
    slides = collect_slides(args.inputs, recursive=args.recursive)
    if not slides:
        print("magnet-zoo predict: no slides found in the inputs", file=sys.stderr)
        return 1
    model = load_model(args)
    trees, policy = tree_inference(model, args, "predict")
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")

    def bar(batches):
        return tqdm(batches, desc=f"predict (rank {rank}/{world})" if world > 1 else "predict", unit="batch",
                    disable=None)

    summary = predict_many(
        model,
        slides,
        args.out,
        batch_size=args.batch_size,
        workers=args.workers,
        backend=args.backend,
        explain=args.explain,
        retry_errors=args.retry_errors,
        force=args.force,
        threshold=args.threshold,
        rank=rank,
        world=world,
        progress=bar,
        trees=trees,
        tree_seed=args.tree_seed,
        tree_policy=policy,
    )
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if rank == 0:
            merge_rank_outputs(args.out)
        dist.barrier()
        dist.destroy_process_group()
    failed_before = summary.skipped - summary.done_before
    failed_now = summary.failed - failed_before
    before = f", {failed_before} failed before (--retry-errors tries them again)" if failed_before else ""
    redone = f" ({summary.redone} had results of another model or settings)" if summary.redone else ""
    print(
        f"{summary.predicted} predicted{redone}, {summary.done_before} already done, {failed_now} failed{before} "
        f"(of {summary.total}{' on this rank' if world > 1 else ''}); results in {args.out}",
        file=sys.stderr,
    )
    return 1 if summary.all_failed else 0


def run_explain(args: argparse.Namespace) -> int:
    from magnet_zoo.atomic import atomic_write_text
    from magnet_zoo.explain import save_explanation, write_geojson
    from magnet_zoo.infer.predict import policy_kwargs, predict_slide, tree_settings
    from magnet_zoo.infer.provenance import provenance
    from magnet_zoo.wsi.open import open_slide

    model = load_model(args)
    trees, policy = tree_inference(model, args, "explain")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open_slide(args.slide, args.backend) as src:
        pred = predict_slide(model, src, threshold=args.threshold, trees=trees, seed=args.tree_seed,
                             **policy_kwargs(policy))
        settings = {"threshold": float(args.threshold), "backend": args.backend,
                    **tree_settings(trees, args.tree_seed, policy)}
        pred.provenance = provenance(model, settings)
        stem = Path(args.slide).stem
        png = save_explanation(src, pred, out / f"{stem}.magnet.png", thumb_size=args.thumb_size)
        geo = write_geojson(pred, out / f"{stem}.magnet.geojson", slide=str(args.slide))
        atomic_write_text(out / f"{stem}.magnet.json", json.dumps(pred.to_dict(), indent=1))
    if pred.resolution and pred.resolution["warning"]:
        print(f"warning: {pred.resolution['warning']}", file=sys.stderr)
    print(f"p({model.config.labels[1]}) = {pred.probability:.3f} -> {pred.label}")
    print(f"wrote {png}, {geo} and {stem}.magnet.json")
    return 0
