"""Attention MIL: the first attention map trained as a weakly supervised detector from slide labels.

On a multiple-instance task (SynthMets, CAMELYON: a slide is positive when *some* region holds tumour)
the first layer's map over the whole-slide view can be asked the slide's question directly. Each learned
map's logits are pooled over the view's tissue into one slide logit, the mean of its top ``top`` share
of tissue pixels (``top -> 0``: max pooling; ``1``: mean pooling), and trained towards the slide label
with binary cross-entropy. A positive slide then needs a few high logits somewhere, a negative slide
none anywhere: where the map rises is where the label's evidence is, learnt at the map's own 56 px
resolution, from the first step, without waiting for the heads (DESIGN.md section 6: the first layer
otherwise learns only through the crops' geometry, and on SynthMets never did). The crop's attention
(``softmax`` or ``entmax`` over the same logits) is unchanged by a shift of the logits, so the pooled
level costs the crop nothing; only the map's shape matters there.

A slide label says more about a normal slide than the pooled logit uses: *every* tissue pixel of a normal
slide is a normal instance. ``negatives="all"`` (recipe field ``attention_mil_negatives``) trains each of
them towards 0 (the mean BCE over the view's tissue), where ``"top"`` pushes only the pooled top share
down: the map gets a dense gradient on every normal slide from the first step, not only where it already
rises. Tumour slides are pooled either way (their tumour pixels are unknown).

Recipe fields ``attention_mil_weight`` (0: off) and ``attention_mil_top``; ``attention_mil_only`` makes it
the first map's only teacher (:func:`first_map_frozen` around the forward of every other loss);
``attention_pretrain_steps`` runs the same training as a phase before the loop, on every training slide's
view read once (:func:`pretrain_attention`, like head pre-training: its time counts against the run's time
limit, and the loop's schedules share what it leaves); ``attention_pretrain_candidates`` trains several
first maps from different starts in that phase and keeps the one that best separates held-out training
slides; ``attention_pretrain_top_start`` starts the phase's pooling wider (:func:`annealed_top`) and
``attention_pretrain_edge_start`` its edge term later. Only the first layer's attention stacks get this
gradient. Not for tasks where both classes carry
an object to find (FindIt): there the negative class's object must be looked at too.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from magnet_zoo.nn.fetcher import RegionFetcher
from magnet_zoo.nn.magnet import MagNet
from magnet_zoo.train.recipe import ATTENTION_MIL_EDGES, PRETRAIN_AUGMENTS, RESTART_FROM

logger = logging.getLogger(__name__)


def top_share_mean(logits: torch.Tensor, mask: torch.Tensor | None, top: float) -> torch.Tensor:
    """``(..., H, W)`` logits -> ``(...)``: the mean of each map's largest ``ceil(top * n)`` logits among
    its ``n`` pixels where ``mask`` is true (every pixel without a mask; a map with no masked-in pixel
    pools over all of them)."""
    if not 0 < top <= 1:
        raise ValueError(f"top must be in (0, 1], got {top}")
    flat = logits.flatten(-2)
    if mask is None:
        keep = torch.ones_like(flat, dtype=torch.bool)
    else:
        if mask.shape != logits.shape:
            raise ValueError(f"mask of shape {tuple(mask.shape)} for logits of shape {tuple(logits.shape)}")
        keep = mask.flatten(-2)
        keep = keep | ~keep.any(-1, keepdim=True)
    n = keep.sum(-1)
    k = torch.clamp(torch.ceil(top * n.float()).long(), min=1)
    ordered = flat.masked_fill(~keep, float("-inf")).sort(-1, descending=True).values
    ranks = torch.arange(flat.shape[-1], device=flat.device)
    chosen = ranks < k.unsqueeze(-1)
    return torch.where(chosen, ordered, torch.zeros_like(ordered)).sum(-1) / k.to(flat.dtype)


NEGATIVE_POOLINGS = ("top", "all")
EDGE_TREATMENTS = ATTENTION_MIL_EDGES
EDGE_MARGIN = 1.0
"""With ``edges="below"``: how far (in logits) below the map's pooled logit the edge is trained to sit."""


