"""Layer-by-layer localisation of the SynthMets benchmark (``benchmarks/baselines/magnet.layer_localisation``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from magnet_zoo.synth import generate_slide, tumour_mask

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from baselines.common import Slide  # noqa: E402
from baselines.magnet import layer_localisation  # noqa: E402

SIZE = 2048


@pytest.fixture(scope="module")
def macro(tmp_path_factory):
    path = tmp_path_factory.mktemp("layers") / "macro.tif"
    generate_slide(path, size=SIZE, category="macro", seed=3)
    mask = tumour_mask(path, (SIZE, SIZE))
    assert 0 < mask.mean() < 0.5
    return Slide(str(path), 1, "macro", SIZE, SIZE, "test"), mask


def _spots(mask: np.ndarray, side: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Top-left corners of a ``side`` square wholly on tumour and of one wholly off it."""
    from numpy.lib.stride_tricks import sliding_window_view

    windows = sliding_window_view(mask[::8, ::8], (side // 8, side // 8)).mean(axis=(-1, -2))
    on = np.argwhere(windows == 1.0)[0] * 8
    off = np.argwhere(windows == 0.0)[0] * 8
    return (int(on[1]), int(on[0])), (int(off[1]), int(off[0]))


def test_a_child_on_tumour_scores_one_and_a_child_beside_it_zero(macro):
    slide, mask = macro
    (onx, ony), (offx, offy) = _spots(mask, 64)
    whole = [0.0, 0.0, float(SIZE)]  # the first layer's crop: the whole slide, so surely on tumour
    # two (parent, learned child) pairs: each parent is on tumour, one child is and one is not
    found = layer_localisation(slide, [whole, [onx, ony, 64.0], whole, [offx, offy, 64.0]], samples=64)
    assert found["layer1"]["n"] == 2 and found["layer1"]["hit"] == 1.0
    assert found["layer2_on_tumour"]["n"] == 2 and found["layer2_on_tumour"]["hit"] == 0.5
    on = layer_localisation(slide, [whole, [onx, ony, 64.0]], samples=256)["layer2_on_tumour"]
    off = layer_localisation(slide, [whole, [offx, offy, 64.0]], samples=256)["layer2_on_tumour"]
    assert on["n"] == off["n"] == 1
    assert on["hit"] == 1.0 and on["tumour_area"] == pytest.approx(1.0, abs=0.05)
    assert off["hit"] == 0.0 and off["tumour_area"] == 0.0
    # the random baseline is the same for both (same parent, same side) and strictly between
    assert 0.0 < on["random_hit"] == off["random_hit"] < 1.0
    # tumour lies in tissue, and glass is a good part of the slide: squares centred on tissue hit more often
    assert on["random_hit"] < on["random_tissue_hit"] < 1.0


def test_children_of_parents_off_tumour_are_not_scored(macro):
    slide, mask = macro
    (_, _), (offx, offy) = _spots(mask, 256)
    parent = [float(offx), float(offy), 256.0]
    found = layer_localisation(slide, [parent, [offx + 10.0, offy + 10.0, 64.0]], samples=32)
    one = found["layer1"]
    assert (one["n"], one["hit"], one["tumour_area"]) == (1, 0.0, 0.0)
    assert 0.0 <= one["random_hit"] <= 1.0 and 0.0 <= one["random_tissue_hit"] <= 1.0
    assert found["layer2_on_tumour"] == {"n": 0}
    with pytest.raises(ValueError, match="pairs"):
        layer_localisation(slide, [parent], samples=8)
