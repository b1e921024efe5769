"""Ground-truth tumour masks of a SynthMets slide at any resolution, rebuilt from its sidecar.

Boxes in the sidecar are coarse for irregular regions; localisation metrics want the mask. The layout
is a pure function of the sidecar's size, category, seed and mpp, so the mask is recomputed rather
than stored: the tumour fields are sampled at the centres of the requested grid's pixels. At level 0
(``shape`` equal to the slide size) the fine border roughness is included and the mask is exact;
at coarser resolutions it is the smooth region without that roughness (a few pixels at most).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from magnet_zoo.synth.layout import plan_layout
from magnet_zoo.synth.slide import GENERATOR_VERSION
from magnet_zoo.synth.texture import edge_noise


def tumour_mask(sidecar: dict[str, Any] | str | os.PathLike[str], shape: tuple[int, int]) -> np.ndarray:
    """Boolean tumour mask of shape ``(height, width)`` covering the whole slide.

    ``sidecar`` is a sidecar dict or the path of a slide or of its ``.json`` sidecar.
    """
    if not isinstance(sidecar, dict):
        path = Path(sidecar)
        sidecar = json.loads(path.with_suffix(".json").read_text())
    if sidecar.get("version") != GENERATOR_VERSION:
        raise ValueError(
            f"sidecar was written by generator {sidecar.get('version')!r}; this is {GENERATOR_VERSION!r}, "
            "whose layouts may differ: regenerate the slide"
        )
    width, height = int(sidecar["width"]), int(sidecar["height"])
    mpp = float(sidecar["mpp"])
    layout = plan_layout(
        width, height, sidecar["category"], int(sidecar["seed"]), mpp, edge_noise(round(mpp, 4))
    )
    out_h, out_w = shape
    mask = np.zeros((out_h, out_w), bool)
    if (out_w, out_h) == (width, height):
        for tumour in layout.tumours:
            x0, y0, x1, y1 = tumour.region.box
            x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
            mask[y0:y1, x0:x1] |= tumour.region.mask(x0, y0, x1 - x0, y1 - y0)
        return mask
    sx, sy = width / out_w, height / out_h
    for tumour in layout.tumours:
        x0, y0, x1, y1 = tumour.region.box
        c0, c1 = max(0, int(x0 / sx)), min(out_w, int(np.ceil(x1 / sx)) + 1)
        r0, r1 = max(0, int(y0 / sy)), min(out_h, int(np.ceil(y1 / sy)) + 1)
        if c0 >= c1 or r0 >= r1:
            continue
        xs = (np.arange(c0, c1) + 0.5) * sx
        ys = (np.arange(r0, r1) + 0.5) * sy
        values = tumour.region.field.sample(xs[None, :], ys[:, None])
        mask[r0:r1, c0:c1] |= values > 0
    return mask
