"""``load_pretrained``: one entry point for a checkpoint folder, a Hub repo or a registered name."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from magnet_zoo.hub.checkpoint import load_checkpoint_dir
from magnet_zoo.hub.errors import CheckpointNotFoundError, InvalidRepoIdError, NoPretrainedWeightsError
from magnet_zoo.hub.remote import HF_HUB_PREFIX, download_checkpoint, is_repo_id, parse_repo_spec
from magnet_zoo.nn.magnet import MagNet
from magnet_zoo.registry import UnknownModelError, list_models, resolve

logger = logging.getLogger(__name__)


def models_with_weights() -> list[str]:
    """Registered names whose tag points at a Hub repo or at weights shipped in the package."""
    return [name for name in list_models() if resolve(name)[3].has_weights]


def packaged_checkpoint(spec: str) -> Path:
    """The folder of weights shipped in the package, from a ``"module:folder"`` registry entry."""
    import importlib.resources

    module, _, folder = spec.partition(":")
    path = Path(str(importlib.resources.files(module))) / folder
    if not (path / "model.safetensors").is_file():
        raise CheckpointNotFoundError(
            f"the packaged checkpoint {spec!r} is missing from {path}; reinstall magnet-zoo"
        )
    return path


def _no_weights(name: str, description: str) -> NoPretrainedWeightsError:
    published = models_with_weights()
    have = ", ".join(published) if published else "none yet"
    return NoPretrainedWeightsError(
        f"No pretrained weights are published for {name!r} ({description}). Train your own with "
        f"`magnet-zoo train --data labels.csv --model {name} --out DIR` and load them with "
        f"load_pretrained('DIR'), or pass a checkpoint folder or a Hub repo id ('org/name'). For the "
        f"untrained network use magnet_zoo.create_model({name!r}). Registered models with weights: {have}."
    )


def _looks_like_path(text: str) -> bool:
    """Unmistakably a path (``./x``, ``~/x``, ``/x``, ``C:\\x``, ``x\\y`` on Windows), never ``org/name``."""
    return text.startswith((".", "~")) or os.path.isabs(text) or (os.sep != "/" and os.sep in text)


def load_pretrained(
    name_or_repo_or_dir: str | os.PathLike[str],
    revision: str | None = None,
    device: str | torch.device = "cpu",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> MagNet:
    """A trained MagNet in eval mode on ``device``.

    ``name_or_repo_or_dir`` is, in this order:

    - a checkpoint folder (``config.json`` + ``model.safetensors``), e.g. one written by
      :func:`save_pretrained` or by ``hf download org/name --local-dir DIR``;
    - ``"hf-hub:org/name"`` or ``"org/name"`` (optionally ``"...@revision"``): a Hub repo, fetched
      through the Hugging Face cache (works offline with ``HF_HUB_OFFLINE=1`` once cached);
    - a registered name (``magnet_zoo.list_models()``) whose tag points at a Hub repo; its pinned
      revision is used unless ``revision`` is given.

    ``revision`` (branch, tag or commit) applies to Hub repos only. ``cache_dir``, ``token`` and
    ``local_files_only`` are passed to huggingface_hub. Nothing is unpickled, and no ImageNet
    weights are downloaded: the checkpoint holds every weight.
    """
    if isinstance(name_or_repo_or_dir, os.PathLike):
        return _load_dir(Path(name_or_repo_or_dir), revision, device)
    if not isinstance(name_or_repo_or_dir, str) or not name_or_repo_or_dir:
        raise TypeError(f"load_pretrained expects a folder, a Hub repo id or a model name, got {name_or_repo_or_dir!r}")
    spec = name_or_repo_or_dir

    if spec.startswith(HF_HUB_PREFIX):
        repo_id, rev = parse_repo_spec(spec, revision)
        return _load_hub(repo_id, rev, device, cache_dir, token, local_files_only)
    if os.path.exists(spec) or _looks_like_path(spec):
        return _load_dir(Path(spec), revision, device)  # a missing path gets a clear "no checkpoint folder" error

    if "/" not in spec:
        try:
            arch_name, tag_name, _, tag = resolve(spec)
        except UnknownModelError as exc:
            raise CheckpointNotFoundError(f"{exc} Or pass a checkpoint folder or a Hub repo id ('org/name').") from exc
        registered = f"{arch_name}.{tag_name}"
        if tag.packaged and not tag.hub_repo:
            folder = packaged_checkpoint(tag.packaged)
            model = _load_dir(folder, revision, device)
            return _mark(model, name=registered, source="registered (packaged)", revision=magnet_zoo_version(),
                         path=folder)
        if not tag.hub_repo:
            raise _no_weights(registered, tag.description)
        rev = revision or tag.hub_revision
        if rev is None:
            logger.warning("%s points at %s without a pinned revision; using its main branch", registered, tag.hub_repo)
        repo_id, rev = parse_repo_spec(tag.hub_repo, rev)
        model = _load_hub(repo_id, rev, device, cache_dir, token, local_files_only)
        model.pretrained_source["name"] = registered
        model.pretrained_source["source"] = f"registered (hub:{repo_id})"
        return model

    repo_part = spec.partition("@")[0]
    if is_repo_id(repo_part):
        repo_id, rev = parse_repo_spec(spec, revision)
        return _load_hub(repo_id, rev, device, cache_dir, token, local_files_only)
    raise InvalidRepoIdError(
        f"{spec!r} is neither a checkpoint folder, a Hub repo id ('org/name' or 'hf-hub:org/name') nor a "
        "registered model name (see magnet_zoo.list_models())"
    )


def _mark(model: MagNet, **source: object) -> MagNet:
    """Record on ``model`` what was loaded (name asked for, kind, revision, folder): outputs cite it."""
    model.pretrained_source = {k: (str(v) if isinstance(v, Path) else v) for k, v in source.items()}
    return model


def _load_dir(path: Path, revision: str | None, device: str | torch.device) -> MagNet:
    if revision is not None:
        raise InvalidRepoIdError(
            f"revision={revision!r} applies to Hub repos, not to the local folder {path}; drop it or pass 'org/name'"
        )
    folder = path.expanduser()
    return _mark(load_checkpoint_dir(folder, device), name=str(path), source="folder", revision=None,
                 path=folder.resolve())


def _load_hub(
    repo_id: str,
    revision: str | None,
    device: str | torch.device,
    cache_dir: str | os.PathLike[str] | None,
    token: str | bool | None,
    local_files_only: bool,
) -> MagNet:
    folder = download_checkpoint(repo_id, revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
    # The Hub cache keeps every snapshot in a folder named after its commit: the revision actually loaded.
    commit = folder.name if len(folder.name) == 40 else revision
    return _mark(load_checkpoint_dir(folder, device), name=repo_id, source="hub", revision=commit, path=folder)


def magnet_zoo_version() -> str:
    """Weights shipped in the package are pinned by the package version."""
    import magnet_zoo

    return f"magnet_zoo {magnet_zoo.__version__}"
