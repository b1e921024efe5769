"""ArraySource (the in-memory slide) and the network's reads: level, area resize, padding, grey filter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from magnet_zoo.nn.fetcher import Square
from magnet_zoo.nn.tree import root_square
from magnet_zoo.wsi import ArraySource, InvalidImageError, SlideFetcher, grey_filter, read_square
from magnet_zoo.wsi.orient import orient_array


def ramp(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)


def test_pyramid_is_built_by_area_halving():
    src = ArraySource(ramp(1000, 3000), coarsest=400)
    assert src.dimensions == (3000, 1000)
    assert src.level_dimensions == ((3000, 1000), (1500, 500), (750, 250), (375, 125))
    assert src.level_downsamples == (1.0, 2.0, 4.0, 8.0)
    lvl1 = src.read_region((0, 0), 1, (4, 2))
    full = src.read_region((0, 0), 0, (8, 4)).astype(float)
    expect = full.reshape(2, 2, 4, 2, 3).mean(axis=(1, 3))
    assert np.abs(lvl1 - expect).max() <= 0.5 + 1e-9


def test_read_region_pads_outside_with_black():
    img = np.full((10, 10, 3), 200, np.uint8)
    src = ArraySource(img)
    out = src.read_region((-5, 8), 0, (10, 5))
    assert out.shape == (5, 10, 3)
    assert (out[:2, 5:] == 200).all()  # rows 8, 9 of the image; columns 0..4
    assert (out[2:] == 0).all() and (out[:, :5] == 0).all()


@pytest.mark.parametrize(
    ("image", "expected_shape"),
    [
        (np.zeros((20, 30), np.uint8), (20, 30, 3)),  # grayscale
        (np.zeros((20, 30, 4), np.uint8), (20, 30, 3)),  # RGBA
        (np.zeros((20, 30, 3), np.uint16), (20, 30, 3)),  # 16-bit
        (np.zeros((20, 30, 3), np.float32), (20, 30, 3)),  # float in [0, 1]
    ],
)
def test_array_source_coerces_common_inputs(image, expected_shape):
    src = ArraySource(image)
    assert src.read_region((0, 0), 0, (30, 20)).shape == expected_shape


def test_rgba_transparent_is_black_and_16bit_scales():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:2, ..., 3] = 255
    out = ArraySource(rgba).read_region((0, 0), 0, (4, 4))
    assert (out[:2] == 255).all() and (out[2:] == 0).all()
    wide = np.full((4, 4, 3), 65535, np.uint16)
    assert (ArraySource(wide).read_region((0, 0), 0, (4, 4)) == 255).all()


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((5, 5, 2), np.uint8), "expected an"),
        (np.zeros((0, 5, 3), np.uint8), "empty"),
        (np.full((5, 5, 3), 2.0, np.float32), r"\[0, 1\]"),
        (np.full((5, 5, 3), np.nan, np.float32), "NaN"),
        (np.zeros((5, 5, 3), np.int64), "unsupported dtype"),
    ],
)
def test_array_source_rejects_bad_arrays(image, message):
    with pytest.raises(InvalidImageError, match=message):
        ArraySource(image)


def test_grey_filter_blacks_out_grey_and_white():
    px = np.array([[[255, 255, 255], [120, 125, 130], [200, 100, 150], [100, 114, 100], [100, 115, 100]]], np.uint8)
    out = grey_filter(px.copy(), 15)
    assert out[0, 0].tolist() == [0, 0, 0]  # white
    assert out[0, 1].tolist() == [0, 0, 0]  # grey (spread 10)
    assert out[0, 2].tolist() == [200, 100, 150]  # pink survives
    assert out[0, 3].tolist() == [0, 0, 0]  # spread 14 < 15
    assert out[0, 4].tolist() == [100, 115, 100]  # spread 15 is not < 15


def test_read_square_is_an_exact_area_resize():
    img = ramp(64, 64)
    src = ArraySource(img, pyramid=[])
    out, read = read_square(src, Square(16, 8, 32), 8, 0)
    expect = img[8:40, 16:48].astype(float).reshape(8, 4, 8, 4, 3).mean(axis=(1, 3))
    assert np.abs(out.astype(float) - expect).max() <= 1.0
    assert read == 32 * 32


def test_read_square_only_reads_the_part_inside_the_slide():
    img = np.full((100, 100, 3), (200, 100, 150), np.uint8)
    src = ArraySource(img, pyramid=[])
    out, read = read_square(src, Square(50, -50, 100), 10, 0)  # right-hand and top halves are outside
    assert read <= 51 * 51
    assert (out[5:, :5] == (200, 100, 150)).all()
    assert (out[:5] == 0).all() and (out[:, 5:] == 0).all()
    blank, read = read_square(src, Square(500, 500, 50), 10, 0)
    assert read == 0 and (blank == 0).all()


def test_root_square_is_the_papers_resize_and_pad_protocol():
    # A 2:1 slide: resized so its longer side is 56 and padded symmetrically with black.
    img = np.full((400, 800, 3), (200, 100, 150), np.uint8)
    fetcher = SlideFetcher(ArraySource(img))
    got = fetcher.fetch([root_square(*fetcher.slide_size)], 56)
    assert got.images.shape == (1, 3, 56, 56)
    column = got.images[0, 0, :, 28]
    assert torch.all(column[:14] == 0) and torch.all(column[42:] == 0)
    assert torch.allclose(column[14:42], torch.tensor(200 / 255))
    assert got.levels == [1]  # levels are 800 and 400 px wide: the coarsest suffices


def test_fetch_chooses_finer_levels_for_smaller_rois_and_counts_pixels():
    src = ArraySource(ramp(2048, 2048), coarsest=256)  # levels: 2048, 1024, 512, 256
    fetcher = SlideFetcher(src)
    got = fetcher.fetch([Square(0, 0, 2048), Square(0, 0, 1024), Square(100, 100, 200)], 112)
    assert got.levels == [3, 3, 0]
    assert got.pixels_read == 256 * 256 + 128 * 128 + 200 * 200
    serial = SlideFetcher(src, serial=True).fetch([Square(0, 0, 2048), Square(0, 0, 1024)], 112)
    assert torch.equal(serial.images, got.images[:2])


# --------------------------------------------------------------------------- D4 orientation on real pyramids
REAL_SLIDES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wsi"


@pytest.fixture(scope="module")
def pyramids(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A generated non-square pyramidal TIFF (always), plus the real slides beside the project when present."""
    from magnet_zoo.synth import generate_slide

    path = tmp_path_factory.mktemp("pyramid") / "wide.tif"
    generate_slide(path, size=(1536, 1024), category="macro", seed=3)
    found = sorted(p for p in REAL_SLIDES.glob("*") if p.suffix in (".svs", ".tif", ".tiff"))
    return [path, *found]


