"""The paper's three losses (section 3.2.3 and 3.3.4), each switchable for the ablations of Table 1.

* L1, paradoxical: ``mean(max(P_a - P_b, 0))`` where ``P_a`` and ``P_b`` are the probabilities the
  first and second auxiliary heads (layers 1 and 3 by default) give to the *true* class: looking
  closer should never make the prediction worse. ``paradoxical_reference="constant"`` makes ``P_a`` a
  constant, so the term never lowers layer 1's probability (the formula's gradient does, whenever
  layer 1 leads).
* L2, auxiliary: binary cross-entropy of every auxiliary head, averaged over heads, or summed as the
  paper sums its terms (``aux_reduction``; with per-patch auxiliary logits, the BCE of every patch
  against the slide label, averaged over patches).
* L3, classifier: binary cross-entropy of the classifier.

The total is ``L1 + L2 + L3`` over the enabled terms. (The paper writes L2 without the minus sign;
we use the standard, non-negative BCE.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class LossTerms:
    total: torch.Tensor
    paradoxical: torch.Tensor
    auxiliary: torch.Tensor
    classifier: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("total", "paradoxical", "auxiliary", "classifier")}


def true_class_probability(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    return torch.where(targets > 0.5, p, 1 - p)


def paradoxical_loss(
    first_logits: torch.Tensor, later_logits: torch.Tensor, targets: torch.Tensor, reference: str = "live"
) -> torch.Tensor:
    """``mean(relu(P_first - P_later))``; ``reference="constant"`` makes ``P_first`` a constant."""
    if reference not in ("live", "constant"):
        raise ValueError(f"reference must be 'live' or 'constant', got {reference!r}")
    p_first = true_class_probability(first_logits, targets)
    if reference == "constant":
        p_first = p_first.detach()
    p_later = true_class_probability(later_logits, targets)
    return torch.relu(p_first - p_later).mean()


def loss_settings(config: Any) -> dict[str, Any]:
    """The loss options a :class:`~magnet_zoo.config.MagNetConfig` sets (keyword arguments of :func:`magnet_loss`)."""
    return {
        "paradoxical": config.loss_paradoxical,
        "auxiliary": config.loss_auxiliary,
        "classifier": config.loss_classifier,
        "paradoxical_reference": config.paradoxical_reference,
        "aux_reduction": config.aux_reduction,
    }


def magnet_loss(
    logits: torch.Tensor,
    aux_logits: dict[int, torch.Tensor],
    targets: torch.Tensor,
    *,
    paradoxical: bool = True,
    auxiliary: bool = True,
    classifier: bool = True,
    aux_patch_logits: dict[int, torch.Tensor] | None = None,
    paradoxical_reference: str = "live",
    aux_reduction: str = "mean",
) -> LossTerms:
    """Combine the enabled terms. ``logits`` ``(B,)``, ``aux_logits`` ``{layer: (B,)}``, ``targets`` ``(B,)``.

    ``paradoxical_reference``: see :func:`paradoxical_loss`; ``aux_reduction``: L2 is the ``mean`` or the
    ``sum`` of the auxiliary heads' BCEs."""
    targets = targets.to(logits.dtype)
    zero = logits.new_zeros(())
    heads = [aux_logits[k].float() for k in sorted(aux_logits)]
    l1 = (
        paradoxical_loss(heads[0], heads[1], targets, paradoxical_reference)
        if paradoxical and len(heads) >= 2 else zero
    )
    if aux_patch_logits:
        per_head = [
            F.binary_cross_entropy_with_logits(v.float(), targets[:, None].expand_as(v))
            for _, v in sorted(aux_patch_logits.items())
        ]
    else:
        per_head = [F.binary_cross_entropy_with_logits(h, targets) for h in heads]
    if aux_reduction not in ("mean", "sum"):
        raise ValueError(f"aux_reduction must be 'mean' or 'sum', got {aux_reduction!r}")
    reduce = torch.mean if aux_reduction == "mean" else torch.sum
    l2 = reduce(torch.stack(per_head)) if auxiliary and per_head else zero
    l3 = F.binary_cross_entropy_with_logits(logits.float(), targets) if classifier else zero
    return LossTerms(total=l1 + l2 + l3, paradoxical=l1, auxiliary=l2, classifier=l3)


def output_loss(
    output: Any,
    targets: torch.Tensor,
    *,
    paradoxical: bool = True,
    auxiliary: bool = True,
    classifier: bool = True,
    paradoxical_reference: str = "live",
    aux_reduction: str = "mean",
) -> LossTerms:
    """:func:`magnet_loss` of a :class:`~magnet_zoo.nn.magnet.MagNetOutput` (logits, auxiliary logits and,
    with ``aux_pooling="per_patch"``, the auxiliary logits of every patch; with ``"max"``, their maximum)
    against ``targets`` ``(B,)``."""
    return magnet_loss(
        output.logits,
        output.aux_logits,
        targets.to(output.logits.device),
        paradoxical=paradoxical,
        auxiliary=auxiliary,
        classifier=classifier,
        aux_patch_logits=None if output.aux_pooling == "max" else (output.aux_patch_logits or None),
        paradoxical_reference=paradoxical_reference,
        aux_reduction=aux_reduction,
    )
