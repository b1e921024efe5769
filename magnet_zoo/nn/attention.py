"""Spatial entmax-1.5 attention -> the affine parameters ``(s, tx, ty)`` of a crop (paper eq. 1-4).

Coordinates are normalised to ``[-1, 1]`` over the image *extent* with pixel centres at
``(2 i + 1) / W - 1`` (PyTorch's ``align_corners=False`` convention), the same convention the sampler
and the region geometry use, so a crop ``[t - s, t + s]`` is exactly the box the tree reports.

Choices where the paper's text and listing differ (documented in the README):

* Translation: the expected x and y under the attention map, *then* ``tanh`` (eq. 2-3). The
  listing applies ``tanh`` to the marginals before the expectation instead; eq. 2-3 is the
  equation the text describes and keeps the expectation a proper mean.
* Scale: the expected L1 distance from the (pre-``tanh``) mean. For a uniform map over a box of
  half-width ``a`` this is exactly ``a``, so the crop covers the attended box. Then
  ``s = min(s, 1 - max(|tx|, |ty|))`` keeps the crop inside the view, and ``s`` is clamped to
  ``[min_scale, max_scale]`` (eq. 1 and the listing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from entmax import entmax15

SAMPLE_SOURCES = ("softmax", "entmax")
"""What a sampled crop centre is drawn from: a dense ``softmax(logits / T)`` (every position can be drawn,
so a score-function gradient reaches every logit: exploration in training) or the layer's own sparse
entmax map (a centre inside the support the expected crop averages: sampled trees at inference)."""


def pixel_centres(n: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised coordinates of ``n`` pixel centres across ``[-1, 1]`` (align_corners=False)."""
    return (torch.arange(n, device=device, dtype=dtype) * 2 + 1) / n - 1


@dataclass
class Affine:
    """Affine crop parameters for a batch of attention maps, each tensor shaped like the maps' batch."""

    scale: torch.Tensor
    tx: torch.Tensor
    ty: torch.Tensor
    probs: torch.Tensor
    """The sparse attention map (..., H, W), summing to one."""
    log_prob: torch.Tensor | None = None
    """With sampled crop centres (training-time exploration): the log-probability of each sampled centre
    under the sampling policy, with gradient to the attention logits; ``None`` otherwise."""

    def theta(self) -> torch.Tensor:
        """``[[s, 0, tx], [0, s, ty]]`` shaped ``(..., 2, 3)``."""
        zero = torch.zeros_like(self.scale)
        row0 = torch.stack([self.scale, zero, self.tx], dim=-1)
        row1 = torch.stack([zero, self.scale, self.ty], dim=-1)
        return torch.stack([row0, row1], dim=-2)