def _regions(w: int, h: int) -> list[tuple[int, int, int, int]]:
    """(x, y, width, height) in level pixels: the whole level, an interior block, one off the far corner."""
    return [(0, 0, w, h), (w // 5, h // 3, max(w // 3, 1), max(h // 4, 1)), (w - 7, h - 5, 20, 11), (-4, -6, 13, 9)]


def _source_block(index: np.ndarray, k: int, x: int, y: int, w: int, h: int) -> tuple[int, int, int, int] | None:
    """The block of the original level (col, row, width, height) that region ``(x, y, w, h)`` of orientation
    ``k`` shows, found by orienting an array of pixel numbers (not by the library's own inverse mapping);
    ``None`` when the region lies wholly outside."""
    oriented = orient_array(index, k)
    oh, ow = oriented.shape
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, ow), min(y + h, oh)
    if x1 <= x0 or y1 <= y0:
        return None
    rows, cols = np.divmod(oriented[y0:y1, x0:x1], index.shape[1])
    return int(cols.min()), int(rows.min()), int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)


@pytest.mark.slow
def test_every_orientation_of_a_pyramid_reads_the_numpy_transformed_region(pyramids):
    """For each of the 8 orientations and each level small enough to hold in memory, a region read through
    :class:`OrientedSource` is the corresponding region of the original, read and transformed with
    ``orient_array`` (black outside the slide). Where the backend's reads of a level are exact crops of the
    whole level (always on the generated TIFF, whose downsamples are powers of two), the oriented read is
    also checked against ``orient_array`` of the whole level."""
    from magnet_zoo.wsi import OrientedSource, open_slide

    checked, exact_levels = 0, 0
    for path in pyramids:
        base = open_slide(path)
        try:
            assert base.level_count >= 2, f"{path.name} is not a pyramid"
            for level, (lw, lh) in enumerate(base.level_dimensions):
                if lw * lh > 1600 * 1600:
                    continue
                ds0 = base.level_downsamples[level]
                whole = base.read_region((0, 0), level, (lw, lh))
                index = np.arange(lw * lh).reshape(lh, lw)
                # OpenSlide resamples reads whose level-0 origin falls between a level's pixels (levels whose
                # downsample is not a whole number): then only the read-and-transform comparison is exact
                exact = all(
                    np.array_equal(base.read_region((int(round(x * ds0)), int(round(y * ds0))), level, (w, h)),
                                   whole[y:y + h, x:x + w])
                    for x, y, w, h in _regions(lw, lh)[:2]
                )
                exact_levels += exact
                for k in range(8):
                    expected_level = orient_array(whole, k)
                    oriented = OrientedSource(base, k)
                    ow, oh = oriented.level_dimensions[level]
                    assert (oh, ow) == expected_level.shape[:2], (path.name, level, k)
                    ds = oriented.level_downsamples[level]
                    padded = np.zeros((oh + 40, ow + 40, 3), np.uint8)  # black outside the slide
                    padded[20:20 + oh, 20:20 + ow] = expected_level
                    for x, y, w, h in _regions(ow, oh):
                        where = (path.name, level, k, (x, y, w, h))
                        got = oriented.read_region((int(round(x * ds)), int(round(y * ds))), level, (w, h))
                        assert got.shape == (h, w, 3), where
                        block = _source_block(index, k, x, y, w, h)
                        inside = got[max(-y, 0):min(oh - y, h), max(-x, 0):min(ow - x, w)]
                        c, r, bw, bh = block
                        read = base.read_region((int(round(c * ds0)), int(round(r * ds0))), level, (bw, bh))
                        assert np.array_equal(inside, orient_array(read, k)), where
                        assert int(got.sum()) - int(inside.sum()) == 0, where  # black outside the slide
                        if exact:
                            assert np.array_equal(got, padded[20 + y:20 + y + h, 20 + x:20 + x + w]), where
                        checked += 1
        finally:
            base.close()
    assert checked >= len(pyramids) * 2 * 8 * 4
    assert exact_levels >= 2  # at least the generated TIFF's levels were checked against whole-level reads
