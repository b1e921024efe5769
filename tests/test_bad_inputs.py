"""Bad inputs: each gives a typed, readable error or a valid prediction; none crashes or returns garbage."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
from PIL import Image

import magnet_zoo
from magnet_zoo.wsi import (
    CorruptSlideError,
    SlideError,
    SlideNotFoundError,
    UnreadableRegionError,
    UnsupportedFormatError,
    open_slide,
)
from tests.conftest import tissue_image


@pytest.fixture(scope="module")
def model():
    return magnet_zoo.create_model("magnet2_tiny").eval()


def assert_valid_prediction(model, source):
    import torch

    from magnet_zoo.wsi.fetch import as_fetcher

    pred = magnet_zoo.predict_slide(model, source)
    # The probability is the network's on this slide (not a default or a NaN clipped into [0, 1]) and
    # the label follows from it.
    with torch.inference_mode():
        direct = float(model([as_fetcher(source, model.config.grey_threshold)]).probs[0])
    assert math.isfinite(pred.probability) and pred.probability == pytest.approx(direct, abs=1e-6)
    assert pred.label == model.config.labels[int(pred.probability >= pred.threshold)]
    assert len(pred.tree) == 1 + 2 + 4
    for node in pred.tree:
        assert all(math.isfinite(v) for v in node.box)
    return pred


def test_missing_path(tmp_path):
    with pytest.raises(SlideNotFoundError, match="no such file"):
        open_slide(tmp_path / "nope.svs")


def test_directory(tmp_path):
    with pytest.raises(SlideNotFoundError, match="is a directory"):
        open_slide(tmp_path)


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.svs"
    p.write_bytes(b"")
    with pytest.raises(CorruptSlideError, match="0 bytes"):
        open_slide(p)


def test_text_file_named_svs(tmp_path):
    p = tmp_path / "notes.svs"
    p.write_text("this is not a slide\n" * 10)
    with pytest.raises(UnsupportedFormatError, match="no backend can read"):
        open_slide(p)


def test_truncated_tiff(tmp_path, pyramid, model):
    data = pyramid.path.read_bytes()
    p = tmp_path / "truncated.tiff"
    p.write_bytes(data[: len(data) // 2])
    # Either it refuses to open, or it opens and the missing tiles fail loudly when read.
    try:
        src = open_slide(p)
    except SlideError as exc:
        assert str(p) in str(exc)
        return
    with pytest.raises((UnreadableRegionError, CorruptSlideError)) as info:
        for level in range(src.level_count):
            src.read_region((0, 0), level, src.level_dimensions[level])
    assert str(p) in str(info.value)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_png_and_jpeg_work(tmp_path, model, suffix):
    p = tmp_path / f"tile{suffix}"
    image = tissue_image(300, 400)
    Image.fromarray(image).save(p, **({"quality": 95, "subsampling": 0} if suffix == ".jpg" else {}))
    with open_slide(p) as src:
        assert src.backend == "pil" and src.dimensions == (400, 300)
        whole = src.read_region((0, 0), 0, (400, 300))
        part = src.read_region((130, 70), 0, (150, 100))
        assert whole.shape == (300, 400, 3) and part.shape == (100, 150, 3)
        if suffix == ".png":  # lossless: every pixel, exactly
            assert np.array_equal(whole, image) and np.array_equal(part, image[70:170, 130:280])
        else:  # JPEG (4:4:4, q95): close everywhere (the texture is noise), and placed right
            for got, want in ((whole, image), (part, image[70:170, 130:280])):
                diff = np.abs(got.astype(np.int16) - want)
                assert diff.mean() < 4.5 and diff.max() <= 40, (diff.mean(), diff.max())
            # A read one pixel off is much further from the source than the codec's error.
            shifted = np.abs(src.read_region((131, 70), 0, (150, 100)).astype(np.int16) - image[70:170, 130:280])
            assert shifted.mean() > 3 * np.abs(part.astype(np.int16) - image[70:170, 130:280]).mean()
        assert_valid_prediction(model, src)


@pytest.mark.parametrize(
    ("mode", "make"),
    [
        ("RGBA", lambda img: Image.fromarray(np.dstack([img, np.full(img.shape[:2], 255, np.uint8)]), "RGBA")),
        ("L", lambda img: Image.fromarray(img[..., 0], "L")),
        ("I;16", lambda img: Image.fromarray(img[..., 0].astype(np.uint16) * 257)),
    ],
)
def test_rgba_grayscale_and_16bit(tmp_path, model, mode, make):
    p = tmp_path / f"img_{mode.replace(';', '')}.png"
    im = make(tissue_image(200, 260))
    assert im.mode == mode
    im.save(p)
    with open_slide(p) as src:
        px = src.read_region((0, 0), 0, (260, 200))
        assert px.dtype == np.uint8 and px.shape == (200, 260, 3)
        assert px.max() > 0
        assert_valid_prediction(model, src)


def test_tiny_image(model):
    img = tissue_image(10, 10)
    pred = assert_valid_prediction(model, magnet_zoo.ArraySource(img))
    assert pred.tree[0].box == (0.0, 0.0, 10.0, 10.0)


def test_extreme_aspect_ratio(model):
    img = tissue_image(50, 2500)
    pred = assert_valid_prediction(model, magnet_zoo.ArraySource(img))
    # The canvas is the square around the strip; the strip occupies its middle 2% (paper's padding).
    assert pred.tree[0].box == (0.0, 0.0, 2500.0, 50.0)


def test_all_white_slide_is_all_black_after_the_grey_filter(model):
    img = np.full((800, 800, 3), 255, np.uint8)
    fetcher = magnet_zoo.SlideFetcher(magnet_zoo.ArraySource(img))
    from magnet_zoo.nn.tree import root_square

    assert fetcher.fetch([root_square(800, 800)], 56).images.abs().sum() == 0
    assert_valid_prediction(model, fetcher)


def test_corrupt_slide_message_names_the_file_and_what_to_do(tmp_path, pyramid):
    p = tmp_path / "broken slide é.tiff"  # unicode and a space in the name
    shutil.copy(pyramid.path, p)
    data = bytearray(p.read_bytes())
    data[4:8] = b"\xff\xff\xff\x7f"  # first IFD offset points past the end of the file
    p.write_bytes(bytes(data))
    with pytest.raises(SlideError) as info:
        open_slide(p)
    assert str(p) in str(info.value)


# --------------------------------------------------------------------------- layouts and claims
def _planar(tmp_path, **kwargs):
    import tifffile

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    path = tmp_path / f"planar_{'tiled' if 'tile' in kwargs else 'strips'}.tif"
    tifffile.imwrite(path, np.ascontiguousarray(np.moveaxis(img, -1, 0)), photometric="rgb",
                     planarconfig="separate", **kwargs)
    return path, img


@pytest.mark.parametrize("kwargs", [{}, {"tile": (128, 128), "compression": "zlib"}], ids=["strips", "tiles"])
def test_planar_separate_rgb_tiff_is_read(tmp_path, model, kwargs):
    path, img = _planar(tmp_path, **kwargs)
    with open_slide(path, "tifffile") as src:
        assert src.dimensions == (400, 300)
        assert np.array_equal(src.read_region((0, 0), 0, (400, 300)), img)
        assert np.array_equal(src.read_region((130, 70), 0, (150, 100)), img[70:170, 130:280])
        magnet_zoo.predict_slide(model, src)
    with open_slide(path) as src:  # whichever backend auto picks
        assert np.array_equal(src.read_region((0, 0), 0, (400, 300)), img)


def _claiming(tmp_path, width, height, tile=None):
    """A small valid TIFF whose size tags are then overwritten to claim ``width`` x ``height``."""
    import tifffile

    path = tmp_path / f"claims_{width}x{height}{'_tiled' if tile else ''}.tif"
    tifffile.imwrite(path, np.full((64, 64, 3), 200, np.uint8), photometric="rgb", tile=tile)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tags = tif.pages[0].tags
        tags["ImageWidth"].overwrite(width)
        tags["ImageLength"].overwrite(height)
        if "RowsPerStrip" in tags:
            tags["RowsPerStrip"].overwrite(height)
    return path


def test_an_implausible_untiled_claim_is_refused_at_open(tmp_path):
    import time

    from magnet_zoo.wsi.errors import CorruptSlideError, ImplausibleSlideError

    path = _claiming(tmp_path, 200_000, 250_000)
    start = time.perf_counter()
    with pytest.raises(ImplausibleSlideError, match=r"claims 200000 x 250000 px \(139.7 GiB decoded\)") as info:
        open_slide(path)
    assert time.perf_counter() - start < 2
    assert path.name in str(info.value) and "tiled pyramid" in str(info.value)
    assert isinstance(info.value, CorruptSlideError)  # reported per slide by `predict`, like any bad file


def test_a_side_no_scanner_produces_is_refused_whatever_the_layout(tmp_path):
    from magnet_zoo.wsi.errors import ImplausibleSlideError

    path = _claiming(tmp_path, 3_000_000, 64, tile=(16, 16))
    with pytest.raises(ImplausibleSlideError, match="3000000 x 64 px"):
        open_slide(path, "tifffile")
