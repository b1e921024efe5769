"""Level selection (paper section 3.2.1) and its generalisation to any pyramid."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from magnet_zoo.wsi.levels import halving_downsamples, paper_level, select_level

# The paper's example: level 0 is 50,000 wide x 100,000 high, halving per level, levels 0..8.
W0, H0, M_MAX = 50_000, 100_000, 8
DS = halving_downsamples(M_MAX + 1)
# Half the coarsest level's size: the number of pixels across an ROI the paper's rule guarantees.
TARGET = (W0 / 2**M_MAX / 2, H0 / 2**M_MAX / 2)

# Rows of the paper's table: (minimum ROI width, minimum ROI height, level).
PAPER_TABLE = [
    (25_000, 50_000, 8),
    (12_500, 25_000, 7),
    (6_250, 12_500, 6),
    (3_125, 6_250, 5),
    (1_563, 3_125, 4),
    (782, 1_563, 3),
    (391, 782, 2),
    (196, 391, 1),  # the paper prints 171 for the width; 50,000 / 2**8 = 195.3 is what its formula gives
]


@pytest.mark.parametrize(("min_w", "min_h", "level"), PAPER_TABLE)
def test_reproduces_paper_table(min_w, min_h, level):
    # An ROI on the row's threshold, and one just below the next row's threshold, get the row's level.
    assert select_level(DS, (min_w, min_h), TARGET) == level
    assert select_level(DS, (min_w * 1.99, min_h * 1.99), TARGET) == level
    assert paper_level((W0, H0), (min_w * 1.5, min_h * 1.5), M_MAX) == level


def test_smallest_rois_read_level_zero():
    assert select_level(DS, (150, 300), TARGET) == 0
    assert paper_level((W0, H0), (150, 300), M_MAX) == 0


def test_agrees_with_paper_formula_off_the_boundaries():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        exponent = rng.uniform(-10, 0)
        if abs(exponent - round(exponent)) < 0.005:  # within 0.35% of a boundary: the 0.1% slack may differ
            continue
        frac = 2**exponent
        roi = (W0 * frac, H0 * frac)
        assert select_level(DS, roi, TARGET) == paper_level((W0, H0), roi, M_MAX), roi


def test_thin_rois_need_the_finer_dimension():
    # R = max(R_h, R_w): a region thin in one direction is read where that direction has enough pixels.
    assert select_level(DS, (25_000, 400), TARGET) == paper_level((W0, H0), (25_000, 400), M_MAX) == 1


def test_four_x_pyramid_like_svs():
    ds = [1.0, 4.0, 16.0, 64.0]
    assert select_level(ds, 100_000, 112) == 3  # whole slide: coarsest level (1562 px across)
    assert select_level(ds, 10_000, 112) == 3  # 156 px at 64x still >= 112
    assert select_level(ds, 5_000, 112) == 2  # 78 px at 64x is too few; 312 px at 16x
    assert select_level(ds, 1_000, 112) == 1
    assert select_level(ds, 300, 112) == 0
    # Never pick a level with fewer pixels than the target when a finer one exists.
    for side, target in itertools.product([200, 900, 3_000, 20_000, 99_000], [56, 112, 448]):
        lvl = select_level(ds, side, target)
        assert side / ds[lvl] >= target or lvl == 0
        if lvl + 1 < len(ds):
            assert side / ds[lvl + 1] < target


def test_single_level_and_float_downsamples():
    assert select_level([1.0], 50_000, 112) == 0
    # Scanner downsamples are rarely exact powers (e.g. 4.000297): tolerance keeps the boundary stable.
    ds = [1.0, 4.000297, 16.00119]
    assert select_level(ds, 448 * 4, 448) == 1
    assert select_level(ds, 448 * 16, 448) == 2


def test_empty_pyramid_is_an_error():
    with pytest.raises(ValueError, match="at least one level"):
        select_level([], 100, 10)
