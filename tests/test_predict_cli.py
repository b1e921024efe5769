"""``magnet-zoo predict`` over a folder (resumable, error-tolerant) and ``magnet-zoo explain``."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

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


@pytest.mark.slow
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
    assert "0 predicted, 18 already done, 0 failed, 2 failed before" in capsys.readouterr().err
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


def test_explain_draws_the_roi_tree_on_a_pyramid(pyramid, checkpoint, tmp_path):
    slide = pyramid.path
    assert main(["explain", str(slide), "--model", str(checkpoint), "--out", str(tmp_path), "--thumb-size", "512"]) == 0
    png = tmp_path / f"{slide.stem}.magnet.png"
    geo = json.loads((tmp_path / f"{slide.stem}.magnet.geojson").read_text())
    pred = json.loads((tmp_path / f"{slide.stem}.magnet.json").read_text())
    img = np.asarray(Image.open(png).convert("RGB"))
    # Thumbnail (512 + header) beside a gallery of 4 final patches of 64x64.
    assert img.shape[0] >= 512 and img.shape[1] >= 512 + 64

    # GeoJSON as QuPath reads it: a FeatureCollection of closed Polygon annotations, one per drawn ROI
    # (frozen patches are their parent's box: not a second polygon) plus the slide-level result.
    assert geo["type"] == "FeatureCollection"
    drawn = [n for n in pred["tree"] if n["layer"] > 0 and not n["frozen"]]
    assert len(geo["features"]) == len(drawn) + 1
    for feat in geo["features"]:
        assert feat["type"] == "Feature" and feat["geometry"]["type"] == "Polygon"
        ring = feat["geometry"]["coordinates"][0]
        assert len(ring) == 5 and ring[0] == ring[-1]
        assert feat["properties"]["objectType"] == "annotation"
    slide_result = geo["features"][0]["properties"]
    assert slide_result["classification"]["name"] == pred["label"]
    assert slide_result["measurements"]["MagNet probability (tumour)"] == pytest.approx(pred["probability"])
    for feat in geo["features"][1:]:
        assert {"MagNet layer", "Pyramid level", "Scale"} <= set(feat["properties"]["measurements"])
    assert geo["properties"]["provenance"]["model"]["name"] == str(checkpoint)
    assert pred["provenance"]["model"]["name"] == str(checkpoint)

    # Boxes are drawn where the ROI tree says: the left edge of each final ROI carries its colour.
    from magnet_zoo.explain.geojson import patch_colour
    from magnet_zoo.explain.render import GAP, HEADER

    w, h = pyramid.dimensions
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


# --------------------------------------------------------------------------- provenance and resume keys
@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory):
    import torch

    torch.manual_seed(1)
    model = magnet_zoo.create_model("magnet2_tiny", attention_init="random")
    return save_pretrained(model, tmp_path_factory.mktemp("ckpt2") / "tiny-other")


@pytest.fixture()
def small_cohort(cohort, tmp_path):
    """Two good slides and the text file that is not a slide."""
    folder = tmp_path / "small"
    folder.mkdir()
    for name in ("s00.tif", "s01.tif", "s19_text.tif"):
        shutil.copy(cohort / name, folder / name)
    return folder


def _jsons(out):
    return {p.name: json.loads(p.read_text()) for p in sorted((out / "slides").glob("*.json"))}


def test_outputs_record_model_revision_weights_version_and_settings(small_cohort, checkpoint, tmp_path):
    from magnet_zoo.infer.provenance import weights_sha256

    out = tmp_path / "out"
    assert main(["predict", str(small_cohort), "--model", str(checkpoint), "--out", str(out)]) == 0
    expected_hash = weights_sha256(magnet_zoo.load_pretrained(str(checkpoint)))
    for d in _jsons(out).values():
        prov = d["provenance"]
        assert prov["magnet_zoo_version"] == magnet_zoo.__version__
        assert prov["model"]["name"] == str(checkpoint) and prov["model"]["source"] == "folder"
        assert prov["model"]["weights_sha256"] == expected_hash
        assert prov["settings"] == {"threshold": 0.5, "backend": "auto"}
        assert len(prov["run_key"]) == 16
    run = json.loads((out / "run.json").read_text())
    assert run["run_key"] == prov["run_key"]
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["weights_sha256"] for r in rows} == {expected_hash}
    assert {r["model"] for r in rows} == {str(checkpoint)}
    # SynthMets slides are written at 0.5 µm/px; this checkpoint does not record its training mpp.
    assert {r["slide_mpp"] for r in rows} == {"0.5"}
    assert all(d["resolution"]["slide_mpp"] == [0.5, 0.5] for d in _jsons(out).values())
    with open(out / "errors.csv") as fh:
        assert [r["run_key"] for r in csv.DictReader(fh)] == [prov["run_key"]]


def test_packaged_and_hub_models_name_their_revision():
    model = magnet_zoo.load_pretrained("magnet2_micro")
    source = model.pretrained_source
    assert source["name"] == "magnet2_micro.synthmets_demo"
    assert source["revision"] == f"magnet_zoo {magnet_zoo.__version__}"


def test_rerun_with_another_model_or_threshold_predicts_again(small_cohort, checkpoint, other_checkpoint,
                                                              tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict", str(small_cohort), "--model", str(checkpoint), "--out", str(out)]) == 0
    first = _jsons(out)
    capsys.readouterr()
    assert main(["predict", str(small_cohort), "--model", str(other_checkpoint), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "2 predicted (2 had results of another model or settings), 0 already done, 1 failed" in err
    second = _jsons(out)
    assert all(second[k]["provenance"]["model"]["name"] == str(other_checkpoint) for k in second)
    assert all(second[k]["provenance"]["run_key"] != first[k]["provenance"]["run_key"] for k in second)
    # The text file failed for the first model too; with the new model it is tried (and fails) again.
    with open(out / "errors.csv") as fh:
        assert [r["run_key"] for r in csv.DictReader(fh)] == [second[next(iter(second))]["provenance"]["run_key"]]
    # Same model, new threshold: the labels can change, so this is new work as well.
    assert main(["predict", str(small_cohort), "--model", str(other_checkpoint), "--out", str(out),
                 "--threshold", "0.0"]) == 0
    assert "2 predicted" in capsys.readouterr().err
    assert {d["label"] for d in _jsons(out).values()} == {"tumour"}
    with open(out / "predictions.csv") as fh:
        assert {r["label"] for r in csv.DictReader(fh)} == {"tumour"}


def test_force_redoes_everything(small_cohort, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict", str(small_cohort), "--model", str(checkpoint), "--out", str(out)]) == 0
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "slides").glob("*.json")}
    capsys.readouterr()
    assert main(["predict", str(small_cohort), "--model", str(checkpoint), "--out", str(out), "--force"]) == 0
    assert "2 predicted, 0 already done, 1 failed" in capsys.readouterr().err
    assert all(p.stat().st_mtime_ns != t for p, t in mtimes.items())


def test_rerun_with_explain_writes_the_figures(small_cohort, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict", str(small_cohort), "--model", str(checkpoint), "--out", str(out)]) == 0
    assert not list((out / "slides").glob("*.png"))
    capsys.readouterr()
    assert main(["predict", str(small_cohort), "--model", str(checkpoint), "--out", str(out), "--explain"]) == 0
    assert "2 predicted" in capsys.readouterr().err
    assert len(list((out / "slides").glob("*.png"))) == 2
    assert len(list((out / "slides").glob("*.geojson"))) == 2
    # Now complete: a third run with --explain has nothing to do.
    assert main(["predict", str(small_cohort), "--model", str(checkpoint), "--out", str(out), "--explain"]) == 0
    assert "0 predicted, 2 already done" in capsys.readouterr().err


def test_retry_errors_succeeds_when_other_slides_are_done(small_cohort, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict", str(small_cohort), "--model", str(checkpoint), "--out", str(out)]) == 0
    capsys.readouterr()
    # The text file fails again; the two slides are done: that is not a failed run.
    assert main(["predict", str(small_cohort), "--model", str(checkpoint), "--out", str(out),
                 "--retry-errors"]) == 0
    assert "0 predicted, 2 already done, 1 failed" in capsys.readouterr().err
    with open(out / "errors.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 1


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_output_files_get_the_mode_the_umask_allows(small_cohort, checkpoint, tmp_path, umask, mode):
    import os

    out = tmp_path / "out"
    old = os.umask(umask)
    try:
        assert main(["predict", str(small_cohort / "s00.tif"), "--model", str(checkpoint), "--out", str(out),
                     "--explain"]) == 0
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".json", ".csv", ".png", ".geojson"}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(mode) for p in files}


# --------------------------------------------------------------------------- sharded runs (torchrun ranks)
def _csv_rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_sharded_run_merges_into_one_folder_then_a_sharded_retry_clears_fixed_errors(cohort, checkpoint, tmp_path):
    """``predict`` under torchrun: every rank predicts its shard into one folder, with its own errors file;
    rank 0 then merges (magnet_zoo.cli.predict calls merge_rank_outputs after a barrier)."""
    from magnet_zoo.infer.batch import merge_rank_outputs, predict_many, slide_key

    folder = tmp_path / "cohort"
    folder.mkdir()
    for name in ("s00.tif", "s01.tif", "s02.tif", "s18_truncated.tif", "s19_text.tif"):
        shutil.copy(cohort / name, folder / name)
    slides = collect_slides([folder])
    assert len(slides) == 5
    model = magnet_zoo.load_pretrained(str(checkpoint))
    out = tmp_path / "out"

    def run_ranks(**kwargs):
        return [predict_many(model, slides, out, rank=r, world=2, **kwargs) for r in range(2)]

    summaries = run_ranks()
    assert not (out / "predictions.csv").exists()  # ranks leave the shared CSV to the merge
    assert [s.total for s in summaries] == [3, 2]  # the shards of 5 slides
    assert sum(s.predicted for s in summaries) == 3 and sum(s.failed for s in summaries) == 2
    rank_files = sorted(p.name for p in out.glob("errors.rank*.csv"))
    assert rank_files and not (out / "errors.csv").exists()
    merged = merge_rank_outputs(out)
    assert merged == out / "predictions.csv"
    assert sorted(r["path"] for r in _csv_rows(merged)) == sorted(
        str(p) for p in slides if p.name in ("s00.tif", "s01.tif", "s02.tif"))
    assert len({r["slide"] for r in _csv_rows(merged)}) == 3  # each slide once, whichever rank did it
    errors = _csv_rows(out / "errors.csv")
    assert sorted(Path(e["path"]).name for e in errors) == ["s18_truncated.tif", "s19_text.tif"]
    assert not list(out.glob("errors.rank*.csv"))

    # The text file is replaced by a good slide; a sharded retry predicts it and its error row goes.
    shutil.copy(cohort / "s00.tif", folder / "s19_text.tif")
    summaries = run_ranks(retry_errors=True)
    assert sum(s.predicted for s in summaries) == 1 and sum(s.done_before for s in summaries) == 3
    assert sum(s.failed for s in summaries) == 1  # the truncated file, tried again
    merge_rank_outputs(out)
    errors = _csv_rows(out / "errors.csv")
    assert [Path(e["path"]).name for e in errors] == ["s18_truncated.tif"], errors
    assert (out / "slides" / f"{slide_key(folder / 's19_text.tif')}.json").is_file()
    assert len(_csv_rows(out / "predictions.csv")) == 4


# --------------------------------------------------------------------------- the model's grey threshold, end to end
def test_a_checkpoints_grey_threshold_other_than_15_is_honoured_end_to_end(tmp_path):
    """Tissue whose colour channels differ by exactly 20: kept by the paper's threshold (15), blacked out
    by a model whose config says 30. Saved, loaded, and predicted by predict_slide, predict_many and the
    CLI, that model must see an all-black slide; under 15 it sees tissue."""
    import torch

    from magnet_zoo.infer.batch import predict_many, slide_key
    from tests.conftest import micro_magnet

    rng = np.random.default_rng(0)
    base = rng.integers(60, 200, (500, 600, 1))
    image = np.concatenate([base + 20, base + 10, base], axis=-1).astype(np.uint8)  # spread 20 everywhere
    slide = tmp_path / "spread20.png"
    Image.fromarray(image).save(slide)
    black = magnet_zoo.ArraySource(np.zeros_like(image))

    model = micro_magnet(attention_init="random", grey_threshold=30).eval()
    loaded = magnet_zoo.load_pretrained(save_pretrained(model, tmp_path / "ckpt30"))
    assert loaded.config.grey_threshold == 30
    with open_source(slide) as src:
        seen = magnet_zoo.predict_slide(loaded, src)
    assert seen.final_patches.abs().sum() == 0  # every read was filtered with 30
    expected = magnet_zoo.predict_slide(loaded, black).probability
    assert seen.probability == pytest.approx(expected, abs=1e-6)

    fifteen = micro_magnet(attention_init="random").eval()
    assert fifteen.config.grey_threshold == 15
    with torch.no_grad():
        fifteen.load_state_dict(loaded.state_dict())
    with open_source(slide) as src:
        assert magnet_zoo.predict_slide(fifteen, src).final_patches.abs().sum() > 0  # the control sees tissue

    out = tmp_path / "out"
    summary = predict_many(loaded, [slide], out)
    assert summary.predicted == 1
    record = json.loads((out / "slides" / f"{slide_key(slide)}.json").read_text())
    assert record["probability"] == pytest.approx(expected, abs=1e-6)
    assert main(["predict", str(slide), "--model", str(tmp_path / "ckpt30"), "--out", str(tmp_path / "cli")]) == 0
    record = json.loads((tmp_path / "cli" / "slides" / f"{slide_key(slide)}.json").read_text())
    assert record["probability"] == pytest.approx(expected, abs=1e-6)


def open_source(path):
    from magnet_zoo.wsi import open_slide

    return open_slide(path)
