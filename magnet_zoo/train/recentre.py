"""Recentring: ask each layer to centre what its children find (recipe field ``recentre_weight``).

Nothing in the paper's losses asks a first-layer box to hold the evidence at its centre: any box that
contains the object classifies as well, and on FindIt the boxes of the failing seeds hold it at one edge,
the same offset for every image (docs/learn_to_look.md). A learned child crop that has found the object
says where it lies in its parent's box. This term pulls the parent's centre towards that place::

    L = mean over slides b, learned children c of parent j of  w_bc * ((t_j - stopgrad(t_j + s_j t_c)) / s_j)^2

with ``t`` a crop centre in its parent's normalised view, ``s`` its scale, and ``w_bc = max(0, 2 q - 1)``
for ``q`` the child's own auxiliary-head probability of the slide's label (detached: a child that
classifies its slide no better than chance, such as one on background, pulls nothing; a first version
weighted by ``q`` itself, so a child on background still pulled with weight 0.5). The target and
``s_j`` are constants, so the gradient reaches only the parent's centre (through its attention map),
never the child; in units of the parent's box the term is the child's offset squared, ``w * t_c^2``.
Once the parent moves, the child's view moves with it and the child's own losses bring it back onto the
object, nearer its box's centre: the pair settles with the evidence centred. A child that sits on
background gets no help from it (its offset pulls nothing): on FindIt that is how the term fails.

It helps on FindIt, where both classes carry an object to centre. On a multiple-instance task such
as SynthMets a negative slide's crops classify it confidently wherever they look, so there the term would
also pull towards background; ``recentre_on="positive"`` (``positives_only``) counts only label-1 slides'
children. On SynthMets (30 minutes, 2 seeds, ``learn_to_look_centred``) that variant stayed at chance
(test AUROC 0.43 / 0.57), as the default recipe does; no recipe turns the term on by default.

It needs per-patch auxiliary logits (``aux_pooling`` ``"per_patch"`` or ``"max"``) for the children's layer,
and pathwise centres: the loop leaves the term out during head warm-up (random trees) and exploration
(sampled centres).
"""

from __future__ import annotations

from typing import Any

import torch

from magnet_zoo.config import ConfigError, MagNetConfig
from magnet_zoo.nn.magnet import MagNet


def check_recentre_model(config: MagNetConfig) -> None:
    """Raise a :class:`ConfigError` unless ``config`` gives some layer >= 2 per-patch auxiliary logits."""
    if (config.aux_pooling not in ("per_patch", "max") or not any(k >= 2 for k in config.active_aux_layers)
            or not config.loss_auxiliary):
        raise ConfigError(
            "recentre_weight needs per-patch auxiliary logits on a layer >= 2 (aux_pooling 'per_patch' or "
            f"'max', loss_auxiliary on); this MagNet has aux_layers={config.active_aux_layers}, "
            f"aux_pooling={config.aux_pooling!r}, loss_auxiliary={config.loss_auxiliary}"
        )


def recentre_loss(model: MagNet, out: Any, labels: torch.Tensor, positives_only: bool = False) -> torch.Tensor:
    """The recentring term over every parent layer whose children's layer has per-patch auxiliary logits
    (zero, with a gradient graph, if none has). With ``positives_only`` only label-1 slides' children count
    (the mean is over them alone)."""
    labels = labels.float().view(-1, 1)
    terms = []
    for child_idx in range(2, len(model.layers) + 1):
        patch_logits = out.aux_patch_logits.get(child_idx)
        if patch_logits is None:
            continue
        parent, child = out.affines[child_idx - 2], out.affines[child_idx - 1]
        b, n, p = child.scale.shape
        p_label = torch.sigmoid(patch_logits.detach().float())
        right = labels * p_label + (1 - labels) * (1 - p_label)
        weight = (2 * right - 1).clamp_min(0).view(b, n, p)
        learned = (model.layers[child_idx - 1].slot >= 0).view(1, n, p).expand(b, n, p)
        if positives_only:
            learned = learned & (labels.view(b, 1, 1) > 0.5)
        # Parent centres and scales per child's node: (B, N_child) = flattened (B, N_parent, P_parent).
        ptx, pty = parent.tx.reshape(b, n, 1), parent.ty.reshape(b, n, 1)
        ps = parent.scale.detach().reshape(b, n, 1).clamp_min(1e-6)
        target_x = (ptx + ps * child.tx).detach()
        target_y = (pty + ps * child.ty).detach()
        sq = ((ptx - target_x) / ps) ** 2 + ((pty - target_y) / ps) ** 2
        terms.append((weight * sq).masked_select(learned))
    flat = torch.cat(terms) if terms else out.logits.new_zeros(0)
    return flat.mean() if flat.numel() else out.logits.sum() * 0.0
