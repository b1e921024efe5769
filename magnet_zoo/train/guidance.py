"""Head-guided attention: teach the inner magnifying layers to point where the auxiliary head fires.

Why: a MagNet's attention learns only from the gradient of its heads' losses through the crop it
samples. That gradient says "move" only when the crop already overlaps the evidence and the heads already
respond to it with a smooth slope; on SynthMets, whose tumours differ from normal tissue in texture only,
it never did (docs/synthmets_magnet.md: final patches on tumour no more often than random tissue crops).

What: for every node entering a guided layer (a region the layer above chose; for the first layer, the
whole slide's square canvas), the region is read once at ``grid * S / 2`` pixels (``S``: the final patch
size) and cut into a ``grid x grid`` set of overlapping windows of ``S`` pixels, one centred on each cell,
each covering ``2 / grid`` of the region's side (a quarter at the default grid of 8: the size of a
mid-range crop). The last layer's auxiliary head scores every window (eval mode, no gradient). Two losses
follow (:func:`guidance_loss`):

* the layer's attention logits, averaged over the same cells, are trained towards
  ``softmax(scores / temperature)`` over the cells that are mostly tissue (cross-entropy); with
  ``standardise`` the scores are first centred and divided by their spread over those cells, so that the
  target's sharpness does not follow the head's logit scale (a head whose window logits differ by a few
  tenths gives a target within 2 % of uniform entropy at temperature 1: the map is taught to cover the
  tissue, not where the head fires);
* the head itself is trained on each slide's best window against the slide label (multiple-instance
  learning with max pooling), so that it sees many more candidate regions per step than the final
  patches alone show it.

Nothing here uses a tumour mask: the target is the MagNet's own head, which learns from slide labels.

By default only the layers after the first are guided. The first layer can be guided too (``layers``
with 1; a finer ``grid`` there, e.g. 16, keeps its windows near the head's resolution): its 56 px view of
the whole slide is coarse, but a supervised probe finds SynthMets tumours in it
(``benchmarks/synthmets_visibility.py``), so what the head finds at full resolution is something the first
map can learn to point at.

Where every class carries an object to find (FindIt: a ring or a cross), the head's logit is evidence for
label 1 only, and a target built from it would turn a label-0 image's map away from its own object.
``evidence="label"`` (recipe field ``guidance_evidence``) scores each window by the evidence for its
image's own label instead (the logit times +1 or -1); the head's window MIL then takes each image's window
that best supports its label (docs/learn_to_look.md, grid ``findit-guided``). On top of FindIt's recipe it
revived one seed's dead second-layer crop and killed another's (the 3 % targets in 2 of 5 seeds, the recipe
alone 4 of the same 5), so no recipe uses it.

At inference nothing changes: the attention runs alone, and the values fed to the networks are the same.

Cost: one extra read per guided node and ``grid**2`` head evaluations per node (training only); the
``slides`` argument limits it to the first slides of a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from magnet_zoo.nn.fetcher import RegionFetcher, Square
from magnet_zoo.nn.magnet import MagNet, MagNetOutput
from magnet_zoo.nn.magnify import TISSUE_LEVEL
from magnet_zoo.nn.tree import root_square
from magnet_zoo.train.recipe import GUIDANCE_EVIDENCE

MIN_TISSUE = 0.5
"""A cell takes part in the target when at least this share of its pixels is tissue."""


def _windows(regions: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, 3, R, R)`` with ``R = grid * size / 2`` -> ``(N, grid * grid, 3, size, size)``: window ``(i, j)``
    is centred on cell ``(i, j)`` of side ``size / 2`` (glass beyond the region's edge)."""
    n, c, r, _ = regions.shape
    half, quarter = size // 2, size // 4
    padded = F.pad(regions, (quarter, quarter, quarter, quarter))
    cols = F.unfold(padded, kernel_size=size, stride=half)  # (N, 3 * size * size, grid * grid)
    return cols.transpose(1, 2).reshape(n, -1, c, size, size)


@dataclass
class Windows:
    """A ``grid x grid`` set of windows over each of ``N`` squares per slide, scored by the last layer's head."""

    scores: torch.Tensor
    """``(B, N, grid, grid)``: the head's logit per window (no gradient)."""
    tissue: torch.Tensor
    """``(B, N, grid, grid)``: whether the cell under each window is mostly tissue."""
    pixels: torch.Tensor
    """``(B, N, grid * grid, 3, S, S)``: the windows themselves."""


