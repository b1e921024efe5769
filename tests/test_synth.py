"""SynthMets: determinism, sidecar truth, OpenSlide compatibility, colour matching, invisibility of ITCs."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from magnet_zoo.synth import generate_dataset, generate_slide, plan_slide, read_labels, texture, tumour_mask
from magnet_zoo.synth.cli import add_parser, main
from magnet_zoo.synth.texture import STAIN_E, STAIN_H

SIZE = 6144
SEED = 5


def _levels(path: Path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tf:
        return [level.asarray() for level in tf.series[0].levels]


def _level0(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tf:
        return tf.series[0].levels[0].asarray()


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for level in _levels(path):
        h.update(level.tobytes())
    return h.hexdigest()


def _thumbnail(path: Path, side: int = 56) -> np.ndarray:
    """Area-averaged ``side`` x ``side`` view of the whole (square) slide, from its coarsest level."""
    from PIL import Image

    with tifffile.TiffFile(path) as tf:
        coarsest = tf.series[0].levels[-1].asarray()
    return np.asarray(Image.fromarray(coarsest).resize((side, side), Image.BOX)).astype(np.float64)


def _nuclear_fraction(rgb: np.ndarray) -> float:
    """Fraction of pixels with haematoxylin above 0.4 OD units (colour deconvolution)."""
    od = -np.log(np.clip(rgb.astype(np.float64), 1, 255) / 255.0)
    unmix = np.linalg.pinv(np.stack([STAIN_H, STAIN_E], axis=1))
    return float(((od @ unmix.T)[..., 0] > 0.4).mean())


@pytest.fixture(scope="module")
def macro(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path, dict]:
    """A macro slide and its tumour-free twin (same seed, category normal)."""
    root = tmp_path_factory.mktemp("synth")
    tumour = generate_slide(root / "macro.tif", size=SIZE, category="macro", seed=SEED)
    normal = generate_slide(root / "normal.tif", size=SIZE, category="normal", seed=SEED)
    return root / "macro.tif", tumour, root / "normal.tif", normal


@pytest.mark.slow
def test_same_seed_gives_identical_pixels_different_seed_does_not(tmp_path: Path) -> None:
    first = generate_slide(tmp_path / "a.tif", size=3072, category="micro", seed=11)
    texture.bank_variant.cache_clear()  # the second run rebuilds its texture bank from scratch
    texture.edge_noise.cache_clear()
    second = generate_slide(tmp_path / "b.tif", size=3072, category="micro", seed=11)
    other = generate_slide(tmp_path / "c.tif", size=3072, category="micro", seed=12)
    assert _digest(tmp_path / "a.tif") == _digest(tmp_path / "b.tif")
    assert {k: v for k, v in first.items() if k != "file"} == {k: v for k, v in second.items() if k != "file"}
    assert _digest(tmp_path / "a.tif") != _digest(tmp_path / "c.tif")
    assert first["boxes"] != other["boxes"]


def test_sidecar_is_written_and_describes_the_slide(macro: tuple[Path, dict, Path, dict]) -> None:
    path, meta, _, normal = macro
    assert json.loads(path.with_suffix(".json").read_text()) == meta
    assert meta["label"] == 1 and meta["category"] == "macro"
    assert normal["label"] == 0 and normal["boxes"] == [] and normal["category"] == "normal"
    assert meta["size"] == [SIZE, SIZE] and meta["mpp"] == 0.5 and meta["seed"] == SEED
    assert meta["version"] and meta["levels"][0] == [SIZE, SIZE]
    assert [t["category"] for t in meta["tumours"]][0] == "macro"
    for x, y, w, h in meta["boxes"]:
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= SIZE and y + h <= SIZE
    assert 0.2 < meta["tissue_fraction"] < 0.8


def test_boxes_enclose_exactly_the_pixels_that_differ_from_the_tumour_free_twin(
    macro: tuple[Path, dict, Path, dict],
) -> None:
    path, meta, twin, _ = macro
    a, b = _level0(path), _level0(twin)
    changed = np.abs(a.astype(np.int16) - b).max(axis=-1) > 0
    inside = np.zeros_like(changed)
    slack = 17  # JPEG works on 16 x 16 blocks; chroma upsampling may touch one pixel further
    for x, y, w, h in meta["boxes"]:
        inside[max(0, y - slack) : y + h + slack, max(0, x - slack) : x + w + slack] = True
        # every box is tight: tumour pixels reach each of its four sides
        box = changed[y : y + h, x : x + w]
        assert box[:slack].any() and box[-slack:].any() and box[:, :slack].any() and box[:, -slack:].any()
    assert changed.any()
    assert not (changed & ~inside).any()


def test_tumour_mask_matches_the_boxes_at_level_0_and_below(macro: tuple[Path, dict, Path, dict]) -> None:
    path, meta, _, normal = macro
    full = tumour_mask(path, (SIZE, SIZE))
    inside = np.zeros_like(full)
    for x, y, w, h in meta["boxes"]:
        inside[y : y + h, x : x + w] = True
        box = full[y : y + h, x : x + w]
        assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
    assert full.any() and not (full & ~inside).any()
    coarse = tumour_mask(meta, (96, 96))
    reference = full.reshape(96, 64, 96, 64).mean(axis=(1, 3)) > 0.5
    assert (coarse & reference).sum() / (coarse | reference).sum() > 0.9
    assert not tumour_mask(normal, (96, 96)).any()


def test_tumour_texture_has_more_nuclear_area_inside_the_boxes(macro: tuple[Path, dict, Path, dict]) -> None:
    path, meta, _, _ = macro
    level0 = _level0(path)
    glass = np.asarray(meta["glass_rgb"])
    outside = np.abs(level0.astype(np.int16) - glass).sum(axis=-1) > 30  # tissue
    centres = []
    for x, y, w, h in meta["boxes"]:
        outside[max(0, y - 64) : y + h + 64, max(0, x - 64) : x + w + 64] = False
        centres.append(level0[y + h // 4 : y + 3 * h // 4, x + w // 4 : x + 3 * w // 4].reshape(-1, 3))
    inside_fraction = _nuclear_fraction(np.concatenate(centres))
    outside_fraction = _nuclear_fraction(level0[outside][::7])  # a sample is plenty
    assert inside_fraction > outside_fraction + 0.04


def test_tumour_and_normal_tissue_have_the_same_mean_colour(macro: tuple[Path, dict, Path, dict]) -> None:
    path, meta, _, _ = macro
    a = _level0(path)
    x, y, w, h = meta["boxes"][0]
    region = plan_slide(SIZE, "macro", SEED).layout.tumours[0].region  # the exact tumour mask
    tumour_mean = a[y : y + h, x : x + w][region.mask(x, y, w, h)].mean(axis=0)
    # normal tissue of the same slide, as 128 x 128 patches fully inside tissue and outside every box
    glass = np.asarray(meta["glass_rgb"])
    means = []
    p = 128
    for py in range(0, SIZE, p):
        for px in range(0, SIZE, p):
            patch = a[py : py + p, px : px + p]
            near_box = any(
                px < bx + bw + 64 and px + p > bx - 64 and py < by + bh + 64 and py + p > by - 64
                for bx, by, bw, bh in meta["boxes"]
            )
            if not near_box and (np.abs(patch.astype(np.int16) - glass).sum(axis=-1) > 30).all():
                means.append(patch.reshape(-1, 3).mean(axis=0))
    means = np.asarray(means)
    assert len(means) > 100
    spread = means.std(axis=0)
    difference = np.abs(tumour_mean - means.mean(axis=0))
    assert np.all(difference < spread), (difference, spread)
    assert np.all(difference < 3.0)


def test_openslide_reads_every_level_consistently_with_level_0(macro: tuple[Path, dict, Path, dict]) -> None:
    path, meta, _, _ = macro
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert slide.level_count == len(meta["levels"]) >= 3
        assert [list(d) for d in slide.level_dimensions] == meta["levels"]
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.5)
        x, y, w, h = meta["boxes"][0]
        side = 1024  # a level-0 window over the tumour's corner: tissue, tumour and maybe glass
        origin = (x, y)
        base = np.asarray(slide.read_region(origin, 0, (side, side)).convert("RGB")).astype(np.float64)
        for level in range(1, slide.level_count):
            factor = 2**level
            assert slide.level_downsamples[level] == pytest.approx(factor, rel=1e-3)
            n = side // factor
            expected = base.reshape(n, factor, n, factor, 3).mean(axis=(1, 3))
            got = np.asarray(slide.read_region(origin, level, (n, n)).convert("RGB")).astype(np.float64)
            shifted = slide.read_region((x + factor, y + factor), level, (n, n)).convert("RGB")
            error = np.abs(got - expected).mean()
            # JPEG at quality 85 on this busy texture costs ~4-6 grey levels per pixel; one pixel of
            # misalignment costs far more
            assert error < 8.0, (level, error)
            assert error < 0.5 * np.abs(np.asarray(shifted, np.float64) - expected).mean(), level
            # every level is readable in full
            whole = slide.read_region((0, 0), level, slide.level_dimensions[level])
            assert whole.size == slide.level_dimensions[level]
    with tifffile.TiffFile(path) as tf:
        assert len(tf.pages) == len(meta["levels"])  # one top-level page per level
        for page in tf.pages:
            assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
            assert page.compression == tifffile.COMPRESSION.JPEG and page.jpegtables


@pytest.mark.slow
def test_an_itc_is_invisible_at_56_by_56(tmp_path: Path) -> None:
    size, seed = 8192, 2
    itc = generate_slide(tmp_path / "itc.tif", size=size, category="itc", seed=seed)
    generate_slide(tmp_path / "normal.tif", size=size, category="normal", seed=seed)
    assert all(t["category"] == "itc" and t["extent_um"] < 200 for t in itc["tumours"])
    a, b = _thumbnail(tmp_path / "itc.tif"), _thumbnail(tmp_path / "normal.tif")
    # the ITC is there at full resolution ...
    x, y, w, h = itc["boxes"][0]
    full_a, full_b = _level0(tmp_path / "itc.tif"), _level0(tmp_path / "normal.tif")
    assert np.abs(full_a[y : y + h, x : x + w].astype(np.float64) - full_b[y : y + h, x : x + w]).mean() > 5
    # ... but at 56 x 56 it changes a few pixels by less than normal tissue varies from pixel to pixel
    diff = np.abs(a - b)
    assert diff.mean() < 0.02
    glass = np.asarray(itc["glass_rgb"])
    tissue = np.abs(b - glass).sum(axis=-1) > 30
    inner = tissue[1:-1, 1:-1] & tissue[:-2, 1:-1] & tissue[2:, 1:-1] & tissue[1:-1, :-2] & tissue[1:-1, 2:]
    neighbour = np.abs(b[2:, 1:-1] - b[1:-1, 1:-1]).max(axis=-1)[inner]
    assert diff.max() <= np.median(neighbour) * 2, (diff.max(), np.median(neighbour))


def test_dataset_is_balanced_with_labels_csv(tmp_path: Path) -> None:
    labels = generate_dataset(tmp_path / "set", n=4, size=2048, seed=3, split="train", progress=False)
    assert labels == tmp_path / "set" / "labels.csv"
    with labels.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == [f"slide_{i:04d}.tif" for i in range(4)]
    assert {"path", "label", "category", "split"} <= set(rows[0])
    assert sorted(int(r["label"]) for r in rows) == [0, 0, 1, 1]
    assert all(r["split"] == "train" for r in rows)
    for r in rows:
        meta = json.loads((tmp_path / "set" / r["path"]).with_suffix(".json").read_text())
        assert meta["category"] == r["category"] and meta["label"] == int(r["label"])
        assert (r["category"] == "normal") == (r["label"] == "0")
        assert (tmp_path / "set" / r["path"]).is_file()
    typed = read_labels(labels)
    assert typed[0]["label"] in (0, 1) and Path(typed[0]["path"]).is_file()
    # a second run keeps the existing slides
    stamp = (tmp_path / "set" / rows[0]["path"]).stat().st_mtime_ns
    generate_dataset(tmp_path / "set", n=4, size=2048, seed=3, split="train", progress=False)
    assert (tmp_path / "set" / rows[0]["path"]).stat().st_mtime_ns == stamp


def test_two_writers_of_one_folder_both_finish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs reusing one folder (two benchmarks started together) each write labels.csv; one finishing
    between the other's write and rename must not make the other fail."""
    import magnet_zoo.synth.dataset as dataset

    generate_dataset(tmp_path / "set", n=2, size=2048, seed=3, split="train", progress=False)
    real_replace = dataset.os.replace
    nested = []

    def replace_after_another_writer(src, dst):  # the other run writes and renames first
        if not nested:
            nested.append(None)
            nested[0] = generate_dataset(tmp_path / "set", n=2, size=2048, seed=3, split="train", progress=False)
        real_replace(src, dst)

    monkeypatch.setattr(dataset.os, "replace", replace_after_another_writer)
    labels = generate_dataset(tmp_path / "set", n=2, size=2048, seed=3, split="train", progress=False)
    assert nested == [labels]
    assert [r["path"] for r in read_labels(labels)] and not list((tmp_path / "set").glob("*.part"))
    assert oct((tmp_path / "set" / "labels.csv").stat().st_mode & 0o777) == oct(0o644)