def attention_to_affine(
    logits: torch.Tensor,
    *,
    min_scale: float = 0.05,
    max_scale: float = 1.0,
    temperature: float = 1.0,
    translation: str = "tanh",
    jitter: float = 0.0,
    mask: torch.Tensor | None = None,
    bounds: str = "clip",
    sample: dict | None = None,
) -> Affine:
    """Turn attention logit maps ``(..., H, W)`` into crop parameters.

    entmax-1.5 over all ``H * W`` positions gives a sparse probability map ``p``. Translation is
    ``tanh(E_p[x])``, ``tanh(E_p[y])``; scale is ``E_p[|x - E x| + |y - E y|]``, bounded so the crop
    stays inside the view and clamped to ``[min_scale, max_scale]``. ``translation="clamp"`` uses the
    expected position itself (it always lies in the view) instead of its ``tanh``.

    ``jitter > 0`` adds Gaussian noise of that standard deviation to the crop centre (training-time
    exploration, see the recipe field ``jitter``): a crop whose attention never covers the evidence gets
    no gradient towards it, but a jittered crop sometimes lands on it, and the loss gradient with
    respect to the jittered centre is the gradient with respect to the attended one.

    ``bounds="clip"`` is the paper's: ``s = min(s, 1 - max(|tx|, |ty|))`` then clamped to ``[min_scale,
    max_scale]`` (the clamp runs last, so a crop on the view's edge can hang outside it, and a scale on a
    bound has no gradient). ``bounds="soft"`` squashes ``s`` smoothly into ``(min_scale, max_scale)``
    (``lo + (hi - lo) * sigmoid(4 (s - mid) / (hi - lo))``: slope 1 at the middle, a gradient everywhere),
    then, with the scale final, limits the centre softly to ``[-(1 - s), 1 - s]`` (the identity up to
    ``0.8 (1 - s)``, then a tanh knee that reaches the bound only at infinity: centres inside are not
    moved, and the crop always lies inside the view).

    ``sample={"temperature": T, "uniform": e}`` (training-time exploration) draws each crop's centre
    from a dense policy over the same logits instead of taking the map's expectation: ``(1 - e) *
    softmax(logits / T) + e * uniform`` (over the allowed positions), a uniformly random point inside
    the drawn pixel. The centre then has no pathwise gradient; ``log_prob`` (the drawn pixel's
    log-probability, differentiable in the logits) carries a score-function gradient instead
    (:mod:`magnet_zoo.train.exploration`). The policy is dense, unlike entmax: a position outside the
    map's support can be drawn, and its logit moves. The scale is the map's, as without sampling.
    ``sample["generator"]`` (optional) is a ``torch.Generator`` for the draws, which then happen on the
    generator's device (a CPU generator gives the same draws whatever device the model is on) instead of
    from the global RNG; ``sample["source"]`` (optional, :data:`SAMPLE_SOURCES`) ``"entmax"`` draws from the
    sparse map ``p`` itself instead of the softmax (mixed with the same uniform share); ``sample["eval"]`` is
    read by :class:`~magnet_zoo.nn.magnify.MagnifyingLayer`
    (sample in eval mode too, :mod:`magnet_zoo.nn.trees`) and ignored here.
    """
    *lead, h, w = logits.shape
    flat = logits.reshape(*lead, h * w).float() / temperature
    if mask is not None:
        allowed = mask.reshape(*lead, h * w).to(torch.bool)
        top = flat.detach().masked_fill(~allowed, float("-inf")).amax(-1, keepdim=True)
        fill = torch.where(torch.isfinite(top), top - 100.0, top.new_zeros(()))
        flat = torch.where(allowed | ~torch.isfinite(top), flat, fill.expand_as(flat))
    probs = entmax15(flat, dim=-1).reshape(*lead, h, w)
    xs = pixel_centres(w, logits.device)
    ys = pixel_centres(h, logits.device)
    px = probs.sum(dim=-2)  # marginal over x: (..., W)
    py = probs.sum(dim=-1)  # marginal over y: (..., H)
    mean_x = (px * xs).sum(-1)
    mean_y = (py * ys).sum(-1)
    spread = (px * (xs - mean_x.unsqueeze(-1)).abs()).sum(-1) + (py * (ys - mean_y.unsqueeze(-1)).abs()).sum(-1)
    if translation == "tanh":
        tx, ty = torch.tanh(mean_x), torch.tanh(mean_y)
    elif translation == "clamp":
        tx, ty = mean_x.clamp(-1, 1), mean_y.clamp(-1, 1)
    else:
        raise ValueError(f"translation must be 'tanh' or 'clamp', got {translation!r}")
    log_prob = None
    if sample is not None:
        policy = {k: v for k, v in sample.items() if k != "eval"}
        tx, ty, log_prob = _sample_centres(logits.reshape(*lead, h * w).float(), mask, h, w,
                                           entmax_map=probs.reshape(*lead, h * w), **policy)
    elif jitter > 0:
        tx = (tx + jitter * torch.randn_like(tx)).clamp(-1, 1)
        ty = (ty + jitter * torch.randn_like(ty)).clamp(-1, 1)
    if bounds == "clip":
        scale = torch.minimum(spread, 1 - torch.maximum(tx.abs(), ty.abs()))
        scale = scale.clamp(min_scale, max_scale)
    elif bounds == "soft":
        width = max_scale - min_scale
        if width < 1e-6:
            scale = torch.full_like(spread, min_scale)
        else:
            scale = min_scale + width * torch.sigmoid(4 * (spread - (min_scale + max_scale) / 2) / width)
        room = (1 - scale).clamp_min(1e-6)
        tx, ty = _soft_limit(tx, room), _soft_limit(ty, room)
    else:
        raise ValueError(f"bounds must be 'clip' or 'soft', got {bounds!r}")
    return Affine(scale=scale, tx=tx, ty=ty, probs=probs, log_prob=log_prob)


