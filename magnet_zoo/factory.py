"""Build registered MagNets: ``create_model`` joins the registry (data) and the network (``nn``).

One meaning per name, timm's: a name is an architecture and a tag of weights (``magnet2_micro`` is
``magnet2_micro.synthmets_demo``). ``create_model(name)`` builds the *architecture* with fresh weights
(ImageNet backbones where the config says ``backbone_pretrained``); ``create_model(name,
pretrained=True)`` and ``load_pretrained(name)`` give the tag's trained weights. Building a name whose
tag has trained weights without them is logged, so that nobody trains or predicts with random weights
believing they are the shipped ones.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any
from urllib.parse import urlparse

from magnet_zoo.config import MagNetConfig
from magnet_zoo.nn.magnet import MagNet
from magnet_zoo.registry import get_config, resolve

log = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 3.0
"""How long ``create_model`` waits for the Hub before calling ImageNet weights unreachable."""
_TIMM_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_DOWNLOAD_ERRORS = {
    "LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError", "ConnectTimeout", "ReadTimeout",
    "ConnectError", "HfHubHTTPError",
}
_noted: set[str] = set()


class BackboneWeightsUnavailableError(RuntimeError):
    """ImageNet backbone weights are needed, not in the Hugging Face cache, and the Hub is unreachable."""


def create_model(name: str, *, pretrained: bool = False, **overrides: Any) -> MagNet:
    """Build a registered MagNet, timm style.

    ``overrides`` are :class:`~magnet_zoo.config.MagNetConfig` fields, e.g.
    ``create_model("magnet3_inception_v3", backbone_pretrained=False)`` builds it without
    downloading ImageNet weights. ``pretrained=True`` loads the trained weights of the name's tag
    (:func:`magnet_zoo.load_pretrained`; overrides are then refused: they would not fit the weights).

    Raises :class:`BackboneWeightsUnavailableError` at once (no retries) when the config wants ImageNet
    backbones that are neither in the Hugging Face cache nor downloadable.
    """
    arch, tag_name, _, tag = resolve(name)
    if pretrained:
        if overrides:
            raise ValueError(
                f"create_model({name!r}, pretrained=True) loads trained weights; config overrides "
                f"({', '.join(sorted(overrides))}) would not fit them. Drop them, or build the architecture "
                "with pretrained=False"
            )
        from magnet_zoo.hub.pretrained import load_pretrained

        return load_pretrained(f"{arch}.{tag_name}")
    if tag.has_weights and f"{arch}.{tag_name}" not in _noted:  # once per name and process
        _noted.add(f"{arch}.{tag_name}")
        log.warning(
            "create_model(%r) builds the %s architecture with fresh (untrained) weights; the trained weights "
            "of %s.%s come with create_model(%r, pretrained=True) or load_pretrained(%r)",
            name, arch, arch, tag_name, name, name,
        )
    config = get_config(name, **overrides)
    if config.backbone_pretrained:
        check_backbone_weights(config, name)
    try:
        return MagNet(config)
    except Exception as exc:
        if config.backbone_pretrained and _looks_like_download_failure(exc):
            raise BackboneWeightsUnavailableError(_unavailable_message(name, config, str(exc))) from exc
        raise


def _backbones(config: MagNetConfig) -> list[str]:
    names = [config.classifier_backbone]
    if config.active_aux_layers:
        names.append(config.aux_backbone)
    return list(dict.fromkeys(names))


def _hub_ids(config: MagNetConfig) -> dict[str, str | None]:
    """timm's Hugging Face repo of each backbone's default pretrained weights (``None``: not on the Hub)."""
    from timm.models import get_pretrained_cfg

    out: dict[str, str | None] = {}
    for backbone in _backbones(config):
        try:
            cfg = get_pretrained_cfg(backbone)
        except Exception:  # an unknown name: timm itself says so when the network is built
            cfg = None
        out[backbone] = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    return out


def _cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in _TIMM_WEIGHT_FILES)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true")


def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> tuple[bool, str]:
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, ""
    except OSError as exc:
        return False, f"{host}:{port}: {exc}"


def check_backbone_weights(config: MagNetConfig, name: str | None = None) -> None:
    """Fail fast, before building anything, when ImageNet weights are missing and cannot be fetched."""
    missing = [repo for repo in _hub_ids(config).values() if repo is not None and not _cached(repo)]
    if not missing:
        return
    if _offline():
        reason = "HF_HUB_OFFLINE is set"
    else:
        ok, reason = _hub_reachable()
        if ok:
            return
    raise BackboneWeightsUnavailableError(_unavailable_message(name, config, reason, missing))


def _unavailable_message(name: str | None, config: MagNetConfig, reason: str, repos: list[str] | None = None) -> str:
    backbones = ", ".join(_backbones(config))
    repos = repos or [r for r in _hub_ids(config).values() if r]
    call = f"create_model({name or 'name'!r}, backbone_pretrained=False)"
    return (
        f"the ImageNet weights of the backbones ({backbones}) are not in the Hugging Face cache and cannot be "
        f"downloaded ({reason}). Either build the network without them: {call} (random backbones; what "
        "load_pretrained does anyway, since a checkpoint holds every weight), or go online once (or run "
        f"`hf download {repos[0] if repos else 'timm/<backbone>'}`) so that they are cached."
    )


def _looks_like_download_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause) is the Hub client failing to fetch weights, not a bug."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        kind = type(exc).__name__
        text = str(exc)
        if kind in _DOWNLOAD_ERRORS or isinstance(exc, (ConnectionError, socket.gaierror)):
            return True
        if "client has been closed" in text or "Name or service not known" in text or "huggingface.co" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False
