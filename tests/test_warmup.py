"""Head warm-up on random zoom trees (``explore=`` / ``magnet_zoo.train.warmup``) and the open-slide cache."""

from __future__ import annotations

import pytest
import torch

from magnet_zoo.train.data import process_slide_cache, set_open_slides
from magnet_zoo.train.warmup import warmup_loss
from magnet_zoo.wsi import ArraySource, SlideFetcher
from tests.conftest import micro_magnet, tissue_image


def _model(**kw):
    return micro_magnet(min_scale=0.2, max_scale=0.4, aux_pooling="max", **kw)


def test_random_crops_lie_in_the_view_and_centre_on_tissue():
    layer = _model().layers[0]
    images = torch.zeros(6, 1, 3, 40, 40)
    images[:5, :, :, 30:, :10] = 0.7  # tissue only in the bottom-left corner; the last view is all glass
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        a = layer.random_affine(images, gen)
        assert a.scale.shape == (6, 2)
        assert bool(((a.scale >= 0.2 - 1e-6) & (a.scale <= 0.4 + 1e-6)).all())
        assert bool((a.tx.abs() <= 1 - a.scale + 1e-6).all() and (a.ty.abs() <= 1 - a.scale + 1e-6).all())
        # centres in the tissue corner: x in [-1, -0.5], y in [0.5, 1] (moving inside the view keeps them there)
        assert bool((a.tx[:5] <= -0.5 + 1e-6).all() and (a.ty[:5] >= 0.5 - 1e-6).all())
    spread = torch.stack([layer.random_affine(images, gen).tx[5] for _ in range(30)])
    assert float(spread.max() - spread.min()) > 0.5  # no tissue: anywhere in the view


def test_explore_runs_the_tree_with_random_crops_and_no_attention():
    img = tissue_image(1500, 1500)
    fetchers = [SlideFetcher(ArraySource(img), 15)]
    net = _model(crop_source="reread").train()
    a = net(fetchers, explore=torch.Generator().manual_seed(1))
    b = net(fetchers, explore=torch.Generator().manual_seed(1))
    c = net(fetchers, explore=torch.Generator().manual_seed(2))
    boxes = [[n.box for n in out.trees[0]] for out in (a, b, c)]
    assert boxes[0] == boxes[1] and boxes[0] != boxes[2]
    attended = net(fetchers)
    assert [n.box for n in attended.trees[0]] != boxes[0]
    a.logits.sum().backward()
    assert all(p.grad is None for layer in net.layers for p in layer.parameters())


def test_warmup_loss_pools_trees_and_trains_only_the_heads():
    img = tissue_image(1200, 1200)
    fetchers = [SlideFetcher(ArraySource(img), 15), SlideFetcher(ArraySource(img[::-1].copy()), 15)]
    net = _model().train()
    labels = torch.tensor([1.0, 0.0])
    with pytest.raises(ValueError, match="trees"):
        warmup_loss(net, fetchers, labels, torch.Generator(), trees=0)
    terms = warmup_loss(net, fetchers, labels, torch.Generator().manual_seed(0), trees=3)
    assert torch.isfinite(terms.total) and float(terms.auxiliary.detach()) > 0 and float(terms.classifier.detach()) > 0
    # the slide logit is the largest of its trees': the same trees scored one by one give it back
    net.eval()
    with torch.no_grad():
        pooled = warmup_loss(net, fetchers, labels, torch.Generator().manual_seed(0), trees=3).classifier
        trees = net(fetchers * 3, auxiliary=True, explore=torch.Generator().manual_seed(0))
        best = trees.logits.view(3, 2).amax(0)
        expected = torch.nn.functional.binary_cross_entropy_with_logits(best, labels)
    torch.testing.assert_close(pooled, expected)
    net.train()
    terms.total.backward()
    assert all(p.grad is None for layer in net.layers for p in layer.parameters())
    for module in (net.classifier, *net.aux_heads.values()):
        assert sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None) > 0


def test_open_slide_cache_capacity_is_settable():
    cache = process_slide_cache()
    try:
        set_open_slides(7)
        assert cache.capacity == 7
        with pytest.raises(ValueError):
            set_open_slides(0)
    finally:
        set_open_slides(32)
    assert cache.capacity == 32
