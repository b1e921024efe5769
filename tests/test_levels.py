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


# --------------------------------------------------------------------------- irregular and anisotropic pyramids
def test_irregular_downsamples_in_any_order():
    # DICOM-style irregular factors, listed out of order, with a duplicate: the coarsest sufficient level wins.
    ds = [1.0, 10.3, 2.5, 40.0, 10.3]
    assert select_level(ds, 100, 112) == 0  # even level 0 is short: nothing finer exists
    assert select_level(ds, 280, 112) == 2  # 112 px at 2.5x
    assert select_level(ds, 279, 112) == 0  # 111.6 px at 2.5x: short by more than the slack
    assert ds[select_level(ds, 1153.6, 112)] == 10.3  # 112.0 px at 10.3x (either of the two equal levels)
    assert select_level(ds, 4480, 112) == 3
    assert select_level(ds, 10**6, 112) == 3
    # Exhaustively: the level chosen has enough pixels, and no coarser level has.
    for side in np.geomspace(50, 20_000, 400):
        lvl = select_level(ds, side, 112)
        enough = [d for d in ds if side / d >= 112 * (1 - 1e-3)]
        assert ds[lvl] == (max(enough) if enough else 1.0), side


def _anisotropic_pyramid(w0: int, h0: int, factors_x, factors_y):
    dims = [(w0, h0)] + [(max(1, round(w0 / fx)), max(1, round(h0 / fy))) for fx, fy in zip(factors_x, factors_y,
                                                                                            strict=True)]
    # How every backend reports a level's downsample: the mean of its two axes' factors.
    return dims, [((w0 / w) + (h0 / h)) / 2 for w, h in dims]


@pytest.mark.parametrize(
    ("w0", "h0", "fx", "fy"),
    [
        (2220, 2967, (2, 4, 8), (2, 4, 8)),  # rounding makes real pyramids slightly anisotropic
        (99_999, 77_777, (4, 16, 64, 256), (4, 16, 64, 256)),
        (4001, 3, (2, 4), (1.5, 3)),  # a thin strip: the short axis rounds far from the long one
        (6000, 6000, (2, 4, 8), (2.02, 4.04, 8.08)),  # a scanner whose y steps are 1% larger
    ],
)
def test_anisotropic_pyramids_give_both_axes_the_target_within_the_axis_mismatch(w0, h0, fx, fy):
    """On an anisotropic level the scalar downsample is the mean of the axes, so an axis may get fewer
    pixels than the target, but never fewer than the target scaled by that axis' mismatch; and the level
    chosen is the coarsest that reaches the target by the scalar downsample (the protocol's)."""
    dims, ds = _anisotropic_pyramid(w0, h0, fx, fy)
    for side in np.geomspace(4, 4 * max(w0, h0), 300):
        for target in (56, 112):
            lvl = select_level(ds, side, target)
            assert lvl == 0 or side / ds[lvl] >= target * (1 - 1e-3), (side, target)
            coarser = [i for i in range(len(ds)) if ds[i] > ds[lvl]]
            assert all(side / ds[i] < target * (1 - 1e-3) for i in coarser), (side, target, lvl)
            if lvl:
                w, h = dims[lvl]
                per_axis = (side * w / w0, side * h / h0)  # level pixels across the region, each axis
                mismatch = (min(w0 / w, h0 / h) / ds[lvl], max(w0 / w, h0 / h) / ds[lvl])
                assert min(per_axis) >= target * (1 - 1e-3) / mismatch[1] - 1e-9, (side, target, lvl)


def test_rectangles_meet_each_axis_target_on_a_4x_pyramid():
    ds = [1.0, 4.0, 16.0]
    # (w, h) regions against (w, h) targets: each axis must meet its own target.
    assert select_level(ds, (1600, 400), (100, 100)) == 1  # 400 / 16 = 25 < 100 on the short side
    assert select_level(ds, (1600, 1600), (100, 100)) == 2
    assert select_level(ds, (1600, 1600), (100, 400)) == 1
    assert select_level(ds, (1600, 1600), (100, 401)) == 0
