"""``magnet-zoo predict`` over a folder (resumable, error-tolerant) and ``magnet-zoo explain``."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import magnet_zoo
from magnet_zoo.cli import main
from magnet_zoo.hub import save_pretrained
from magnet_zoo.infer.batch import collect_slides, shard


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    model = magnet_zoo.create_model("magnet2_tiny", attention_init="random")
    return save_pretrained(model, tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """20 slides: 18 copies of one generated SynthMets slide, a truncated TIFF and a text file."""
    from magnet_zoo.synth import generate_slide

    folder = tmp_path_factory.mktemp("cohort")
    first = folder / "s00.tif"
    generate_slide(first, size=2048, category="micro", seed=3)
    for i in range(1, 18):
        shutil.copy(first, folder / f"s{i:02d}.tif")
    data = first.read_bytes()
    (folder / "s18_truncated.tif").write_bytes(data[: len(data) // 3])
    (folder / "s19_text.tif").write_text("not a slide")
    (folder / "notes.txt").write_text("ignored: not a slide suffix")
    return folder


def test_predict_folder_with_corrupt_slides_then_resume(cohort, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["predict", str(cohort), "--model", str(checkpoint), "--out", str(out), "--batch-size", "4"])
    assert code == 0
    jsons = sorted((out / "slides").glob("*.json"))
    assert len(jsons) == 18
    with open(out / "errors.csv") as fh:
        errors = list(csv.DictReader(fh))
    assert len(errors) == 2
    assert {e["path"].rsplit("/", 1)[-1] for e in errors} == {"s18_truncated.tif", "s19_text.tif"}
    assert all(e["error"] and e["message"] for e in errors)
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 18
    one = json.loads(jsons[0].read_text())
    assert {"probability", "label", "tree", "accounting", "seconds"} <= set(one)
    assert one["tree"][0]["name"] == "I_1" and len(one["tree"]) == 7
    # Identical copies of one slide get identical predictions, whatever batch they were in.
    probs = {round(float(r["probability"]), 5) for r in rows}
    assert len(probs) == 1

    mtimes = {p: p.stat().st_mtime_ns for p in jsons}
    capsys.readouterr()
    code = main(["predict", str(cohort), "--model", str(checkpoint), "--out", str(out)])
    assert code == 0
    assert "0 predicted, 20 already done, 0 failed" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in jsons} == mtimes


def test_predict_exits_nonzero_only_when_every_slide_fails(cohort, checkpoint, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(cohort / "s19_text.tif", bad / "a.tif")
    assert main(["predict", str(bad), "--model", str(checkpoint), "--out", str(tmp_path / "o")]) == 1


def test_predict_reads_csv_lists_and_reports_missing_inputs(cohort, checkpoint, tmp_path, capsys):
    listing = tmp_path / "list.csv"
    listing.write_text("path,label\n" + "".join(f"{cohort}/s{i:02d}.tif,1\n" for i in range(3)))
    assert len(collect_slides([listing])) == 3
    assert main(["predict", str(listing), "--model", str(checkpoint), "--out", str(tmp_path / "o")]) == 0
    assert len(list((tmp_path / "o" / "slides").glob("*.json"))) == 3
    assert main(["predict", str(tmp_path / "missing"), "--model", str(checkpoint), "--out", str(tmp_path)]) == 1
    assert "no such file or folder" in capsys.readouterr().err


def test_shards_are_disjoint_and_complete():
    items = [f"s{i}" for i in range(11)]
    parts = [shard(items, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(items)
    assert all(not set(a) & set(b) for i, a in enumerate(parts) for b in parts[i + 1 :])


def test_model_without_weights_is_a_one_line_error(cohort, tmp_path, capsys):
    code = main(["predict", str(cohort / "s00.tif"), "--model", "magnet3_inception_v3", "--out", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err
    assert "no pretrained weights are published" in err.lower()
    assert "Traceback" not in err


def test_explain_draws_the_roi_tree_on_a_real_slide(wsi_dir, checkpoint, tmp_path):
    slide = wsi_dir / "CMU-1-Small-Region_pyramid.tiff"
    assert main(["explain", str(slide), "--model", str(checkpoint), "--out", str(tmp_path), "--thumb-size", "512"]) == 0
    png = tmp_path / "CMU-1-Small-Region_pyramid.magnet.png"
    geo = json.loads((tmp_path / "CMU-1-Small-Region_pyramid.magnet.geojson").read_text())
    pred = json.loads((tmp_path / "CMU-1-Small-Region_pyramid.magnet.json").read_text())
    img = np.asarray(Image.open(png).convert("RGB"))
    # Thumbnail (512 + header) beside a gallery of 4 final patches of 64x64.
    assert img.shape[0] >= 512 and img.shape[1] >= 512 + 64

    # GeoJSON as QuPath reads it: a FeatureCollection of closed Polygon annotations.
    assert geo["type"] == "FeatureCollection"
    assert len(geo["features"]) == len(pred["tree"]) - 1
    for feat in geo["features"]:
        assert feat["type"] == "Feature" and feat["geometry"]["type"] == "Polygon"
        ring = feat["geometry"]["coordinates"][0]
        assert len(ring) == 5 and ring[0] == ring[-1]
        assert {"name", "layer", "level", "scale"} <= set(feat["properties"])
        assert feat["properties"]["objectType"] == "annotation"

    # Boxes are drawn where the ROI tree says: the left edge of each final ROI carries its colour.
    from magnet_zoo.explain.geojson import patch_colour
    from magnet_zoo.explain.render import GAP, HEADER

    w, h = 2220, 2967
    side = max(w, h)
    x0 = (w - side) / 2
    k = 512 / side
    checked = 0
    for node in pred["tree"]:
        if node["layer"] == 0 or node["frozen"]:  # frozen patches are their parent's box, drawn once
            continue
        bx, by, bw, bh = node["box"]
        px = int(round((bx - x0) * k)) + GAP
        top, bottom = int(by * k) + HEADER, int((by + bh) * k) + HEADER
        # Along the box's left edge (boxes of other nodes may cover parts of it).
        patch = img[max(top, HEADER) : bottom, max(px - 2, 0) : px + 3].reshape(-1, 3)
        colour = np.array(patch_colour(node["name"]))
        assert (np.abs(patch.astype(int) - colour).sum(axis=1) < 40).any(), node["name"]
        checked += 1
    assert checked == 4
