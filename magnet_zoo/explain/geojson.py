"""The ROI tree as a GeoJSON FeatureCollection in level-0 pixel coordinates, as QuPath imports it.

Every node but the slide itself becomes a closed ``Polygon`` annotation whose properties carry its
tree name, layer, pyramid level and scale (QuPath shows them as measurements/classification).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from magnet_zoo.nn.tree import RoiNode

LAYER_COLOURS = [(230, 25, 75), (0, 130, 200), (60, 180, 75), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
"""Per patch index (first ROI red, second blue, third green, as the paper's Fig. 5), then more."""


def patch_colour(name: str) -> tuple[int, int, int]:
    last = name.rsplit(".", 1)[-1][-1]
    index = int(last) - 1 if last.isdigit() else 0
    return LAYER_COLOURS[index % len(LAYER_COLOURS)]


def roi_geojson(tree: Sequence[RoiNode], slide: str | None = None) -> dict[str, Any]:
    features = []
    for node in tree:
        if node.layer == 0:
            continue
        x, y, w, h = node.box
        ring = [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
        features.append(
            {
                "type": "Feature",
                "id": node.name,
                "geometry": {"type": "Polygon", "coordinates": [[[float(a), float(b)] for a, b in ring]]},
                "properties": {
                    "objectType": "annotation",
                    "name": node.name,
                    "classification": {"name": f"MagNet layer {node.layer}", "color": list(patch_colour(node.name))},
                    "layer": node.layer,
                    "level": node.level,
                    "scale": node.scale,
                    "parent": node.parent,
                    "frozen": node.frozen,
                },
            }
        )
    collection: dict[str, Any] = {"type": "FeatureCollection", "features": features}
    if slide is not None:
        collection["properties"] = {"slide": slide, "coordinates": "level-0 pixels"}
    return collection


def write_geojson(tree: Sequence[RoiNode], path: str | Path, slide: str | None = None) -> Path:
    path = Path(path)
    path.write_text(json.dumps(roi_geojson(tree, slide), indent=1))
    return path