def tissue_edge(mask: torch.Tensor) -> torch.Tensor:
    """``(..., H, W)`` bool -> the masked-in pixels with a masked-out 4-neighbour or on the map's border."""
    padded = F.pad(mask.to(torch.uint8), (1, 1, 1, 1)).bool()
    inner = padded[..., :-2, 1:-1] & padded[..., 2:, 1:-1] & padded[..., 1:-1, :-2] & padded[..., 1:-1, 2:]
    return mask & ~inner


def mil_bce(
    logits: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor, *, top: float, negatives: str = "top",
    edges: str = "pool", edge_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention MIL's loss on ``(B, G, H, W)`` logit maps with slide ``labels`` ``(B,)``: the mean over slides
    and maps of the BCE of each map's pooled logit (:func:`top_share_mean` over ``mask``) against its slide's
    label; with ``negatives="all"`` a normal slide's term is instead the mean BCE of each of its masked-in
    pixels against 0. With ``edges="negative"`` the tissue's edge (:func:`tissue_edge` of ``mask``; needs a
    mask) is left out of the pooling and each map's edge pixels are trained towards 0 (their mean BCE against
    0, added to every slide's term, times ``edge_weight``): the boundary with the glass is never the evidence.
    ``edges="below"`` leaves the edge out of the pooling the same way but trains each edge pixel only to sit
    :data:`EDGE_MARGIN` below its map's pooled logit (the mean of ``relu(edge - pooled + margin)``, the pooled
    logit a constant there, times ``edge_weight``): an edge already that low costs nothing, and no term pulls
    the map's level down (the push towards 0 is met by a negative weight on every channel alive on tissue).
    On SynthMets the phase found the tumours with it in 3 of 6 seeds alone, 6 of 6 with a wide start
    (``top_start=1``; docs/synthmets_magnet.md, "A milder edge term").
    Returns the loss and the pooled logits ``(B, G)``."""
    if negatives not in NEGATIVE_POOLINGS:
        raise ValueError(f"negatives must be one of {NEGATIVE_POOLINGS}, got {negatives!r}")
    if edges not in EDGE_TREATMENTS:
        raise ValueError(f"edges must be one of {EDGE_TREATMENTS}, got {edges!r}")
    edge = None
    if edges != "pool":
        if mask is None:
            raise ValueError(f"edges={edges!r} needs the tissue mask (attention_tissue_only)")
        edge = tissue_edge(mask)
        inside = mask & ~edge
        mask = torch.where(inside.flatten(-2).any(-1)[..., None, None], inside, mask)  # all edge: pool it
    pooled = top_share_mean(logits, mask, top)
    y = labels.to(device=pooled.device, dtype=pooled.dtype).view(-1, 1).expand_as(pooled)
    per_map = F.binary_cross_entropy_with_logits(pooled, y, reduction="none")
    if negatives == "all":
        keep = torch.ones_like(logits, dtype=torch.bool) if mask is None else mask
        keep = (keep | ~keep.flatten(-2).any(-1)[..., None, None]).to(logits.dtype)
        pixels = (F.softplus(logits) * keep).sum((-2, -1)) / keep.sum((-2, -1))  # BCE against 0
        per_map = torch.where(y > 0, per_map, pixels)
    if edge is not None and edge_weight:
        on = edge.to(logits.dtype)
        if edges == "negative":
            cost = F.softplus(logits)  # BCE against 0
        else:
            cost = F.relu(logits - pooled.detach()[..., None, None] + EDGE_MARGIN)
        per_map = per_map + edge_weight * (cost * on).sum((-2, -1)) / on.sum((-2, -1)).clamp(min=1.0)
    return per_map.mean(), pooled


def attention_mil_loss(
    model: MagNet, fetchers: Sequence[RegionFetcher], labels: torch.Tensor, *, top: float = 0.02,
    negatives: str = "top", edges: str = "pool",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary cross-entropy of each learned first-layer map's pooled logit (:func:`top_share_mean` over the
    whole-slide view's tissue, or the whole view with ``attention_tissue_only`` off) against the slide
    labels, averaged over slides and maps (``negatives``, ``edges``: see :func:`mil_bce`); and the pooled logits
    ``(B, G)``. Reads each slide's view as the forward pass does; runs in fp32."""
    layer = model.layers[0]
    if layer.num_stacks == 0:
        raise ValueError("attention MIL needs a first layer with learned attention")
    device = next(model.parameters()).device
    view = model.whole_slide_view(fetchers, device)[0]
    with torch.autocast(device.type, enabled=False):
        logits = layer.attention_logits(view.float())
    mask = layer.tissue_mask(view) if model.config.attention_tissue_only else None
    return mil_bce(logits, mask, labels, top=top, negatives=negatives, edges=edges)


