"""``magnet-zoo train`` (recipes, resumable, DDP under torchrun) and ``magnet-zoo evaluate``."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from typing import Any

from magnet_zoo.cli.predict import _tree_args, tree_inference


def add_parser(sub: argparse._SubParsersAction) -> None:
    from magnet_zoo.train.recipe import DEFAULT_RECIPE, describe_recipes, list_recipes

    p = sub.add_parser(
        "train",
        help="train a MagNet on a CSV of slides (path,label[,category][,split]) with a recipe; checkpoints, metrics",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Train a MagNet with a recipe: named data that says how it learns (optimiser, schedules, anneals, "
            "revival, head warm-up, ...). Under `torchrun --nproc_per_node N -m magnet_zoo train ...` it runs "
            "DistributedDataParallel; only rank 0 writes files."
        ),
        epilog=f"recipes (--recipe NAME, default {DEFAULT_RECIPE}; --list-recipes):\n" + describe_recipes()
        + "\n\nreproduce the paper: --recipe paper --model magnet3_inception_v3 (or magnet4_inception_v3)",
    )
    p.add_argument("--data", default=None, help="CSV of slides: path,label[,category][,split] (paths relative to it)")
    p.add_argument("--model", default="magnet3_inception_v3",
                   help="registered name (see `magnet-zoo list`), checkpoint folder or hub repo to fine-tune")
    p.add_argument("--out", default=None, help="output folder: checkpoints/{best,last,state}, metrics.csv")
    p.add_argument("--recipe", default=DEFAULT_RECIPE, metavar="NAME",
                   help=f"training recipe: {', '.join(list_recipes())} (default {DEFAULT_RECIPE}; see below)")
    p.add_argument("--set", dest="recipe_set", action="append", default=[], metavar="FIELD=VALUE",
                   help="change one recipe field, e.g. --set attention_lr=1e-3 --set revive_at=[] (repeatable)")
    p.add_argument("--list-recipes", action="store_true", help="list the recipes with their fields and exit")
    p.add_argument("--val-data", default=None, help="validation CSV (default: the CSV's split column, else a split)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="stratified validation share when there is no split column nor --val-data (default 0.2)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the recipe's; paper: 200)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps instead of epochs")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="wall-clock limit: the schedules follow the clock if it runs out first, then the run stops")
    # shortcuts for recipe fields (the same as --set FIELD=VALUE)
    p.add_argument("--lr", type=float, default=None, help="recipe field lr (paper: 3e-5)")
    p.add_argument("--min-lr", type=float, default=None, help="recipe field min_lr: floor of the cosine annealing")
    p.add_argument("--weight-decay", type=float, default=None, help="recipe field weight_decay")
    p.add_argument("--batch-size", type=int, default=None,
                   help="recipe field batch_size: slides per optimizer step over all processes")
    p.add_argument("--grad-clip", type=float, default=None, help="recipe field grad_clip: clip the gradient norm")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="recipe field augment=false: no D4 augmentation")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="slides per forward pass per process; gradients accumulate up to the batch size")
    p.add_argument("--eval-batch-size", type=int, default=None, help="slides per validation forward pass")
    p.add_argument("--eval-every", type=int, default=0,
                   help="validate every this many optimizer steps (default 0: every epoch)")
    p.add_argument("--monitor", default="auroc", choices=("auroc", "accuracy", "loss"),
                   help="validation score that picks the best checkpoint (default auroc, ties -> loss)")
    p.add_argument("--patience", type=int, default=None,
                   help="early stopping: stop after this many validations without a better --monitor score")
    p.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"),
                   help="mixed precision on CUDA (auto: bf16 where supported, else fp16; off on the CPU)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute backbone activations in the backward pass (less GPU memory, more time)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (auto: this rank's GPU if any)")
    p.add_argument("--workers", type=int, default=2,
                   help="DataLoader processes opening slides and reading their whole-slide views ahead (default 2)")
    p.add_argument("--backend", default="auto", help="slide backend: auto, openslide, tifffile, pil, monai, tiatoolbox")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=25,
                   help="optimizer steps between resume states (0: at validations only)")
    p.add_argument("--log-every", type=int, default=10, help="optimizer steps between training-loss log lines")
    p.add_argument("--no-baseline-eval", dest="baseline_eval", action="store_false",
                   help="skip validating the untrained model (metrics row step 0)")
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false",
                   help="no TensorBoard event files (written only when tensorboard is installed)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument("--model-override", action="append", default=[], metavar="KEY=VALUE",
                   help="change a MagNetConfig field, e.g. sampler=bilinear, patches=[2,2] (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last saved state (same settings needed)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=run_train)

    p = sub.add_parser(
        "evaluate",
        help="AUROC and accuracy (overall and per category) of a checkpoint on a CSV of slides",
    )
    p.add_argument("--model", required=True, help="checkpoint folder, hub repo or registered name with weights")
    p.add_argument("--revision", default=None, help="hub revision for --model")
    p.add_argument("--data", required=True, help="CSV of slides: path,label[,category][,split]")
    p.add_argument("--split", default="all", help="rows to evaluate: all (default), train, val or test")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"))
    p.add_argument("--backend", default="auto")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold for accuracy (default 0.5)")
    p.add_argument("--out", default=None, help="write the metrics and per-slide predictions as JSON here")
    p.add_argument("--predictions", default=None, help="write per-slide predictions as CSV here")
    _tree_args(p)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run_evaluate)


RECIPE_FLAGS = ("lr", "min_lr", "weight_decay", "batch_size", "grad_clip", "augment")
"""Command-line flags that are shortcuts for ``--set FIELD=VALUE``."""


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~magnet_zoo.train.TrainConfig` that ``magnet-zoo train`` arguments describe."""
    from magnet_zoo.train.recipe import get_recipe, parse_recipe_overrides
    from magnet_zoo.train.settings import TrainConfig, parse_overrides

    recipe_overrides = parse_recipe_overrides(args.recipe_set)
    for name in RECIPE_FLAGS:
        value = getattr(args, name)
        if value is not None:
            recipe_overrides[name] = value
    get_recipe(args.recipe, **recipe_overrides)  # unknown names and bad values fail here, before any work
    return TrainConfig(
        data=args.data,
        out=args.out,
        model=args.model,
        model_overrides=parse_overrides(args.model_override),
        recipe=args.recipe,
        recipe_overrides=recipe_overrides,
        val_data=args.val_data,
        val_fraction=args.val_fraction,
        epochs=args.epochs,
        steps=args.steps,
        time_limit=args.time_limit,
        micro_batch=args.micro_batch,
        eval_batch_size=args.eval_batch_size,
        eval_every=args.eval_every,
        monitor=args.monitor,
        patience=args.patience,
        amp=args.amp,
        device=args.device,
        num_workers=args.workers,
        seed=args.seed,
        save_every=args.save_every,
        log_every=args.log_every,
        baseline_eval=args.baseline_eval,
        tensorboard=args.tensorboard,
        activation_checkpointing=args.activation_checkpointing,
        backend=args.backend,
        threads=args.threads,
        resume=args.resume,
        progress=args.progress,
    )


