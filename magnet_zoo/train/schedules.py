"""What the recipe changes as training progresses: learning rates, the scale bound, the entmax
temperature, crop jitter, and the scale prior.

Each is a pure function of *progress* ``p`` in [0, 1] (the share of the planned training done), so the
loop's checkpointed step and elapsed time are all the state they need.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from magnet_zoo.nn.magnet import MagNet


def cosine(t: float, start: float, end: float) -> float:
    """Cosine interpolation from ``start`` (``t = 0``) to ``end`` (``t >= 1``)."""
    t = min(max(t, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def lr_factor(progress: float, warmup: float, schedule: str = "cosine", step_share: float = 0.0) -> float:
    """Share of the base learning rate at ``progress``: linear warm-up over the first ``warmup`` of training,
    then cosine annealing to 0 (or constant). ``step_share`` (1 / planned steps) makes the warm-up's first
    step a small, non-zero rate: step ``k`` of ``n`` during the warm-up gets ``(k + 1) / (warmup * n)``."""
    if warmup > 0 and progress < warmup:
        return min(max((progress + step_share) / warmup, 1e-3), 1.0)
    if schedule == "constant":
        return 1.0
    return cosine((progress - warmup) / max(1.0 - warmup, 1e-12), 1.0, 0.0)


def set_max_scale(model: MagNet, value: float) -> None:
    for layer in model.layers:
        layer.max_scale = value


def set_min_scale(model: MagNet, starts: Sequence[float], t: float) -> None:
    """Set every layer's lower scale bound: from ``starts`` per layer (the last entry repeats; the config's
    ``min_scale`` where that is larger) to the config's ``min_scale`` along a cosine as ``t`` goes from 0 to 1,
    never above the layer's current upper bound."""
    floor = model.config.min_scale
    for i, layer in enumerate(model.layers):
        start = max(starts[min(i, len(starts) - 1)], floor) if starts else floor
        layer.min_scale = min(cosine(t, start, floor), layer.max_scale)


def set_temperature(model: MagNet, value: float) -> None:
    for layer in model.layers:
        layer.temperature = value


def set_crop_jitter(model: MagNet, jitter: Sequence[float], t: float) -> None:
    """Set every layer's crop-centre noise: ``jitter`` per layer (the last entry repeats), falling to zero
    along a cosine as ``t`` (the share of the jitter schedule done) goes from 0 to 1."""
    fade = 0.5 * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))
    for i, layer in enumerate(model.layers):
        start = jitter[min(i, len(jitter) - 1)] if jitter else 0.0
        layer.jitter = start * fade if start > 0 else 0.0


def apply_progress(model: MagNet, recipe: Any, progress: float) -> None:
    """Set the anneals and the jitter of ``recipe`` for ``progress`` (training values)."""
    cfg = model.config
    frac = max(recipe.anneal_frac, 1e-12)
    if recipe.max_scale_start is not None:
        set_max_scale(model, cosine(progress / frac, recipe.max_scale_start, cfg.max_scale))
    if recipe.temperature_start is not None:
        set_temperature(model, cosine(progress / frac, recipe.temperature_start, cfg.attention_temperature))
    if recipe.min_scale_start:
        set_min_scale(model, recipe.min_scale_start, progress / max(recipe.min_scale_frac, 1e-12))
    set_crop_jitter(model, recipe.jitter, progress / max(recipe.jitter_frac, 1e-12))


def apply_final(model: MagNet) -> None:
    """The values the network is evaluated and saved with: the config's bounds, no jitter."""
    cfg = model.config
    set_max_scale(model, cfg.max_scale)
    set_temperature(model, cfg.attention_temperature)
    for layer in model.layers:
        layer.min_scale = cfg.min_scale
        layer.jitter = 0.0


def anneals_done(recipe: Any, progress: float) -> bool:
    """Whether the network now runs with its final settings (a 'best' checkpoint must)."""
    annealing = recipe.max_scale_start is not None or recipe.temperature_start is not None
    if annealing and progress < recipe.anneal_frac:
        return False
    return not recipe.min_scale_start or progress >= recipe.min_scale_frac


def scale_prior(model: MagNet, affines: list[Any], targets: Sequence[float]) -> torch.Tensor:
    """``mean(relu(s - target)^2)`` over every learned crop of every layer."""
    terms = []
    for layer_idx, (layer, aff) in enumerate(zip(model.layers, affines, strict=True)):
        target = targets[min(layer_idx, len(targets) - 1)]
        learned = (layer.slot >= 0).view(1, layer.num_nodes, layer.num_patches)
        excess = torch.relu(aff.scale - target) ** 2
        terms.append(excess.masked_select(learned.expand_as(excess)))
    flat = torch.cat(terms) if terms else torch.zeros(1)
    return flat.mean() if flat.numel() else flat.sum()
