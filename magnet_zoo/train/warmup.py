"""Head warm-up: train the classifier and auxiliary heads on random tissue crops before the attention learns.

A MagNet's attention learns from the gradient of its heads' losses through the crops it samples. Heads
that start from random weights give that gradient no direction: nothing tells a crop that it should
move, so the attention wanders while the heads wait for crops that show them the evidence. On SynthMets
with ``test_resnet`` heads trained from scratch, the MagNet's heads never left chance in 10 minutes on
2 CPU cores, while the same head, fed random tissue crops, separates tumour slides after a few hundred
steps (docs/synthmets_magnet.md).

The warm-up runs the MagNet's own forward pass with random crops instead of attended ones
(``MagNet.forward(..., explore=generator)``: side ``U(min_scale, max_scale)`` of the parent view,
centred on a random tissue pixel of it; the frozen patch stays the identity). The heads see crops read,
sampled and ordered exactly as they will be once the attention works, minus the choice, and train on
slide labels with the MagNet's own losses; the attention stacks are not run and get no gradient.
Several random trees per slide (``trees``) are scored as multiple-instance learning: a tumour slide
needs one tree that shows the tumour.

Measured on SynthMets (``benchmarks/synthmets.py --head-warmup 0.4``): the heads learn during the
warm-up (classifier loss 0.55 on random trees after 425 steps), and the MagNet still falls back to
chance once its attention chooses the crops. It is a tool for that investigation, off by default.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from magnet_zoo.nn.fetcher import RegionFetcher
from magnet_zoo.nn.losses import LossTerms
from magnet_zoo.nn.magnet import MagNet, MagNetOutput
from magnet_zoo.nn.trees import multiple_instance_output


def warmup_loss(
    model: MagNet,
    fetchers: Sequence[RegionFetcher],
    labels: torch.Tensor,
    generator: torch.Generator,
    trees: int = 1,
) -> LossTerms:
    """:func:`warmup_step`'s loss alone."""
    return warmup_step(model, fetchers, labels, generator, trees)[0]


def warmup_step(
    model: MagNet,
    fetchers: Sequence[RegionFetcher],
    labels: torch.Tensor,
    generator: torch.Generator,
    trees: int = 1,
) -> tuple[LossTerms, MagNetOutput]:
    """The MagNet's loss on ``trees`` random zoom trees of each slide (heads only: the attention is not run).

    With several trees a slide is scored as multiple-instance learning over them: the classifier's logit
    is its largest over the trees, and each auxiliary head pools the patches of all trees as the config
    says (``aux_pooling``). More trees show the heads more of every slide per step.

    Also returns the exploring forward pass itself: ``trees * B`` slides, tree-major (slide ``i`` of tree
    ``t`` is entry ``t * B + i``), e.g. for :func:`magnet_zoo.train.guidance.guidance_loss`.
    """
    if trees < 1:
        raise ValueError(f"trees must be >= 1, got {trees}")
    pooling = model.config.aux_pooling
    # tree-major: T * B slides; mean-pooled heads are run over the patches of all trees at once
    tree = model(list(fetchers) * trees, auxiliary=pooling != "mean", explore=generator)
    out = multiple_instance_output(model, tree, trees)
    return model.loss(out, labels), tree
