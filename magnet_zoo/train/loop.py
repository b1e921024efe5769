"""The one training loop: every optimizer step a MagNet takes runs here.

What differs between uses is data, not loops: :func:`fit` takes a network, a data source
(:mod:`magnet_zoo.train.sources`: slides from a CSV or a SynthMets split, in-memory slides, FindIt
images), an optional validator, a :class:`~magnet_zoo.train.recipe.Recipe` (how to learn) and the run's
:class:`~magnet_zoo.train.settings.TrainConfig` (how long, where, on what). The recipe's components are
parts of this loop, and their state is part of its resume state:

* parameter groups (attention stacks at ``attention_lr``, the rest at ``lr``), Adam, linear warm-up then
  cosine annealing, all functions of *progress* (the larger of steps done / planned and time used /
  ``time_limit``; :mod:`magnet_zoo.train.schedules`);
* anneals of the scale bound and the entmax temperature, crop jitter, the scale prior;
* branch revival (:mod:`magnet_zoo.train.revival`), its running losses and pending points checkpointed;
* exploration: several zoom trees per slide sampled from the attention, a score-function gradient
  with a leave-one-out baseline (:mod:`~magnet_zoo.train.exploration`);
* head pre-training on windows read once (a phase before the first step, :mod:`~magnet_zoo.train.head_pretrain`),
  head warm-up on random zoom trees (the first ``head_warmup`` of training, :mod:`~magnet_zoo.train.warmup`,
  its generator checkpointed), head-guided attention (:mod:`~magnet_zoo.train.guidance`);
* gradient accumulation, AMP (CUDA), DDP under ``torchrun``, gradient clipping.

Around them: a progress bar with loss and learning rate, a validation every ``eval_every`` steps (or each
epoch) written to ``metrics.csv`` and, when ``tensorboard`` is installed, to TensorBoard event files;
best/last checkpoints (hub folders whose ``config.json`` and card carry the recipe); early stopping on the
monitored metric (``patience``); a wall-clock limit (``time_limit``). A 'best' checkpoint is only chosen
once the anneals and the head warm-up are over, so it runs with the settings it is saved with.

Resume: the state is written every ``save_every`` steps and at every validation (weights, optimizer,
AMP scaler, every rank's RNG states, the place in the data, elapsed time, the components' states). On a
CPU a run killed at any moment and resumed ends with exactly the weights of one never interrupted —
except under a ``time_limit``, whose schedule follows the clock.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
from magnet_zoo.train.distributed import DistInfo, all_gather_objects, barrier, setup_distributed
from magnet_zoo.train.evaluate import LOSS_TERMS, amp_dtype, autocast
from magnet_zoo.train.recentre import check_recentre_model, recentre_loss
from magnet_zoo.train.recipe import Recipe
from magnet_zoo.train.revival import BranchReviver
from magnet_zoo.train.schedules import anneals_done, apply_final, apply_progress, lr_factor, scale_prior
from magnet_zoo.train.settings import (
    RESUME_FREE_FIELDS,
    TrainConfig,
    default_batch_size,
    seed_everything,
    set_activation_checkpointing,
)
from magnet_zoo.train.sources import TrainData, Validator

logger = logging.getLogger(__name__)

EXTRA_TERMS = ("guidance", "window_mil", "scale_prior", "explore", "recentre", "attention_mil")


@dataclass
class TrainResult:
    """What a run left: files (when it had an output folder), the per-validation rows, and the network."""

    out: Path | None
    last: Path | None
    best: Path | None
    metrics_csv: Path | None
    history: list[dict[str, Any]]
    """One row per validation (``step 0``: the untrained model), the rows of ``metrics.csv``."""
    best_score: float | None
    global_step: int
    model: MagNet | None = None
    """The network as training left it (the *last* state, final settings, training mode)."""
    best_state: dict[str, torch.Tensor] | None = None
    """Without an output folder: a copy of the best validation's weights (``None`` without a validator)."""
    log: list[dict[str, Any]] = field(default_factory=list)
    """Training-loss rows every ``log_every`` steps (step, seconds, lr, loss terms, mean scale per layer)."""
    revived: list[dict[str, Any]] = field(default_factory=list)
    head_pretrain: dict[str, Any] = field(default_factory=dict)
    attention_pretrain: dict[str, Any] = field(default_factory=dict)
    stopped_by: str = "steps"
    """``steps``, ``time_limit`` or ``early_stopping``."""
    seconds: float = 0.0
    recipe: dict[str, Any] = field(default_factory=dict)


