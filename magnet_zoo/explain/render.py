"""The paper's Fig. 5, for any prediction: where the MagNet looked, and what it saw.

Left: the slide (its square canvas, glass shown white) with every layer's ROIs as nested boxes,
coloured by patch index (first red, second blue, third green, as in the paper) and labelled with their
tree names; deeper layers are drawn thinner; a frozen patch (the identity) is its parent's box again
and is not drawn twice. Right: the final patches at full resolution (small ones enlarged), in tree
order, captioned with their names (``I_121 = I_12`` for a frozen patch) and the pyramid level read.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from magnet_zoo.explain.geojson import patch_colour
from magnet_zoo.infer.predict import Prediction
from magnet_zoo.nn.tree import root_square
from magnet_zoo.wsi.fetch import read_square
from magnet_zoo.wsi.levels import select_level
from magnet_zoo.wsi.protocol import RegionSource

HEADER = 44
CAPTION = 18
GAP = 6
MIN_TILE = 160
"""Patches smaller than this are shown enlarged (nearest neighbour, every pixel a crisp block)."""


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _caption(node) -> str:
    same = f" = {node.parent}" if node.frozen else ""
    return f"{node.name}{same}  (level {node.level})"


def slide_canvas(source: RegionSource, size: int) -> tuple[np.ndarray, float, float, float]:
    """The slide's square canvas at ``size`` px (black outside the slide), and its level-0 geometry."""
    w, h = source.dimensions
    square = root_square(w, h)
    level = select_level(source.level_downsamples, square.side, size)
    pixels, _ = read_square(source, square, size, level)
    return pixels, square.x, square.y, square.side


def render_explanation(source: RegionSource, prediction: Prediction, *, thumb_size: int = 1024) -> Image.Image:
    canvas_px, cx0, cy0, side = slide_canvas(source, thumb_size)
    k = thumb_size / side
    thumb = Image.fromarray(canvas_px)
    draw = ImageDraw.Draw(thumb)
    font = _font(13)
    depth = max(n.layer for n in prediction.tree)
    # Draw outer layers first so that deeper, smaller boxes stay visible on top.
    for node in sorted(prediction.tree, key=lambda n: n.layer):
        if node.layer == 0 or node.frozen:  # a frozen patch is its parent's box again: drawn once
            continue
        x, y, bw, bh = node.box
        box = [(x - cx0) * k, (y - cy0) * k, (x + bw - cx0) * k, (y + bh - cy0) * k]
        colour = patch_colour(node.name)
        width = max(1, 2 * (depth - node.layer) + 1)
        draw.rectangle(box, outline=colour, width=width)
        label = node.name.replace("I_", "")
        tx, ty = max(box[0] + 2, 0), max(box[1] + 1, 0)
        tb = draw.textbbox((tx, ty), label, font=font)
        draw.rectangle(tb, fill=(255, 255, 255))
        draw.text((tx, ty), label, fill=colour, font=font)

    finals = prediction.final_nodes
    patches = prediction.final_patches
    if patches is None:
        raise ValueError("the prediction carries no final patches (it was loaded from JSON); predict again")
    n, _, s, _ = patches.shape
    zoom = max(1, math.ceil(MIN_TILE / s))
    tile = s * zoom
    caption_font = _font(12)
    caption_w = max((int(caption_font.getlength(_caption(node))) for node in finals), default=0)
    cell = max(tile, caption_w) + GAP
    rows = max(1, min(n, thumb_size // (tile + CAPTION + GAP)))
    cols = math.ceil(n / rows)
    gallery_w = cols * cell
    out = Image.new("RGB", (thumb_size + GAP * 3 + gallery_w, thumb_size + HEADER), (255, 255, 255))
    out.paste(thumb, (GAP, HEADER))
    d = ImageDraw.Draw(out)
    title = f"{Path(prediction.slide).name}   p(positive) = {prediction.probability:.3f} -> {prediction.label}"
    acc = prediction.accounting
    shown = f" (shown {zoom}x)" if zoom > 1 else ""
    sub = (
        f"{len(finals)} final patches of {s}x{s}{shown};  {acc.get('values_fed', 0) / 1e6:.2f} M values fed;  "
        f"{acc.get('pixels_read', 0) / 1e6:.2f} M pixels read;  {prediction.seconds:.2f} s"
    )
    d.text((GAP, 4), title, fill=(0, 0, 0), font=_font(18))
    d.text((GAP, 25), sub, fill=(80, 80, 80), font=_font(13))
    arr = (patches.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()) if n else None
    x_start = thumb_size + GAP * 2
    for i, node in enumerate(finals[:n]):
        r, c = i // cols, i % cols
        px = x_start + c * cell
        py = HEADER + r * (tile + CAPTION + GAP)
        shown_patch = Image.fromarray(arr[i])
        if zoom > 1:
            shown_patch = shown_patch.resize((tile, tile), Image.Resampling.NEAREST)
        out.paste(shown_patch, (px, py))
        d.rectangle([px - 1, py - 1, px + tile, py + tile], outline=patch_colour(node.name), width=2)
        d.text((px, py + tile + 2), _caption(node), fill=(0, 0, 0), font=caption_font)
    return out


def save_explanation(source: RegionSource, prediction: Prediction, path: str | Path, **kwargs) -> Path:
    path = Path(path)
    render_explanation(source, prediction, **kwargs).save(path)
    return path
