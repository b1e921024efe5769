"""Branch revival: give a first-layer patch that never found the evidence the best patch's attention.

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
    Its state (:meth:`state_dict`) is part of the training loop's resume state. Under DDP the running
    losses are averaged over the ranks before a decision, so every rank revives the same branches.
    """

    def __init__(self, model: MagNet, revive_at: Sequence[float], margin: float, momentum: float = 0.9) -> None:
        cfg = model.config
        self.pending = sorted(float(f) for f in revive_at)
        if self.pending and (cfg.aux_pooling not in ("per_patch", "max") or 1 not in cfg.active_aux_layers):
            logger.warning(
                "branch revival needs per-patch auxiliary logits on layer 1 (aux_pooling 'per_patch' or 'max', "
                "1 in aux_layers); it is off for this model"
            )
            self.pending = []
        self.margin = margin
        self.momentum = momentum
        self.running: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return bool(self.pending)

    def observe(self, out: Any, labels: torch.Tensor) -> None:
        """Update the running per-patch BCE of layer 1 from one training batch's output."""
        if not self.pending or 1 not in out.aux_patch_logits:
            return
        logits = out.aux_patch_logits[1].detach().float()
        target = labels.to(logits)[:, None].expand_as(logits)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(0).cpu()
        self.running = bce if self.running is None else self.momentum * self.running + (1 - self.momentum) * bce

    def maybe_revive(
        self, progress: float, step: int, model: MagNet, opt: torch.optim.Optimizer, world_size: int = 1
    ) -> list[dict[str, Any]]:
        """Revive dead branches if a revival point has been reached; returns one row per revival."""
        if not self.pending or progress < self.pending[0] or self.running is None:
            return []
        while self.pending and progress >= self.pending[0]:
            self.pending.pop(0)
        running = self.running
        if world_size > 1:
            import torch.distributed as dist

            device = next(model.parameters()).device
            shared = running.to(device)
            dist.all_reduce(shared)
            running = (shared / world_size).cpu()
            self.running = running
        best = int(running.argmin())
        rows = []
        for k in range(running.numel()):
            if k != best and float(running[k] - running[best]) > self.margin:
                model.copy_branch(best, k, opt)
                row = {"step": step, "from": best, "to": k, "loss_from": float(running[best]),
                       "loss_to": float(running[k])}  # fmt: skip
                rows.append(row)
                running[k] = running[best]
                logger.info(
                    "step %d: revived branch %d from branch %d (aux BCE %.3f vs %.3f)",
                    step, k, best, row["loss_to"], row["loss_from"],
                )  # fmt: skip
        return rows

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {"pending": list(self.pending), "running": self.running.clone() if self.running is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = [float(v) for v in state["pending"]]
        running = state.get("running")
        self.running = running.clone().float() if isinstance(running, torch.Tensor) else None