def build_optimizer(model: MagNet, recipe: Recipe) -> torch.optim.Optimizer:
    """Adam with two parameter groups: the magnifying layers' attention stacks (``attention_lr``) and the
    rest, classifier and auxiliary heads (``lr``)."""
    attention = [p for p in model.layers.parameters() if p.requires_grad]
    ids = {id(p) for p in attention}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    att_lr = recipe.lr if recipe.attention_lr is None else recipe.attention_lr
    groups = [{"params": attention, "lr": att_lr, "name": "attention"},
              {"params": rest, "lr": recipe.lr, "name": "heads"}]
    return torch.optim.Adam(groups, weight_decay=recipe.weight_decay)


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float, per_group: bool = False) -> list[float]:
    """Clip the gradient norm of all parameters together, or of each parameter group on its own
    (``per_group``); returns the norms before clipping (one, or one per group)."""
    groups = [[p for p in g["params"] if p.grad is not None] for g in optimizer.param_groups]
    if not per_group:
        groups = [[p for group in groups for p in group]]
    return [float(torch.nn.utils.clip_grad_norm_(group, max_norm)) if group else 0.0 for group in groups]


class TrainLoop:
    """One run's state; :func:`fit` drives it."""

    def __init__(
        self,
        config: TrainConfig,
        recipe: Recipe,
        data: TrainData,
        validator: Validator | None = None,
        *,
        model: MagNet | None = None,
        build: Callable[[], MagNet] | None = None,
        callbacks: Sequence[Callable[[TrainLoop, dict[str, Any]], None]] = (),
        card: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.recipe = recipe
        self.data = data
        self.validator = validator
        self.callbacks = list(callbacks)
        self.card = dict(card or {})
        self.info: DistInfo = setup_distributed(config.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.out = Path(config.out) if config.out else None
        self.ckpt = self.out / "checkpoints" if self.out else None
        self.state_dir = self.ckpt / "state" if self.ckpt else None
        self.metrics_csv = self.out / "metrics.csv" if self.out else None
        # counters and records (all in the resume state)
        self.history: list[dict[str, Any]] = []
        self.log: list[dict[str, Any]] = []
        self.revived: list[dict[str, Any]] = []
        self.best_score: tuple[float, float] | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stale_evals = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.elapsed = 0.0
        self.sums = dict.fromkeys((*LOSS_TERMS, *EXTRA_TERMS), 0.0)
        self.count = 0
        self.log_sums: dict[str, float] = {}
        self.log_count = 0
        self.pretrain: dict[str, Any] | None = None
        self.attention_pretrain: dict[str, Any] | None = None
        self.stopped_by = "steps"
        self.warm = False
        self.exploring = False
        self._segment_start = time.perf_counter()

        resume_state = self._load_resume_state()
        seed_everything(config.seed + self.info.rank)
        if resume_state is not None:
            model_config = MagNetConfig.from_dict(resume_state["model_config"])
            self.model = MagNet(model_config.replace(backbone_pretrained=False))
        elif model is not None:
            self.model = model
        elif build is not None:
            self.model = build()
        else:
            raise ConfigError("the training loop needs a model (or a way to build one)")
        self.model.to(self.info.device).train()
        if config.activation_checkpointing:
            set_activation_checkpointing(self.model, True)
        self.mconfig = self.model.config
        self._plan()
        self.optimizer = self._optimizer()
        self.dtype = amp_dtype(config.amp, self.info.device)
        self.scaler = torch.amp.GradScaler(
            self.info.device.type, enabled=self.dtype == torch.float16 and self.info.device.type == "cuda"
        )
        self.reviver = BranchReviver(self.model, recipe.revive_at, recipe.revive_margin, last=recipe.revive_last)
        if recipe.recentre_weight:
            check_recentre_model(self.mconfig)
        self.explore = torch.Generator().manual_seed(config.seed * 7919 + 7919)
        if resume_state is not None:
            self._restore(resume_state)
        self.ddp: nn.Module = self.model
        needs_mask = recipe.trains_attention_mil and recipe.attention_mil_edges != "pool"
        if needs_mask and not self.mconfig.attention_tissue_only:
            raise ConfigError(f"attention_mil_edges={recipe.attention_mil_edges!r} needs the tissue mask: set the "
                              "model's attention_tissue_only=True (--model-override attention_tissue_only=true)")
        if recipe.trains_attention_mil and self.model.layers[0].num_stacks > 1:
            logger.warning(
                "attention MIL trains each of the first layer's %d learned maps towards the same detector, and its "
                "cost grows with them. It is measured with one first-layer map (SynthMets, magnet2_micro as "
                "registered, patches=(1, 2): the phase alone found the tumours in 6 of 6 seeds, the 30-minute "
                "MagNets learned in 13 of 14); with two (patches=(2, 2)) it found them in 3 of 4 seeds, but took "
                "40-80 %% of a 30-minute budget on 2 CPU cores, and the two MagNets trained on gave test AUROC 0.48 "
                "and 0.70. Prefer one first-layer patch: --model-override 'patches=[1,...]'",
                self.model.layers[0].num_stacks,
            )
        if self.info.enabled:
            outside = (recipe.head_warmup or recipe.guidance_weight or recipe.head_pretrain_windows
                       or recipe.trains_attention_mil)
            if outside:
                raise ConfigError(
                    f"recipe {recipe.name!r}: head warm-up, head guidance, head pre-training and attention MIL run "
                    "outside DistributedDataParallel's forward and are not supported under torchrun yet; train on "
                    "one process, or choose a recipe without them (--recipe learn_to_look, or --recipe paper), or "
                    "set head_warmup=0, guidance_weight=0, head_pretrain_windows=0, attention_mil_weight=0, "
                    "attention_pretrain_steps=0"
                )
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.info.device.index] if self.info.device.type == "cuda" else None
            m = self.mconfig
            unused = not (m.loss_paradoxical and m.loss_auxiliary and m.loss_classifier)
            self.ddp = DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=unused)
        self.writer = self._tensorboard()
        if self.info.is_main and self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "train_config.json", json.dumps(self.run_record(), indent=2) + "\n")
        logger.info(
            "training with recipe %r: batch %d (micro %d x %d process(es) x %d accumulation), %d steps%s, "
            "lr %g, AMP %s, device %s",
            recipe.name, self.batch_size, self.micro, self.info.world_size, self.accum, self.total_steps,
            f" ({self.steps_per_epoch} per epoch)" if self.steps_per_epoch else "", recipe.lr, self.dtype,
            self.info.device,
        )

    # ------------------------------------------------------------------ setup
    def _plan(self) -> None:
        cfg, recipe, world = self.config, self.recipe, self.info.world_size
        self.batch_size = recipe.batch_size or default_batch_size(self.mconfig)
        self.micro = cfg.micro_batch or max(1, self.batch_size // world)
        if self.batch_size % (self.micro * world):
            raise ConfigError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch {self.micro} x {world} "
                f"process(es); choose sizes where it is"
            )
        self.accum = self.batch_size // (self.micro * world)
        steps = cfg.steps or recipe.steps
        epochs = cfg.epochs or recipe.epochs
        # the data's length depends on the micro-batch: set it up before counting steps
        self.data.setup(self.mconfig, self.micro, self.info, cfg.seed, recipe.augment, steps or 0, self.accum)
        self.micro_per_epoch = self.data.micro_batches_per_epoch()
        if self.micro_per_epoch is None:
            if not steps:
                raise ConfigError("endless training data (drawn per step) needs a number of steps: set steps")
            self.steps_per_epoch = 0
            self.total_steps = int(steps)
        else:
            self.steps_per_epoch = math.ceil(self.micro_per_epoch / self.accum)
            self.total_steps = int(steps) if steps else self.steps_per_epoch * int(epochs)

    def _optimizer(self) -> torch.optim.Optimizer:
        opt = build_optimizer(self.model, self.recipe)
        self.base_lrs = [g["lr"] for g in opt.param_groups]
        return opt

    def _tensorboard(self) -> Any:
        if not (self.config.tensorboard and self.info.is_main and self.out is not None):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            logger.debug("tensorboard is not installed: no event files")
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    def run_record(self) -> dict[str, Any]:
        return {
            "train": self.config.to_dict(),
            "recipe": self.recipe.to_dict(),
            "model": self.mconfig.to_dict(),
            "batch_size": self.batch_size,
            "micro_batch": self.micro,
            "accumulation": self.accum,
            "world_size": self.info.world_size,
            "steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "amp": str(self.dtype) if self.dtype else None,
        }

    # ------------------------------------------------------------------ resume state
    def _load_resume_state(self) -> dict[str, Any] | None:
        cfg = self.config
        if self.state_dir is None:
            if cfg.resume:
                raise ResumeError("--resume needs an output folder")
            return None
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
        state = load_training_state(self.state_dir, recover=False)
        saved = TrainConfig.from_dict(state["train_config"])
        differ = [
            f"{f.name}: {getattr(saved, f.name)!r} -> {getattr(cfg, f.name)!r}"
            for f in dataclasses.fields(TrainConfig)
            if f.name not in RESUME_FREE_FIELDS and getattr(saved, f.name) != getattr(cfg, f.name)
        ]
        saved_recipe = state.get("recipe", {})
        now = self.recipe.to_dict()
        differ += [f"recipe.{k}: {saved_recipe.get(k)!r} -> {now[k]!r}" for k in now if saved_recipe.get(k) != now[k]]
        if differ:
            raise ResumeError("--resume needs the settings of the interrupted run; these differ: " + "; ".join(differ))
        if int(state["world_size"]) != self.info.world_size:
            raise ResumeError(
                f"the run was started with {state['world_size']} process(es) and is resumed with "
                f"{self.info.world_size}; resume with the same torchrun --nproc_per_node"
            )
        return state

    def _state(self) -> dict[str, Any]:
        rngs = all_gather_objects(self.info, capture_rng_state())
        return {
            "train_config": self.config.to_dict(),
            "recipe": self.recipe.to_dict(),
            "model_config": self.mconfig.to_dict(),
            "world_size": self.info.world_size,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "elapsed": self.elapsed + (time.perf_counter() - self._segment_start),
            "sums": dict(self.sums),
            "count": self.count,
            "log_sums": dict(self.log_sums),
            "log_count": self.log_count,
            "history": self.history,
            "log": self.log,
            "revived": self.revived,
            "stale_evals": self.stale_evals,
            "best_score": list(self.best_score) if self.best_score is not None else None,
            "pretrain": self.pretrain,
            "attention_pretrain": self.attention_pretrain,
            "reviver": self.reviver.state_dict(),
            "explore": self.explore.get_state(),
            "model": dict(self.model.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rngs,
        }

    def _save_state(self) -> None:
        if self.state_dir is None:
            return
        state = self._state()  # a collective: every rank takes part
        if self.info.is_main:
            save_training_state(self.state_dir, state)
        barrier(self.info)

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"], strict=True)
        self.model.to(self.info.device)
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.elapsed = float(state["elapsed"])
        self.sums = {k: float(v) for k, v in state["sums"].items()}
        self.count = int(state["count"])
        self.log_sums = {k: float(v) for k, v in state["log_sums"].items()}
        self.log_count = int(state["log_count"])
        self.history = list(state["history"])
        self.log = list(state["log"])
        self.revived = list(state["revived"])
        self.stale_evals = int(state["stale_evals"])
        best = state.get("best_score")
        self.best_score = (float(best[0]), float(best[1])) if best is not None else None
        self.pretrain = state.get("pretrain")
        self.attention_pretrain = state.get("attention_pretrain")
        self.reviver.load_state_dict(state["reviver"])
        self.explore.set_state(state["explore"].to(torch.uint8))
        restore_rng_state(state["rng"][self.info.rank])
        logger.info("resumed at step %d of %d (epoch %d)", self.global_step, self.total_steps, self.epoch + 1)

    # ------------------------------------------------------------------ progress
    def seconds(self) -> float:
        return self.elapsed + (time.perf_counter() - self._segment_start)

    def phase_seconds(self) -> float:
        """Seconds spent in the phases before the first step (head and attention pre-training)."""
        return sum(float((phase or {}).get("seconds", 0.0)) for phase in (self.pretrain, self.attention_pretrain))

    def progress(self) -> float:
        """Share of the planned training done: steps, or the time limit's share if larger. The phases before
        the first step count against the time limit but not here: the loop's schedules (head warm-up, learning
        rates, anneals) share the time they leave."""
        p = self.global_step / max(self.total_steps, 1)
        if self.config.time_limit:
            before = self.phase_seconds()
            left = self.config.time_limit - before
            p = max(p, (self.seconds() - before) / left if left > 0 else 1.0)
        return min(p, 1.0)

    def main_progress(self, p: float | None = None) -> float:
        """Progress of the attention's phase (after the head warm-up): what the schedules follow."""
        p = self.progress() if p is None else p
        hw = self.recipe.head_warmup
        return min(max((p - hw) / (1 - hw), 0.0), 1.0) if hw else p

    def in_head_warmup(self) -> bool:
        return self.recipe.head_warmup > 0 and self.progress() < self.recipe.head_warmup

    def _set_schedules(self) -> float:
        """Learning rates, anneals and jitter for the coming step; returns the heads' learning rate."""
        recipe = self.recipe
        self.warm = self.in_head_warmup()
        self.exploring = (recipe.explore_trees >= 2 and not self.warm
                          and self.main_progress() < recipe.explore_frac)
        if self.warm:
            factors = [1.0, 1.0]
        else:
            q = self.main_progress()
            span = 1.0 / max(self.total_steps * (1 - recipe.head_warmup), 1)
            f = lr_factor(q, recipe.warmup, recipe.schedule, span)
            factors = [f, f]
            apply_progress(self.model, recipe, q)
        for group, base, f in zip(self.optimizer.param_groups, self.base_lrs, factors, strict=True):
            floor = min(recipe.min_lr, base)
            group["lr"] = floor + (base - floor) * f
        return self.optimizer.param_groups[1]["lr"]

    # ------------------------------------------------------------------ one step
    def _micro_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float], Any]:
        recipe, model = self.recipe, self.model
        device, grey = self.info.device, self.mconfig.grey_threshold
        fetchers = batch.fetchers(grey)
        labels = batch.labels.to(device)
        extra: dict[str, float] = {}
        out = None
        frozen = contextlib.nullcontext()
        if recipe.attention_mil_weight:  # on the batch's own slides, before exploration repeats them
            from magnet_zoo.train.attention_mil import attention_mil_loss

            mil, _ = attention_mil_loss(model, fetchers, labels, top=recipe.attention_mil_top,
                                        negatives=recipe.attention_mil_negatives,
                                        edges=recipe.attention_mil_edges)
            extra["attention_mil"] = float(mil.detach())
        if recipe.attention_mil_only:
            from magnet_zoo.train.attention_mil import first_map_frozen

            frozen = first_map_frozen(model)
        with frozen, autocast(device, self.dtype):
            if self.warm:
                from magnet_zoo.train.warmup import warmup_step

                terms, tree = warmup_step(model, fetchers, labels, self.explore, trees=recipe.head_warmup_trees)
                loss = terms.total
                if recipe.guidance_weight:
                    loss = loss + self._guidance(tree, fetchers, labels, extra)
            elif self.exploring:
                from magnet_zoo.nn.trees import multiple_instance_output
                from magnet_zoo.train.exploration import (
                    per_slide_loss,
                    score_function_loss,
                    set_exploration,
                    tree_log_prob,
                )

                k = recipe.explore_trees
                fetchers, labels = list(fetchers) * k, labels.repeat(k)  # tree-major
                set_exploration(model, recipe.explore_temperature, recipe.explore_uniform)
                try:
                    out = self.ddp(fetchers)
                finally:
                    set_exploration(model, None)
                if recipe.tree_mil:
                    terms = model.loss(multiple_instance_output(model, out, k), labels[: len(labels) // k])
                else:
                    terms = model.loss(out, labels)
                sf = score_function_loss(per_slide_loss(out, labels), tree_log_prob(out), k)
                extra["explore"] = float(sf.detach())
                loss = terms.total + recipe.explore_weight * sf
                if recipe.guidance_weight:
                    loss = loss + self._guidance(out, fetchers, labels, extra)
            else:
                out = self.ddp(fetchers)
                terms = model.loss(out, labels)
                loss = terms.total
                if recipe.guidance_weight:
                    loss = loss + self._guidance(out, fetchers, labels, extra)
                if recipe.scale_weight:
                    prior = scale_prior(model, out.affines, recipe.scale_target)
                    extra["scale_prior"] = float(prior.detach())
                    loss = loss + recipe.scale_weight * prior
                if recipe.recentre_weight:
                    pull = recentre_loss(model, out, labels, positives_only=recipe.recentre_on == "positive")
                    extra["recentre"] = float(pull.detach())
                    loss = loss + recipe.recentre_weight * pull
        if recipe.attention_mil_weight:
            loss = loss + recipe.attention_mil_weight * mil
        return loss, {**terms.as_floats(), **extra}, (out, labels)

    def _guidance(self, out: Any, fetchers: Any, labels: torch.Tensor, extra: dict[str, float]) -> torch.Tensor:
        from magnet_zoo.train.guidance import guidance_loss

        r = self.recipe
        terms = guidance_loss(self.model, out, fetchers, labels, temperature=r.guidance_temperature,
                              slides=r.guidance_slides, layers=r.guidance_layers or None, grid=r.guidance_grid,
                              standardise=r.guidance_standardise, evidence=r.guidance_evidence)
        extra["guidance"] = float(terms.attention.detach())
        extra["window_mil"] = float(terms.window_mil.detach())
        return r.guidance_weight * terms.total

    def _step_samples(self, step: int) -> int | None:
        total = self.data.samples_in_epoch()
        if total is None:
            return None
        first = step * self.accum * self.micro
        return min(total, first + self.accum * self.micro) - first

    def _optimizer_step(self) -> None:
        if self.recipe.grad_clip:
            self.scaler.unscale_(self.optimizer)
            clip_gradients(self.optimizer, self.recipe.grad_clip, self.recipe.clip_per_group)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1

    # ------------------------------------------------------------------ validation, checkpoints
    def _validate(self) -> dict[str, Any] | None:
        if self.validator is None:
            return None
        self._sync_buffers()
        apply_final(self.model)
        metrics = self.validator(self.model, device=self.info.device, dtype=self.dtype, info=self.info,
                                 progress=self.config.progress)
        self.model.train()
        return metrics

    def _sync_buffers(self) -> None:
        if self.info.enabled:
            import torch.distributed as dist

            for buffer in self.model.buffers():
                dist.broadcast(buffer, 0)

    def _score(self, metrics: dict[str, Any]) -> tuple[float, float]:
        loss = float(metrics.get("loss", math.nan))
        neg_loss = -loss if math.isfinite(loss) else -math.inf
        monitor = self.config.monitor
        if monitor == "loss":
            primary = neg_loss
        elif monitor in metrics:
            primary = float(metrics[monitor])
        else:
            raise ConfigError(f"monitor {monitor!r} is not among the validator's metrics: {sorted(metrics)}")
        return (primary if math.isfinite(primary) else -math.inf, neg_loss)

    def _row(self, metrics: dict[str, Any] | None, trained: bool) -> dict[str, Any]:
        row: dict[str, Any] = {
            "epoch": self.epoch,
            "step": self.global_step,
            "lr": self.optimizer.param_groups[1]["lr"],
            "seconds": round(self.seconds(), 3),
        }
        if trained:
            totals = all_gather_objects(self.info, (self.sums, self.count))
            count = sum(t[1] for t in totals)
            for key in (*LOSS_TERMS, *EXTRA_TERMS):
                value = sum(t[0].get(key, 0.0) for t in totals) / max(count, 1)
                if key in LOSS_TERMS or value:
                    row[f"train_{'loss' if key == 'total' else key}"] = value
        for key, value in (metrics or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                row[f"val_{key}"] = value
        return row

    def _write_metrics_csv(self) -> None:
        if self.metrics_csv is None:
            return
        columns: list[str] = []
        for row in self.history:
            columns += [k for k in row if k not in columns]
        lines = [",".join(columns)]
        for row in self.history:
            lines.append(",".join(_cell(row.get(c, "")) for c in columns))
        atomic_write_text(self.metrics_csv, "\n".join(lines) + "\n")

    def training_record(self) -> dict[str, Any]:
        """The recipe and run as key/value pairs, for the model card."""
        r = self.recipe
        return {
            "recipe": r.name,
            "optimizer": "Adam" + (f", attention lr {r.attention_lr}" if r.attention_lr else ""),
            "lr": r.lr,
            "schedule": (f"linear warm-up {r.warmup:.3g}, then " if r.warmup else "") + r.schedule,
            "batch_size": self.batch_size,
            "steps": f"{self.global_step}/{self.total_steps}",
            "augmentation": "D4 of the whole slide" if r.augment else "none",
            "amp": str(self.dtype) if self.dtype else "off",
            "seed": self.config.seed,
        }

    def _save_model(self, name: str, metrics: dict[str, Any] | None) -> Path | None:
        if self.ckpt is None:
            return None
        from magnet_zoo.hub import save_pretrained

        target = self.ckpt / name
        scores: dict[str, float] = {}
        for key, out_key in (("auroc", "roc_auc"), ("accuracy", "accuracy")):
            value = (metrics or {}).get(key)
            if isinstance(value, float) and math.isfinite(value):
                scores[out_key] = value
        card = {"model_name": f"{Path(self.config.model).name} trained ({name})", **self.card,
                "metrics_dataset": "validation split" if metrics else None}
        apply_final(self.model)
        with atomic_directory(target) as tmp:
            mpp = self.data.slide_mpp() if hasattr(self.data, "slide_mpp") else None
            save_pretrained(self.model, tmp, card_data=card, metrics=scores or None, training=self.training_record(),
                            slide_mpp=mpp, recipe=self.recipe.to_dict())
        return target

    def _evaluation(self, trained: bool = True) -> None:
        """Validate, write the metrics row, the checkpoints, then the resume state (in that order: a crash
        in between redoes this validation from the previous state)."""
        metrics = self._validate()
        row = self._row(metrics, trained)
        self.history.append(row)
        if trained:
            self.sums = dict.fromkeys(self.sums, 0.0)
            self.count = 0
        improved = False
        eligible = trained and anneals_done(self.recipe, self.main_progress()) and not self.in_head_warmup()
        if metrics is not None and eligible:
            score = self._score(metrics)
            improved = self.best_score is None or score > self.best_score
            if improved:
                self.best_score = score
                self.stale_evals = 0
                if self.ckpt is None:
                    self.best_state = copy.deepcopy(self.model.state_dict())
            else:
                self.stale_evals += 1
        row["eligible"] = eligible
        if self.info.is_main:
            self._write_metrics_csv()
            if trained:
                self._save_model("last", metrics)
                if improved:
                    self._save_model("best", metrics)
            if self.writer is not None:
                for key, value in row.items():
                    if key.startswith("val_") and isinstance(value, float) and math.isfinite(value):
                        self.writer.add_scalar(key.replace("val_", "val/", 1), value, self.global_step)
                self.writer.flush()
        if trained:
            self._save_state()
        headline = ("train_loss", "val_loss", "val_auroc", "val_accuracy", "val_hit_rate")
        shown = ", ".join(f"{k} {row[k]:.4g}" for k in headline if isinstance(row.get(k), float))
        logger.info("step %d/%d: %s", self.global_step, self.total_steps, shown)

    def _should_validate(self) -> bool:
        every = self.config.eval_every
        return bool(every) and self.global_step % every == 0

    # ------------------------------------------------------------------ the run
    def _head_pretrain(self) -> None:
        recipe = self.recipe
        if self.pretrain is not None or not recipe.head_pretrain_windows:
            return
        from magnet_zoo.train.head_pretrain import pretrain_heads

        if not hasattr(self.data, "paths"):
            raise ConfigError("head pre-training reads windows from slide files: the data must be slides")
        self.pretrain = pretrain_heads(
            self.model, self.data.paths, self.data.labels, windows=recipe.head_pretrain_windows,
            steps=recipe.head_pretrain_steps, side=recipe.head_pretrain_side, lr=recipe.lr, seed=self.config.seed,
        )
        self._save_state()

    def _attention_pretrain(self) -> None:
        recipe = self.recipe
        if self.attention_pretrain is not None or not recipe.attention_pretrain_steps:
            return
        from magnet_zoo.train.attention_mil import pretrain_attention

        if not hasattr(self.data, "paths"):
            raise ConfigError("attention pre-training reads each slide's view from its file: the data must be slides")
        self.attention_pretrain = pretrain_attention(
            self.model, self.data.paths, self.data.labels, steps=recipe.attention_pretrain_steps, lr=recipe.lr,
            top=recipe.attention_mil_top, seed=self.config.seed, negatives=recipe.attention_mil_negatives,
            augment=recipe.attention_pretrain_augment, candidates=recipe.attention_pretrain_candidates,
            edges=recipe.attention_mil_edges, top_start=recipe.attention_pretrain_top_start,
            edge_start=recipe.attention_pretrain_edge_start, restarts=recipe.attention_pretrain_restarts,
            plateau=recipe.attention_pretrain_plateau, restart_from=recipe.attention_pretrain_restart_from,
            time_left=0.9 * (self.config.time_limit - self.seconds()) if self.config.time_limit else None,
        )
        self._save_state()

    def _log_step(self, terms: dict[str, float], out: Any, lr: float) -> None:
        for key, value in terms.items():
            self.log_sums[key] = self.log_sums.get(key, 0.0) + value
        self.log_count += 1
        every = self.config.log_every
        if not every or self.global_step % every:
            return
        row: dict[str, Any] = {"step": self.global_step, "seconds": round(self.seconds(), 1), "lr": lr,
                               "warmup": self.in_head_warmup()}
        row.update({k: v / max(self.log_count, 1) for k, v in self.log_sums.items()})
        if out is not None and getattr(out, "affines", None):
            row["scales"] = [round(float(a.scale.detach().float().mean()), 4) for a in out.affines]
        self.log.append(row)
        self.log_sums, self.log_count = {}, 0
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, float):
                    self.writer.add_scalar(f"train/{key}", value, self.global_step)
        logger.info("step %d loss %.3f cls %.3f aux %.3f par %.3f lr %.2g scales %s (%.0f s)", self.global_step,
                    row.get("total", math.nan), row.get("classifier", math.nan), row.get("auxiliary", math.nan),
                    row.get("paradoxical", math.nan), lr, row.get("scales", []), row["seconds"])

    def _stop_reason(self) -> str | None:
        if self.global_step >= self.total_steps:
            return "steps"
        if self.config.time_limit and self.seconds() >= self.config.time_limit:
            return "time_limit"
        patience = self.config.patience
        if patience and self.stale_evals >= patience:
            return "early_stopping"
        return None

    def _train_epoch(self, bar: Any) -> str | None:
        start_micro = self.step_in_epoch * self.accum
        micro_index = start_micro
        loss_sum, loss_n = 0.0, 0
        for batch in self.data.batches(self.epoch, start_micro):
            step = micro_index // self.accum
            if self.micro_per_epoch is None:
                last_of_step = (micro_index + 1) % self.accum == 0
            else:
                last_of_step = (micro_index + 1) % self.accum == 0 or micro_index + 1 == self.micro_per_epoch
            if micro_index % self.accum == 0:
                lr = self._set_schedules()
            share = self._step_samples(step)
            weight = len(batch) / share if share else 1.0 / self.accum
            sync = self.ddp.no_sync() if (self.info.enabled and not last_of_step) else contextlib.nullcontext()
            with sync:
                loss, terms, (out, labels) = self._micro_loss(batch)
                self.scaler.scale(loss * weight).backward()
            if out is not None:
                self.reviver.observe(out, labels)
            for key, value in terms.items():
                self.sums[key] = self.sums.get(key, 0.0) + value * len(batch)
            self.count += len(batch)
            loss_sum, loss_n = loss_sum + terms["total"], loss_n + 1
            micro_index += 1
            if not last_of_step:
                continue
            self._optimizer_step()
            self.step_in_epoch = step + 1
            self.revived += self.reviver.maybe_revive(self.main_progress(), self.global_step, self.model,
                                                      self.optimizer, self.info.world_size)
            self._log_step(terms, out, lr)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / max(loss_n, 1):.4f}", lr=f"{lr:.2g}")
            record = {"step": self.global_step, "loss": terms["total"], "lr": lr, "output": out}
            for callback in self.callbacks:
                callback(self, record)
            epoch_done = self.micro_per_epoch is not None and self.step_in_epoch >= self.steps_per_epoch
            validated = self._should_validate()
            if validated:
                self._evaluation()
            reason = self._stop_reason()
            if reason and not validated and not epoch_done:
                self._evaluation()
            elif (not validated and self.config.save_every and self.global_step % self.config.save_every == 0
                  and not epoch_done and self.state_dir is not None):
                self._save_state()
            if reason:
                return reason
            if epoch_done:
                break
        return None

    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg = self.config
        self._segment_start = time.perf_counter()
        self._head_pretrain()
        self._attention_pretrain()
        if self.global_step == 0 and cfg.baseline_eval and not self.history and self.validator is not None:
            self._evaluation(trained=False)
        bar = tqdm(total=self.total_steps, initial=self.global_step, desc=f"train ({self.recipe.name})", unit="step",
                   disable=not (cfg.progress and self.info.is_main), dynamic_ncols=True)
        reason = self._stop_reason()
        while reason is None:
            reason = self._train_epoch(bar)
            if self.micro_per_epoch is not None and self.step_in_epoch >= self.steps_per_epoch:
                self.epoch += 1
                self.step_in_epoch = 0
                bar.set_description(f"train ({self.recipe.name}) epoch {self.epoch + 1}")
                if reason is None:
                    if not cfg.eval_every:
                        self._evaluation()
                    reason = self._stop_reason()
            elif reason is None and self.micro_per_epoch is None:
                reason = "steps"  # endless data only stops here when its iterator does
        bar.close()
        self.stopped_by = reason
        if not self.history or self.history[-1]["step"] != self.global_step:
            self._evaluation()
        apply_final(self.model)
        if self.writer is not None:
            self.writer.close()
        barrier(self.info)
        best = self.ckpt / "best" if self.ckpt else None
        logger.info("stopped by %s after %d steps (%.0f s)", reason, self.global_step, self.seconds())
        return TrainResult(
            out=self.out,
            last=self.ckpt / "last" if self.ckpt else None,
            best=best if best is not None and best.exists() else None,
            metrics_csv=self.metrics_csv,
            history=self.history,
            best_score=self.best_score[0] if self.best_score is not None else None,
            global_step=self.global_step,
            model=self.model,
            best_state=self.best_state,
            log=self.log,
            revived=self.revived,
            head_pretrain=self.pretrain or {},
            attention_pretrain=self.attention_pretrain or {},
            stopped_by=reason,
            seconds=self.seconds(),
            recipe=self.recipe.to_dict(),
        )


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    text = str(value)
    return f'"{text}"' if "," in text else text


def fit(
    model: MagNet | None,
    data: TrainData,
    config: TrainConfig,
    recipe: Recipe,
    validator: Validator | None = None,
    *,
    build: Callable[[], MagNet] | None = None,
    callbacks: Sequence[Callable[[TrainLoop, dict[str, Any]], None]] = (),
    card: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` (or the network ``build()`` makes) on ``data`` with ``recipe``, as ``config`` says.

    ``callbacks`` are called after every optimizer step with the loop and ``{step, loss, lr, output}``.
    Under ``torchrun`` call it on every rank: only rank 0 writes files.
    """
    return TrainLoop(config, recipe, data, validator, model=model, build=build, callbacks=callbacks,
                     card=card).run()
