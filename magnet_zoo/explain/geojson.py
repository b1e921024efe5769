"""The ROI tree as QuPath-native GeoJSON: a FeatureCollection in level-0 pixel coordinates.

What QuPath (0.4 and later) reads from a feature, and what we put there:

- ``geometry``: a closed ``Polygon`` (RFC 7946: first and last positions equal, exterior ring
  counter-clockwise), clipped to the slide so that no annotation leaves the image;
- ``properties.objectType = "annotation"``, ``name`` (the tree name, ``I_13``), ``isLocked``;
- ``properties.classification = {"name", "color"}``: one class per patch index (``MagNet patch 1``
  red, ``MagNet patch 2`` blue, ...), because QuPath colours objects by class: two ROIs of one layer
  in one class would share a colour. ``properties.color`` repeats the colour for the object itself;
- ``properties.measurements``: a flat ``{name: number}`` map (QuPath's measurement table): layer,
  pyramid level, scale, translation, box and µm per pixel where known;
- ``id``: a UUID (QuPath keeps object ids as UUIDs), derived from the slide and the tree name, so
  rewriting a file gives the same ids.

A frozen patch (the identity: its box is its parent's) is not a second polygon on top of its parent's;
the parent's feature names it (``I_12 = I_121``). With a :class:`~magnet_zoo.infer.predict.Prediction`,
one more annotation covers the slide and carries the slide-level result: classified as the predicted
label, with the probability and the threshold as measurements.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from magnet_zoo.atomic import atomic_write_text
from magnet_zoo.nn.tree import RoiNode

LAYER_COLOURS = [(230, 25, 75), (0, 130, 200), (60, 180, 75), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
"""Per patch index (first ROI red, second blue, third green, as the paper's Fig. 5), then more."""
SLIDE_CLASS_COLOURS = ((90, 90, 90), (200, 0, 0))
"""Colour of the slide-level annotation: negative grey, positive dark red."""
_ID_NAMESPACE = uuid.UUID("6f1c2a9e-3b7d-4c1e-9a55-1d2e3f405162")


def patch_index(name: str) -> int:
    """0-based patch index of a tree name (``I_13`` -> 2, ``I_1.12`` -> 11)."""
    last = name.rsplit(".", 1)[-1] if "." in name else name[-1]
    return int(last) - 1 if last.isdigit() else 0


def patch_colour(name: str) -> tuple[int, int, int]:
    return LAYER_COLOURS[patch_index(name) % len(LAYER_COLOURS)]


def patch_class(name: str) -> str:
    """QuPath class of a ROI: one per patch index, so that each index keeps its own colour."""
    return f"MagNet patch {patch_index(name) + 1}"


def _feature_id(slide: str | None, name: str) -> str:
    return str(uuid.uuid5(_ID_NAMESPACE, f"{slide or ''}|{name}"))


def _ring(x: float, y: float, w: float, h: float, bounds: tuple[float, float] | None) -> list[list[float]]:
    x0, y0, x1, y1 = x, y, x + w, y + h
    if bounds is not None:
        bw, bh = bounds
        x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, bw), min(y1, bh)
        if x1 <= x0 or y1 <= y0:  # entirely off the slide (only glass padding): keep a degenerate-free box
            x0, y0, x1, y1 = x, y, x + w, y + h
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    return [[float(a), float(b)] for a, b in ring]


