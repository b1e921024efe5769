"""Exploration: sample several zoom trees per slide from the attention, and teach it with their losses.

The crop a MagNet takes is its attention map's expectation, so a crop that does not touch the evidence
gets exactly no gradient towards it (DESIGN.md section 6, item 5). During the exploring share of training
(recipe fields ``explore_trees``, ``explore_frac``) every slide is run ``K = explore_trees`` times, each
learned crop centre drawn from a dense policy over the attention logits (``(1 - e) softmax(logits / T)
+ e uniform``, :func:`magnet_zoo.nn.attention.attention_to_affine`'s ``sample``). The heads train on the
sampled crops with the MagNet's own losses (averaged over the trees); the attention gets, besides the
scale's pathwise gradient, a score-function (REINFORCE) gradient: each tree's summed log-probability of
its drawn centres, weighted by how much worse its loss is than the mean of the slide's *other* trees
(a leave-one-out baseline, which keeps the estimator unbiased and its variance low; RAM, ATS). A tree
that found the evidence (lower loss) becomes more likely, wherever its crops landed: no overlap with
the evidence is needed for a gradient. At inference nothing changes by default: the expected crop, one
tree (:mod:`magnet_zoo.nn.trees` pools ``K`` sampled trees on request, ``predict_slide(trees=K)``).

With the recipe's ``tree_mil`` the heads' losses are not averaged over the trees but taken once per slide
as multiple-instance learning over them (:func:`magnet_zoo.nn.trees.multiple_instance_output`: the
classifier's logit the largest over the trees, as in the head warm-up), so a tumour slide needs one tree
on the tumour, not every tree. The classifier then learns to answer "did any tree find it", which one
expected crop cannot be asked: such a model is used with ``K`` trees drawn from the policy it trained
on and max-pooled (:func:`mil_inference`; :func:`trained_inference` reads it back from a checkpoint's
recipe, for ``magnet-zoo evaluate --as-trained``).

Cost: ``K`` forward and backward passes per slide while exploring.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from magnet_zoo.config import ConfigError
from magnet_zoo.nn.magnet import MagNet
from magnet_zoo.nn.trees import TreePolicy, sampling_policy, set_sampling
from magnet_zoo.train.recipe import Recipe


def set_exploration(model: MagNet, temperature: float | None, uniform: float = 0.05) -> None:
    """Switch sampled crop centres on (``temperature``: the policy's softmax temperature) or off (``None``),
    in training mode only (:func:`magnet_zoo.nn.trees.sampled_trees` samples at inference too)."""
    set_sampling(model, None if temperature is None else sampling_policy(temperature, uniform))


def mil_inference(recipe: Recipe) -> tuple[int, TreePolicy] | None:
    """``(K, policy)`` for a recipe with ``tree_mil``: its ``explore_trees`` trees, drawn from its training
    policy (dense softmax at ``explore_temperature`` with its uniform share), max-pooled; ``None`` for any
    other recipe (the expected crop)."""
    if not recipe.tree_mil:
        return None
    policy = TreePolicy(source="softmax", temperature=recipe.explore_temperature, uniform=recipe.explore_uniform,
                        pool="max")
    return recipe.explore_trees, policy


def trained_inference(model: MagNet) -> tuple[int, TreePolicy] | None:
    """:func:`mil_inference` of the recipe a loaded checkpoint was trained with (its ``config.json`` holds
    it: :meth:`magnet_zoo.train.loop.TrainLoop` writes it there), so a ``tree_mil`` model can be scored as
    it was validated; ``None`` for any other recipe, a model that was not loaded from a folder or the Hub,
    or a checkpoint with no (readable) recipe."""
    folder = (getattr(model, "pretrained_source", None) or {}).get("path")
    if not folder:
        return None
    try:
        doc = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        return mil_inference(Recipe.from_dict(doc["recipe"])) if isinstance(doc.get("recipe"), dict) else None
    except (OSError, ValueError, TypeError, ConfigError):  # no file, bad JSON, a recipe of another version
        return None


def per_slide_loss(out: Any, labels: torch.Tensor) -> torch.Tensor:
    """``(B,)``: each slide's classifier BCE plus its auxiliary BCEs (per-patch ones averaged): the
    exploration's cost of a tree."""
    y = labels.to(out.logits.device).float()
    loss = F.binary_cross_entropy_with_logits(out.logits.float(), y, reduction="none")
    if out.aux_patch_logits:
        for v in out.aux_patch_logits.values():
            loss = loss + F.binary_cross_entropy_with_logits(
                v.float(), y[:, None].expand_as(v), reduction="none").mean(1)
    else:
        for v in out.aux_logits.values():
            loss = loss + F.binary_cross_entropy_with_logits(v.float(), y, reduction="none")
    return loss


def tree_log_prob(out: Any) -> torch.Tensor:
    """``(B,)``: the summed log-probability of every sampled crop centre of each slide's tree."""
    parts = [a.log_prob.flatten(1).sum(1) for a in out.affines if a.log_prob is not None]
    if not parts:
        raise ValueError("no sampled crop centres in this output: switch exploration on (set_exploration)")
    return torch.stack(parts).sum(0)


def score_function_loss(cost: torch.Tensor, log_prob: torch.Tensor, trees: int) -> torch.Tensor:
    """REINFORCE with a leave-one-out baseline over the ``trees`` trees of each slide.

    ``cost`` and ``log_prob`` are ``(trees * B,)``, tree-major (tree ``t`` of slide ``i`` at ``t * B + i``).
    The gradient of the result with respect to ``log_prob[k]`` is ``(cost[k] - mean of the slide's other
    trees' costs) / (trees * B)``: minimising it makes cheaper trees more likely."""
    if trees < 2:
        raise ValueError(f"a leave-one-out baseline needs at least 2 trees per slide, got {trees}")
    c = cost.detach().float().view(trees, -1)
    baseline = (c.sum(0, keepdim=True) - c) / (trees - 1)
    advantage = (c - baseline).reshape(-1)
    return (advantage * log_prob.float()).mean()
