"""timm-style model registry: variants are data (a config per name), not a function per variant.

Names are ``arch.tag``. ``arch`` fixes the network (tree shape, backbones); ``tag`` says what its
weights are; a name without a tag takes the arch's default tag. This module holds data only; it
builds nothing (``magnet_zoo.factory.create_model`` does).
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any

from magnet_zoo.config import MagNetConfig


class UnknownModelError(KeyError):
    """No registered model has this name."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0])


@dataclass(frozen=True)
class ModelTag:
    """One set of weights (or none) for an architecture."""

    description: str
    hub_repo: str | None = None
    hub_revision: str | None = None
    packaged: str | None = None
    """Weights shipped inside the installed package: ``"module:folder"`` (e.g. the offline demo)."""
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def has_weights(self) -> bool:
        return bool(self.hub_repo or self.packaged)


@dataclass(frozen=True)
class ModelArch:
    config: MagNetConfig
    description: str
    tags: dict[str, ModelTag]
    default_tag: str


_REGISTRY: dict[str, ModelArch] = {}

TINY_BACKBONE = "resnet10t"
"""Smallest standard timm CNN we use for CPU-friendly variants (about 5 M parameters)."""


def register_model(name: str, arch: ModelArch) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    if arch.default_tag not in arch.tags:
        raise ValueError(f"default tag {arch.default_tag!r} of {name!r} is not among its tags")
    _REGISTRY[name] = arch


# Every registered model takes the crop centre as the attention's expected position itself
# (translation="clamp"), a documented deviation from the paper's tanh (eq. 2-3), which does not learn on
# FindIt (docs/learn_to_look.md); the `paper` recipe trains with tanh.
_IN1K = ModelTag(
    "Backbones start from timm's ImageNet weights; attention is untrained. Fine-tune with "
    "`magnet-zoo train` before use."
)
_SCRATCH = ModelTag("Every weight randomly initialised; no download needed. For tests and quick CPU runs.")

register_model(
    "magnet3_inception_v3",
    ModelArch(
        MagNetConfig(patches=(3, 2, 3), translation="clamp"),
        "The paper's 3-layer MagNet (3, 2, 3): 10 images of 56x56 and 18 of 224x224 per slide.",
        {"in1k": _IN1K},
        "in1k",
    ),
)
register_model(
    "magnet4_inception_v3",
    ModelArch(
        MagNetConfig(patches=(3, 2, 3, 2), translation="clamp"),
        "The paper's 4-layer MagNet (3, 2, 3, 2): 28 images of 56x56 and 36 of 224x224 per slide.",
        {"in1k": _IN1K},
        "in1k",
    ),
)
_TINY = dict(
    translation="clamp",
    classifier_backbone=TINY_BACKBONE,
    aux_backbone=TINY_BACKBONE,
    backbone_pretrained=False,
    final_patch_size=64,
    gru_hidden=64,
    mlp_hidden=(64, 32),
)
register_model(
    "magnet2_tiny",
    ModelArch(
        MagNetConfig(patches=(2, 2), aux_layers=(1, 2), **_TINY),
        "A 2-layer (2, 2) MagNet with ResNet-10t backbones and 64x64 final patches: trains on a "
        "CPU in minutes.",
        {"scratch": _SCRATCH},
        "scratch",
    ),
)
register_model(
    "magnet3_tiny",
    ModelArch(
        MagNetConfig(patches=(3, 2, 3), **_TINY),
        "The paper's (3, 2, 3) tree with ResNet-10t backbones and 64x64 final patches: a CPU-sized "
        "stand-in for magnet3_inception_v3.",
        {"scratch": _SCRATCH},
        "scratch",
    ),
)


register_model(
    "magnet2_micro",
    ModelArch(
        MagNetConfig(
            patches=(1, 2),
            aux_layers=(1, 2),
            classifier_backbone="test_resnet",
            aux_backbone="test_resnet",
            backbone_pretrained=False,
            final_patch_size=64,
            gru_hidden=64,
            mlp_hidden=(64, 32),
            translation="clamp",
            min_scale=0.1,
            max_scale=0.35,
            attention_init="random",
            aux_pooling="per_patch",
        ),
        "A 2-layer (1, 2) MagNet with timm's 0.4 M-parameter test_resnet backbones (1.2 M parameters in "
        "all): one first-layer crop, magnified once more; the architecture the default recipe, "
        "learn_to_look_mil, was measured on, and the offline demo model's. Until 2026-12-07 it was a (2, 2) "
        "tree (patches=[2,2] builds that one).",
        {
            "synthmets_demo": ModelTag(
                "Trained on SynthMets slides by benchmarks/synthmets.py; ships inside the package "
                "(see model_cards/magnet2_micro.synthmets_demo.md). Synthetic data only.",
                packaged="magnet_zoo.demo:checkpoint",
            )
        },
        "synthmets_demo",
    ),
)


def split_name(name: str) -> tuple[str, str | None]:
    arch, _, tag = name.partition(".")
    return arch, (tag or None)


def list_models(pattern: str = "*", with_tags: bool = True) -> list[str]:
    """Registered model names matching a shell-style ``pattern`` (``"magnet3*"``), sorted."""
    names = []
    for arch_name, arch in _REGISTRY.items():
        candidates = [f"{arch_name}.{t}" for t in arch.tags] if with_tags else [arch_name]
        names.extend(n for n in candidates if fnmatch.fnmatch(n, pattern) or fnmatch.fnmatch(arch_name, pattern))
    return sorted(names)


def resolve(name: str) -> tuple[str, str, ModelArch, ModelTag]:
    """``(arch, tag, ModelArch, ModelTag)`` for ``name``, or :class:`UnknownModelError` with hints."""
    arch_name, tag = split_name(name)
    arch = _REGISTRY.get(arch_name)
    if arch is None:
        close = difflib.get_close_matches(arch_name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownModelError(
            f"Unknown model {name!r}.{hint} `magnet_zoo.list_models()` lists the registered names."
        )
    tag = tag or arch.default_tag
    if tag not in arch.tags:
        raise UnknownModelError(
            f"Model {arch_name!r} has no tag {tag!r}; its tags are: {', '.join(sorted(arch.tags))}."
        )
    return arch_name, tag, arch, arch.tags[tag]


def get_config(name: str, **overrides: Any) -> MagNetConfig:
    """The :class:`MagNetConfig` registered under ``name`` with ``overrides`` applied."""
    _, _, arch, tag = resolve(name)
    cfg = arch.config
    if tag.overrides:
        cfg = cfg.replace(**tag.overrides)
    return cfg.replace(**overrides) if overrides else cfg