@contextlib.contextmanager
def first_map_frozen(model: MagNet, frozen: bool = True) -> Iterator[None]:
    """Within the block, the first layer's attention stacks take no gradient (``requires_grad`` off and
    restored after): a forward run here builds no path to them. Recipe field ``attention_mil_only``."""
    stacks = model.layers[0].stacks
    params = [p for p in stacks.parameters() if p.requires_grad] if frozen and stacks is not None else []
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def mirror(images: torch.Tensor, k: int) -> torch.Tensor:
    """``images`` (..., H, W) mirrored by ``k`` in 0..3: bit 0 left-right, bit 1 up-down (never transposed)."""
    out = images.flip(-1) if k & 1 else images
    return out.flip(-2) if k & 2 else out


def read_views(model: MagNet, paths: Sequence[str]) -> torch.Tensor:
    """``(N, 1, 3, S, S)``: each slide's first-layer view, read by ``model`` as its forward pass reads it."""
    from magnet_zoo.wsi import SlideFetcher, open_slide

    views = []
    for path in paths:
        with open_slide(path) as source:
            views.append(model.whole_slide_view([SlideFetcher(source, model.config.grey_threshold)],
                                                torch.device("cpu"))[0][0])
    return torch.stack(views)


def holdout_split(labels: torch.Tensor, share: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Slide indices ``(train, held_out)``: ``share`` of each class's slides (rounded, at least one, at most all
    but one) drawn at random into ``held_out``, the rest into ``train``; both sorted."""
    if not 0 < share < 1:
        raise ValueError(f"the held-out share must be in (0, 1), got {share}")
    train, held = [], []
    for cls in (labels > 0, labels <= 0):
        idx = cls.nonzero().squeeze(1)
        if len(idx) < 2:
            raise ValueError("choosing between candidates needs at least two training slides of each class")
        n = min(max(round(share * len(idx)), 1), len(idx) - 1)
        order = idx[torch.randperm(len(idx), generator=generator)]
        held.append(order[:n])
        train.append(order[n:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values


def annealed_top(step: int, steps: int, top: float, start: float | None) -> float:
    """The phase's pooled share at ``step`` of ``steps``: ``start`` falling geometrically to ``top`` over the
    first half of the steps, then ``top`` (``start=None``: ``top`` throughout).

    Why: at the start the map's top share is whatever its random features rank highest, often no tumour
    pixel; a wide share (1: the mean over the tissue) holds every tumour pixel, so their gradient is there
    from the first step. With the late edge push (``edge_start``) it took SynthMets seeds 4 and 5 off the
    phase's ln 2 plateau (docs/synthmets_magnet.md, "The phase's plateau")."""
    if start is None or start == top:
        return top
    if not 0 < start <= 1:
        raise ValueError(f"the pooled share's start must be in (0, 1], got {start}")
    t = min(step / max(steps / 2, 1.0), 1.0)
    return float(start * (top / start) ** t)