def scoring_head(model: MagNet) -> torch.nn.Module:
    """The head that scores windows: the last layer's auxiliary head, which must give per-patch logits."""
    cfg = model.config
    last = cfg.num_layers
    if last not in cfg.active_aux_layers or cfg.aux_pooling == "mean":
        raise ValueError(
            "head-guided attention scores windows with the last layer's auxiliary head per patch: it needs "
            f"{last} in aux_layers (got {tuple(cfg.active_aux_layers)}) and aux_pooling 'per_patch' or 'max' "
            f"(got {cfg.aux_pooling!r})"
        )
    return model.aux_heads[str(last)]


def _eval_logits(head: torch.nn.Module, patches: torch.Tensor) -> torch.Tensor:
    """``head.patch_logits`` with batch-norm in eval mode (running statistics), gradient as the caller's."""
    was_training = head.training
    head.eval()
    try:
        return head.patch_logits(patches)
    finally:
        head.train(was_training)


def window_scores(
    model: MagNet, fetchers: Sequence[RegionFetcher], squares: Sequence[Sequence[Square]], grid: int = 8
) -> Windows:
    """Read each square at ``grid * S / 2`` pixels, cut it into ``grid x grid`` windows of ``S`` pixels
    (``S``: the final patch size) and score them with the last layer's auxiliary head (eval mode, no
    gradient). ``squares[i]`` holds the ``N`` squares of slide ``i``."""
    head = scoring_head(model)
    size = model.config.final_patch_size
    if size % 4 or grid < 2:
        raise ValueError(f"needs a final patch size divisible by 4 and grid >= 2, got {size} and {grid}")
    device = next(model.parameters()).device
    regions = torch.stack(
        [f.fetch(list(sq), grid * size // 2).images.to(device) for f, sq in zip(fetchers, squares, strict=True)]
    )  # (B, N, 3, R, R)
    b, n = regions.shape[:2]
    flat = regions.flatten(0, 1)
    tissue = F.avg_pool2d((flat.amax(1, keepdim=True) > TISSUE_LEVEL).float(), size // 2) >= MIN_TISSUE
    pixels = _windows(flat, size)
    with torch.no_grad():
        scores = _eval_logits(head, pixels)  # (B * N, grid * grid)
    return Windows(
        scores.view(b, n, grid, grid), tissue.view(b, n, grid, grid), pixels.view(b, n, *pixels.shape[1:])
    )


def _standardised(scores: torch.Tensor, allowed: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``(scores - mean) / std`` along the last axis, both taken over the ``allowed`` entries only."""
    w = allowed.to(scores.dtype)
    n = w.sum(-1, keepdim=True).clamp_min(1.0)
    mean = (scores * w).sum(-1, keepdim=True) / n
    var = (((scores - mean) ** 2) * w).sum(-1, keepdim=True) / n
    return (scores - mean) / (var.sqrt() + eps)


@dataclass
class GuidanceTerms:
    """The two training signals of :func:`guidance_loss` (scalars)."""

    attention: torch.Tensor
    """Cross-entropy of the guided layers' attention against the head's window scores."""
    window_mil: torch.Tensor
    """Multiple-instance loss of the head on its windows (zero without labels)."""

    @property
    def total(self) -> torch.Tensor:
        return self.attention + self.window_mil


def guidance_loss(
    model: MagNet,
    output: MagNetOutput | None,
    fetchers: Sequence[RegionFetcher],
    labels: torch.Tensor | None = None,
    *,
    grid: int | Sequence[int] = 8,
    temperature: float = 1.0,
    slides: int | None = None,
    layers: Sequence[int] | None = None,
    standardise: bool = False,
    evidence: str = "positive",
) -> GuidanceTerms:
    """Train the guided layers' attention towards the head's window scores, and (with ``labels``) the head
    on its windows.

    ``output`` is a forward pass over ``fetchers`` (attended or exploring; ``None`` when only the first
    layer is guided, whose regions and views come from the fetchers alone); ``slides`` uses only its first
    slides; ``layers`` defaults to every layer after the first; with layer 1 among them, the first layer is
    guided from windows over each slide's square canvas (its attention reads the same whole-slide view as
    the forward pass). ``grid`` is one value for every guided layer or one per entry of ``layers`` (the
    last repeats).

    * ``attention``: per learned (node, patch) of a guided layer, the attention logits averaged over the
      ``grid x grid`` cells, ``log_softmax`` over the cells that are mostly tissue, against
      ``softmax(scores / temperature)`` over the same cells (``standardise``: ``(scores - mean) / std`` over
      them in place of ``scores``). Only the attention stacks get this gradient.
    * ``window_mil``: per slide, the window with the largest score over all its guided regions (tissue
      only) is scored again with gradient, and its logit is trained towards the slide label (binary
      cross-entropy; the best by the same signed score as the attention's target): multiple-instance
      learning with max pooling, the recipe that
      ``benchmarks/synthmets_mil_probe.py`` shows the head can learn from. Only the head gets this gradient.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if evidence not in GUIDANCE_EVIDENCE:
        raise ValueError(f"evidence must be one of {GUIDANCE_EVIDENCE}, got {evidence!r}")
    if evidence == "label" and labels is None:
        raise ValueError("evidence='label' signs each window's score by its slide's label: pass labels")
    cfg = model.config
    head = scoring_head(model)
    b = len(fetchers) if slides is None else min(slides, len(fetchers))
    guided = list(range(2, cfg.num_layers + 1)) if layers is None else list(layers)
    grids = [grid] if isinstance(grid, int) else [int(g) for g in grid]
    if not grids:
        raise ValueError("grid needs at least one value")
    zero = next(model.parameters()).new_zeros(())
    attention, terms = zero, 0
    best_score = torch.full((b,), float("-inf"))
    best_pixels: list[torch.Tensor | None] = [None] * b
    for j, k in enumerate(guided):
        if not 1 <= k <= cfg.num_layers:
            raise ValueError(f"guided layers must be in 1..{cfg.num_layers}, got {k}")
        layer = model.layers[k - 1]
        g = grids[min(j, len(grids) - 1)]
        if k == 1:
            squares = [[root_square(*f.slide_size)] for f in fetchers[:b]]
        else:
            if output is None:
                raise ValueError(f"guiding layer {k} needs the forward pass's output (its regions and crops)")
            squares = [
                [Square(n.box[0], n.box[1], n.box[2]) for n in tree if n.layer == k - 1] for tree in output.trees[:b]
            ]
        win = window_scores(model, fetchers[:b], squares, g)
        if evidence == "label":
            sign = 2.0 * labels[:b].to(device=win.scores.device, dtype=win.scores.dtype) - 1.0
            win.scores = win.scores * sign.view(-1, 1, 1, 1)
        if labels is not None:
            flat = win.scores.flatten(1).masked_fill(~win.tissue.flatten(1), float("-inf"))
            top, where = flat.max(1)
            for i in range(b):
                if float(top[i]) > float(best_score[i]):
                    best_score[i] = top[i]
                    best_pixels[i] = win.pixels[i].flatten(0, 1)[int(where[i])]
        if layer.num_stacks == 0:
            continue
        index = layer.node_index
        scores, tissue = win.scores.index_select(1, index), win.tissue.index_select(1, index)  # (b, G, g, g)
        if k == 1:  # the whole-slide view, read as the forward pass reads it
            device = win.scores.device
            views = model.whole_slide_view(fetchers[:b], device)[0]
        else:
            views = output.crops[k - 1][:b].detach()
        logits = F.adaptive_avg_pool2d(layer.attention_logits(views), g).flatten(2)
        keep = tissue.flatten(2).any(-1)
        if not bool(keep.any()):
            continue
        allowed = tissue.flatten(2) | ~keep.unsqueeze(-1)  # rows without tissue are dropped below
        target_scores = scores.flatten(2)
        if standardise:
            target_scores = _standardised(target_scores, allowed)
        target = torch.softmax((target_scores / temperature).masked_fill(~allowed, float("-inf")), -1)
        logp = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), -1)
        per = -(target * logp.masked_fill(~allowed, 0.0)).sum(-1)
        attention = attention + per[keep].mean()
        terms += 1
    mil = zero
    rows = [i for i in range(b) if best_pixels[i] is not None]
    if labels is not None and rows:
        patches = torch.stack([best_pixels[i] for i in rows]).unsqueeze(1)  # (R, 1, 3, S, S)
        logit = _eval_logits(head, patches).squeeze(1)
        mil = F.binary_cross_entropy_with_logits(logit, labels[rows].to(logit.dtype))
    return GuidanceTerms(attention / max(terms, 1), mil)
