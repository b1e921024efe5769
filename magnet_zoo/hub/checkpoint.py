"""The checkpoint folder: ``config.json`` + ``model.safetensors`` + ``README.md``.

``config.json`` holds the config version, the magnet_zoo version that wrote it, the network config
(:meth:`MagNetConfig.to_dict`) and the I/O contract (sizes, grey threshold, normalisation, labels), so
a folder alone rebuilds the network and says how to feed it. Weights are safetensors only: nothing is
ever unpickled. Loading is strict: a missing, unexpected or wrongly shaped tensor is an error that
lists them, and a config version newer than this magnet_zoo understands is refused.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import magnet_zoo
from magnet_zoo.atomic import atomic_write_text
from magnet_zoo.config import CONFIG_VERSION, MPP_TOLERANCE, ConfigError, MagNetConfig
from magnet_zoo.hub.card import CardData, card_from_dict, card_to_dict, parse_card, render_card
from magnet_zoo.hub.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    UnsupportedCheckpointVersionError,
)
from magnet_zoo.nn.heads import Backbone
from magnet_zoo.nn.magnet import MagNet

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
CHECKPOINT_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_PREVIEW = 10


TRAINED_MPP_ATTR = "trained_mpp"
"""Attribute of a loaded model: µm per pixel (level 0) of its training slides, from ``io.slide_mpp``."""
CARD_ATTR = "card_data"
"""Attribute of a loaded model: its card's :class:`CardData`, which ``save_pretrained`` writes again."""


# --------------------------------------------------------------------------- the I/O contract
def io_contract(model: MagNet, slide_mpp: float | None = None) -> dict[str, Any]:
    """How to feed ``model`` and read its output, as stored in ``config.json["io"]``.

    ``slide_mpp`` is the microns per pixel at level 0 of the slides the model was trained on (default:
    the loaded model's ``trained_mpp``); ``None`` where unknown. Predictions compare every slide's mpp
    with it (see :mod:`magnet_zoo.infer.predict`).
    """
    cfg = model.config
    if slide_mpp is None:
        slide_mpp = getattr(model, TRAINED_MPP_ATTR, None)
    normalisation = {
        name: {
            "backbone": module.name,
            "mean": [float(v) for v in module.mean.flatten().tolist()],
            "std": [float(v) for v in module.std.flatten().tolist()],
        }
        for name, module in model.named_modules()
        if isinstance(module, Backbone)
    }
    return {
        "input": "an RGB whole-slide image (any pyramid, any backend) or an RGB array; the whole extent is read",
        "input_size": cfg.input_size,
        "iprime_factor": cfg.iprime_factor,
        "iprime_sizes": [cfg.iprime_size(layer) for layer in range(1, cfg.num_layers + 1)],
        "final_patch_size": cfg.final_patch_size,
        "num_final_patches": cfg.num_final_patches,
        "grey_threshold": cfg.grey_threshold,
        "view_oversample": cfg.view_oversample,
        "pixel_range": "RGB uint8 from the slide, scaled to [0, 1]; each backbone then normalises its input",
        "normalisation": normalisation,
        "slide_mpp": None if slide_mpp is None else float(slide_mpp),
        "mpp_tolerance": MPP_TOLERANCE,
        "labels": list(cfg.labels),
        "output": f"one logit per slide; sigmoid = probability of {cfg.labels[1]!r}",
    }


def _check_io(io: Mapping[str, Any], config: MagNetConfig, source: Path) -> None:
    """The contract must agree with the network config it travels with (catches hand edits)."""
    expected = {
        "input_size": config.input_size,
        "iprime_factor": config.iprime_factor,
        "final_patch_size": config.final_patch_size,
        "grey_threshold": config.grey_threshold,
        "view_oversample": config.view_oversample,
        "labels": list(config.labels),
    }
    wrong = [f"io.{k} = {io[k]!r} but model.{k} = {v!r}" for k, v in expected.items() if k in io and io[k] != v]
    mpp = io.get("slide_mpp")
    if mpp is not None and (isinstance(mpp, bool) or not isinstance(mpp, (int, float)) or not 0 < mpp < 1000):
        wrong.append(f"io.slide_mpp = {mpp!r} is not a positive number of microns per pixel")
    if wrong:
        raise CheckpointError(f"{source} contradicts itself: {'; '.join(wrong)}. Re-export the checkpoint.")