def test_tumour_categories_are_spread_over_tumour_slides() -> None:
    from magnet_zoo.synth.dataset import assign_categories

    cats = assign_categories(12, seed=0)
    assert cats.count("normal") == 6
    assert sorted(c for c in cats if c != "normal") == ["itc"] * 2 + ["macro"] * 2 + ["micro"] * 2
    assert assign_categories(5, seed=0, categories=("macro",)) == ["macro"] * 5
    with pytest.raises(ValueError, match="categories"):
        assign_categories(4, seed=0, categories=("tumour",))


def test_bad_arguments_raise_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="category"):
        generate_slide(tmp_path / "x.tif", size=2048, category="cancer", seed=0)
    with pytest.raises(ValueError, match="sides"):
        generate_slide(tmp_path / "x.tif", size=100, category="normal", seed=0)
    with pytest.raises(ValueError, match="tile"):
        generate_slide(tmp_path / "x.tif", size=2048, category="normal", seed=0, tile=300)
    assert not list(tmp_path.iterdir())


def test_cli_registers_synth_and_writes_a_dataset(tmp_path: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="magnet-zoo")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["synth", str(tmp_path / "out"), "--n", "2", "--size", "2048", "--seed", "1"])
    assert args.func.__name__ == "run" and args.categories == ("normal", "macro", "micro", "itc")
    code = main(
        [
            "synth",
            str(tmp_path / "out"),
            "--n",
            "2",
            "--size",
            "2048",
            "--no-progress",
            "--categories",
            "normal,itc",
        ]
    )
    assert code == 0
    rows = read_labels(tmp_path / "out" / "labels.csv")
    assert sorted(r["category"] for r in rows) == ["itc", "normal"]
    with pytest.raises(SystemExit):
        parser.parse_args(["synth", str(tmp_path), "--categories", "normal,cancer"])
