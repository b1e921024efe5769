"""Crash-safe files: atomic writes, atomic checkpoint folders, and the training state for ``--resume``.

Every file the trainer writes goes through a temporary name in the same folder, is flushed and
fsynced, then moved into place with :func:`os.replace`, so a reader (or a resumed run after a
``SIGKILL``) sees either the old file or the new one, never half of one.

A checkpoint is a *folder* (``config.json`` + ``model.safetensors`` + ``README.md``, or the training
state's two files), and POSIX cannot atomically replace a non-empty folder. :func:`atomic_directory`
writes the new folder under a hidden temporary name, fsyncs it, then swaps it in with two renames
(old folder aside, new folder in); :func:`recover_directory` finishes or undoes a swap that a crash
interrupted, so a folder of the final name is always complete.

The training state (:func:`save_training_state`) is ``train_state.safetensors`` (every tensor: model
weights, optimizer moments, RNG states) plus ``train_state.json`` (everything else: epoch, step,
scheduler, scaler, metric history, Python and NumPy RNG states). Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from magnet_zoo.atomic import fsync_dir

logger = logging.getLogger(__name__)

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
STATE_FORMAT = 1
"""Version of the training-state layout; a newer one is refused on ``--resume``."""

_TMP_MARK = ".tmp-"
_OLD_MARK = ".old-"


class ResumeError(RuntimeError):
    """A training state cannot be resumed (missing, damaged, or from another run's settings)."""


# --------------------------------------------------------------------------- atomic files
def _fsync_tree(folder: Path) -> None:
    for sub, _, files in os.walk(folder):
        for name in files:
            with open(Path(sub) / name, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(sub)


def recover_directory(target: str | os.PathLike[str]) -> Path | None:
    """Repair ``target`` after a crash during :func:`atomic_directory`; returns it if it exists then.

    A crash between the two renames of a swap leaves only the previous folder, set aside under
    ``.<name>.old-*``: it is moved back. Unfinished temporary folders are deleted.
    """
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return None
    olds = sorted(parent.glob(f".{target.name}{_OLD_MARK}*"), key=lambda p: p.stat().st_mtime)
    if not target.exists() and olds:
        logger.warning("restoring %s from %s (a previous save was interrupted)", target, olds[-1].name)
        os.replace(olds[-1], target)
        olds = olds[:-1]
        fsync_dir(parent)
    for leftover in [*olds, *parent.glob(f".{target.name}{_TMP_MARK}*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    return target if target.exists() else None


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Write a folder atomically: ``with atomic_directory(d) as tmp: <write files into tmp>``.

    On normal exit the files are fsynced and ``tmp`` replaces ``target``; on an exception ``tmp`` is
    deleted and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(target)
    token = uuid.uuid4().hex[:8]
    tmp = target.parent / f".{target.name}{_TMP_MARK}{token}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = target.parent / f".{target.name}{_OLD_MARK}{token}"
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- nested state <-> tensors + JSON
def split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able copy of ``obj`` whose tensors are moved into ``tensors`` (by dotted key).

    Dicts with non-string keys (an optimizer's ``state`` is keyed by int) and tuples are tagged so that
    :func:`join_tensors` restores them exactly.
    """
    if isinstance(obj, torch.Tensor):
        key = prefix
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj):
            return {k: split_tensors(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[k, split_tensors(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, float) and not np.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix} in a training state")


def join_tensors(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors`."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__items__"}:
            return {k: join_tensors(v, tensors) for k, v in obj["__items__"]}
        if set(obj) == {"__tuple__"}:
            return tuple(join_tensors(v, tensors) for v in obj["__tuple__"])
        if set(obj) == {"__float__"}:
            return float(obj["__float__"])
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


# --------------------------------------------------------------------------- RNG states
def capture_rng_state() -> dict[str, Any]:
    """Torch (CPU and every CUDA device), NumPy and Python RNG states of this process."""
    np_state = np.random.get_state()  # noqa: NPY002 - the legacy global RNG is what third-party code draws from
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": [int(v) for v in np_state[1]],
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": _python_state_to_json(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [t.to(torch.uint8) for t in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning("saved CUDA RNG states for %d devices, found %d; not restored",
                           len(cuda_states), torch.cuda.device_count())
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002 - see capture_rng_state
        (n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    random.setstate(_python_state_from_json(state["python"]))


def _python_state_to_json(st: tuple) -> list:
    version, internal, gauss = st
    return [version, list(internal), gauss]


def _python_state_from_json(st: list) -> tuple:
    version, internal, gauss = st
    return (int(version), tuple(int(v) for v in internal), gauss)


# --------------------------------------------------------------------------- the training state
def save_training_state(directory: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """Write ``state`` (nested dicts of tensors and JSON values) atomically as a state folder."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    meta = split_tensors(dict(state), "s", tensors)
    doc = {"format": STATE_FORMAT, "state": meta}
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / STATE_TENSORS), metadata={"format": str(STATE_FORMAT)})
        (tmp / STATE_JSON).write_text(json.dumps(doc, indent=1, sort_keys=True), encoding="utf-8")
    return Path(directory)


def load_training_state(directory: str | os.PathLike[str], *, recover: bool = True) -> dict[str, Any]:
    """Read a state folder written by :func:`save_training_state`.

    ``recover`` first repairs a swap that a crash interrupted (:func:`recover_directory`, which may
    rename and delete folders: under DDP only rank 0 does it, before the others read).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    present = recover_directory(directory) if recover else (directory if directory.is_dir() else None)
    if present is None:
        raise ResumeError(f"no training state at {directory}; start without --resume")
    try:
        doc = json.loads((directory / STATE_JSON).read_text(encoding="utf-8"))
        tensors = load_file(str(directory / STATE_TENSORS), device="cpu")
    except (OSError, json.JSONDecodeError, SafetensorError) as exc:
        raise ResumeError(f"training state at {directory} is unreadable: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format", 0) > STATE_FORMAT:
        raise ResumeError(f"training state at {directory} has an unknown format; upgrade magnet_zoo")
    return join_tensors(doc["state"], tensors)