def pretrain_attention(
    model: MagNet,
    paths: Sequence[str],
    labels: Sequence[int],
    *,
    steps: int,
    lr: float,
    top: float,
    seed: int,
    batch: int = 32,
    negatives: str = "top",
    augment: str = "d4",
    candidates: int = 1,
    holdout: float = 0.2,
    edges: str = "pool",
    top_start: float | None = None,
    edge_start: float = 0.0,
    restarts: int = 0,
    plateau: float = 0.68,
    time_left: float | None = None,
    restart_from: str = "fresh",
) -> dict[str, Any]:
    """Attention MIL as a phase before the loop: every training slide's first-layer view is read once, and
    the first layer's attention stacks alone are trained on them with :func:`mil_bce` (``negatives`` and
    ``edges`` as there), ``steps`` steps of ``batch`` views, half from each class, each batch in one random orientation
    (``augment``: ``"d4"``, one of the eight turns and mirrorings; ``"flips"``, one of the four mirrorings,
    never transposed, as the standalone trainer of ``benchmarks/synthmets_visibility.py``), Adam at ``lr``;
    with ``top_start`` the pooled share starts there and narrows to ``top`` over the first half of the steps
    (:func:`annealed_top`); with ``edges`` ``"negative"`` or ``"below"`` the edge term counts from the step
    ``edge_start * steps`` on (the edge is left out of the pooling from the first).

    With ``candidates`` K > 1 the phase trains K maps side by side,
    the layer's own and K - 1 freshly initialised ones, on the same batches, on all but a ``holdout`` share
    of each class's slides; the map whose pooled logits best separate the held-out slides (AUROC, then their
    loss) is copied into the layer. It costs K times the steps.

    With ``restarts`` R > 0, a phase whose loss over its last 50 steps is still ``plateau`` or more (ln 2 = 0.693
    is the loss of pooled logits that do not separate the classes: the map found nothing) is followed by another,
    up to R times, as long as one more, timed as the ones before, ends within ``time_left`` seconds of the
    phase's start (None: no limit); the phase with the lowest final loss is kept, and one that leaves the plateau
    costs nothing more. ``restart_from``: ``"fresh"``, freshly initialised maps (their own seed; the batches go
    on), or ``"continue"``, the same map trained on for another ``steps`` (a new Adam, the final pooled share and
    the edge term from its first step, no candidates): a map on the plateau is often slow rather than dead
    (SynthMets seed 6: a fresh start stayed there, the same map trained on left it; docs/synthmets_magnet.md,
    "A second phase on the plateau").

    Returns what it did (seconds, reading seconds, steps, the loss's means over the first and last 50 steps
    and over every block of 50, of the kept map; with candidates, each one's held-out AUROC and loss, and
    which was kept; with restarts, each start's loss and seconds and which was kept)."""

    if steps <= 0:
        return {"seconds": 0.0, "steps": 0}
    if negatives not in NEGATIVE_POOLINGS:
        raise ValueError(f"negatives must be one of {NEGATIVE_POOLINGS}, got {negatives!r}")
    if augment not in PRETRAIN_AUGMENTS:
        raise ValueError(f"augment must be one of {PRETRAIN_AUGMENTS}, got {augment!r}")
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    if not 0 <= edge_start < 1:
        raise ValueError(f"edge_start must be in [0, 1), got {edge_start}")
    if restarts < 0:
        raise ValueError(f"restarts must be >= 0, got {restarts}")
    if plateau <= 0:
        raise ValueError(f"plateau must be > 0, got {plateau}")
    if restart_from not in RESTART_FROM:
        raise ValueError(f"restart_from must be one of {RESTART_FROM}, got {restart_from!r}")
    if edges not in EDGE_TREATMENTS:
        raise ValueError(f"edges must be one of {EDGE_TREATMENTS}, got {edges!r}")
    annealed_top(0, steps, top, top_start)  # a bad start fails before the views are read
    if edges != "pool" and not model.config.attention_tissue_only:
        raise ValueError(f"edges={edges!r} needs the tissue mask: set attention_tissue_only")
    layer = model.layers[0]
    if layer.num_stacks == 0:
        raise ValueError("attention pre-training needs a first layer with learned attention")
    y = torch.tensor([float(v) for v in labels])
    if not (y > 0).any() or not (y == 0).any():
        raise ValueError("attention pre-training needs training slides of both classes")
    gen = torch.Generator().manual_seed(seed + 41)
    trained, held = (holdout_split(y, holdout, gen) if candidates > 1
                     else (torch.arange(len(y)), torch.zeros(0, dtype=torch.long)))
    pos, neg = trained[y[trained] > 0], trained[y[trained] == 0]
    start = time.perf_counter()
    views = read_views(model, paths)
    read_s = time.perf_counter() - start
    device = next(model.parameters()).device
    config = model.config

    def fresh() -> torch.nn.Module:
        return type(layer.stacks)(layer.stacks.groups, init=config.layer_attention_init(layer.layer),
                                  padding=config.attention_padding, norm=config.attention_norm).to(device)

    attempts: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    for attempt in range(restarts + 1):
        attempt_start = time.perf_counter()
        previous = best if restart_from == "continue" else None  # the phase this one goes on from, if any
        if previous is not None:  # the kept map alone, on at the phase's final share
            losses, kept, _ = _train_maps(layer, [layer.stacks], views, y, pos, neg, held[:0], gen, steps=steps,
                                          lr=lr, top=top, batch=batch, negatives=negatives, augment=augment,
                                          edges=edges, top_start=None, edge_start=0.0)
            out = previous["out"]
        else:
            # a fresh start for every map, from its own seed: the loop's random stream is left as it was
            with torch.random.fork_rng(devices=[]) if attempt else contextlib.nullcontext():
                if attempt:
                    torch.manual_seed(seed + 7919 * attempt)
                    layer.stacks.load_state_dict(fresh().state_dict())
                stacks = [layer.stacks] + [fresh() for _ in range(candidates - 1)]
            losses, kept, out = _train_maps(layer, stacks, views, y, pos, neg, held, gen, steps=steps, lr=lr,
                                            top=top, batch=batch, negatives=negatives, augment=augment, edges=edges,
                                            top_start=top_start, edge_start=edge_start)
        curve = losses[kept]
        last = float(np.mean(curve[-50:]))
        attempts.append({"loss_first_50": float(np.mean(curve[:50])), "loss_last_50": last,
                         "seconds": time.perf_counter() - attempt_start})
        if previous is not None:
            curve = previous["curve"] + curve  # one map's whole curve
        if best is None or last < best["last"]:
            best = {"attempt": attempt, "last": last, "curve": curve, "out": out,
                    "state": ({k: v.detach().clone() for k, v in layer.stacks.state_dict().items()}
                              if attempt < restarts else None)}
        if last < plateau or attempt == restarts:
            break
        spent = time.perf_counter() - start
        one = spent - read_s
        if time_left is not None and spent + one / (attempt + 1) > time_left:
            logger.warning("attention pre-training: the loss ended on its plateau (%.3f >= %.3f), but another phase "
                           "(~%.0f s) would not fit the %.0f s left to it: keeping this map", last, plateau,
                           one / (attempt + 1), time_left)
            break
        logger.warning("attention pre-training: the loss ended on its plateau (%.3f >= %.3f: the pooled logits do "
                       "not separate the classes); %s (%d of %d)", last, plateau,
                       "training the same map on for another phase" if restart_from == "continue"
                       else "starting the phase again from a fresh first map", attempt + 1, restarts)
    assert best is not None
    if best["attempt"] != len(attempts) - 1:
        layer.stacks.load_state_dict(best["state"])
    layer.train()
    seconds = time.perf_counter() - start
    curve, out, kept = best["curve"], best["out"], best["out"].get("kept", 0)
    first, last = float(np.mean(curve[:50])), best["last"]
    if restarts:
        out = {**out, "attempts": attempts, "attempt_kept": best["attempt"], "plateau": plateau,
               "restart_from": restart_from}
    logger.info("attention pre-training: %d views read in %.0f s, %d steps x %d candidate(s) x %d start(s), kept %d, "
                "loss %.3f -> %.3f (%.0f s)", len(paths), read_s, steps, candidates, len(attempts), kept, first, last,
                seconds)
    return {"seconds": seconds, "read_seconds": read_s, "slides": len(paths), "steps": steps,
            "top": top, "top_start": top_start, "edge_start": edge_start, "loss_first_50": first, "loss_last_50": last,
            "loss_per_50_steps": [float(np.mean(curve[i:i + 50])) for i in range(0, len(curve), 50)], **out}


