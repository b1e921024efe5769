"""``predict_slide``: one slide in, an explainable prediction out, with its resolution report.

The resolution contract: a checkpoint records the microns per pixel (level 0) of the slides it was
trained on (``config.json["io"]["slide_mpp"]``, kept on the loaded model as ``model.trained_mpp``).
Every prediction reports the slide's own mpp, the mpp of every node's pixels (the level it was read
from and the image the network saw) and warns when the slide's mpp differs from the training mpp by
more than :data:`MPP_TOLERANCE` (relative), or when either is unknown and nothing can be checked.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from magnet_zoo.config import MPP_TOLERANCE
from magnet_zoo.nn.magnet import MagNet
from magnet_zoo.nn.tree import RoiNode
from magnet_zoo.nn.trees import (
    DEFAULT_TEMPERATURE,
    INFERENCE_SOURCE,
    INFERENCE_UNIFORM,
    TreePolicy,
    check_pool,
    check_trees,
    pooled_forward,
)
from magnet_zoo.wsi.fetch import as_fetcher

log = logging.getLogger(__name__)

TRAINED_MPP_ATTR = "trained_mpp"


def node_image_size(config: Any, layer: int) -> int:
    """Side in pixels of the finest image the network saw for a node of ``layer``: its ``I'`` for the
    root and inner nodes, the final patch for the last layer's nodes."""
    return config.final_patch_size if layer == config.num_layers else config.iprime_size(layer + 1)


def resolution_report(model: MagNet, source: Any, tree: Sequence[RoiNode]) -> dict[str, Any]:
    """Slide mpp, training mpp, their relative difference, per-node mpp and the warning, if any.

    ``nodes`` maps each tree name to ``level_mpp`` (µm per pixel of the pyramid level read) and ``mpp``
    (µm per pixel of the image the network saw: the node's side in µm over its image side).
    """
    slide_mpp = getattr(source, "mpp", None)
    trained = getattr(model, TRAINED_MPP_ATTR, None)
    downsamples = getattr(source, "level_downsamples", None) or (1.0,)
    cfg = model.config
    nodes: dict[str, dict[str, float | None]] = {}
    mean_mpp = None if slide_mpp is None else (float(slide_mpp[0]) + float(slide_mpp[1])) / 2
    for node in tree:
        side = float(max(node.box[2], node.box[3]))
        size = node_image_size(cfg, node.layer)
        ds = float(downsamples[min(node.level, len(downsamples) - 1)])
        nodes[node.name] = {
            "level_mpp": None if mean_mpp is None else round(mean_mpp * ds, 6),
            "mpp": None if mean_mpp is None else round(mean_mpp * side / size, 6),
            "level0_px_per_px": round(side / size, 6),
        }
    difference = None
    warning = None
    if mean_mpp is None:
        warning = (
            "the slide has no microns-per-pixel metadata: its resolution cannot be checked against the "
            f"training slides' ({trained} µm/px)" if trained else
            "the slide has no microns-per-pixel metadata: node sizes are in pixels only"
        )
    elif trained is None:
        warning = None  # nothing to compare with; the report still gives the slide's own mpp
    else:
        difference = mean_mpp / float(trained) - 1.0
        if abs(difference) > MPP_TOLERANCE:
            warning = (
                f"the slide's resolution ({mean_mpp:.3g} µm/px at level 0) differs from the training slides' "
                f"({float(trained):.3g} µm/px) by {100 * difference:+.0f} % (tolerance ±{100 * MPP_TOLERANCE:.0f} %): "
                "the model sees tissue at another scale than it learned; treat this prediction with care"
            )
    return {
        "slide_mpp": None if slide_mpp is None else [float(slide_mpp[0]), float(slide_mpp[1])],
        "trained_mpp": None if trained is None else float(trained),
        "relative_difference": None if difference is None else round(difference, 6),
        "tolerance": MPP_TOLERANCE,
        "warning": warning,
        "nodes": nodes,
    }


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
    threshold: float = 0.5
    """``label`` is the positive class when ``probability >= threshold``."""
    resolution: dict[str, Any] | None = None
    """See :func:`resolution_report`; its per-node mpp also appear in ``to_dict()["tree"]``."""
    provenance: dict[str, Any] | None = None
    """Model, revision, weights hash, versions and settings (:mod:`magnet_zoo.infer.provenance`)."""
    labels: tuple[str, ...] | None = None
    """The model's ``(negative, positive)`` class names."""
    trees: list[list[RoiNode]] | None = None
    """With sampled trees (``predict_slide(trees=K)``, ``K > 1``): all ``K`` zoom trees, in draw order;
    ``tree`` is ``trees[tree_index]``. ``None`` with the expected crop (one deterministic tree)."""
    tree_probabilities: list[float] | None = None
    """Each sampled tree's probability; ``probability`` is their mean (with ``pool="max"``: their largest)."""
    tree_index: int | None = None
    """Which of ``trees`` is ``tree`` (and gave ``final_patches``): the one whose probability is closest to
    the pooled ``probability`` (the first on a tie)."""
    sampling: dict[str, Any] | None = None
    """With sampled trees: ``trees`` (K), ``seed``, ``source``, ``temperature``, ``uniform`` and ``pooling``."""

    @property
    def final_nodes(self) -> list[RoiNode]:
        depth = max(n.layer for n in self.tree)
        return [n for n in self.tree if n.layer == depth]

    @property
    def positive_label(self) -> str:
        """The class whose probability ``probability`` is (``labels[1]`` of the model)."""
        return self.labels[1] if self.labels else "positive"

    def to_dict(self) -> dict[str, Any]:
        nodes = (self.resolution or {}).get("nodes", {})
        resolution = {k: v for k, v in (self.resolution or {}).items() if k not in ("nodes", "tree_nodes")}
        out = {
            "slide": self.slide,
            "probability": self.probability,
            "label": self.label,
            "labels": list(self.labels) if self.labels else None,
            "threshold": self.threshold,
            "aux_probabilities": self.aux_probabilities,
            "accounting": self.accounting,
            "seconds": self.seconds,
            "resolution": resolution or None,
            "tree": [{**n.to_dict(), **nodes.get(n.name, {})} for n in self.tree],
        }
        if self.trees is not None:
            per_tree = (self.resolution or {}).get("tree_nodes") or [{} for _ in self.trees]
            out["sampling"] = {
                **(self.sampling or {}),
                "tree_index": self.tree_index,
                "tree_probabilities": self.tree_probabilities,
            }
            out["trees"] = [
                [{**n.to_dict(), **res.get(n.name, {})} for n in tree]
                for tree, res in zip(self.trees, per_tree, strict=True)
            ]
        if self.provenance is not None:
            out["provenance"] = self.provenance
        return out