def _apply_normalisation(model: MagNet, io: Mapping[str, Any], source: Path) -> None:
    """Use the mean/std recorded at save time, so a change of timm's defaults cannot change outputs."""
    recorded = io.get("normalisation") or {}
    for name, module in model.named_modules():
        if not isinstance(module, Backbone) or name not in recorded:
            continue
        norm = recorded[name]
        try:
            mean = torch.tensor(norm["mean"], dtype=torch.float32).view_as(module.mean)
            std = torch.tensor(norm["std"], dtype=torch.float32).view_as(module.std)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{source}: io.normalisation[{name!r}] is malformed ({exc})") from exc
        if not (torch.equal(mean, module.mean) and torch.equal(std, module.std)):
            logger.info("%s: using the recorded normalisation of %s instead of timm's defaults", source, name)
        module.mean.copy_(mean)
        module.std.copy_(std)


# --------------------------------------------------------------------------- saving
def _unwrap(model: Any) -> MagNet:
    inner = getattr(model, "module", None)  # DistributedDataParallel / DataParallel
    if not isinstance(model, MagNet) and isinstance(inner, MagNet):
        model = inner
    if not isinstance(model, MagNet):
        raise TypeError(f"save_pretrained expects a magnet_zoo MagNet, got {type(model).__name__}")
    return model


def checkpoint_config(model: MagNet, slide_mpp: float | None = None, card: CardData | None = None) -> dict[str, Any]:
    """The content of ``config.json`` for ``model`` (with its card's data, so that a re-save keeps it)."""
    out = {
        "library": "magnet_zoo",
        "config_version": CONFIG_VERSION,
        "magnet_zoo_version": magnet_zoo.__version__,
        "model": model.config.to_dict(),
        "io": io_contract(model, slide_mpp),
    }
    if card is not None:
        out["card"] = card_to_dict(card)
    return out


