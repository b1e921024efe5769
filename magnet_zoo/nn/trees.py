"""Sampled zoom trees: several trees per slide, each learned crop centre drawn from the attention.

A MagNet's crop is normally its attention map's expectation, so a slide has one deterministic zoom tree.
The paper's "more exhaustive exploration" runs the network ``K`` times instead, each learned crop centre
drawn from the attention (:func:`magnet_zoo.nn.attention.attention_to_affine`'s ``sample``; the crop's
scale stays the map's), and pools the ``K`` results. At inference the centres are drawn by default from
each layer's sparse entmax map itself, the map whose expectation the deterministic crop is
(``source="entmax"``, no uniform share). Training explores with a dense policy instead,
``(1 - e) softmax(logits / T) + e uniform`` (:func:`magnet_zoo.train.exploration.set_exploration`), whose
tail reaches every position; ``source="softmax"`` uses it at inference too. Measured on FindIt, the
softmax's tail costs accuracy and moves the crops off the object; the entmax map keeps them far nearer
the expected crop (docs/learn_to_look.md).

Pooling (``pool``): by default the slide's probability is the mean of the ``K`` trees' probabilities (a
Monte-Carlo estimate of the expected probability under the sampling policy), not the sigmoid of the mean
logit: a tree that lands on the evidence and is confident moves the mean by at most ``1 / K``, which keeps
the result in the units every tree reports. ``pool="max"`` takes the largest tree probability instead:
multiple-instance pooling over the trees, for a MagNet trained that way (recipe field ``tree_mil``,
:mod:`magnet_zoo.train.exploration`): a tumour slide needs one tree that found the tumour.
``PooledOutput.logits`` is the logit of the pooled probability.

Reproducibility: tree ``k`` draws from its own CPU ``torch.Generator`` seeded from ``(seed, k)``, never
from the global RNG, so the same seed gives the same trees on any device, and the first trees of a
``K = 4`` run are those of a ``K = 2`` run. The draws of one forward pass cover the whole batch, so a
slide's trees depend on the slides batched with it; predict one slide at a time for per-slide
reproducibility (``magnet_zoo.predict_slide`` does).

Cost: ``K`` forward passes, ``K`` times the values fed to the networks and about ``K`` times the pixels
read (the slide's overview is read again by every tree).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from magnet_zoo.nn.attention import SAMPLE_SOURCES

DEFAULT_TEMPERATURE = 1.0
"""The sampling policy's softmax temperature by default (the exploring recipes' ``explore_temperature``)."""
DEFAULT_UNIFORM = 0.05
"""The policy's uniform share by default (the exploring recipes' ``explore_uniform``)."""
DEFAULT_SOURCE = "softmax"
"""What :func:`sampling_policy` draws the centres from by default (:data:`~magnet_zoo.nn.attention.
SAMPLE_SOURCES`): the dense softmax the exploring recipes train with (a score-function gradient needs
every position drawable)."""
INFERENCE_SOURCE = "entmax"
"""What sampled trees at *inference* draw from by default (:func:`pooled_forward`, ``predict_slide``, the
toolkits): each layer's sparse entmax map, the map the expected crop averages. Measured on FindIt it keeps
accuracy and the crops far nearer the expected crop's than the softmax does (docs/learn_to_look.md)."""
INFERENCE_UNIFORM = 0.0
"""The inference policy's uniform share by default: none (a crop spent anywhere at random helps no
prediction; the share is for exploration while training)."""


TREE_POOLS = ("mean", "max")
"""How :func:`pooled_forward` pools the trees' probabilities (see the module doc)."""


def check_pool(pool: str) -> str:
    if pool not in TREE_POOLS:
        raise ValueError(f"tree pooling must be one of {TREE_POOLS}, got {pool!r}")
    return pool


def check_trees(trees: int | None) -> int | None:
    """``trees`` as given to ``predict_slide`` or ``evaluate``: ``None`` (or 1) for the expected crop, else
    ``K >= 2``."""
    if trees is None:
        return None
    if isinstance(trees, bool) or int(trees) != trees or trees < 1:
        raise ValueError(f"trees must be None or an integer >= 1, got {trees!r}")
    return None if int(trees) == 1 else int(trees)


@dataclass(frozen=True)
class TreePolicy:
    """How sampled trees are drawn and pooled at inference: the keyword arguments of :func:`pooled_forward`
    besides ``trees`` and ``seed``. The default is the inference default (sparse entmax maps, no uniform
    share, mean of the probabilities); a MagNet trained with ``tree_mil`` is used with the policy it
    trained on, max-pooled (:func:`magnet_zoo.train.exploration.mil_inference`)."""

    source: str = INFERENCE_SOURCE
    temperature: float = DEFAULT_TEMPERATURE
    uniform: float = INFERENCE_UNIFORM
    pool: str = "mean"

    def __post_init__(self) -> None:
        sampling_policy(self.temperature, self.uniform, source=self.source)
        check_pool(self.pool)

    def kwargs(self) -> dict[str, Any]:
        return {"source": self.source, "temperature": float(self.temperature), "uniform": float(self.uniform),
                "pool": self.pool}