def _train_maps(layer: Any, stacks: list[torch.nn.Module], views: torch.Tensor, y: torch.Tensor, pos: torch.Tensor,
                neg: torch.Tensor, held: torch.Tensor, gen: torch.Generator, *, steps: int, lr: float, top: float,
                batch: int, negatives: str, augment: str, edges: str, top_start: float | None,
                edge_start: float) -> tuple[list[list[float]], int, dict[str, Any]]:
    """One start of :func:`pretrain_attention`: ``stacks`` (the layer's own first) trained side by side on the same
    batches; with several, the one that best separates the ``held`` slides is copied into the layer. Returns each
    map's loss curve, the kept one's index and, with several, what the choice saw."""
    from magnet_zoo.train.head_pretrain import d4
    from magnet_zoo.train.metrics import auroc

    device = next(stacks[0].parameters()).device
    candidates = len(stacks)
    opts = [torch.optim.Adam(s.parameters(), lr=lr) for s in stacks]
    tissue_only = layer.tissue_only
    half = batch // 2
    losses: list[list[float]] = [[] for _ in stacks]
    layer.train()
    for s in stacks:
        s.train()
    for step in range(steps):
        share = annealed_top(step, steps, top, top_start)
        edge_weight = 1.0 if step >= edge_start * steps else 0.0
        idx = torch.cat([pos[torch.randint(len(pos), (half,), generator=gen)],
                         neg[torch.randint(len(neg), (batch - half,), generator=gen)]])
        k = int(torch.randint(0, 8 if augment == "d4" else 4, (1,), generator=gen))
        x = (d4(views[idx], k) if augment == "d4" else mirror(views[idx], k)).to(device).float()
        mask = layer.tissue_mask(x) if tissue_only else None
        for stack, opt, curve in zip(stacks, opts, losses, strict=True):
            loss, _ = mil_bce(layer.attention_logits(x, stack), mask, y[idx], top=share, negatives=negatives,
                              edges=edges, edge_weight=edge_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            curve.append(float(loss.detach()))
    for opt in opts:
        opt.zero_grad(set_to_none=True)  # the loop's first step must not add the phase's last gradient
    if candidates == 1:
        return losses, 0, {}
    x = views[held].to(device).float()
    mask = layer.tissue_mask(x) if tissue_only else None
    scores = []
    with torch.no_grad():
        for stack in stacks:
            stack.eval()
            loss, pooled = mil_bce(layer.attention_logits(x, stack), mask, y[held], top=top,
                                   negatives=negatives, edges=edges)
            area = float(np.mean([auroc(pooled[:, g].cpu().numpy(), y[held].numpy())
                                  for g in range(pooled.shape[1])]))
            scores.append({"held_out_auroc": area, "held_out_loss": float(loss),
                           "loss_last_50": float(np.mean(losses[len(scores)][-50:]))})
    kept = max(range(candidates), key=lambda i: (scores[i]["held_out_auroc"], -scores[i]["held_out_loss"]))
    if kept:
        layer.stacks.load_state_dict(stacks[kept].state_dict())
    return losses, kept, {"candidates": scores, "kept": kept, "held_out_slides": len(held)}
