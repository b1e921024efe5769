"""Fixed-frame geometry: crops that stay differentiable in every ancestor's crop parameters.

With ``geometry="reread"`` (the paper) a child's ``I'`` is read from the slide for its box, which is a
constant: the pixels the heads see below layer ``l`` do not move when layer ``l``'s crop moves, so an
ancestor learns only through the next attention map's input. With ``geometry="frame"`` each child's
pixels are read for a *frame*, a constant square around its box (the box grown by a margin), and its
crops are sampled from that frame through the composition of every ancestor's transform expressed
relative to the frame. At the current parameters the composed crop is the child's box inside the frame,
so the forward pass reads what ``reread`` reads (up to the resampling of the margin); its derivative with
respect to an ancestor's ``(s, t)`` is that of the sharp pixels actually sampled (DESIGN.md section 6,
item 2).

Boxes are kept in the root canvas's normalised coordinates (the slide's padded square spans
``[-1, 1]``): a node is ``centre + half * u`` for ``u`` in ``[-1, 1]^2``; its crop ``(s, tx, ty)`` is the
box ``centre + half * t`` with half-side ``half * s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from magnet_zoo.nn.attention import Affine


@dataclass
class Frames:
    """Per slide and node: the node's box (differentiable) and the frame its pixels were read for (constant)."""

    centre: torch.Tensor
    """``(B, N, 2)``: box centres ``(x, y)``, a function of every ancestor's crop parameters."""
    half: torch.Tensor
    """``(B, N)``: box half-sides."""
    frame_centre: torch.Tensor
    """``(B, N, 2)``: centres of the squares that were read (constants)."""
    frame_half: torch.Tensor
    """``(B, N)``: half-sides of the squares that were read (constants)."""

    @classmethod
    def root(cls, batch: int, device: torch.device) -> Frames:
        """The slide's canvas: box and frame are the whole padded square."""
        centre = torch.zeros((batch, 1, 2), device=device)
        half = torch.ones((batch, 1), device=device)
        return cls(centre, half, centre, half)

    def theta(self, affine: Affine) -> torch.Tensor:
        """``(B, N, P, 2, 3)``: each crop of :class:`Affine` ``(B, N, P)`` as a transform of its node's
        frame. For the root (box = frame) this is ``affine.theta()`` exactly."""
        centre, half = self._crop_boxes(affine)
        fh = self.frame_half[:, :, None]
        a = half / fh
        shift = (centre - self.frame_centre[:, :, None, :]) / fh[..., None]
        zero = torch.zeros_like(a)
        row0 = torch.stack([a, zero, shift[..., 0]], dim=-1)
        row1 = torch.stack([zero, a, shift[..., 1]], dim=-1)
        return torch.stack([row0, row1], dim=-2)

    def children(self, affine: Affine, grow: float) -> Frames:
        """The ``N * P`` children's boxes, each read for a frame ``grow`` times its side (same centre)."""
        centre, half = self._crop_boxes(affine)
        b = centre.shape[0]
        centre = centre.reshape(b, -1, 2)
        half = half.reshape(b, -1)
        return Frames(centre, half, centre.detach(), half.detach() * grow)

    def _crop_boxes(self, affine: Affine) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.stack([affine.tx, affine.ty], dim=-1).to(self.centre.dtype)
        centre = self.centre[:, :, None, :] + self.half[:, :, None, None] * t
        half = self.half[:, :, None] * affine.scale.to(self.half.dtype)
        return centre, half
