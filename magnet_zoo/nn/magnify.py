"""A magnifying layer: node-specific Branch stacks -> attention -> one crop per (node, patch).

Layer ``l`` receives ``N`` images (one per node entering it) and extracts ``P`` patches from each. Each
``(node, patch)`` position has its own Branch stack (paper: "patch and layer-specific Branches"); all of
them run in one grouped-convolution call. The frozen patch (first patch of layer 2) has no stack: its
transform is the identity.
"""

from __future__ import annotations

import torch
from torch import nn

from magnet_zoo.config import MagNetConfig
from magnet_zoo.nn.attention import Affine, attention_to_affine
from magnet_zoo.nn.branch import BranchStack

TISSUE_LEVEL = 0.02
"""A view pixel brighter than this in some channel is tissue (the grey filter makes glass exactly black;
resampled edges are in between)."""


class MagnifyingLayer(nn.Module):
    """Input ``(B, N, 3, H, W)`` -> :class:`Affine` with tensors shaped ``(B, N, P)``."""

    def __init__(self, config: MagNetConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_nodes = config.nodes_entering(layer)
        self.num_patches = config.patches[layer - 1]
        self.min_scale = config.min_scale
        self.max_scale = config.max_scale
        self.temperature = config.attention_temperature
        self.translation = config.translation
        self.tissue_only = config.attention_tissue_only
        self.bounds = config.scale_bounds
        self.jitter = 0.0
        """Training-time noise on the crop centre (set by trainers; never used in eval mode)."""
        self.sample_policy: dict | None = None
        """Draw crop centres from the attention (``attention_to_affine``'s ``sample``): training-time
        exploration (set by the training loop; used in training mode only) or, when the policy has
        ``"eval": True``, sampled zoom trees at inference too (:mod:`magnet_zoo.nn.trees`)."""
        positions = [
            (n, p)
            for n in range(self.num_nodes)
            for p in range(self.num_patches)
            if not config.is_frozen(layer, p)
        ]
        self.register_buffer("node_index", torch.tensor([n for n, _ in positions], dtype=torch.long), False)
        slot = torch.full((self.num_nodes * self.num_patches,), -1, dtype=torch.long)
        for g, (n, p) in enumerate(positions):
            slot[n * self.num_patches + p] = g
        self.register_buffer("slot", slot, False)
        self.stacks = (
            BranchStack(len(positions), init=config.layer_attention_init(layer), padding=config.attention_padding,
                        norm=config.attention_norm)
            if positions else None
        )

    @property
    def num_stacks(self) -> int:
        return int(self.node_index.numel())

    def tissue_mask(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, N, 3, H, W)`` -> ``(B, G, H, W)``: where each learned (node, patch)'s view is not black."""
        b, n, c, h, w = images.shape
        return images.index_select(1, self.node_index).amax(2) > TISSUE_LEVEL

    def attention_logits(self, images: torch.Tensor, stacks: BranchStack | None = None) -> torch.Tensor:
        """``(B, N, 3, H, W)`` -> ``(B, G, H, W)``, one logit map per learned (node, patch); ``stacks``: run
        these instead of the layer's own (a candidate of the same shape, as attention pre-training trains)."""
        b, n, c, h, w = images.shape
        if n != self.num_nodes:
            raise ValueError(f"layer {self.layer} expects {self.num_nodes} images per slide, got {n}")
        gathered = images.index_select(1, self.node_index)
        return (self.stacks if stacks is None else stacks)(gathered.reshape(b, -1, h, w))

    def random_affine(self, images: torch.Tensor, generator: torch.Generator) -> Affine:
        """Random crops instead of attention, ``(B, G)`` like the learned ones: side ``U(min_scale,
        max_scale)`` of the view, centred on a random tissue pixel of it (anywhere when it shows none) and
        moved inside it. Used to train the heads before the attention (``magnet_zoo.train.warmup``)."""
        gathered = images.index_select(1, self.node_index).detach()
        b, g, _, h, w = gathered.shape
        tissue = (gathered.amax(2) > TISSUE_LEVEL).flatten(0, 1).flatten(1).float()
        weights = torch.where(tissue.sum(1, keepdim=True) > 0, tissue, torch.ones_like(tissue))
        pick = torch.multinomial(weights.cpu(), 1, generator=generator).view(b, g).to(images.device)
        u = torch.rand((3, b, g), generator=generator).to(images.device)
        cx = ((pick % w).float() + u[0]) * 2 / w - 1
        cy = (torch.div(pick, w, rounding_mode="floor").float() + u[1]) * 2 / h - 1
        scale = self.min_scale + (self.max_scale - self.min_scale) * u[2]
        tx = torch.maximum(torch.minimum(cx, 1 - scale), scale - 1)
        ty = torch.maximum(torch.minimum(cy, 1 - scale), scale - 1)
        return Affine(scale=scale, tx=tx, ty=ty, probs=images.new_zeros((b, g, h, w)))

    def forward(self, images: torch.Tensor, explore: torch.Generator | None = None) -> Affine:
        """The crops of every (node, patch); with ``explore`` (a CPU generator) random ones, see
        :meth:`random_affine`, and the attention stacks are not run."""
        b = images.shape[0]
        total = self.num_nodes * self.num_patches
        scale = images.new_ones((b, total))
        tx = images.new_zeros((b, total))
        ty = images.new_zeros((b, total))
        probs = images.new_zeros((b, total, *images.shape[-2:]))
        log_prob = None
        if self.stacks is not None and explore is not None:
            learned = self.random_affine(images, explore)
        elif self.stacks is not None:
            # The attention runs in fp32 even under AMP: entmax's support is decided by logit differences
            # that bf16 rounds away.
            with torch.autocast(images.device.type, enabled=False):
                logits = self.attention_logits(images.float())
            learned = attention_to_affine(
                logits,
                min_scale=self.min_scale,
                max_scale=self.max_scale,
                temperature=self.temperature,
                translation=self.translation,
                jitter=self.jitter if self.training else 0.0,
                mask=self.tissue_mask(images) if self.tissue_only else None,
                bounds=self.bounds,
                sample=self.sample_policy if self.training or (self.sample_policy or {}).get("eval") else None,
            )
        if self.stacks is not None:
            where = (self.slot >= 0).nonzero().squeeze(1)
            src = self.slot[where]
            scale = scale.index_copy(1, where, learned.scale.index_select(1, src).to(scale.dtype))
            tx = tx.index_copy(1, where, learned.tx.index_select(1, src).to(tx.dtype))
            ty = ty.index_copy(1, where, learned.ty.index_select(1, src).to(ty.dtype))
            probs = probs.index_copy(1, where, learned.probs.index_select(1, src).to(probs.dtype))
            if learned.log_prob is not None:
                log_prob = images.new_zeros((b, total), dtype=torch.float32).index_copy(
                    1, where, learned.log_prob.index_select(1, src))
        shape = (b, self.num_nodes, self.num_patches)
        return Affine(
            scale=scale.view(shape),
            tx=tx.view(shape),
            ty=ty.view(shape),
            probs=probs.view(*shape, *images.shape[-2:]),
            log_prob=log_prob.view(shape) if log_prob is not None else None,
        )
