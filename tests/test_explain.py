"""The explanation a pathologist reads: resolution report, true levels, the PNG's legend, scale bar and
labels, and the QuPath GeoJSON checked against the GeoJSON schema and QuPath's import rules."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

import magnet_zoo
from magnet_zoo.explain import render_explanation, roi_geojson, save_explanation, write_geojson
from magnet_zoo.explain.render import place_labels, scale_bar
from magnet_zoo.wsi.levels import select_level
from tests.conftest import micro_magnet, tissue_image


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return tissue_image(1600, 1200, seed=4)


@pytest.fixture(scope="module")
def model():
    m = micro_magnet(crop_source="reread", attention_init="random").eval()
    m.trained_mpp = 0.5
    return m


# --------------------------------------------------------------------------- resolution contract
def test_prediction_reports_mpp_of_the_slide_and_every_node(model, image):
    pred = magnet_zoo.predict_slide(model, magnet_zoo.ArraySource(image, mpp=0.5))
    res = pred.resolution
    assert res["slide_mpp"] == [0.5, 0.5] and res["trained_mpp"] == 0.5
    assert res["relative_difference"] == 0 and res["warning"] is None
    src = magnet_zoo.ArraySource(image, mpp=0.5)
    for node in pred.tree:
        got = res["nodes"][node.name]
        size = model.config.final_patch_size if node.layer == model.config.num_layers else (
            model.config.iprime_size(node.layer + 1))
        assert got["mpp"] == pytest.approx(0.5 * max(node.box[2], node.box[3]) / size, rel=1e-5)
        assert got["level_mpp"] == pytest.approx(0.5 * src.level_downsamples[node.level], rel=1e-5)
    tree = pred.to_dict()["tree"]
    assert all("mpp" in n and "level_mpp" in n for n in tree)


def test_a_slide_far_from_the_training_resolution_is_flagged(model, image, caplog):
    with caplog.at_level(logging.WARNING, logger="magnet_zoo.infer.predict"):
        pred = magnet_zoo.predict_slide(model, magnet_zoo.ArraySource(image, mpp=0.25))
    assert pred.resolution["relative_difference"] == pytest.approx(-0.5)
    assert "differs from the training slides' (0.5 µm/px) by -50 %" in pred.resolution["warning"]
    assert "differs from the training slides'" in caplog.text
    # Within the tolerance: silent.
    assert magnet_zoo.predict_slide(model, magnet_zoo.ArraySource(image, mpp=0.55)).resolution["warning"] is None


def test_a_slide_without_mpp_says_what_cannot_be_checked(model, image):
    pred = magnet_zoo.predict_slide(model, magnet_zoo.ArraySource(image))
    assert "no microns-per-pixel metadata" in pred.resolution["warning"]
    assert "cannot be checked against the training slides' (0.5 µm/px)" in pred.resolution["warning"]
    assert all(v["mpp"] is None for v in pred.resolution["nodes"].values())
    from magnet_zoo.wsi.errors import NO_MPP_WARNING

    assert "does not need it" in NO_MPP_WARNING and "levels are chosen by downsample only" not in NO_MPP_WARNING


def test_reread_final_patches_carry_the_level_they_were_read_from(model, image):
    src = magnet_zoo.ArraySource(image, mpp=0.5, coarsest=64)
    pred = magnet_zoo.predict_slide(model, src)
    finals = pred.final_nodes
    expected = [select_level(src.level_downsamples, n.box[2], model.config.final_patch_size) for n in finals]
    assert [n.level for n in finals] == expected
    parents = {n.name: n for n in pred.tree}
    # Small final ROIs are re-read at finer levels than their parent's I' was: the old caption was wrong.
    assert any(n.level < parents[n.parent].level for n in finals)


# --------------------------------------------------------------------------- the PNG
def test_labels_never_overlap_even_for_nested_small_boxes():
    boxes = [(100, 100, 400, 400), (110, 110, 130, 130), (112, 112, 128, 128), (115, 115, 125, 125),
             (300, 300, 305, 305), (301, 301, 303, 303)]
    sizes = [(30, 16)] * len(boxes)
    rects = place_labels(boxes, sizes, (512, 512))
    for i, a in enumerate(rects):
        assert 0 <= a[0] and a[2] <= 512 and 0 <= a[1] and a[3] <= 512
        for b in rects[i + 1 :]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)


def test_scale_bar_uses_round_lengths():
    px, label = scale_bar(2.0, 90)  # 180 µm fit: 100 µm
    assert px == pytest.approx(50) and label in ("100 µm", "100 um")
    px, label = scale_bar(10.0, 256)  # 2.56 mm fit: 2 mm
    assert px == pytest.approx(200) and label == "2 mm"


def _legend_band(img: np.ndarray, thumb: int) -> np.ndarray:
    from magnet_zoo.explain.render import HEADER

    return img[HEADER + thumb :, :thumb]


def test_figure_has_class_name_scale_bar_legend_and_provenance(model, image, tmp_path):
    from magnet_zoo.explain.geojson import LAYER_COLOURS
    from magnet_zoo.infer.provenance import provenance

    src = magnet_zoo.ArraySource(image, mpp=0.5, name="slide.tif")
    pred = magnet_zoo.predict_slide(model, src)
    pred.provenance = provenance(model, {"threshold": 0.5, "backend": "auto"})
    path = save_explanation(src, pred, tmp_path / "x.png", thumb_size=384)
    png = Image.open(path)
    assert json.loads(png.text["magnet_zoo.provenance"])["run_key"] == pred.provenance["run_key"]
    assert "p(tumour)" in png.text["Description"]
    img = np.asarray(png.convert("RGB"))
    band = _legend_band(img, 384)
    # The scale bar: a solid black run under the slide; the legend: both patch colours.
    black_rows = (band.sum(axis=2) == 0).sum(axis=1)
    assert black_rows.max() >= 20
    for colour in LAYER_COLOURS[:2]:
        assert (np.abs(band.astype(int) - colour).sum(axis=2) < 30).sum() > 20, colour
    # The legend's last line, under the boxes' line, says what the patches show (black = the grey filter's glass).
    grey_rows = np.flatnonzero((np.abs(band.astype(int) - 80).sum(axis=2) < 30).sum(axis=1) > 5)
    assert grey_rows.max() >= 8 + 40  # the band starts 8 px above the legend's first line
    # Without mpp there is no bar (and the figure says so instead).
    bare = np.asarray(render_explanation(magnet_zoo.ArraySource(image), pred, thumb_size=384).convert("RGB"))
    assert (_legend_band(bare, 384).sum(axis=2) == 0).sum(axis=1).max() < 20


# --------------------------------------------------------------------------- QuPath GeoJSON
GEOJSON_SCHEMA = {
    # RFC 7946 FeatureCollection of Polygon Features (the subset we write), as in geojson.org's schemas.
    "type": "object",
    "required": ["type", "features"],
    "properties": {
        "type": {"enum": ["FeatureCollection"]},
        "features": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "geometry", "properties"],
                "properties": {
                    "type": {"enum": ["Feature"]},
                    "id": {"type": ["string", "number"]},
                    "properties": {"type": ["object", "null"]},
                    "geometry": {
                        "type": "object",
                        "required": ["type", "coordinates"],
                        "properties": {
                            "type": {"enum": ["Polygon"]},
                            "coordinates": {
                                "type": "array",
                                "items": {
                                    "type": "array",
                                    "minItems": 4,
                                    "items": {"type": "array", "minItems": 2, "items": {"type": "number"}},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def _check_qupath(collection: dict) -> None:
    """QuPath's import rules (0.4+): annotations, a classification with name and RGB colour, a flat
    ``measurements`` map of finite numbers, UUID ids, closed rings."""
    import uuid

    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(collection, GEOJSON_SCHEMA)
    ids = [f["id"] for f in collection["features"]]
    assert len(set(ids)) == len(ids)
    for feat in collection["features"]:
        uuid.UUID(feat["id"])
        props = feat["properties"]
        assert props["objectType"] == "annotation" and isinstance(props["name"], str)
        cls = props["classification"]
        assert isinstance(cls["name"], str) and len(cls["color"]) == 3
        assert all(isinstance(c, int) and 0 <= c <= 255 for c in cls["color"])
        assert all(isinstance(v, float | int) and np.isfinite(v) for v in props["measurements"].values())
        for ring in feat["geometry"]["coordinates"]:
            assert ring[0] == ring[-1]
            xs, ys = zip(*ring, strict=True)
            area = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:], strict=False)) / 2
            assert area > 0  # counter-clockwise (RFC 7946 right-hand rule) and not degenerate


def test_geojson_is_qupath_native(model, image, tmp_path):
    src = magnet_zoo.ArraySource(image, mpp=0.5)
    pred = magnet_zoo.predict_slide(model, src)
    path = write_geojson(pred, tmp_path / "x.geojson", slide="slide.tif")
    collection = json.loads(path.read_text())
    _check_qupath(collection)
    features = collection["features"]
    # The slide-level result comes first, classified as the predicted label.
    first = features[0]["properties"]
    assert first["classification"]["name"] == pred.label
    assert first["measurements"]["MagNet probability (tumour)"] == pytest.approx(pred.probability)
    rois = features[1:]
    # No frozen patch is drawn again on its parent; the parent names it.
    frozen = [n for n in pred.tree if n.frozen]
    assert frozen and len(rois) == len(pred.tree) - 1 - len(frozen)
    assert {f["properties"]["tree_name"] for f in rois}.isdisjoint({n.name for n in frozen})
    assert any(" = " in f["properties"]["name"] for f in rois)
    # Every ROI: layer, level, scale and µm per pixel as QuPath measurements.
    for f in rois:
        assert {"MagNet layer", "Pyramid level", "Scale", "Image µm per pixel"} <= set(f["properties"]["measurements"])
    # The two layer-1 ROIs: two classes, two colours (QuPath colours objects by class).
    layer1 = [f["properties"] for f in rois if f["properties"]["measurements"]["MagNet layer"] == 1]
    assert len({p["classification"]["name"] for p in layer1}) == 2
    assert len({tuple(p["classification"]["color"]) for p in layer1}) == 2
    # Every polygon is its node's box (x, y, w, h in level-0 pixels), corner for corner: one closed exterior
    # ring, starting top-left and going right first (positive shoelace area in QuPath's y-down pixel frame,
    # as _check_qupath requires); a box hanging past the slide's edge is cut at the edge.
    w, h = src.dimensions
    nodes = {n.name: n for n in pred.tree}
    assert features[0]["properties"]["tree_name"] == pred.tree[0].name
    inside = 0
    for f in features:
        (ring,) = f["geometry"]["coordinates"]
        bx, by, bw, bh = nodes[f["properties"]["tree_name"]].box
        x0, y0, x1, y1 = max(bx, 0.0), max(by, 0.0), min(bx + bw, w), min(by + bh, h)
        assert ring == [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], f["properties"]["tree_name"]
        if (x0, y0, x1, y1) == (bx, by, bx + bw, by + bh):
            inside += 1
            assert ring == [[bx, by], [bx + bw, by], [bx + bw, by + bh], [bx, by + bh], [bx, by]]
        for x, y in ring:  # polygons stay on the slide (a box past the edge is not an ROI there)
            assert 0 <= x <= w and 0 <= y <= h
    assert inside >= len(features) // 2  # most boxes lie inside and are compared uncut
    # A rewrite gives the same ids (QuPath re-imports replace instead of duplicating).
    assert json.loads(write_geojson(pred, tmp_path / "y.geojson", slide="slide.tif").read_text()) == collection


def test_geojson_of_a_bare_tree_still_imports(model, image):
    pred = magnet_zoo.predict_slide(model, magnet_zoo.ArraySource(image))
    collection = roi_geojson(pred.tree, slide="s")
    _check_qupath(collection)
    assert all(f["properties"]["classification"]["name"].startswith("MagNet patch") for f in collection["features"])