def sampling_policy(
    temperature: float = DEFAULT_TEMPERATURE,
    uniform: float = DEFAULT_UNIFORM,
    *,
    source: str = DEFAULT_SOURCE,
    generator: torch.Generator | None = None,
    in_eval: bool = False,
) -> dict[str, Any]:
    """The ``sample`` dictionary of :func:`~magnet_zoo.nn.attention.attention_to_affine` (a layer's
    ``sample_policy``): ``temperature`` ``> 0``, ``uniform`` in ``[0, 1]``, ``source`` one of
    :data:`~magnet_zoo.nn.attention.SAMPLE_SOURCES`; ``generator`` for the draws (the global RNG without);
    ``in_eval`` also samples in eval mode (otherwise only in training mode)."""
    if not float(temperature) > 0:
        raise ValueError(f"the sampling temperature must be > 0, got {temperature}")
    if not 0.0 <= float(uniform) <= 1.0:
        raise ValueError(f"the sampling policy's uniform share must lie in [0, 1], got {uniform}")
    if source not in SAMPLE_SOURCES:
        raise ValueError(f"the sampling source must be one of {SAMPLE_SOURCES}, got {source!r}")
    policy: dict[str, Any] = {"temperature": float(temperature), "uniform": float(uniform)}
    if source != DEFAULT_SOURCE:
        policy["source"] = source
    if generator is not None:
        policy["generator"] = generator
    if in_eval:
        policy["eval"] = True
    return policy


def multiple_instance_output(model: Any, tree: Any, trees: int) -> Any:
    """Score each slide as multiple-instance learning over its ``trees`` zoom trees.

    ``tree`` is one forward pass of ``model`` (a :class:`~magnet_zoo.nn.magnet.MagNet`) over ``trees * B``
    slides, tree-major (slide ``i`` of tree ``t`` is entry ``t * B + i``). The result is a
    :class:`~magnet_zoo.nn.magnet.MagNetOutput` over the ``B`` slides whose classifier logit is the largest
    over the trees and whose auxiliary heads pool the patches of all trees as the config says
    (``aux_pooling``: per patch or their maximum; ``"mean"`` runs the heads again over every patch of every
    tree): a tumour slide needs one tree that shows the tumour. Trees, accounting and final patches are the
    first tree's; ``affines`` is empty (the sampled crops' parameters stay in ``tree``)."""
    from magnet_zoo.nn.magnet import MagNetOutput

    if trees < 1 or len(tree.logits) % trees:
        raise ValueError(f"{len(tree.logits)} slides cannot be {trees} trees of the same slides")
    b = len(tree.logits) // trees
    pooling = model.config.aux_pooling
    crops, patch = tree.crops, tree.aux_patch_logits
    aux_logits: dict[int, torch.Tensor] = {}
    aux_patch_logits: dict[int, torch.Tensor] = {}
    for layer in model.config.active_aux_layers:
        if pooling in ("per_patch", "max"):
            per = patch[layer].view(trees, b, -1).permute(1, 0, 2).reshape(b, -1)
            aux_patch_logits[layer] = per
            aux_logits[layer] = per.mean(1) if pooling == "per_patch" else per.amax(1)
        else:  # mean pooling: the heads' own pooled logit, over every patch of every tree
            c = crops[layer]
            aux_logits[layer] = model.aux_heads[str(layer)](
                c.view(trees, b, *c.shape[1:]).transpose(0, 1).reshape(b, -1, *c.shape[2:])
            )
    return MagNetOutput(
        logits=tree.logits.view(trees, b).amax(0),
        aux_logits=aux_logits,
        trees=tree.trees[:b],
        accounting=tree.accounting[:b],
        affines=[],
        final_patches=tree.final_patches[:b],
        crops=crops,
        aux_patch_logits=aux_patch_logits,
        aux_pooling=pooling,
    )


