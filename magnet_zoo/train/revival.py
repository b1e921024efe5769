"""Branch revival: give a first-layer patch that never found the evidence the best patch's attention
(and, optionally, a dead learned patch of the last layer the best last-layer patch's).

With sparse (entmax) attention a patch whose map never covered the evidence gets no gradient towards it
and stays "dead"; this is the learned-attention analogue of resetting dead codebook entries. It uses the
slide labels only: a running mean of every first-layer patch's auxiliary BCE.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from magnet_zoo.nn.magnet import MagNet

logger = logging.getLogger(__name__)


class BranchReviver:
    """Keeps a running mean of every first-layer patch's auxiliary BCE and revives dead branches.

    At each revival point (shares ``revive_at`` of training progress; each fires once), a first-layer
    patch whose running BCE exceeds the best first-layer patch's by more than ``margin`` gets the best
    patch's attention stacks, its whole subtree included (:meth:`MagNet.copy_branch`, Adam state too).
    With ``last`` the same points also revive the last magnifying layer's *learned* patches (the frozen
    patch has no stack): one whose running BCE exceeds the best learned last-layer patch's by ``margin``
    gets that patch's attention stack (:meth:`BranchStack.copy_group`; it has no subtree), after the
    first-layer revival of the same point.
    Its state (:meth:`state_dict`) is part of the training loop's resume state. Under DDP the running
    losses are averaged over the ranks before a decision, so every rank revives the same branches.
    """

    def __init__(self, model: MagNet, revive_at: Sequence[float], margin: float, momentum: float = 0.9,
                 last: bool = False) -> None:
        cfg = model.config
        self.pending = sorted(float(f) for f in revive_at)
        if self.pending and (cfg.aux_pooling not in ("per_patch", "max") or 1 not in cfg.active_aux_layers):
            logger.warning(
                "branch revival needs per-patch auxiliary logits on layer 1 (aux_pooling 'per_patch' or 'max', "
                "1 in aux_layers); it is off for this model"
            )
            self.pending = []
        self.depth = cfg.num_layers
        self.last = bool(last) and bool(self.pending) and cfg.num_layers > 1
        if self.last and cfg.num_layers not in cfg.active_aux_layers:
            logger.warning("last-layer revival needs per-patch auxiliary logits on layer %d (in aux_layers); it is "
                           "off for this model", cfg.num_layers)
            self.last = False
        if self.last:
            layer = model.layers[-1]
            learned = (layer.slot >= 0).nonzero().squeeze(1)
            self.last_slots = learned.tolist()  # columns of the last layer's per-patch logits with a stack
            self.last_groups = layer.slot[learned].tolist()  # their stacks' groups
            if len(self.last_slots) < 2:
                self.last = False
        self.margin = margin
        self.momentum = momentum
        self.running: torch.Tensor | None = None
        self.running_last: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return bool(self.pending)

    def observe(self, out: Any, labels: torch.Tensor) -> None:
        """Update the running per-patch BCE of layer 1 (and with ``last`` of the last layer's learned
        patches) from one training batch's output."""
        if not self.pending or 1 not in out.aux_patch_logits:
            return
        bce = self._bce(out.aux_patch_logits[1], labels)
        self.running = bce if self.running is None else self.momentum * self.running + (1 - self.momentum) * bce
        if self.last and self.depth in out.aux_patch_logits:
            bce = self._bce(out.aux_patch_logits[self.depth], labels)[self.last_slots]
            self.running_last = bce if self.running_last is None else (
                self.momentum * self.running_last + (1 - self.momentum) * bce)

    @staticmethod
    def _bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.detach().float()
        target = labels.to(logits)[:, None].expand_as(logits)
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(0).cpu()

    def maybe_revive(
        self, progress: float, step: int, model: MagNet, opt: torch.optim.Optimizer, world_size: int = 1
    ) -> list[dict[str, Any]]:
        """Revive dead branches if a revival point has been reached; returns one row per revival."""
        if not self.pending or progress < self.pending[0] or self.running is None:
            return []
        while self.pending and progress >= self.pending[0]:
            self.pending.pop(0)
        running = self.running
        running = self.running = _mean_over_ranks(running, model, world_size)
        best, dead = _dead_against_best(running, self.margin)
        rows = []
        for k in dead:
            model.copy_branch(best, k, opt)
            row = {"step": step, "layer": 1, "from": best, "to": k, "loss_from": float(running[best]),
                   "loss_to": float(running[k])}  # fmt: skip
            rows.append(row)
            running[k] = running[best]
            logger.info(
                "step %d: revived branch %d from branch %d (aux BCE %.3f vs %.3f)",
                step, k, best, row["loss_to"], row["loss_from"],
            )  # fmt: skip
        if self.last and self.running_last is not None:
            rows += self._revive_last(step, model, opt, world_size)
        return rows

    def _revive_last(
        self, step: int, model: MagNet, opt: torch.optim.Optimizer, world_size: int
    ) -> list[dict[str, Any]]:
        """The last layer's learned patches: the dead ones get the best one's stack."""
        running = self.running_last = _mean_over_ranks(self.running_last, model, world_size)
        stacks = model.layers[-1].stacks
        depth = self.depth
        best, dead = _dead_against_best(running, self.margin)
        rows = []
        for k in dead:
            stacks.copy_group(self.last_groups[best], self.last_groups[k], opt)
            row = {"step": step, "layer": depth, "from": self.last_slots[best], "to": self.last_slots[k],
                   "loss_from": float(running[best]), "loss_to": float(running[k])}
            rows.append(row)
            running[k] = running[best]
            logger.info("step %d: revived layer-%d patch %d from patch %d (aux BCE %.3f vs %.3f)",
                        step, depth, row["to"], row["from"], row["loss_to"], row["loss_from"])
        return rows

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        def copy(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.clone() if t is not None else None

        return {"pending": list(self.pending), "running": copy(self.running), "running_last": copy(self.running_last)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = [float(v) for v in state["pending"]]
        running, last = state.get("running"), state.get("running_last")  # no running_last: an older checkpoint
        self.running = running.clone().float() if isinstance(running, torch.Tensor) else None
        self.running_last = last.clone().float() if isinstance(last, torch.Tensor) else None


def _dead_against_best(running: torch.Tensor, margin: float) -> tuple[int, list[int]]:
    """The patch with the lowest running loss, and those whose loss exceeds it by more than ``margin``."""
    best = int(running.argmin())
    return best, [k for k in range(running.numel()) if k != best and float(running[k] - running[best]) > margin]


def _mean_over_ranks(running: torch.Tensor, model: MagNet, world_size: int) -> torch.Tensor:
    """Under DDP, the running losses averaged over the ranks (each rank then decides alike)."""
    if world_size <= 1:
        return running
    import torch.distributed as dist

    shared = running.to(next(model.parameters()).device)
    dist.all_reduce(shared)
    return (shared / world_size).cpu()
