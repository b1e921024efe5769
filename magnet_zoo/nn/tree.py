"""The ROI tree: names as in the paper's Fig. 5 and the geometry of magnification.

Every node is a square *canvas* in level-0 pixels. The root's canvas is the slide's extent padded
symmetrically to a square (exactly the paper's resize-and-pad protocol). A child is the parent's
canvas mapped through the crop ``theta = [[s, 0, tx], [0, s, ty]]``: its centre moves by
``t * side / 2`` and its side scales by ``s`` (normalised coordinates span the canvas edge to edge).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from magnet_zoo.nn.fetcher import Square

ROOT_NAME = "I_1"


def child_name(parent: str, patch: int, max_patches: int) -> str:
    """``I_13`` is the third ROI of ``I_1``; with more than 9 patches per node, indices get a dot."""
    sep = "" if max_patches <= 9 else "."
    return f"{parent}{sep}{patch + 1}"


def root_square(width: float, height: float) -> Square:
    side = float(max(width, height))
    return Square(x=(width - side) / 2, y=(height - side) / 2, side=side)


def child_square(parent: Square, scale: float, tx: float, ty: float) -> Square:
    cx, cy = parent.centre
    cx += tx * parent.side / 2
    cy += ty * parent.side / 2
    side = scale * parent.side
    return Square(x=cx - side / 2, y=cy - side / 2, side=side)


def frame_square(square: Square, grow: float) -> Square:
    """``square`` grown ``grow`` times about its centre (the frame read with ``geometry="frame"``)."""
    cx, cy = square.centre
    side = square.side * grow
    return Square(x=cx - side / 2, y=cy - side / 2, side=side)


@dataclass
class RoiNode:
    """One image of the zoom tree."""

    name: str
    """Tree name as in the paper's Fig. 5: ``I_1`` (the slide), ``I_13``, ``I_131``, ..."""
    layer: int
    """Magnifying layer that produced this ROI (0 for the slide itself)."""
    box: tuple[float, float, float, float]
    """``(x, y, w, h)`` in level-0 pixels; the slide's extent for the root, the square ROI otherwise
    (it may extend past the slide, where the pixels are black)."""
    level: int
    """Pyramid level the node's pixels were read from (for the last layer's patches: the level of
    the parent's ``I'`` they were sampled from, or with ``crop_source="reread"`` the level they were
    re-read from)."""
    scale: float
    translation: tuple[float, float]
    parent: str | None
    frozen: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["box"] = list(self.box)
        d["translation"] = list(self.translation)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoiNode:
        return cls(
            name=data["name"],
            layer=int(data["layer"]),
            box=tuple(float(v) for v in data["box"]),
            level=int(data["level"]),
            scale=float(data["scale"]),
            translation=tuple(float(v) for v in data["translation"]),
            parent=data.get("parent"),
            frozen=bool(data.get("frozen", False)),
        )
