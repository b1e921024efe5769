"""``magnet-zoo train`` (the paper's recipe, resumable, DDP under torchrun) and ``magnet-zoo evaluate``."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a MagNet on a CSV of slides (path,label[,category][,split]); best/last checkpoints, metrics.csv",
        description=(
            "Train a MagNet with the paper's recipe (Adam 3e-5, cosine annealing, batch 16 for 3 layers / 8 for 4, "
            "D4 augmentation of the whole slide). Under `torchrun --nproc_per_node N -m magnet_zoo train ...` it "
            "runs DistributedDataParallel; only rank 0 writes files."
        ),
    )
    p.add_argument("--data", required=True, help="CSV of slides: path,label[,category][,split] (paths relative to it)")
    p.add_argument("--model", default="magnet3_inception_v3",
                   help="registered name (see `magnet-zoo list`), checkpoint folder or hub repo to fine-tune")
    p.add_argument("--out", required=True, help="output folder: checkpoints/{best,last,state}, metrics.csv")
    p.add_argument("--val-data", default=None, help="validation CSV (default: the CSV's split column, else a split)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="stratified validation share when there is no split column nor --val-data (default 0.2)")
    p.add_argument("--epochs", type=int, default=200, help="epochs (paper: 200; 20 for tuning)")
    p.add_argument("--lr", type=float, default=3e-5,
                   help="Adam learning rate (paper: 3e-5; tiny models from scratch want ~1e-3)")
    p.add_argument("--min-lr", type=float, default=0.0, help="floor of the cosine annealing (default 0)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=None,
                   help="slides per optimizer step over all processes (default: 16 up to 3 layers, 8 for 4)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="slides per forward pass per process; gradients accumulate up to --batch-size")
    p.add_argument("--eval-batch-size", type=int, default=None, help="slides per validation forward pass")
    p.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm to this (default: off)")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="no D4 augmentation")
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
                   help="optimizer steps between resume states within an epoch (0: epoch ends only)")
    p.add_argument("--monitor", default="auroc", choices=("auroc", "accuracy", "loss"),
                   help="validation score that picks the best checkpoint (default auroc, ties -> loss)")
    p.add_argument("--no-baseline-eval", dest="baseline_eval", action="store_false",
                   help="skip validating the untrained model (metrics row epoch 0)")
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
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run_evaluate)


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~magnet_zoo.train.TrainConfig` that ``magnet-zoo train`` arguments describe."""
    from magnet_zoo.train.settings import TrainConfig, parse_overrides

    return TrainConfig(
        data=args.data,
        out=args.out,
        model=args.model,
        model_overrides=parse_overrides(args.model_override),
        val_data=args.val_data,
        val_fraction=args.val_fraction,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        min_lr=args.min_lr,
        batch_size=args.batch_size,
        micro_batch=args.micro_batch,
        eval_batch_size=args.eval_batch_size,
        grad_clip=args.grad_clip,
        augment=args.augment,
        amp=args.amp,
        device=args.device,
        num_workers=args.workers,
        seed=args.seed,
        save_every=args.save_every,
        monitor=args.monitor,
        baseline_eval=args.baseline_eval,
        activation_checkpointing=args.activation_checkpointing,
        backend=args.backend,
        threads=args.threads,
        resume=args.resume,
        progress=args.progress,
    )


def run_train(args: argparse.Namespace) -> int:
    from magnet_zoo.train.checkpointing import ResumeError
    from magnet_zoo.train.data import DataError
    from magnet_zoo.train.distributed import cleanup_distributed
    from magnet_zoo.train.trainer import train

    try:
        result = train(config_from_args(args))
    except (DataError, ResumeError) as exc:  # the user's to fix: one line, no traceback
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
        print(f"trained {result.global_step} steps; last epoch: {summary or 'no metrics'}", file=sys.stderr)
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