def save_pretrained(
    model: MagNet,
    save_directory: str | os.PathLike[str],
    *,
    card_data: CardData | Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    training: Mapping[str, Any] | None = None,
    slide_mpp: float | None = None,
    recipe: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a checkpoint folder (``config.json``, ``model.safetensors``, ``README.md``).

    ``card_data`` fills the model card (a :class:`~magnet_zoo.hub.card.CardData` or a dict of its
    fields); without it, a model loaded from a checkpoint keeps the card it came with (training data,
    results, recipe). ``metrics`` (e.g. ``{"roc_auc": 0.84}``) and ``training`` (the recipe as
    key/value pairs) override the card's fields of the same name. ``slide_mpp`` records the µm per pixel
    (level 0) of the training slides in the I/O contract (default: the loaded model's). Existing files
    of those names are replaced; other files in the folder are left alone. ``recipe`` (the training
    recipe's ``Recipe.to_dict()``) goes into ``config.json["recipe"]``, so that the checkpoint can be
    scored as it was validated (``magnet-zoo evaluate --as-trained``). Returns the folder.
    """
    from safetensors.torch import save_file

    model = _unwrap(model)
    card = CardData.coerce(card_data if card_data is not None else getattr(model, CARD_ATTR, None))
    if metrics is not None:
        card.metrics = dict(metrics)
    if training is not None:
        card.training = dict(training)

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = checkpoint_config(model, slide_mpp, card)
    if recipe is not None:
        config["recipe"] = dict(recipe)
    card_text = render_card(
        card,
        config=config["model"],
        io=config["io"],
        counts=model.counts(),
        magnet_zoo_version=magnet_zoo.__version__,
    )
    metadata = {
        "format": "pt",
        "library": "magnet_zoo",
        "magnet_zoo_version": magnet_zoo.__version__,
        "config_version": str(CONFIG_VERSION),
    }
    tmp_weights = directory / f".{WEIGHTS_NAME}.tmp"
    try:
        save_file(state, str(tmp_weights), metadata=metadata)
    except (RuntimeError, ValueError) as exc:  # e.g. tensors sharing memory (tied weights)
        tmp_weights.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {directory / WEIGHTS_NAME}: {exc}") from exc
    os.replace(tmp_weights, directory / WEIGHTS_NAME)
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    atomic_write_text(directory / CARD_NAME, card_text)
    logger.info("saved MagNet checkpoint to %s", directory)
    return directory


# --------------------------------------------------------------------------- loading
def read_checkpoint_config(path: str | os.PathLike[str]) -> tuple[MagNetConfig, dict[str, Any]]:
    """Parse a checkpoint's ``config.json``: ``(network config, the whole JSON object)``.

    Refuses files that are not magnet_zoo checkpoints and config versions newer than this magnet_zoo.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(f"{path} does not exist") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not readable JSON ({exc}); re-download or re-export the checkpoint") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise CheckpointError(
            f"{path} is not a magnet_zoo checkpoint config (no 'model' object); magnet_zoo checkpoints are "
            "written by magnet_zoo.save_pretrained"
        )
    versions = {"config_version": raw.get("config_version"), "model.version": raw["model"].get("version")}
    for key, value in versions.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise CheckpointError(f"{path}: {key} must be a positive integer, got {value!r}")
    version = max((v for v in versions.values() if v is not None), default=CONFIG_VERSION)
    if version > CONFIG_VERSION:
        writer = raw.get("magnet_zoo_version", "a newer magnet_zoo")
        raise UnsupportedCheckpointVersionError(
            f"{path} uses config version {version} (written by magnet_zoo {writer}), but magnet_zoo "
            f"{magnet_zoo.__version__} reads config versions up to {CONFIG_VERSION}. Upgrade with "
            "`pip install -U magnet-zoo`."
        )
    try:
        config = MagNetConfig.from_dict(raw["model"])
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{path}: the model config is invalid: {exc}") from exc
    io = raw.get("io", {})
    if not isinstance(io, dict):
        raise CheckpointError(f"{path}: 'io' must be a JSON object, got {type(io).__name__}")
    _check_io(io, config, path)
    return config, raw


def read_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file on the CPU; a damaged file is a :class:`CheckpointError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path} does not exist")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}); it may be truncated or damaged: "
            "re-download or re-export it"
        ) from exc


def _preview(items: list[str]) -> str:
    shown = ", ".join(items[:_PREVIEW])
    return shown + (f", ... ({len(items) - _PREVIEW} more)" if len(items) > _PREVIEW else "")


def load_state_dict_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` only if keys and shapes match exactly; otherwise list what differs."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        (k, tuple(state[k].shape), tuple(expected[k].shape))
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_preview(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_preview(unexpected)}")
    if mismatched:
        shapes = [f"{k} is {list(got)} in the file, {list(want)} in the network" for k, got, want in mismatched]
        problems.append(f"{len(mismatched)} wrongly shaped tensor(s): {_preview(shapes)}")
    if problems:
        raise CheckpointMismatchError(
            f"{source} does not fit the network its config.json describes: {'; '.join(problems)}. "
            "The weights belong to another config or the file was edited; re-export the checkpoint.",
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        )
    model.load_state_dict(state, strict=True)


def load_checkpoint_dir(directory: str | os.PathLike[str], device: str | torch.device = "cpu") -> MagNet:
    """Build the MagNet of a checkpoint folder and load its weights (eval mode, on ``device``).

    Backbones are built without downloading ImageNet weights (``backbone_pretrained=False`` in the
    returned model's config): the checkpoint holds every weight.
    """
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointNotFoundError(f"no checkpoint folder at {directory}")
    if directory.is_file():
        raise CheckpointNotFoundError(
            f"{directory} is a file; pass the checkpoint folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    config_file = directory / CONFIG_NAME
    weights_file = directory / WEIGHTS_NAME
    if not config_file.is_file():
        raise CheckpointNotFoundError(
            f"{directory} has no {CONFIG_NAME}, so it is not a magnet_zoo checkpoint folder (expected "
            f"{', '.join(CHECKPOINT_FILES)} as written by magnet_zoo.save_pretrained)"
        )
    config, raw = read_checkpoint_config(config_file)
    if not weights_file.is_file():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = (
            f" It holds {', '.join(pickles)}: magnet_zoo never unpickles weights; convert them to safetensors."
            if pickles
            else ""
        )
        raise CheckpointNotFoundError(f"{directory} has no {WEIGHTS_NAME}.{hint}")
    state = read_weights(weights_file)
    model = MagNet(config.replace(backbone_pretrained=False))
    load_state_dict_strict(model, state, str(weights_file))
    _apply_normalisation(model, raw.get("io", {}), config_file)
    setattr(model, TRAINED_MPP_ATTR, raw.get("io", {}).get("slide_mpp"))
    setattr(model, CARD_ATTR, _read_card(raw, directory / CARD_NAME))
    return model.to(device).eval()


def _read_card(raw: Mapping[str, Any], card_file: Path) -> CardData | None:
    """The card data of a checkpoint: from ``config.json["card"]``, else parsed from its ``README.md``."""
    if isinstance(raw.get("card"), dict):
        try:
            return card_from_dict(raw["card"])
        except (TypeError, ValueError) as exc:
            logger.warning("%s: ignoring the malformed card data in config.json (%s)", card_file.parent, exc)
    if card_file.is_file():
        try:
            return parse_card(card_file.read_text(encoding="utf-8"))
        except Exception as exc:  # a hand-written card: keep loading, lose only the re-save of it
            logger.warning("%s: could not read the model card (%s); a re-save writes a default card", card_file, exc)
    return None
