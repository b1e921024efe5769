"""The MagNet: magnifying layers over a region fetcher, then the classifier and auxiliary heads.

Per slide, with ``L`` layers and ``P_l`` patches per node at layer ``l``:

1. The fetcher reads the slide's square canvas at ``input_size`` (``I``, 56x56; with
   ``view_oversample = k`` at ``k`` times that, grey-filtered, then area-averaged) and at layer 1's
   ``I'`` size (112x112), from the coarsest pyramid level that still has enough pixels.
2. Layer ``l`` runs one Branch stack per (node, patch) on each node's ``I`` -> entmax-1.5 ->
   ``theta`` -> samples a crop from the node's ``I'`` (differentiable in ``theta``). For ``l < L`` each
   child's ``I'`` is re-read from the slide at the level its ROI needs, and the crops are the children's
   ``I`` (56x56); the last layer's crops (224x224) go to the classifier. With ``crop_source="reread"``
   every crop takes its values from its own region read at its output size instead (for inner layers:
   the child's re-read ``I'``, resized), and its gradient from the sampled crop. With
   ``geometry="frame"`` each child is read for a frame around its box and its crops are sampled through
   the ancestors' composed transforms (:mod:`magnet_zoo.nn.frames`), so they are differentiable in every
   ancestor's crop.
3. Auxiliary heads read the crops of the watched layers (1 and 3 by default).

The forward pass also returns the ROI tree (names, boxes, levels, scales) and the accounting (images
and values fed to the networks, pixels read from the source).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from magnet_zoo.config import MagNetConfig
from magnet_zoo.nn.attention import Affine
from magnet_zoo.nn.fetcher import RegionFetcher, Square
from magnet_zoo.nn.frames import Frames
from magnet_zoo.nn.heads import AuxiliaryHead, SequenceClassifier
from magnet_zoo.nn.losses import LossTerms, loss_settings, output_loss
from magnet_zoo.nn.magnify import MagnifyingLayer
from magnet_zoo.nn.sampler import sample
from magnet_zoo.nn.tree import ROOT_NAME, RoiNode, child_name, child_square, frame_square, root_square


@dataclass
class MagNetOutput:
    """What one forward pass over ``B`` slides returns."""

    logits: torch.Tensor
    """Classifier logit per slide, ``(B,)``."""
    aux_logits: dict[int, torch.Tensor]
    """Auxiliary head logits by watched layer, each ``(B,)``."""
    trees: list[list[RoiNode]]
    """Per slide, every node of the zoom tree in breadth-first (tree) order."""
    accounting: list[dict[str, Any]]
    """Per slide: images and values fed to the networks, pixels read from the source."""
    affines: list[Affine]
    """Per layer, the crop parameters with tensors shaped ``(B, N_l, P_l)`` (for losses and metrics)."""
    final_patches: torch.Tensor
    """The classifier's input ``(B, N_final, 3, S, S)`` in tree order."""
    crops: dict[int, torch.Tensor] = field(default_factory=dict)
    """Crops produced by each layer, ``(B, N_l * P_l, 3, s, s)``; kept for explanation and analysis."""
    aux_patch_logits: dict[int, torch.Tensor] = field(default_factory=dict)
    """With ``aux_pooling`` ``"per_patch"`` or ``"max"``: the auxiliary heads' logits per patch, each
    ``(B, N_l * P_l)``."""
    aux_pooling: str = "per_patch"
    """The config's ``aux_pooling``; the auxiliary loss is taken per patch unless it is ``"max"``."""

    @property
    def probs(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    @property
    def aux_probs(self) -> dict[int, torch.Tensor]:
        return {k: torch.sigmoid(v) for k, v in self.aux_logits.items()}


def resize_views(views: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, N, 3, S, S)`` -> ``(B, N, 3, size, size)`` by area averaging (``size <= S``)."""
    b, n, c, s, _ = views.shape
    if s == size:
        return views
    return F.interpolate(views.flatten(0, 1), size=(size, size), mode="area").view(b, n, c, size, size)


def straight_through(crops: torch.Tensor, sharp: torch.Tensor) -> torch.Tensor:
    """The values of ``sharp`` with the gradient of ``crops``: a crop's region read from the slide,
    differentiable in the crop parameters as the sampled crop it replaces (``crop_source="reread"``)."""
    return crops + (sharp.to(crops.dtype) - crops).detach()


class MagNet(nn.Module):
    """Magnifying Network (Dimitriou et al., Diagnostics 2024) for gigapixel images.

    Input: a sequence of ``B`` :class:`~magnet_zoo.nn.fetcher.RegionFetcher` objects, one per slide
    (``magnet_zoo.wsi.SlideFetcher`` wraps any slide source or in-memory array). Pixels are RGB in
    ``[0, 1]``; the fetcher applies the grey filter. Output: :class:`MagNetOutput`, whose ``logits`` are
    ``(B,)`` slide-level tumour logits.
    """

    def __init__(self, config: MagNetConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(MagnifyingLayer(config, k) for k in range(1, config.num_layers + 1))
        self.classifier = SequenceClassifier(
            config.classifier_backbone,
            config.backbone_pretrained,
            config.gru_hidden,
            config.mlp_hidden,
            config.dropout,
        )
        self.aux_heads = nn.ModuleDict(
            {str(k): AuxiliaryHead(config.aux_backbone, config.backbone_pretrained) for k in config.active_aux_layers}
        )

    # ------------------------------------------------------------------ helpers
    def _crop(self, iprime: torch.Tensor, affine: Affine, size: int, frames: Frames | None = None) -> torch.Tensor:
        """Crops ``(B, N*P, 3, size, size)`` of each node's ``I'`` ``(B, N, 3, S, S)``; with ``frames``
        (``geometry="frame"``) ``iprime`` holds each node's frame and the crops are composed through it."""
        b, n, c, s, _ = iprime.shape
        p = affine.scale.shape[-1]
        images = iprime.unsqueeze(2).expand(b, n, p, c, s, s).reshape(b * n * p, c, s, s)
        theta = affine.theta() if frames is None else frames.theta(affine)
        theta = theta.reshape(b * n * p, 2, 3).to(images.dtype)
        out = sample(images, theta, size, mode=self.config.sampler, num_samples=self.config.linearized_samples)
        return out.view(b, n * p, c, size, size)

    @staticmethod
    def _fetch(fetchers: Sequence[RegionFetcher], squares: list[list[Square]], size: int, device: torch.device):
        """Every slide's reads for one layer; the slides of a batch are read at the same time."""
        pairs = list(zip(fetchers, squares, strict=True))
        if len(pairs) == 1:
            results = [pairs[0][0].fetch(pairs[0][1], size)]
        else:
            with ThreadPoolExecutor(max_workers=len(pairs), thread_name_prefix="magnet-slide") as pool:
                results = list(pool.map(lambda pair: pair[0].fetch(pair[1], size), pairs))
        images = torch.stack([got.images.to(device) for got in results])
        return images, [got.levels for got in results], [got.pixels_read for got in results]

    def whole_slide_view(
        self, fetchers: Sequence[RegionFetcher], device: torch.device, iprime: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """The first layer's view ``I`` of each slide's square canvas, ``(B, 1, 3, input_size, input_size)``,
        and the pixels read for it: read at ``input_size``, or with ``view_oversample = k > 1`` read at
        ``k x input_size``, grey-filtered by the fetcher there and area-averaged (layer 1's ``I'`` is reused
        when it has that size: pass it as ``iprime``)."""
        cfg = self.config
        size = cfg.view_read_size()
        if iprime is not None and cfg.view_oversample > 1 and iprime.shape[-1] == size:
            image, read = iprime, [0] * len(fetchers)
        else:
            image, _, read = self._fetch(fetchers, [[root_square(*f.slide_size)] for f in fetchers], size, device)
        if cfg.view_oversample > 1:
            b = image.shape[0]
            image = F.avg_pool2d(image.flatten(0, 1), cfg.view_oversample).view(b, 1, 3, cfg.input_size, cfg.input_size)
        return image, read

    def counts(self) -> dict[str, Any]:
        """Images and values fed to the networks per slide (independent of the slide)."""
        cfg = self.config
        small = sum(cfg.nodes_entering(layer) for layer in range(1, cfg.num_layers + 1))
        final = cfg.num_final_patches
        values = 3 * (small * cfg.input_size**2 + final * cfg.final_patch_size**2)
        return {
            "images": {str(cfg.input_size): small, str(cfg.final_patch_size): final},
            "values_fed": values,
        }

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        fetchers: Sequence[RegionFetcher],
        *,
        auxiliary: bool | None = None,
        explore: torch.Generator | None = None,
    ) -> MagNetOutput:
        """Run the zoom tree over ``fetchers`` (one per slide).

        ``auxiliary`` runs the auxiliary heads; by default only in training mode, where the losses
        need them (at inference they cost compute and change nothing in the prediction). With
        ``explore`` (a CPU ``torch.Generator``) every learned crop is random instead of attended
        (:meth:`MagnifyingLayer.random_affine`): the heads see the tree's crops, read and sampled as
        usual, and the attention gets no gradient (``magnet_zoo.train.warmup``).
        """
        cfg = self.config
        run_aux = self.training if auxiliary is None else auxiliary
        device = next(self.parameters()).device
        b = len(fetchers)
        if b == 0:
            raise ValueError("MagNet.forward needs at least one slide (a sequence of region fetchers)")

        roots = [root_square(*f.slide_size) for f in fetchers]
        squares = [[r] for r in roots]
        iprime, levels, pixels_read = self._fetch(fetchers, squares, cfg.iprime_size(1), device)
        image, px_view = self.whole_slide_view(fetchers, device, iprime)
        pixels_read = [a + c for a, c in zip(pixels_read, px_view, strict=True)]
        names = [[ROOT_NAME] for _ in range(b)]
        trees: list[list[RoiNode]] = [
            [
                RoiNode(
                    name=ROOT_NAME,
                    layer=0,
                    box=(0.0, 0.0, float(f.slide_size[0]), float(f.slide_size[1])),
                    level=levels[i][0],
                    scale=1.0,
                    translation=(0.0, 0.0),
                    parent=None,
                )
            ]
            for i, f in enumerate(fetchers)
        ]

        affines: list[Affine] = []
        crops_by_layer: dict[int, torch.Tensor] = {}
        frames = Frames.root(b, device) if cfg.geometry == "frame" else None
        for layer_idx, layer in enumerate(self.layers, start=1):
            affine = layer(image, explore=explore)
            affines.append(affine)
            size = cfg.output_size(layer_idx)
            crops = self._crop(iprime, affine, size, frames)

            # Geometry of the children (no gradient: boxes only decide where to read).
            p = affine.scale.shape[-1]
            s_list = affine.scale.detach().float().cpu().tolist()
            tx_list = affine.tx.detach().float().cpu().tolist()
            ty_list = affine.ty.detach().float().cpu().tolist()
            new_squares, new_names = [], []
            for i in range(b):
                sq_i, nm_i = [], []
                for n, parent_sq in enumerate(squares[i]):
                    for k in range(p):
                        s, tx, ty = s_list[i][n][k], tx_list[i][n][k], ty_list[i][n][k]
                        sq = child_square(parent_sq, s, tx, ty)
                        nm = child_name(names[i][n], k, max(cfg.patches))
                        sq_i.append(sq)
                        nm_i.append(nm)
                        trees[i].append(
                            RoiNode(
                                name=nm,
                                layer=layer_idx,
                                box=(sq.x, sq.y, sq.side, sq.side),
                                level=levels[i][n],  # overwritten below when the child is re-read
                                scale=s,
                                translation=(tx, ty),
                                parent=names[i][n],
                                frozen=cfg.is_frozen(layer_idx, k),
                            )
                        )
                new_squares.append(sq_i)
                new_names.append(nm_i)
            squares, names = new_squares, new_names

            if layer_idx < cfg.num_layers:
                # With geometry="frame" each child is read for a frame (its box plus a margin of ``margin``
                # I' pixels per side) and its crops are composed through it; otherwise for its box.
                core, margin = cfg.iprime_size(layer_idx + 1), cfg.frame_pixels(layer_idx + 1)
                grow = (core + 2 * margin) / core
                reads = squares if margin == 0 else [[frame_square(sq, grow) for sq in row] for row in squares]
                iprime, levels, px = self._fetch(fetchers, reads, core + 2 * margin, device)
                if frames is not None:
                    frames = frames.children(affine, grow)
                for i in range(b):
                    pixels_read[i] += px[i]
                    first = len(trees[i]) - len(squares[i])
                    for j, lvl in enumerate(levels[i]):
                        trees[i][first + j].level = lvl
                if cfg.crop_source == "reread":
                    view = iprime[..., margin:margin + core, margin:margin + core]
                    crops = straight_through(crops, resize_views(view, size).view_as(crops))
                image = crops.view(b, -1, 3, size, size)
                if not cfg.view_gradient:
                    image = image.detach()
            elif cfg.crop_source == "reread":
                sharp, reread_levels, px = self._fetch(fetchers, squares, size, device)
                crops = straight_through(crops, sharp.view_as(crops))
                for i in range(b):
                    pixels_read[i] += px[i]
                    first = len(trees[i]) - len(squares[i])
                    for j, lvl in enumerate(reread_levels[i]):  # their pixels come from here, not the parent's I'
                        trees[i][first + j].level = lvl

            crops_by_layer[layer_idx] = crops

        final = crops_by_layer[cfg.num_layers]
        logits, aux_logits, aux_patch_logits = self.read_out(crops_by_layer, auxiliary=run_aux)
        base = self.counts()
        accounting = [{**base, "pixels_read": int(pixels_read[i])} for i in range(b)]
        return MagNetOutput(
            logits=logits,
            aux_logits=aux_logits,
            trees=trees,
            accounting=accounting,
            affines=affines,
            final_patches=final,
            crops=crops_by_layer,
            aux_patch_logits=aux_patch_logits,
            aux_pooling=cfg.aux_pooling,
        )

    def read_out(
        self, crops: dict[int, torch.Tensor], auxiliary: bool = True
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """The heads on each layer's crops ``{layer: (B, N, 3, s, s)}``: ``(classifier logits (B,), auxiliary
        logits by watched layer, per-patch auxiliary logits by watched layer)`` (the last two empty
        without ``auxiliary``; the per-patch ones only with ``aux_pooling`` ``"per_patch"`` or ``"max"``)."""
        cfg = self.config
        aux_logits: dict[int, torch.Tensor] = {}
        aux_patch_logits: dict[int, torch.Tensor] = {}
        for layer_idx in cfg.active_aux_layers if auxiliary else ():
            head = self.aux_heads[str(layer_idx)]
            if cfg.aux_pooling in ("per_patch", "max"):
                patch = aux_patch_logits[layer_idx] = head.patch_logits(crops[layer_idx])
                aux_logits[layer_idx] = patch.mean(1) if cfg.aux_pooling == "per_patch" else patch.amax(1)
            else:
                aux_logits[layer_idx] = head(crops[layer_idx])
        return self.classifier(crops[cfg.num_layers]), aux_logits, aux_patch_logits

    def subtree_stacks(self, patch: int) -> list[tuple[int, int]]:
        """``(layer index, group)`` of every Branch stack under first-layer patch ``patch``: its own and
        those of all its descendants (frozen patches have none)."""
        cfg = self.config
        if not 0 <= patch < cfg.patches[0]:
            raise IndexError(f"layer 1 has patches 0..{cfg.patches[0] - 1}, got {patch}")
        out: list[tuple[int, int]] = []
        nodes = [0]  # node indices entering the layer that descend from ``patch``
        for i, layer in enumerate(self.layers):
            slots = [n * layer.num_patches + k for n in nodes for k in range(layer.num_patches)]
            if i == 0:
                slots = [patch]
            out += [(i, int(layer.slot[s])) for s in slots if int(layer.slot[s]) >= 0]
            nodes = slots
        return out

    def copy_branch(self, src: int, dst: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Overwrite the attention stacks under first-layer patch ``dst`` with those under ``src``
        (same tree shape), optimiser state included: the two branches then look where ``src`` looks.

        Used to revive a branch that never found the evidence (see the recipe field ``revive_at``).
        """
        pairs = zip(self.subtree_stacks(src), self.subtree_stacks(dst), strict=True)
        for (layer_i, g_src), (_, g_dst) in pairs:
            self.layers[layer_i].stacks.copy_group(g_src, g_dst, optimizer)

    def loss(self, output: MagNetOutput, targets: torch.Tensor) -> LossTerms:
        """The paper's total loss ``L1 + L2 + L3`` with the terms the config enables."""
        return output_loss(output, targets, **loss_settings(self.config))
