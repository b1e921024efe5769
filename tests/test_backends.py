"""Every backend on one JPEG pyramid (the real one of ../shared/data/wsi, or a generated one when it is
absent): same geometry, same pixels, same ROI tree; the .svs tests need the real slide."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import magnet_zoo
from magnet_zoo.wsi import CoarseLevelSource, OrientedSource, SlideFetcher, open_slide
from magnet_zoo.wsi.array_source import ArraySource
from magnet_zoo.wsi.orient import _forward_point, _inverse_point, orient_array

SVS = "CMU-1-Small-Region.svs"
BACKENDS = ["openslide", "tifffile", "monai", "tiatoolbox"]
# Boxes as fractions of the level-0 size: (x, y), level, (w, h); the last one hangs over the bottom-right edge.
BOXES = [
    ((0.0, 0.0), 0, (256, 256)),
    ((0.3, 0.3), 0, (300, 200)),
    ((0.45, 0.54), 1, (120, 90)),
    (None, 0, (200, 200)),
]


def _edge_location(pyramid) -> tuple[int, int]:
    """Top-left of a 200 x 200 read with 120 x 67 px on the slide (the rest past the edge)."""
    w, h = pyramid.dimensions
    return w - 120, h - 67


@pytest.fixture(scope="module")
def pyramid_sources(pyramid):
    sources = {b: open_slide(pyramid.path, b) for b in BACKENDS}
    yield sources
    for s in sources.values():
        s.close()


def test_backends_agree_on_geometry(pyramid_sources, pyramid):
    ref = pyramid_sources["openslide"]
    assert ref.level_dimensions == pyramid.level_dimensions and ref.level_count == 4
    assert ref.mpp == pytest.approx((pyramid.mpp, pyramid.mpp))
    for name, src in pyramid_sources.items():
        assert src.level_dimensions == ref.level_dimensions, name
        assert np.allclose(src.level_downsamples, ref.level_downsamples, rtol=1e-3), name


@pytest.mark.parametrize(("location", "level", "size"), BOXES)
def test_backends_return_the_same_pixels(pyramid_sources, pyramid, location, level, size):
    w, h = pyramid.dimensions
    location = _edge_location(pyramid) if location is None else (round(location[0] * w), round(location[1] * h))
    ref = pyramid_sources["openslide"].read_region(location, level, size).astype(np.int16)
    assert ref.shape == (size[1], size[0], 3)
    for name, src in pyramid_sources.items():
        got = src.read_region(location, level, size).astype(np.int16)
        assert got.shape == ref.shape, name
        diff = np.abs(got - ref)
        if level == 0:
            # Same JPEG tiles; decoders may differ by rounding (JPEG tolerance).
            assert diff.mean() < 1.0 and diff.max() <= 8, name
        else:
            # These pyramids' downsamples are not integers (2.000337): OpenSlide places level pixels at
            # fractional offsets and interpolates (cairo), tifffile reads whole pixels. A sub-pixel
            # shift of textured H&E, not a misplaced read (a one-pixel shift gives a mean of ~17).
            assert diff.mean() < 6.0, name


def test_reads_past_the_edge_are_black(pyramid_sources, pyramid):
    for name, src in pyramid_sources.items():
        px = src.read_region(_edge_location(pyramid), 0, (200, 200))
        assert (px[67:] == 0).all() and (px[:, 120:] == 0).all(), name
        assert px[:60, :100].mean() > 50, name


def test_magnet_builds_the_same_roi_tree_whichever_backend_reads(pyramid_sources):
    torch.manual_seed(0)
    model = magnet_zoo.create_model("magnet3_tiny", attention_init="random").eval()
    trees = {}
    for name, src in pyramid_sources.items():
        pred = magnet_zoo.predict_slide(model, src)
        trees[name] = pred.tree
    ref = trees["openslide"]
    assert len({n.box for n in ref}) > 5  # random attention: the ROIs differ from each other
    for name, tree in trees.items():
        assert [n.name for n in tree] == [n.name for n in ref], name
        assert [n.level for n in tree] == [n.level for n in ref], name
        for a, b in zip(tree, ref, strict=True):
            assert np.allclose(a.box, b.box, atol=1e-3 * b.box[2] + 0.5), (name, a.name, a.box, b.box)


def test_single_level_svs_gets_a_coarse_view_and_predicts(wsi_dir):
    for backend in ("openslide", "tifffile"):
        with open_slide(wsi_dir / SVS, backend) as src:
            assert isinstance(src, CoarseLevelSource)
            assert src.inner.level_count == 1
            assert src.level_dimensions[1:] == ((1110, 1484), (555, 742), (277, 371), (138, 185))
            assert src.mpp == pytest.approx((0.499, 0.499))
            coarse = src.read_region((0, 0), 1, src.level_dimensions[1])
            full = src.read_region((0, 0), 0, (2220, 2967)).astype(np.float32)
            expect = full[:2966, :2220].reshape(1483, 2, 1110, 2, 3).mean(axis=(1, 3))
            assert np.abs(coarse[:1483].astype(np.float32) - expect).mean() < 1.0
            model = magnet_zoo.create_model("magnet2_tiny").eval()
            pred = magnet_zoo.predict_slide(model, src)
            assert pred.tree[0].level == 4  # the whole-slide view: the smallest computed level (185 px >= 112)
            view = src.coarse_view()
            magnet_zoo.predict_slide(model, src)
            assert src.coarse_view() is view  # computed once, then cached


def test_svs_associated_images(wsi_dir):
    with open_slide(wsi_dir / SVS, "openslide") as src:
        inner = src.inner
        assert {"thumbnail", "label", "macro"} <= set(inner.associated_images)
        assert inner.associated_image("thumbnail").shape[-1] == 3
        assert inner.associated_image("nope") is None


def test_backend_accepts_class_and_reader_instances(pyramid):
    from monai.data import WSIReader as MonaiReader

    from magnet_zoo.wsi.backends.tifffile_backend import TiffFileSource

    with open_slide(pyramid.path, TiffFileSource) as src:
        assert src.backend == "tifffile"
    with open_slide(pyramid.path, MonaiReader(backend="tifffile")) as src:
        assert src.backend == "monai" and src.level_count == 4
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        open_slide(pyramid.path, "nope")


# ----------------------------------------------------------------------------- D4 orientation
def test_orientation_point_maps_invert_each_other():
    w, h = 7, 4
    for k in range(8):
        for c in range(w):
            for r in range(h):
                c2, r2, _, _ = _forward_point(c, r, w, h, bool(k & 4), k % 4)
                assert _inverse_point(c2, r2, w, h, bool(k & 4), k % 4) == (c, r)


@pytest.mark.parametrize("k", range(8))
def test_oriented_reads_are_exact(k):
    rng = np.random.default_rng(k)
    img = rng.integers(0, 255, (300, 500, 3), dtype=np.uint8)
    src = ArraySource(img, coarsest=100)
    oriented = OrientedSource(src, k)
    for level in range(src.level_count):
        full = orient_array(src.read_region((0, 0), level, src.level_dimensions[level]), k)
        assert oriented.level_dimensions[level] == (full.shape[1], full.shape[0])
        ds = oriented.level_downsamples[level]
        for x, y, w, h in [(0, 0, 10, 7), (13, 5, 31, 17), (full.shape[1] - 9, full.shape[0] - 4, 9, 4)]:
            w, h = min(w, full.shape[1] - x), min(h, full.shape[0] - y)
            got = oriented.read_region((round(x * ds), round(y * ds)), level, (w, h))
            assert np.array_equal(got, full[y : y + h, x : x + w]), (k, level, x, y)


def test_oriented_slide_reads_the_oriented_roi():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (400, 600, 3), dtype=np.uint8)
    rotated = OrientedSource(ArraySource(img), 1)
    direct = ArraySource(np.ascontiguousarray(np.rot90(img)))
    from magnet_zoo.nn.fetcher import Square

    sq = [Square(30.5, 100.25, 217.0), Square(-50, 400, 300)]
    a = SlideFetcher(rotated).fetch(sq, 56).images
    b = SlideFetcher(direct).fetch(sq, 56).images
    assert torch.equal(a, b)