def _layers(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    return getattr(model, "module", model).layers  # DataParallel / DDP wrap the MagNet


def set_sampling(model: torch.nn.Module, policy: dict[str, Any] | None) -> None:
    """Give every magnifying layer of ``model`` the sampling ``policy`` (``None``: expected crops)."""
    for layer in _layers(model):
        layer.sample_policy = policy


@contextmanager
def sampled_trees(
    model: torch.nn.Module,
    temperature: float = DEFAULT_TEMPERATURE,
    uniform: float = INFERENCE_UNIFORM,
    *,
    source: str = INFERENCE_SOURCE,
    generator: torch.Generator | None = None,
) -> Iterator[None]:
    """Within the block, every forward pass of ``model`` draws its learned crop centres from the
    attention, in eval mode as in training mode; the layers' previous policies come back on exit."""
    layers = _layers(model)
    before = [layer.sample_policy for layer in layers]
    set_sampling(model, sampling_policy(temperature, uniform, source=source, generator=generator, in_eval=True))
    try:
        yield
    finally:
        for layer, policy in zip(layers, before, strict=True):
            layer.sample_policy = policy


def tree_generator(seed: int, tree: int) -> torch.Generator:
    """The CPU generator of tree ``tree`` under ``seed`` (both ``>= 0``): independent streams per pair."""
    if int(seed) < 0 or int(tree) < 0:
        raise ValueError(f"seed and tree index must be >= 0, got {seed} and {tree}")
    state = np.random.SeedSequence([int(seed), int(tree)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


@dataclass
class PooledOutput:
    """``K`` sampled zoom trees over the same ``B`` slides and their pooled probability."""

    outputs: list[Any]
    """The ``K`` trees' :class:`~magnet_zoo.nn.magnet.MagNetOutput`, in tree order."""
    tree_probs: torch.Tensor
    """``(K, B)``: each tree's probability for each slide."""
    probs: torch.Tensor
    """``(B,)``: the pooled probability: the mean (or with ``pool="max"`` the largest) of ``tree_probs``
    over the trees."""
    seed: int
    temperature: float
    uniform: float
    source: str = INFERENCE_SOURCE
    pool: str = "mean"

    @property
    def num_trees(self) -> int:
        return len(self.outputs)

    @property
    def logits(self) -> torch.Tensor:
        """``(B,)``: the logit of the pooled probability."""
        return torch.logit(self.probs.double(), eps=1e-12).to(self.probs.dtype)

    def representative(self) -> list[int]:
        """Per slide, the tree whose probability is closest to the pooled one (the first on a tie): the
        tree a prediction shows, since no single sampled tree is *the* tree of a pooled result."""
        gap = (self.tree_probs - self.probs.unsqueeze(0)).abs()
        return [int(i) for i in gap.argmin(0).tolist()]

    def accounting(self) -> list[dict[str, Any]]:
        """Per slide, the trees' accounting summed (images and values fed, pixels read) plus ``trees``
        (``K``) and ``pixels_read_per_tree``."""
        out = []
        for i in range(len(self.probs)):
            parts = [o.accounting[i] for o in self.outputs]
            total = _sum_counts(parts)
            total["trees"] = self.num_trees
            total["pixels_read_per_tree"] = [int(p.get("pixels_read", 0)) for p in parts]
            out.append(total)
        return out


def _sum_counts(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Key-wise sum of accounting dictionaries (numbers added, nested dictionaries summed alike)."""
    total: dict[str, Any] = {}
    for key, first in parts[0].items():
        values = [p[key] for p in parts]
        if isinstance(first, dict):
            total[key] = _sum_counts(values)
        elif isinstance(first, int | float) and not isinstance(first, bool):
            total[key] = sum(values)
        else:
            total[key] = first
    return total


def pooled_forward(
    model: torch.nn.Module,
    fetchers: Sequence[Any],
    *,
    trees: int,
    seed: int = 0,
    temperature: float = DEFAULT_TEMPERATURE,
    uniform: float = INFERENCE_UNIFORM,
    source: str = INFERENCE_SOURCE,
    pool: str = "mean",
    **forward_kwargs: Any,
) -> PooledOutput:
    """Run ``model`` ``trees`` times over ``fetchers``, each pass a sampled zoom tree (see the module
    doc), and pool: the returned ``probs`` are the mean of the trees' probabilities (``pool="max"``:
    their largest).

    The model runs in whatever mode it is in (call ``model.eval()`` first for inference; gradients as
    the caller's context allows); ``forward_kwargs`` go to every pass. ``trees`` must be ``>= 1``;
    ``trees = 1`` is *one sampled tree*, not the expected crop. By default every centre is drawn from its
    layer's sparse entmax map with no uniform share (``INFERENCE_SOURCE``, ``INFERENCE_UNIFORM``;
    ``temperature`` is then unused); ``source="softmax"`` draws from ``softmax(logits / temperature)``, the
    exploring recipes' policy.
    """
    if isinstance(trees, bool) or int(trees) != trees or trees < 1:
        raise ValueError(f"trees must be an integer >= 1, got {trees!r}")
    sampling_policy(temperature, uniform, source=source)  # validate before the first pass
    check_pool(pool)
    outputs = []
    for k in range(int(trees)):
        with sampled_trees(model, temperature, uniform, source=source, generator=tree_generator(seed, k)):
            outputs.append(model(fetchers, **forward_kwargs))
    tree_probs = torch.stack([o.probs.detach().float() for o in outputs])
    return PooledOutput(
        outputs=outputs,
        tree_probs=tree_probs,
        probs=tree_probs.amax(0) if pool == "max" else tree_probs.mean(0),
        seed=int(seed),
        temperature=float(temperature),
        uniform=float(uniform),
        source=source,
        pool=pool,
    )
