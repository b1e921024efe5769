"""Scale-out helpers: ``torchrun`` detection, process groups, and small collectives.

``torchrun --nproc_per_node N -m magnet_zoo train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`setup_distributed` reads them, picks the device (``cuda:LOCAL_RANK`` when CUDA
is there, else the CPU) and starts the process group (NCCL on CUDA, Gloo on the CPU). Without
``torchrun`` everything here is a no-op for a world of one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) writes files."""
        return self.rank == 0


def resolve_device(device: str | torch.device, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:LOCAL_RANK`` if CUDA is available, else the CPU; ``"cuda"`` -> this rank's GPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} asked for, but CUDA is not available; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    return dev


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the ``torchrun`` environment (``(0, 1, 0)`` without it)."""
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def setup_distributed(device: str | torch.device = "auto") -> DistInfo:
    """Start the process group when launched by ``torchrun`` (idempotent) and return this rank's place."""
    rank, world, local_rank = env_world()
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        logger.info("rank %d/%d started the %s process group on %s", rank, world, backend, dev)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def all_gather_objects(info: DistInfo, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable, small), in rank order; ``[obj]`` for a world of one."""
    if not (info.enabled and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(info: DistInfo, obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not (info.enabled and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
