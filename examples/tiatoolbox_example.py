"""A MagNet next to TIAToolbox's own tools: one slide, one ``WSIReader``, TIAToolbox's tissue mask.

1. Open the slide with TIAToolbox (``WSIReader.open``) and compute its tissue mask with TIAToolbox's
   Otsu masker.
2. Predict the slide with :class:`magnet_zoo.integrations.tiatoolbox.MagNetTIAModel` through the
   TIAToolbox model interface (``infer_batch``, ``postproc_func``): the same reader object, no copy.
3. Check where the MagNet looked: the share of each zoom level's ROIs that lie on tissue according
   to TIAToolbox's mask, and draw the ROIs on TIAToolbox's thumbnail.
4. Keep the result where TIAToolbox users keep results: an annotation store (``--store magnet.ndjson``,
   or ``magnet.db`` for SQLite where Python's sqlite3 can load extensions; one annotation per ROI and
   one for the slide), which TIAToolbox's renderer reads.
5. The same model on an in-memory image, through TIAToolbox's ``VirtualWSIReader``.

No TIAToolbox engine (``PatchPredictor``, ``SemanticSegmentor``, ...) can drive a MagNet: engines feed
patches described by an ``IOConfig``, while a MagNet reads the whole slide itself. Call ``infer_batch``
with slides instead, as here.

Usage (a checkpoint folder from ``magnet-zoo train``; without ``--model`` an untrained tiny MagNet is
used, which only shows the plumbing)::

    python examples/tiatoolbox_example.py ../shared/data/wsi/CMU-1-Small-Region.svs \\
        --model runs/tiny/checkpoints/best --out magnet_tiatoolbox.png
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger("tiatoolbox_example")
LAYER_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")


def on_tissue(box: list[float], mask: np.ndarray, scale: float) -> float:
    """Share of ``box`` (level-0 ``x, y, w, h``) covered by tissue in ``mask`` (``scale`` = mask px per level-0 px)."""
    h, w = mask.shape
    x0, y0 = int(max(box[0] * scale, 0)), int(max(box[1] * scale, 0))
    x1, y1 = int(min((box[0] + box[2]) * scale, w)), int(min((box[1] + box[3]) * scale, h))
    if x1 <= x0 or y1 <= y0:
        return 0.0
    return float(mask[y0:y1, x0:x1].mean())


def thumbnail(reader, power: float = 1.25, max_side: int = 2048) -> np.ndarray:
    """TIAToolbox's thumbnail of the slide: at ``power`` when the slide states its objective power, else
    at a baseline scale (a fraction of level 0) whose longer side is at most ``max_side`` pixels."""
    info = reader.info
    if info.objective_power:
        return reader.slide_thumbnail(resolution=power, units="power")
    scale = min(1.0, max_side / max(info.slide_dimensions))  # "baseline" units: 1.0 is level 0 itself
    return reader.slide_thumbnail(resolution=scale, units="baseline")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("slide", help="a slide file TIAToolbox can open")
    parser.add_argument("--model", default=None, help="magnet_zoo checkpoint folder or hub repo (default: untrained)")
    parser.add_argument("--out", default="magnet_tiatoolbox.png", help="picture of the ROIs on the thumbnail")
    parser.add_argument("--thumb", type=float, default=1.25, help="thumbnail resolution in 'power' units")
    parser.add_argument("--store", default=None, help="also write the ROIs and the result to this annotation store")
    parser.add_argument("--threshold", type=float, default=0.5, help="probability from which a slide is positive")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch
    from tiatoolbox.tools.tissuemask import OtsuTissueMasker
    from tiatoolbox.wsicore.wsireader import VirtualWSIReader, WSIReader

    from magnet_zoo import create_model
    from magnet_zoo.integrations.tiatoolbox import MagNetTIAModel, to_annotation_store

    if args.model:
        model = MagNetTIAModel.from_pretrained(args.model, threshold=args.threshold)
    else:
        logger.warning("no --model given: an untrained magnet2_tiny shows the plumbing, not a diagnosis")
        torch.manual_seed(0)
        model = MagNetTIAModel(create_model("magnet2_tiny"), threshold=args.threshold)

    # 1. TIAToolbox: reader, thumbnail and tissue mask.
    reader = WSIReader.open(args.slide)
    info = reader.info
    thumb = thumbnail(reader, args.thumb)
    mask = OtsuTissueMasker().fit_transform([thumb])[0].astype(bool)
    scale = thumb.shape[1] / info.slide_dimensions[0]
    logger.info("%s: %s px at level 0, tissue %.0f%% of the thumbnail", args.slide, info.slide_dimensions,
                100 * mask.mean())

    # 2. The MagNet through TIAToolbox's model interface, on the same reader.
    out = MagNetTIAModel.infer_batch(model, [reader], device="cpu")
    prob = float(out["probabilities"][0])
    label = model.class_dict[int(model.postproc_func(out["probabilities"])[0])]
    logger.info("p(%s) = %.3f -> %s", model.class_dict[1], prob, label)

    # 3. Where it looked, judged by TIAToolbox's mask.
    tree = out["trees"][0]
    picture = Image.fromarray(thumb).convert("RGB")
    draw = ImageDraw.Draw(picture)
    for layer in sorted({n["layer"] for n in tree if n["layer"] > 0}):
        nodes = [n for n in tree if n["layer"] == layer]
        share = np.mean([on_tissue(n["box"], mask, scale) for n in nodes])
        logger.info("layer %d: %d ROIs, %.0f%% of their area on tissue", layer, len(nodes), 100 * share)
        for n in nodes:
            x, y, w, h = (v * scale for v in n["box"])
            draw.rectangle([x, y, x + w, y + h], outline=LAYER_COLOURS[(layer - 1) % len(LAYER_COLOURS)], width=2)
    picture.save(args.out)
    logger.info("wrote %s", args.out)

    # 4. The result in a TIAToolbox annotation store.
    if args.store:
        store = to_annotation_store(out, args.store, labels=model.class_dict, threshold=model.threshold,
                                    slides=[args.slide])
        store.commit()
        logger.info("wrote %d annotations to %s", len(store), args.store)

    # 5. An in-memory image through TIAToolbox's VirtualWSIReader.
    virtual = VirtualWSIReader(np.asarray(thumb))
    small = MagNetTIAModel.infer_batch(model, [virtual], device="cpu")
    logger.info("the thumbnail as a VirtualWSIReader slide: p(%s) = %.3f", model.class_dict[1],
                float(small["probabilities"][0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
