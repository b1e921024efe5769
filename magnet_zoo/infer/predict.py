"""``predict_slide``: one slide in, an explainable prediction out."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from magnet_zoo.nn.magnet import MagNet
from magnet_zoo.nn.tree import RoiNode
from magnet_zoo.wsi.fetch import as_fetcher


@dataclass
class Prediction:
    """A slide-level prediction with its explanation (the ROI tree) and its cost."""

    slide: str
    probability: float
    label: str
    aux_probabilities: dict[str, float]
    tree: list[RoiNode]
    accounting: dict[str, Any]
    seconds: float
    final_patches: torch.Tensor | None = field(default=None, repr=False)
    """``(N, 3, S, S)`` final patches in tree order, for galleries; not serialised."""

    @property
    def final_nodes(self) -> list[RoiNode]:
        depth = max(n.layer for n in self.tree)
        return [n for n in self.tree if n.layer == depth]

    def to_dict(self) -> dict[str, Any]:
        return {
            "slide": self.slide,
            "probability": self.probability,
            "label": self.label,
            "aux_probabilities": self.aux_probabilities,
            "accounting": self.accounting,
            "seconds": self.seconds,
            "tree": [n.to_dict() for n in self.tree],
        }


@torch.inference_mode()
def predict_slide(model: MagNet, source: object, *, threshold: float = 0.5) -> Prediction:
    """Classify one slide.

    ``source`` is a slide source (``magnet_zoo.ArraySource``, or a slide opened by
    ``magnet_zoo.open_slide``), a ``SlideFetcher`` or an RGB numpy array. The model runs in eval mode
    on its own device; its training mode is restored afterwards.
    """
    fetcher = as_fetcher(source, model.config.grey_threshold)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        out = model([fetcher])
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    prob = float(out.probs[0])
    labels = model.config.labels
    return Prediction(
        slide=getattr(fetcher.source, "name", "slide"),
        probability=prob,
        label=labels[1] if prob >= threshold else labels[0],
        aux_probabilities={str(k): float(v[0]) for k, v in out.aux_probs.items()},
        tree=out.trees[0],
        accounting=out.accounting[0],
        seconds=seconds,
        final_patches=out.final_patches[0].detach().cpu(),
    )