def _soft_limit(t: torch.Tensor, limit: torch.Tensor, knee: float = 0.8) -> torch.Tensor:
    """``t`` where ``|t| <= knee * limit``; beyond, ``knee * limit + (1 - knee) * limit * tanh(excess / ...)``:
    continuous with slope 1 at the knee, strictly inside ``(-limit, limit)``, a gradient everywhere."""
    a = knee * limit
    span = (limit - a).clamp_min(1e-6)
    excess = (t.abs() - a).clamp_min(0)
    bent = torch.sign(t) * (a + span * torch.tanh(excess / span))
    return torch.where(t.abs() <= a, t, bent)


def _sample_centres(
    flat: torch.Tensor,
    mask: torch.Tensor | None,
    h: int,
    w: int,
    temperature: float = 1.0,
    uniform: float = 0.05,
    generator: torch.Generator | None = None,
    source: str = "softmax",
    entmax_map: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one centre per map from ``(1 - uniform) * softmax(flat / temperature) + uniform * U`` (with
    ``source="entmax"``, ``entmax_map``, the layer's own sparse map, instead of the softmax; the temperature
    is then unused): ``(tx, ty, log_prob)``, the centres without gradient, ``log_prob`` with it (see
    attention_to_affine). With ``generator`` the draws come from it, on its device; otherwise from the
    global RNG."""
    lead = flat.shape[:-1]
    allowed = torch.ones_like(flat, dtype=torch.bool) if mask is None else mask.reshape(flat.shape).to(torch.bool)
    allowed = allowed | ~allowed.any(-1, keepdim=True)  # a map with nothing allowed: anywhere
    if source == "entmax":
        if entmax_map is None:
            raise ValueError("source='entmax' needs the layer's entmax map")
        policy = entmax_map.float()
    elif source == "softmax":
        policy = torch.softmax((flat / temperature).masked_fill(~allowed, float("-inf")), -1)
    else:
        raise ValueError(f"the sampling source must be one of {SAMPLE_SOURCES}, got {source!r}")
    even = allowed.float() / allowed.float().sum(-1, keepdim=True)
    policy = (1 - uniform) * policy + uniform * even
    draw_on = flat.device if generator is None else generator.device
    index = torch.multinomial(policy.detach().reshape(-1, h * w).to(draw_on), 1, generator=generator)
    index = index.to(flat.device).view(*lead, 1)
    log_prob = torch.log(policy.gather(-1, index).squeeze(-1).clamp_min(1e-30))
    index = index.squeeze(-1)
    offset = torch.rand((2, *lead), device=draw_on, generator=generator).to(flat.device)
    tx = ((index % w).float() + offset[0]) * 2 / w - 1
    ty = (torch.div(index, w, rounding_mode="floor").float() + offset[1]) * 2 / h - 1
    return tx, ty, log_prob


def identity_affine(shape: tuple[int, ...], device: torch.device | None = None) -> Affine:
    """The frozen patch: the whole view, ``s = 1, t = 0``."""
    ones = torch.ones(shape, device=device)
    zeros = torch.zeros(shape, device=device)
    return Affine(scale=ones, tx=zeros, ty=zeros.clone(), probs=torch.empty(0, device=device))