def tree_settings(trees: int | None, seed: int = 0, policy: TreePolicy | None = None) -> dict[str, Any]:
    """The prediction settings sampled trees add to the provenance (and so to the run key): nothing for
    the expected crop (``trees`` ``None`` or 1), so those run keys are unchanged; ``policy`` (default: the
    inference default) says how the trees are drawn and pooled, its pooling recorded only when it is not
    the mean (so the run keys of mean-pooled runs are unchanged too)."""
    k = check_trees(trees)
    if k is None:
        return {}
    policy = policy or TreePolicy()
    settings = {"trees": k, "tree_seed": int(seed), "tree_source": policy.source,
                "tree_temperature": float(policy.temperature), "tree_uniform": float(policy.uniform)}
    if policy.pool != "mean":
        settings["tree_pool"] = policy.pool
    return settings


def policy_kwargs(policy: TreePolicy | None) -> dict[str, Any]:
    """``policy`` (default: the inference default) as :func:`predict_slide`'s keyword arguments."""
    policy = policy or TreePolicy()
    return {"temperature": float(policy.temperature), "uniform": float(policy.uniform),
            "tree_source": policy.source, "pool": policy.pool}


@torch.inference_mode()
def predict_slide(
    model: MagNet,
    source: object,
    *,
    threshold: float = 0.5,
    trees: int | None = None,
    seed: int = 0,
    temperature: float = DEFAULT_TEMPERATURE,
    uniform: float = INFERENCE_UNIFORM,
    tree_source: str = INFERENCE_SOURCE,
    pool: str = "mean",
) -> Prediction:
    """Classify one slide.

    ``source`` is a slide source (``magnet_zoo.ArraySource``, or a slide opened by
    ``magnet_zoo.open_slide``), a ``SlideFetcher`` or an RGB numpy array. The model runs in eval mode
    on its own device; its training mode is restored afterwards. The prediction's ``resolution`` says
    the µm per pixel of the slide and of every node, and warns (also through ``logging``) when the
    slide's resolution is far from the training slides'.

    ``trees`` (``K``): ``None`` or 1, the default, is the MagNet as trained: every crop the attention
    map's expectation, one deterministic tree. ``K > 1`` runs ``K`` sampled trees
    (:mod:`magnet_zoo.nn.trees`: every learned crop centre drawn from ``(1 - uniform) p + uniform * U``, ``p``
    the layer's sparse entmax map, or with ``tree_source="softmax"`` ``softmax(logits / temperature)``; tree ``k``
    from a generator seeded by ``(seed, k)``) and pools them: the
    probability is the mean of the trees' probabilities (``pool="max"``: the largest, as a MagNet trained
    with tree MIL is validated: :func:`magnet_zoo.train.exploration.trained_inference` gives its ``K`` and
    policy), ``Prediction.trees`` holds all ``K`` trees and ``Prediction.tree`` the one closest to the pooled
    probability (with ``pool="max"``: the tree that gave it). It costs ``K`` times the compute and about
    ``K`` times the reads; ``accounting`` sums them over the trees and records ``trees``.
    """
    was_training = model.training
    model.eval()
    try:
        pred = predict_fetcher(model, as_fetcher(source, model.config.grey_threshold), threshold=threshold,
                               trees=trees, seed=seed, temperature=temperature, uniform=uniform,
                               tree_source=tree_source, pool=pool)
    finally:
        model.train(was_training)
    if pred.resolution["warning"] and pred.resolution["relative_difference"] is not None:  # no-mpp: the reader said so
        log.warning("%s: %s", pred.slide, pred.resolution["warning"])
    return pred


