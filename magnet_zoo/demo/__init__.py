"""The demo checkpoint that ships inside magnet_zoo, and the helpers ``magnet-zoo demo`` uses.

``checkpoint/`` holds a small MagNet trained on SynthMets slides by ``benchmarks/synthmets.py`` (its
``README.md`` is the model card: data, recipe, test metrics and the command that made it). It installs
with the package, so the demo runs offline. It has only ever seen synthetic slides.

>>> from magnet_zoo.demo import load_demo_model
>>> model = load_demo_model()
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from magnet_zoo.nn.magnet import MagNet
    from magnet_zoo.nn.tree import RoiNode

DEMO_MODEL = "magnet2_micro.synthmets_demo"
"""The registered name of the demo model; its registry entry says where the weights ship (``checkpoint/``)."""


def load_demo_model(device: str = "cpu") -> MagNet:
    """The demo MagNet in eval mode (strict, pickle-free loading of the shipped checkpoint).

    Resolved through the registry like any other model, so there is one place that says where the
    shipped weights live; a broken installation raises ``CheckpointNotFoundError`` naming the folder.
    """
    from magnet_zoo.hub import load_pretrained

    return load_pretrained(DEMO_MODEL, device=device)


def patches_on_tumour(
    tree: Sequence[RoiNode], sidecar: dict[str, Any] | str | Path, *, mask_side: int = 1024
) -> list[bool]:
    """For each final patch of ``tree`` (deepest layer, tree order): does its box overlap the slide's tumour?

    ``sidecar`` is a SynthMets sidecar (dict or path of the slide / its ``.json``); the ground-truth mask is
    rebuilt at about ``mask_side`` pixels across and a box counts when any mask cell it touches is tumour.
    """
    import json

    import numpy as np

    from magnet_zoo.synth import tumour_mask

    meta = sidecar if isinstance(sidecar, dict) else json.loads(Path(sidecar).with_suffix(".json").read_text())
    w, h = int(meta["width"]), int(meta["height"])
    factor = max(w, h) / mask_side
    shape = (max(1, round(h / factor)), max(1, round(w / factor)))
    mask = tumour_mask(meta, shape)
    fy, fx = h / shape[0], w / shape[1]
    depth = max(n.layer for n in tree)
    hits = []
    for node in tree:
        if node.layer != depth:
            continue
        x, y, bw, bh = node.box
        c0, r0 = max(math.floor(x / fx), 0), max(math.floor(y / fy), 0)
        c1, r1 = min(math.ceil((x + bw) / fx), shape[1]), min(math.ceil((y + bh) / fy), shape[0])
        hits.append(bool(c1 > c0 and r1 > r0 and np.any(mask[r0:r1, c0:c1])))
    return hits
