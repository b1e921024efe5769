"""``view_oversample``: the first layer's whole-slide view read larger, grey-filtered, then area-averaged,
so that an object smaller than a view pixel is not blacked out with the glass around it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from magnet_zoo.config import ConfigError, MagNetConfig
from magnet_zoo.nn.fetcher import Square
from magnet_zoo.nn.tree import root_square
from magnet_zoo.tasks.findit import FindItSpec, make_fetcher, make_image
from magnet_zoo.train.data import PrefetchedFetcher, prefetch_sizes, read_views
from magnet_zoo.wsi import ArraySource, SlideFetcher
from tests.conftest import micro_magnet, tissue_image

CPU = torch.device("cpu")


DOT = 6
DOT_AT = 896 // 3 + 5
"""Top-left corner of the dot (not aligned with the 16 px cells of a 56 px view of 896 px)."""


def _dot_on_glass(side: int = 896, dot: int = DOT) -> np.ndarray:
    """White glass with one purple square of ``dot`` px: 36 of a 56 px view pixel's 256 level-0 pixels, so
    its area average with the glass has a channel spread under the grey filter's 15."""
    img = np.full((side, side, 3), 240, dtype=np.uint8)
    y0 = x0 = DOT_AT
    img[y0:y0 + dot, x0:x0 + dot] = (120, 40, 160)
    return img


def test_config_checks_the_factor_and_names_the_read_size():
    assert MagNetConfig(input_size=56, view_oversample=4).view_read_size() == 224
    assert MagNetConfig(input_size=56).view_read_size() == 56
    with pytest.raises(ConfigError, match="view_oversample"):
        MagNetConfig(view_oversample=0)


def test_a_sub_pixel_object_vanishes_at_1_and_leaves_a_coloured_trace_when_oversampled():
    fetchers = [SlideFetcher(ArraySource(_dot_on_glass()), 15)]
    plain, _ = micro_magnet().whole_slide_view(fetchers, CPU)
    over, read = micro_magnet(view_oversample=4).whole_slide_view(fetchers, CPU)
    assert plain.shape == over.shape == (1, 1, 3, 56, 56)
    assert int((plain.sum(2) > 0).sum()) == 0  # averaged with the glass, grey, blacked out
    lit = over[0, 0].sum(0) > 0
    assert 1 <= int(lit.sum()) <= 4  # only where the dot is
    ys, xs = torch.nonzero(lit, as_tuple=True)
    assert all(abs(int(v) * 16 + 8 - (DOT_AT + DOT / 2)) <= 16 for v in (*ys, *xs))
    pixel = over[0, 0, :, ys[0], xs[0]]
    assert float(pixel[2]) > float(pixel[1])  # still purple, not grey
    # It is exactly the area average of the view filtered at 224 px.
    direct = fetchers[0].fetch([Square(0, 0, 896)], 224).images
    torch.testing.assert_close(over[0], F.avg_pool2d(direct, 4))
    assert read[0] > 0


def test_the_findit_1pct_object_is_visible_in_the_oversampled_view():
    spec = FindItSpec(image_size=896, object_frac=0.01)
    fetchers = [make_fetcher(make_image(spec, seed), 15) for seed in range(3)]
    plain, _ = micro_magnet().whole_slide_view(fetchers, CPU)
    over, _ = micro_magnet(view_oversample=4).whole_slide_view(fetchers, CPU)
    assert (plain.sum(2) > 0).flatten(1).sum(1).tolist() == [0, 0, 0]
    assert all(n >= 1 for n in (over.sum(2) > 0).flatten(1).sum(1).tolist())


def test_the_forward_feeds_the_first_layer_the_oversampled_view():
    # A pyramid down to 32 px, so that the 56 px and 224 px views come from different levels.
    fetchers = [SlideFetcher(ArraySource(tissue_image(600, 500, seed=s), coarsest=32), 15) for s in range(2)]
    model = micro_magnet(view_oversample=4).eval()
    seen = {}
    model.layers[0].register_forward_pre_hook(lambda mod, args, kwargs: seen.update(view=args[0]), with_kwargs=True)
    with torch.no_grad():
        out = model(fetchers)
    view, read = model.whole_slide_view(fetchers, CPU)
    torch.testing.assert_close(seen["view"], view)
    assert not torch.equal(view, micro_magnet().whole_slide_view(fetchers, CPU)[0])  # not the plain 56 px read
    # The accounting counts the 224 px read (instead of the 56 px one).
    plain = micro_magnet().eval()
    with torch.no_grad():
        base = plain(fetchers)
    extra = [a["pixels_read"] - b["pixels_read"] for a, b in zip(out.accounting, base.accounting, strict=True)]
    assert extra == [r - p for r, p in zip(read, plain.whole_slide_view(fetchers, CPU)[1], strict=True)]
    assert all(e > 0 for e in extra)


def test_layer_ones_iprime_is_pooled_when_it_has_the_read_size():
    fetchers = [SlideFetcher(ArraySource(tissue_image(600, 500)), 15)]
    model = micro_magnet(view_oversample=2)  # iprime_factor 2: I' is read at 112 px, the view's read size
    assert model.config.iprime_size(1) == model.config.view_read_size()
    iprime = torch.stack([fetchers[0].fetch([root_square(500, 600)], 112).images])
    view, read = model.whole_slide_view(fetchers, CPU, iprime)
    assert read == [0]
    torch.testing.assert_close(view[0], F.avg_pool2d(iprime[0], 2))
    torch.testing.assert_close(view, model.whole_slide_view(fetchers, CPU)[0])  # the same as reading it


def test_prefetched_views_serve_the_oversampled_read():
    cfg = MagNetConfig(view_oversample=4)
    assert prefetch_sizes(cfg) == (224, 112)
    source = ArraySource(tissue_image(600, 500))
    views, size = read_views(source, prefetch_sizes(cfg), 15)
    prefetched = PrefetchedFetcher(source, views, size, 15)
    model = micro_magnet(view_oversample=4)
    got, read = model.whole_slide_view([prefetched], CPU)
    want, _ = model.whole_slide_view([SlideFetcher(source, 15)], CPU)
    torch.testing.assert_close(got, want)
    assert read == [views[224].pixels_read]