def predict_fetcher(
    model: MagNet,
    fetcher: Any,
    *,
    threshold: float = 0.5,
    trees: int | None = None,
    seed: int = 0,
    temperature: float = DEFAULT_TEMPERATURE,
    uniform: float = INFERENCE_UNIFORM,
    tree_source: str = INFERENCE_SOURCE,
    pool: str = "mean",
) -> Prediction:
    """:func:`predict_slide` on a ``SlideFetcher``, in the model's current mode and gradient context,
    without logging the resolution warning (:func:`predict_slide` and the cohort runner log it)."""
    k = check_trees(trees)
    check_pool(pool)
    start = time.perf_counter()
    if k is None:
        out = model([fetcher])
        tree, final, chosen = out.trees[0], out.final_patches[0], None
        prob = float(out.probs[0])
        aux = {str(key): float(v[0]) for key, v in out.aux_probs.items()}
        accounting = out.accounting[0]
    else:
        pooled = pooled_forward(model, [fetcher], trees=k, seed=seed, temperature=temperature, uniform=uniform,
                                source=tree_source, pool=pool)
        chosen = pooled.representative()[0]
        tree, final = pooled.outputs[chosen].trees[0], pooled.outputs[chosen].final_patches[0]
        prob = float(pooled.probs[0])
        keys = pooled.outputs[0].aux_probs.keys()
        if pool == "max":  # the auxiliary heads of the tree that gave the probability
            aux = {str(key): float(pooled.outputs[chosen].aux_probs[key][0]) for key in keys}
        else:
            aux = {str(key): sum(float(o.aux_probs[key][0]) for o in pooled.outputs) / k for key in keys}
        accounting = pooled.accounting()[0]
    seconds = time.perf_counter() - start
    labels = model.config.labels
    resolution = resolution_report(model, fetcher.source, tree)
    pred = Prediction(
        slide=getattr(fetcher.source, "name", "slide"),
        probability=prob,
        label=labels[1] if prob >= threshold else labels[0],
        aux_probabilities=aux,
        tree=tree,
        accounting=accounting,
        seconds=seconds,
        final_patches=final.detach().cpu(),
        threshold=threshold,
        resolution=resolution,
        labels=tuple(labels),
    )
    if k is not None:
        pred.trees = [o.trees[0] for o in pooled.outputs]
        pred.tree_probabilities = [float(p) for p in pooled.tree_probs[:, 0]]
        pred.tree_index = chosen
        pred.sampling = {"trees": k, "seed": int(seed), "source": tree_source, "temperature": float(temperature),
                         "uniform": float(uniform),
                         "pooling": ("largest of the trees' probabilities" if pool == "max"
                                     else "mean of the trees' probabilities")}
        resolution["tree_nodes"] = [resolution_report(model, fetcher.source, t)["nodes"] for t in pred.trees]
    return pred