def list_recipes_text() -> str:
    """Every recipe with its summary and all its fields (``--set FIELD=VALUE`` changes one)."""
    from magnet_zoo.train.recipe import DEFAULT_RECIPE, RECIPES, list_recipes

    lines = []
    for name in list_recipes():
        recipe = RECIPES[name].to_dict()
        lines.append(f"{name}{' (default)' if name == DEFAULT_RECIPE else ''}: {recipe['summary']}")
        for key, value in recipe.items():
            if key not in ("name", "summary"):
                lines.append(f"    {key} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines).rstrip()


def run_train(args: argparse.Namespace) -> int:
    from magnet_zoo.config import ConfigError
    from magnet_zoo.train.checkpointing import ResumeError
    from magnet_zoo.train.data import DataError
    from magnet_zoo.train.distributed import cleanup_distributed
    from magnet_zoo.train.trainer import train

    if args.list_recipes:
        print(list_recipes_text())
        return 0
    try:
        if not args.data or not args.out:
            raise DataError("--data and --out are required (or --list-recipes)")
        result = train(config_from_args(args))
    except (DataError, ResumeError, ConfigError) as exc:  # the user's to fix: one line, no traceback
        if args.verbose >= 2:
            raise
        print(f"magnet-zoo train: error: {exc}", file=sys.stderr)
        return 1
    finally:
        cleanup_distributed()
    if _is_main():
        last = result.history[-1] if result.history else {}
        summary = ", ".join(
            f"{k} {last[k]:.4f}" for k in ("train_loss", "val_loss", "val_auroc", "val_accuracy")
            if isinstance(last.get(k), float) and math.isfinite(last[k])
        )
        print(f"trained {result.global_step} steps (stopped by {result.stopped_by}); last validation: "
              f"{summary or 'no metrics'}", file=sys.stderr)
        print(f"checkpoints in {result.last.parent} (best: {result.best or 'none'}); metrics in {result.metrics_csv}",
              file=sys.stderr)
    return 0


def _is_main() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def run_evaluate(args: argparse.Namespace) -> int:
    from magnet_zoo.atomic import atomic_write_text
    from magnet_zoo.hub import load_pretrained
    from magnet_zoo.train.data import DataError
    from magnet_zoo.train.distributed import cleanup_distributed
    from magnet_zoo.train.evaluate import evaluate

    model = load_pretrained(args.model, revision=args.revision, device="cpu")
    trees, policy = tree_inference(model, args, "evaluate")
    try:
        report = evaluate(
            model,
            args.data,
            split=args.split,
            batch_size=args.batch_size,
            num_workers=args.workers,
            device=args.device,
            amp=args.amp,
            backend=args.backend,
            threshold=args.threshold,
            progress=args.progress,
            trees=trees,
            tree_seed=args.tree_seed,
            tree_policy=policy,
        )
    except DataError as exc:
        if args.verbose >= 2:
            raise
        print(f"magnet-zoo evaluate: error: {exc}", file=sys.stderr)
        return 1
    finally:
        cleanup_distributed()
    if not _is_main():
        return 0
    if args.out:
        atomic_write_text(args.out, json.dumps(_jsonable(report.to_dict()), indent=2) + "\n")
    if args.predictions:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["path", "label", "category", "probability"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(report.predictions)
        atomic_write_text(args.predictions, buffer.getvalue())
    print(format_report(report.metrics, report.loss["total"]))
    return 0


def format_report(metrics: dict[str, Any], loss: float | None = None) -> str:
    """A small text table: overall and per-category n, AUROC, accuracy."""

    def num(x: float) -> str:
        return "   -  " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:6.3f}"

    lines = [f"{'':12s} {'n':>5s} {'AUROC':>6s} {'acc':>6s}"]
    lines.append(f"{'overall':12s} {metrics['n']:5d} {num(metrics['auroc'])} {num(metrics['accuracy'])}")
    for cat, m in metrics.get("per_category", {}).items():
        lines.append(f"{cat:12s} {m['n']:5d} {num(m['auroc'])} {num(m['accuracy'])}")
    if loss is not None:
        lines.append(f"loss {loss:.4f}")
    return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj
