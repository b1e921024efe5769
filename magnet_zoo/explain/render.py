"""The paper's Fig. 5, for any prediction: where the MagNet looked, and what it saw.

Left: the slide (its square canvas, glass shown white) with every layer's ROIs as nested boxes,
coloured by patch index (first red, second blue, third green, as in the paper) and labelled with their
tree names; deeper layers are drawn thinner; a frozen patch (the identity) is its parent's box again
and is not drawn twice. Labels sit beside their box where they fit, never on top of another label. A
scale bar in µm (when the slide says its microns per pixel) and a legend (colours, line widths) sit
under the slide. Right: the final patches at full resolution (small ones enlarged), in tree order,
captioned with their names (``I_121 = I_12`` for a frozen patch), the pyramid level their pixels came
from and their µm per pixel. The title names the class whose probability is shown; the PNG's text
chunks carry the prediction's provenance.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from magnet_zoo.explain.geojson import LAYER_COLOURS, patch_colour, patch_index
from magnet_zoo.infer.predict import Prediction
from magnet_zoo.nn.tree import root_square
from magnet_zoo.wsi.fetch import read_square
from magnet_zoo.wsi.levels import select_level
from magnet_zoo.wsi.protocol import RegionSource

HEADER = 44
CAPTION = 30
GAP = 6
FOOTER = 74
MIN_TILE = 160
"""Patches smaller than this are shown enlarged (nearest neighbour, every pixel a crisp block)."""
LABEL_FONT = 14
NICE_STEPS = (1, 2, 5)

Rect = tuple[float, float, float, float]


def _system_font(size: int) -> ImageFont.ImageFont | None:
    try:  # DejaVu has every glyph we write (µ included); Pillow's bundled default font has no µ
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return None


def _font(size: int) -> ImageFont.ImageFont:
    font = _system_font(size)
    if font is not None:
        return font
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _um() -> str:
    """How the figure writes micrometres: ``µm`` where a font with the glyph exists, else ``um``."""
    return "µm" if _system_font(12) is not None else "um"


def _caption(node, mpp: float | None = None) -> str:
    same = f" = {node.parent}" if node.frozen else ""
    res = f", {mpp:.2g} {_um()}/px" if mpp is not None else ""
    return f"{node.name}{same}  (level {node.level}{res})"


def slide_canvas(source: RegionSource, size: int) -> tuple[np.ndarray, float, float, float]:
    """The slide's square canvas at ``size`` px (black outside the slide), and its level-0 geometry."""
    w, h = source.dimensions
    square = root_square(w, h)
    level = select_level(source.level_downsamples, square.side, size)
    pixels, _ = read_square(source, square, size, level)
    return pixels, square.x, square.y, square.side


def _overlaps(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(
    boxes: Sequence[Rect], sizes: Sequence[tuple[float, float]], bounds: tuple[float, float]
) -> list[Rect]:
    """Where to draw each box's label (``(w, h)`` in ``sizes``) so that no two labels overlap.

    Candidates, in order: inside the top-left corner (if the box is large enough to hold the label with
    room to spare), just above the box, just below, left of it, right of it; then further out in the
    same directions. Labels stay inside ``bounds`` (the picture). Boxes are labelled in the order given;
    the first candidate free of every label placed so far wins.
    """
    placed: list[Rect] = []
    bw, bh = bounds
    for (x0, y0, x1, y1), (lw, lh) in zip(boxes, sizes, strict=True):
        candidates: list[tuple[float, float]] = []
        if (x1 - x0) >= 2 * lw and (y1 - y0) >= 3 * lh:
            candidates.append((x0 + 3, y0 + 2))
        for step in range(0, 8):
            d = step * (lh + 1)
            candidates += [
                (x0, y0 - lh - 2 - d),
                (x0, y1 + 2 + d),
                (x0 - lw - 3 - d, y0),
                (x1 + 3 + d, y0),
            ]
        chosen = None
        for cx, cy in candidates:
            cx = min(max(cx, 0.0), bw - lw)
            cy = min(max(cy, 0.0), bh - lh)
            rect = (cx, cy, cx + lw, cy + lh)
            if not any(_overlaps(rect, other) for other in placed):
                chosen = rect
                break
        if chosen is None:  # crowded beyond help: the first candidate, on top
            cx, cy = candidates[0]
            cx, cy = min(max(cx, 0.0), bw - lw), min(max(cy, 0.0), bh - lh)
            chosen = (cx, cy, cx + lw, cy + lh)
        placed.append(chosen)
    return placed


def scale_bar(um_per_px: float, max_px: float) -> tuple[float, str]:
    """The longest 1-2-5 length in µm whose bar fits in ``max_px`` pixels: ``(bar length in px, label)``."""
    if um_per_px <= 0 or max_px <= 0:
        raise ValueError("scale_bar needs a positive resolution and length")
    exponent = math.floor(math.log10(um_per_px * max_px))
    fitting = [s * 10.0**e for e in (exponent - 1, exponent) for s in NICE_STEPS if s * 10.0**e / um_per_px <= max_px]
    best = max(fitting)  # 10**(exponent - 1) always fits
    label = f"{best / 1000:g} mm" if best >= 1000 else f"{best:g} {_um()}"
    return best / um_per_px, label


def _mean_mpp(source: RegionSource) -> float | None:
    mpp = getattr(source, "mpp", None)
    return None if mpp is None else (float(mpp[0]) + float(mpp[1])) / 2


def render_explanation(source: RegionSource, prediction: Prediction, *, thumb_size: int = 1024) -> Image.Image:
    canvas_px, cx0, cy0, side = slide_canvas(source, thumb_size)
    k = thumb_size / side
    thumb = Image.fromarray(canvas_px)
    draw = ImageDraw.Draw(thumb)
    font = _font(LABEL_FONT)
    depth = max(n.layer for n in prediction.tree)
    # Draw outer layers first so that deeper, smaller boxes stay visible on top.
    drawn = [n for n in sorted(prediction.tree, key=lambda n: n.layer) if n.layer > 0 and not n.frozen]
    rects = []
    for node in drawn:
        x, y, bw, bh = node.box
        box = ((x - cx0) * k, (y - cy0) * k, (x + bw - cx0) * k, (y + bh - cy0) * k)
        rects.append(box)
        draw.rectangle(box, outline=patch_colour(node.name), width=max(1, 2 * (depth - node.layer) + 1))
    labels = [n.name.replace("I_", "") for n in drawn]
    sizes = []
    for text in labels:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        sizes.append((right - left + 4, bottom - top + 4))
    for node, text, rect in zip(drawn, labels, place_labels(rects, sizes, (thumb_size, thumb_size)), strict=True):
        draw.rectangle(rect, fill=(255, 255, 255), outline=patch_colour(node.name))
        draw.text((rect[0] + 2, rect[1] + 1), text, fill=patch_colour(node.name), font=font)

    finals = prediction.final_nodes
    patches = prediction.final_patches
    if patches is None:
        raise ValueError("the prediction carries no final patches (it was loaded from JSON); predict again")
    nodes_res = (prediction.resolution or {}).get("nodes", {})
    n, _, s, _ = patches.shape
    zoom = max(1, math.ceil(MIN_TILE / s))
    tile = s * zoom
    caption_font = _font(12)
    captions = [_caption(node, nodes_res.get(node.name, {}).get("mpp")) for node in finals]
    caption_w = max((int(caption_font.getlength(c)) for c in captions), default=0)
    cell = max(tile, caption_w) + 3 * GAP
    rows = max(1, min(n, thumb_size // (tile + CAPTION + GAP)))
    cols = math.ceil(n / rows)
    gallery_w = cols * cell
    width = max(thumb_size + GAP * 3 + gallery_w, 640)
    out = Image.new("RGB", (width, thumb_size + HEADER + FOOTER), (255, 255, 255))
    out.paste(thumb, (GAP, HEADER))
    d = ImageDraw.Draw(out)
    positive = prediction.positive_label
    title = f"{Path(prediction.slide).name}   p({positive}) = {prediction.probability:.3f} -> {prediction.label}"
    if prediction.threshold != 0.5:
        title += f" (threshold {prediction.threshold:g})"
    acc = prediction.accounting
    shown = f" (shown {zoom}x)" if zoom > 1 else ""
    model = ((prediction.provenance or {}).get("model") or {}).get("name")
    sub = (
        f"{len(finals)} final patches of {s}x{s}{shown};  {acc.get('values_fed', 0) / 1e6:.2f} M values fed;  "
        f"{acc.get('pixels_read', 0) / 1e6:.2f} M pixels read;  {prediction.seconds:.2f} s"
        + (f";  model {Path(model).name if '/' in model and Path(model).exists() else model}" if model else "")
    )
    d.text((GAP, 4), title, fill=(0, 0, 0), font=_font(18))
    d.text((GAP, 25), sub, fill=(80, 80, 80), font=_font(13))
    _footer(d, source, prediction, k, thumb_size, depth)
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
        d.text((px, py + tile + 2), captions[i], fill=(0, 0, 0), font=caption_font)
    return out


def _footer(d: ImageDraw.ImageDraw, source: RegionSource, prediction: Prediction, k: float, thumb_size: int,
            depth: int) -> None:
    """Scale bar (or a note that there is none) and the legend, under the slide picture."""
    top = HEADER + thumb_size + 8
    font = _font(12)
    mpp = _mean_mpp(source)
    if mpp is not None:
        um_per_px = mpp / k
        length, text = scale_bar(um_per_px, thumb_size / 4)
        x0, y = GAP + 4, top + 8
        d.rectangle([x0, y, x0 + length, y + 5], fill=(0, 0, 0))
        d.text((x0 + length + 6, y - 4), text, fill=(0, 0, 0), font=font)
        right = x0 + length + 6 + int(font.getlength(text)) + 24
    else:
        note = "no scale bar: the slide has no microns-per-pixel metadata"
        d.text((GAP + 4, top + 2), note, fill=(120, 0, 0), font=font)
        right = GAP + 4 + int(font.getlength(note)) + 24
    patches = max((patch_index(n.name) + 1 for n in prediction.tree if n.layer > 0), default=1)
    x = right
    for i in range(min(patches, len(LAYER_COLOURS))):
        colour = LAYER_COLOURS[i]
        d.rectangle([x, top + 4, x + 14, top + 14], outline=colour, width=3)
        label = f"patch {i + 1}"
        d.text((x + 18, top + 2), label, fill=colour, font=font)
        x += 18 + int(font.getlength(label)) + 14
    widths = ", ".join(f"layer {layer}: {max(1, 2 * (depth - layer) + 1)} px" for layer in range(1, depth + 1))
    d.text((GAP + 4, top + 24), f"boxes: ROIs in level-0 pixels; line width by layer ({widths}); "
           "a frozen patch is its parent's box, drawn once", fill=(80, 80, 80), font=font)
    d.text((GAP + 4, top + 40), "patches: the pixels the heads see; black is glass removed by the grey filter, "
           "or outside the slide", fill=(80, 80, 80), font=font)


def save_explanation(source: RegionSource, prediction: Prediction, path: str | Path, **kwargs) -> Path:
    """Render and write the PNG (atomically; the prediction's provenance goes into its text chunks)."""
    from magnet_zoo.atomic import atomic_write_bytes

    path = Path(path)
    image = render_explanation(source, prediction, **kwargs)
    info = PngInfo()
    info.add_text("Software", "magnet_zoo")
    info.add_text("Description", f"{prediction.slide}: p({prediction.positive_label}) = {prediction.probability:.6f}")
    if prediction.provenance is not None:
        info.add_itxt("magnet_zoo.provenance", json.dumps(prediction.provenance))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    atomic_write_bytes(path, buffer.getvalue())
    return path
