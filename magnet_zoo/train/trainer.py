"""Train a MagNet on a CSV of slides: the paper's recipe, crash-safe, resumable and DDP-ready.

Defaults are the paper's recipe (section 4.2; ``DESIGN.md`` section 2): Adam at ``lr = 3e-5``, cosine
annealing over the whole run (stepped per optimizer step), batch 16 for networks of up to three
layers and 8 for four, 200 epochs, D4 augmentation of the slide as a whole. Tiny models trained from
scratch want a larger ``lr`` (1e-3): it is a setting, not a default.

Output folder::

    OUT/train_config.json         the settings of the run
    OUT/metrics.csv               one row per epoch (epoch 0: the untrained model), rewritten atomically
    OUT/checkpoints/last/         hub checkpoint (config.json, model.safetensors, README.md), every epoch
    OUT/checkpoints/best/         the same, for the best validation score (``monitor``)
    OUT/checkpoints/state/        train_state.safetensors + train_state.json: what ``resume`` needs

The resume state is written every ``save_every`` optimizer steps and at every epoch's end. It holds the
weights, the optimizer and scheduler (and AMP scaler) states, every rank's RNG states, and the place in
the data order (epoch, step); the data order and the D4 orientations are a function of
``(seed, epoch)`` (:class:`~magnet_zoo.train.data.ResumableSampler`). So on a CPU a run killed at any
moment and resumed ends with exactly the weights of a run that was never interrupted.

Batches: ``batch_size`` is the number of slides per optimizer step over all processes;
``micro_batch`` is the number per forward pass per process (default: ``batch_size / world_size``).
Gradients are accumulated over ``batch_size / (micro_batch * world_size)`` micro-batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from magnet_zoo.atomic import atomic_write_text
from magnet_zoo.config import ConfigError, MagNetConfig
from magnet_zoo.nn.magnet import MagNet
from magnet_zoo.train.checkpointing import (
    ResumeError,
    atomic_directory,
    capture_rng_state,
    load_training_state,
    recover_directory,
    restore_rng_state,
    save_training_state,
)
from magnet_zoo.train.data import (
    DataError,
    ResumableSampler,
    SlideDataset,
    SlideRecord,
    make_loader,
    prefetch_sizes,
    read_slide_csv,
    stratified_split,
)
from magnet_zoo.train.distributed import DistInfo, all_gather_objects, barrier, setup_distributed
from magnet_zoo.train.evaluate import LOSS_TERMS, EvalReport, amp_dtype, autocast, predict_loader, report_from_rows
from magnet_zoo.train.metrics import flatten_metrics
from magnet_zoo.train.settings import (
    RESUME_FREE_FIELDS,
    TrainConfig,
    build_model,
    default_batch_size,
    seed_everything,
    set_activation_checkpointing,
)

logger = logging.getLogger(__name__)

@dataclass
class TrainResult:
    """Where a run left its files, and its per-epoch metrics."""

    out: Path
    last: Path
    best: Path | None
    metrics_csv: Path
    history: list[dict[str, Any]]
    best_score: float | None
    global_step: int


# --------------------------------------------------------------------------- the run
class _Run:
    """One training run's state; :func:`train` drives it."""

    def __init__(self, config: TrainConfig, model: MagNet | None) -> None:
        self.config = config
        self.info: DistInfo = setup_distributed(config.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.out = Path(config.out)
        self.ckpt = self.out / "checkpoints"
        self.state_dir = self.ckpt / "state"
        self.metrics_csv = self.out / "metrics.csv"
        self.history: list[dict[str, Any]] = []
        self.best_score: tuple[float, float] | None = None
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.epoch_sums = dict.fromkeys(LOSS_TERMS, 0.0)
        self.epoch_count = 0
        self.epoch_seconds = 0.0

        resume_state = self._load_resume_state()
        seed_everything(config.seed + self.info.rank)
        if resume_state is not None:
            model_config = MagNetConfig.from_dict(resume_state["model_config"])
            self.model = MagNet(model_config.replace(backbone_pretrained=False))
        else:
            self.model = model if model is not None else build_model(config.model, config.model_overrides)
        self.model.to(self.info.device).train()
        if config.activation_checkpointing:
            set_activation_checkpointing(self.model, True)
        self.mconfig = self.model.config

        self._build_data()
        self.batch_size = config.batch_size or default_batch_size(self.mconfig)
        world = self.info.world_size
        self.micro = config.micro_batch or max(1, self.batch_size // world)
        if self.batch_size % (self.micro * world):
            raise ConfigError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch {self.micro} x {world} "
                f"process(es); choose sizes where it is"
            )
        self.accum = self.batch_size // (self.micro * world)
        per_rank = self.train_sampler.per_rank()
        self.micro_per_epoch = math.ceil(per_rank / self.micro)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / self.accum)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.train_loader = self._make_train_loader()
        self.val_loader = self._make_val_loader()

        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=max(self.total_steps, 1), eta_min=config.min_lr
        )
        self.dtype = amp_dtype(config.amp, self.info.device)
        self.scaler = torch.amp.GradScaler(
            self.info.device.type, enabled=self.dtype == torch.float16 and self.info.device.type == "cuda"
        )
        if resume_state is not None:
            self._restore(resume_state)
        self.ddp: nn.Module = self.model
        if self.info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.info.device.index] if self.info.device.type == "cuda" else None
            m = self.mconfig
            # A loss term switched off (ablations) leaves its head without gradients: let DDP look for them.
            unused = not (m.loss_paradoxical and m.loss_auxiliary and m.loss_classifier)
            self.ddp = DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=unused)
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "train_config.json", json.dumps(self._run_record(), indent=2) + "\n")
        logger.info(
            "training %s: %d train / %d val slides, batch %d (micro %d x %d process(es) x %d accumulation), "
            "%d steps per epoch, %d epochs, lr %g, AMP %s, device %s",
            config.model,
            len(self.train_set),
            len(self.val_set) if self.val_set else 0,
            self.batch_size,
            self.micro,
            world,
            self.accum,
            self.steps_per_epoch,
            config.epochs,
            config.lr,
            self.dtype,
            self.info.device,
        )

    # ------------------------------------------------------------------ setup helpers
    def _load_resume_state(self) -> dict[str, Any] | None:
        """The saved state when resuming (every rank reads it: the output folder must be shared)."""
        cfg = self.config
        if self.info.is_main:
            recover_directory(self.state_dir)
        barrier(self.info)
        has_state = (self.state_dir / "train_state.json").is_file()
        if not cfg.resume:
            if has_state:
                raise ResumeError(
                    f"{self.out} already holds a training run; pass --resume to continue it, or choose another --out"
                )
            return None
        if not has_state:
            logger.warning("--resume: no training state in %s; starting from scratch", self.state_dir)
            return None
        state = load_training_state(self.state_dir, recover=False)  # rank 0 recovered it above
        saved = TrainConfig.from_dict(state["train_config"])
        differ = [
            f"{f.name}: {getattr(saved, f.name)!r} -> {getattr(cfg, f.name)!r}"
            for f in dataclasses.fields(TrainConfig)
            if f.name not in RESUME_FREE_FIELDS and getattr(saved, f.name) != getattr(cfg, f.name)
        ]
        if differ:
            raise ResumeError(
                "--resume needs the settings of the interrupted run; these differ: " + "; ".join(differ)
            )
        if int(state["world_size"]) != self.info.world_size:
            raise ResumeError(
                f"the run was started with {state['world_size']} process(es) and is resumed with "
                f"{self.info.world_size}; resume with the same torchrun --nproc_per_node"
            )
        return state

    def _build_data(self) -> None:
        cfg = self.config
        labels = self.mconfig.labels
        records = read_slide_csv(cfg.data, labels)
        if cfg.val_data:
            train_records = [r for r in records if r.split == "train"]
            val_records = read_slide_csv(cfg.val_data, labels)
        elif any(r.split == "val" for r in records):
            train_records = [r for r in records if r.split == "train"]
            val_records = [r for r in records if r.split == "val"]
        elif cfg.val_fraction > 0:
            train_records, val_records = stratified_split(
                [r for r in records if r.split == "train"], cfg.val_fraction, cfg.seed
            )
        else:
            train_records, val_records = [r for r in records if r.split == "train"], []
        if not train_records:
            raise DataError(f"{cfg.data}: no training slides (rows with split 'train' or no split)")
        if not val_records:
            logger.warning("no validation slides: no validation metrics, and no 'best' checkpoint")
        sizes = prefetch_sizes(self.mconfig)
        grey = self.mconfig.grey_threshold
        self.train_records: list[SlideRecord] = train_records
        self.train_set = SlideDataset(train_records, sizes, grey, cfg.backend)
        self.val_set = SlideDataset(val_records, sizes, grey, cfg.backend) if val_records else None
        info = self.info
        self.train_sampler = ResumableSampler(
            len(self.train_set), seed=cfg.seed, shuffle=True, augment=cfg.augment,
            rank=info.rank, world_size=info.world_size,
        )

    def _make_train_loader(self) -> DataLoader:
        cfg = self.config
        return make_loader(
            self.train_set, self.train_sampler, self.micro,
            num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor, seed=cfg.seed,
        )

    def _make_val_loader(self) -> DataLoader | None:
        cfg = self.config
        if self.val_set is None:
            return None
        sampler = ResumableSampler(
            len(self.val_set), shuffle=False, augment=False,
            rank=self.info.rank, world_size=self.info.world_size, pad=False,
        )
        return make_loader(
            self.val_set, sampler, cfg.eval_batch_size or self.micro,
            num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor, seed=cfg.seed,
        )

    def _run_record(self) -> dict[str, Any]:
        return {
            "train": self.config.to_dict(),
            "model": self.mconfig.to_dict(),
            "batch_size": self.batch_size,
            "micro_batch": self.micro,
            "accumulation": self.accum,
            "world_size": self.info.world_size,
            "steps_per_epoch": self.steps_per_epoch,
            "amp": str(self.dtype) if self.dtype else None,
        }

    # ------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        rngs = all_gather_objects(self.info, capture_rng_state())
        return {
            "train_config": self.config.to_dict(),
            "model_config": self.mconfig.to_dict(),
            "world_size": self.info.world_size,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "epoch_sums": dict(self.epoch_sums),
            "epoch_count": self.epoch_count,
            "epoch_seconds": self.epoch_seconds,
            "history": self.history,
            "best_score": list(self.best_score) if self.best_score is not None else None,
            "model": dict(self.model.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rngs,
        }

    def _save_state(self) -> None:
        state = self._state()  # a collective: every rank takes part
        if self.info.is_main:
            save_training_state(self.state_dir, state)
        barrier(self.info)

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"], strict=True)
        self.model.to(self.info.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.epoch_sums = {k: float(v) for k, v in state["epoch_sums"].items()}
        self.epoch_count = int(state["epoch_count"])
        self.epoch_seconds = float(state["epoch_seconds"])
        self.history = list(state["history"])
        best = state.get("best_score")
        self.best_score = (float(best[0]), float(best[1])) if best is not None else None
        restore_rng_state(state["rng"][self.info.rank])
        logger.info("resumed at epoch %d, step %d of %d", self.epoch + 1, self.step_in_epoch, self.steps_per_epoch)

    # ------------------------------------------------------------------ training
    def _step_samples(self, step: int) -> int:
        """Samples of this rank in optimizer step ``step`` of an epoch."""
        per_rank = self.train_sampler.per_rank()
        first = step * self.accum * self.micro
        return min(per_rank, first + self.accum * self.micro) - first

    def _train_epoch(self) -> None:
        from tqdm.auto import tqdm

        cfg = self.config
        start_micro = self.step_in_epoch * self.accum
        self.train_sampler.set_epoch(self.epoch, start=start_micro * self.micro)
        bar = tqdm(
            self.train_loader,
            total=self.micro_per_epoch - start_micro,
            desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
            unit="batch",
            disable=not (cfg.progress and self.info.is_main),
            leave=False,
        )
        micro_index = start_micro
        started = time.perf_counter()
        grey = self.mconfig.grey_threshold
        device = self.info.device
        for batch in bar:
            step = micro_index // self.accum
            last_of_step = (micro_index + 1) % self.accum == 0 or micro_index + 1 == self.micro_per_epoch
            weight = len(batch) / self._step_samples(step)
            sync = self.ddp.no_sync() if (self.info.enabled and not last_of_step) else contextlib.nullcontext()
            with sync:
                with autocast(device, self.dtype):
                    out = self.ddp(batch.fetchers(grey))
                    terms = self.model.loss(out, batch.labels.to(device))
                self.scaler.scale(terms.total * weight).backward()
            for key, value in terms.as_floats().items():
                self.epoch_sums[key] += value * len(batch)
            self.epoch_count += len(batch)
            if last_of_step:
                self._optimizer_step()
                self.step_in_epoch = step + 1
                bar.set_postfix(loss=f"{self.epoch_sums['total'] / max(self.epoch_count, 1):.4f}")
                if (
                    cfg.save_every
                    and self.global_step % cfg.save_every == 0
                    and self.step_in_epoch < self.steps_per_epoch
                ):
                    self.epoch_seconds += time.perf_counter() - started
                    started = time.perf_counter()
                    self._save_state()
            micro_index += 1
        bar.close()
        self.epoch_seconds += time.perf_counter() - started

    def _optimizer_step(self) -> None:
        if self.config.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.global_step += 1

    # ------------------------------------------------------------------ validation and checkpoints
    def _validate(self) -> EvalReport | None:
        if self.val_loader is None:
            return None
        self._sync_buffers()
        rows, losses = predict_loader(
            self.model, self.val_loader, device=self.info.device, dtype=self.dtype, info=self.info,
            progress=self.config.progress, desc="validate",
        )
        return report_from_rows(rows, losses)

    def _sync_buffers(self) -> None:
        """Give every rank rank 0's BatchNorm statistics before validating (DDP syncs them only at forward)."""
        if self.info.enabled:
            import torch.distributed as dist

            for buffer in self.model.buffers():
                dist.broadcast(buffer, 0)

    def _score(self, report: EvalReport) -> tuple[float, float]:
        loss = report.loss["total"]
        neg_loss = -loss if math.isfinite(loss) else -math.inf
        primary = {"auroc": report.metrics["auroc"], "accuracy": report.metrics["accuracy"], "loss": neg_loss}[
            self.config.monitor
        ]
        if not math.isfinite(primary):
            primary = -math.inf
        return (primary, neg_loss)

    def _row(self, epoch: int, report: EvalReport | None, train: bool) -> dict[str, Any]:
        row: dict[str, Any] = {
            "epoch": epoch,
            "global_step": self.global_step,
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": round(self.epoch_seconds, 3) if train else 0.0,
        }
        if train:
            totals = all_gather_objects(self.info, (self.epoch_sums, self.epoch_count))
            count = sum(t[1] for t in totals)
            for key in LOSS_TERMS:
                row[f"train_{'loss' if key == 'total' else key}"] = sum(t[0][key] for t in totals) / max(count, 1)
        if report is not None:
            for key in LOSS_TERMS:
                row[f"val_{'loss' if key == 'total' else key}"] = report.loss[key]
            row.update(flatten_metrics(report.metrics, "val_"))
        return row

    def _write_metrics_csv(self) -> None:
        columns: list[str] = []
        for row in self.history:
            columns += [k for k in row if k not in columns]
        lines = [",".join(columns)]
        for row in self.history:
            lines.append(",".join(_cell(row.get(c, "")) for c in columns))
        atomic_write_text(self.metrics_csv, "\n".join(lines) + "\n")

    def _save_model(self, name: str, report: EvalReport | None) -> Path:
        from magnet_zoo.hub import save_pretrained

        target = self.ckpt / name
        metrics: dict[str, float] = {}
        if report is not None:
            for key, out_key in (("auroc", "roc_auc"), ("accuracy", "accuracy")):
                if math.isfinite(report.metrics[key]):
                    metrics[out_key] = float(report.metrics[key])
        recipe = {
            "optimizer": "Adam",
            "lr": self.config.lr,
            "schedule": "cosine annealing",
            "batch_size": self.batch_size,
            "epochs": f"{self.epoch}/{self.config.epochs}",
            "augmentation": "D4 of the whole slide" if self.config.augment else "none",
            "amp": str(self.dtype) if self.dtype else "off",
            "seed": self.config.seed,
        }
        card = {
            "model_name": f"{Path(self.config.model).name} fine-tuned ({name})",
            "training_data": f"slides listed in {Path(self.config.data).name}",
            "metrics_dataset": "validation split" if report is not None else None,
            "reproduce": "magnet-zoo train " + " ".join(_cli_args(self.config)),
        }
        with atomic_directory(target) as tmp:
            save_pretrained(self.model, tmp, card_data=card, metrics=metrics or None, training=recipe)
        return target

    def _end_epoch(self, report: EvalReport | None) -> None:
        """Metrics row, CSV, last/best checkpoints, then the resume state (in that order: a crash in
        between redoes this epoch's end from the previous state)."""
        row = self._row(self.epoch + 1, report, train=True)
        self.history.append(row)
        improved = False
        if report is not None:
            score = self._score(report)
            improved = self.best_score is None or score > self.best_score
            if improved:
                self.best_score = score
        if self.info.is_main:
            self._write_metrics_csv()
            self._save_model("last", report)
            if improved:
                self._save_model("best", report)
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_sums = dict.fromkeys(LOSS_TERMS, 0.0)
        self.epoch_count = 0
        self.epoch_seconds = 0.0
        self._save_state()
        logger.info(
            "epoch %d/%d: %s",
            self.epoch,
            self.config.epochs,
            ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float) and k != "seconds"),
        )

    def run(self) -> TrainResult:
        cfg = self.config
        if self.epoch == 0 and self.step_in_epoch == 0 and cfg.baseline_eval and not self.history:
            report = self._validate()
            if report is not None:
                self.history.append(self._row(0, report, train=False))
                if self.info.is_main:
                    self._write_metrics_csv()
        while self.epoch < cfg.epochs:
            if self.step_in_epoch < self.steps_per_epoch:
                self._train_epoch()
            self._end_epoch(self._validate())
        barrier(self.info)
        best = self.ckpt / "best"
        return TrainResult(
            out=self.out,
            last=self.ckpt / "last",
            best=best if best.exists() else None,
            metrics_csv=self.metrics_csv,
            history=self.history,
            best_score=self.best_score[0] if self.best_score is not None else None,
            global_step=self.global_step,
        )


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    text = str(value)
    return f'"{text}"' if "," in text else text


def _cli_args(config: TrainConfig) -> list[str]:
    args = [f"--data {Path(config.data).name}", f"--model {config.model}", f"--epochs {config.epochs}",
            f"--lr {config.lr}"]
    if config.batch_size:
        args.append(f"--batch-size {config.batch_size}")
    for key, value in config.model_overrides.items():
        args.append(f"--model-override {key}={json.dumps(value)}")
    args.append(f"--seed {config.seed}")
    return args


def train(config: TrainConfig, *, model: MagNet | None = None) -> TrainResult:
    """Train a MagNet as ``config`` says (the Python API of ``magnet-zoo train``).

    ``model`` optionally gives the network to train (otherwise built from ``config.model``); it is ignored
    when resuming, where the network comes from the saved state. Under ``torchrun`` call it on every
    rank: only rank 0 writes files.
    """
    config = dataclasses.replace(
        config,
        data=str(Path(config.data).resolve()),
        out=str(Path(config.out).resolve()),
        val_data=str(Path(config.val_data).resolve()) if config.val_data else None,
    )
    return _Run(config, model).run()