def _number(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if v == v and v not in (float("inf"), float("-inf")) else None


def roi_geojson(tree_or_prediction: Any, slide: str | None = None) -> dict[str, Any]:
    """The FeatureCollection for a :class:`~magnet_zoo.infer.predict.Prediction` (ROIs, per-node mpp,
    the slide-level result) or for a bare ROI tree (ROIs only)."""
    prediction = None if isinstance(tree_or_prediction, Sequence) else tree_or_prediction
    tree: Sequence[RoiNode] = tree_or_prediction if prediction is None else prediction.tree
    if slide is None and prediction is not None:
        slide = prediction.slide
    nodes_res = ((prediction.resolution or {}).get("nodes", {}) if prediction is not None else {}) or {}
    root = next((n for n in tree if n.layer == 0), None)
    bounds = (float(root.box[2]), float(root.box[3])) if root is not None else None
    frozen_of = {n.parent: n.name for n in tree if n.frozen and n.parent is not None}

    features = []
    for node in tree:
        if node.layer == 0 or node.frozen:
            continue
        x, y, w, h = node.box
        colour = list(patch_colour(node.name))
        measurements = {
            "MagNet layer": node.layer,
            "MagNet patch": patch_index(node.name) + 1,
            "Pyramid level": node.level,
            "Scale": node.scale,
            "Translation x": node.translation[0],
            "Translation y": node.translation[1],
            "Box x (level-0 px)": x,
            "Box y (level-0 px)": y,
            "Box side (level-0 px)": w,
        }
        res = nodes_res.get(node.name, {})
        if res.get("mpp") is not None:
            measurements["Image µm per pixel"] = res["mpp"]
        if res.get("level_mpp") is not None:
            measurements["Level µm per pixel"] = res["level_mpp"]
        measurements = {k: v for k, v in ((k, _number(v)) for k, v in measurements.items()) if v is not None}
        label = node.name if node.name not in frozen_of else f"{node.name} = {frozen_of[node.name]}"
        features.append(
            {
                "type": "Feature",
                "id": _feature_id(slide, node.name),
                "geometry": {"type": "Polygon", "coordinates": [_ring(x, y, w, h, bounds)]},
                "properties": {
                    "objectType": "annotation",
                    "name": label,
                    "isLocked": True,
                    "color": colour,
                    "classification": {"name": patch_class(node.name), "color": colour},
                    "measurements": measurements,
                    # Not read by QuPath; kept for scripts (the tree in its own terms).
                    "tree_name": node.name,
                    "parent": node.parent,
                    "frozen_child": frozen_of.get(node.name),
                },
            }
        )
    if prediction is not None and root is not None:
        labels = prediction.labels or ("negative", "positive")
        positive = prediction.label == labels[1]
        colour = list(SLIDE_CLASS_COLOURS[int(positive)])
        measurements = {
            f"MagNet probability ({labels[1]})": prediction.probability,
            "MagNet threshold": prediction.threshold,
        }
        features.insert(
            0,
            {
                "type": "Feature",
                "id": _feature_id(slide, root.name),
                "geometry": {"type": "Polygon", "coordinates": [_ring(*root.box, bounds)]},
                "properties": {
                    "objectType": "annotation",
                    "name": f"MagNet slide result: {prediction.label} (p = {prediction.probability:.3f})",
                    "isLocked": True,
                    "color": colour,
                    "classification": {"name": prediction.label, "color": colour},
                    "measurements": {k: float(v) for k, v in measurements.items()},
                    "tree_name": root.name,
                },
            },
        )
    collection: dict[str, Any] = {"type": "FeatureCollection", "features": features}
    info: dict[str, Any] = {"coordinates": "level-0 pixels"}
    if slide is not None:
        info["slide"] = slide
    if prediction is not None:
        info.update(probability=prediction.probability, label=prediction.label, threshold=prediction.threshold)
        if prediction.provenance is not None:
            info["provenance"] = prediction.provenance
    collection["properties"] = info  # a foreign member (RFC 7946 section 6.1): QuPath ignores it
    return collection


def write_geojson(tree_or_prediction: Any, path: str | Path, slide: str | None = None) -> Path:
    """Write :func:`roi_geojson` to ``path`` (atomically) and return the path."""
    path = Path(path)
    atomic_write_text(path, json.dumps(roi_geojson(tree_or_prediction, slide), indent=1, ensure_ascii=False))
    return path
