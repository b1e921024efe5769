"""Head-guided attention (``magnet_zoo.train.guidance``): windows, scores, and what the loss trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from magnet_zoo.nn.fetcher import Square
from magnet_zoo.train.guidance import _standardised, _windows, guidance_loss, window_scores
from magnet_zoo.train.warmup import warmup_step
from magnet_zoo.wsi import ArraySource, SlideFetcher
from tests.conftest import micro_magnet, tissue_image


def _model(**kw):
    return micro_magnet(**{"min_scale": 0.2, "max_scale": 0.4, "aux_pooling": "max", **kw})


def _fetchers():
    img = tissue_image(1500, 1500)
    return [SlideFetcher(ArraySource(img), 15), SlideFetcher(ArraySource(img[:, ::-1].copy()), 15)]


def _red_scorer(net):
    """Replace the last layer's head by a fixed, known scorer: 20 x the window's mean red value."""
    head = net.aux_heads[str(net.config.num_layers)]
    head.patch_logits = lambda patches: 20 * patches[:, :, 0].mean((-1, -2))


def _scored_forward():
    """The two test slides, a tissue-only micro MagNet whose last head is :func:`_red_scorer`, its forward."""
    fetchers = _fetchers()
    net = _model(attention_tissue_only=True).train()
    _red_scorer(net)
    return fetchers, net, net(fetchers)


def _assert_logits_follow(scores: torch.Tensor, logits: torch.Tensor, tissue: torch.Tensor) -> None:
    """Row by row (one guided view each, ``(rows, windows)``), the attention logits over the tissue windows
    correlate with the scorer's window scores."""
    for row, (w, g, m) in enumerate(zip(scores, logits, tissue, strict=True)):
        corr = float(torch.corrcoef(torch.stack([w[m], g[m]]))[0, 1])
        assert corr > 0.7, (row, corr)


def _optimise(layer, loss_fn, steps: int = 40) -> tuple[float, float]:
    """Adam on ``layer``'s parameters alone against ``loss_fn()``; the first and the last loss."""
    opt = torch.optim.Adam(layer.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses[0], losses[-1]


def test_windows_are_centred_on_their_cells():
    grid, size = 4, 8
    cells = torch.arange(grid * grid, dtype=torch.float32).view(1, 1, grid, grid)
    region = cells.repeat_interleave(size // 2, 2).repeat_interleave(size // 2, 3).expand(2, 3, -1, -1)
    win = _windows(region.contiguous(), size)
    assert win.shape == (2, grid * grid, 3, size, size)
    centre = win[0, :, 0, size // 2 - 1, size // 2 - 1]  # the pixel left-above each window's centre
    torch.testing.assert_close(centre, cells.flatten())
    assert float(win[0, 0, 0, 0, 0]) == 0.0 and float(win[0, -1, 0, -1, -1]) == 0.0  # glass past the edge


def test_window_scores_need_a_per_patch_head_on_the_last_layer():
    fetchers = _fetchers()
    with pytest.raises(ValueError, match="aux_layers"):
        guidance_loss(_model(aux_layers=(1,)), _model(aux_layers=(1,))(fetchers), fetchers)
    net = _model(aux_pooling="mean")
    with pytest.raises(ValueError, match="aux_pooling"):
        guidance_loss(net, net(fetchers), fetchers)


def test_window_scores_mark_glass_cells():
    net = _model()
    img = tissue_image(1500, 1500)
    img[:, 750:] = 255  # the right half is glass (white, black after the grey filter)
    f = SlideFetcher(ArraySource(img), 15)
    win = window_scores(net, [f], [[Square(0, 0, 1500)]], grid=8)
    scores, tissue = win.scores, win.tissue
    assert win.pixels.shape == (1, 1, 64, 3, 32, 32)
    assert scores.shape == tissue.shape == (1, 1, 8, 8)
    assert not bool(tissue[0, 0, :, 4:].any())  # right half: glass
    assert bool(tissue[0, 0, 3:6, 1:3].all())  # inside the blob: tissue


@pytest.mark.slow
def test_guidance_trains_only_the_inner_attention_towards_the_scores():
    fetchers, net, out = _scored_forward()
    loss = guidance_loss(net, out, fetchers).attention
    assert torch.isfinite(loss) and float(loss.detach()) > 0
    loss.backward()
    assert all(p.grad is None for p in net.layers[0].parameters())  # the slide-level layer is not guided
    assert all(p.grad is None for p in (*net.classifier.parameters(), *net.aux_heads.parameters()))
    assert sum(float(p.grad.abs().sum()) for p in net.layers[1].parameters()) > 0

    # optimised on the guidance alone, the layer's attention comes to agree with the scorer
    layer = net.layers[1]
    first, last = _optimise(layer, lambda: guidance_loss(net, out, fetchers).attention)
    assert last < first - 0.2
    squares = [[Square(n.box[0], n.box[1], n.box[2]) for n in tree if n.layer == 1] for tree in out.trees]
    win = window_scores(net, fetchers, squares, grid=8)
    scores, tissue = win.scores, win.tissue
    with torch.no_grad():
        pooled = torch.nn.functional.adaptive_avg_pool2d(layer.attention_logits(out.crops[1]), 8)
    node = layer.node_index
    _assert_logits_follow(scores.index_select(1, node).flatten(2).flatten(0, 1), pooled.flatten(2).flatten(0, 1),
                          tissue.index_select(1, node).flatten(2).flatten(0, 1))


@pytest.mark.slow
def test_first_layer_guidance_trains_the_slide_level_attention_towards_windows_over_the_whole_slide():
    fetchers, net, out = _scored_forward()
    loss = guidance_loss(net, out, fetchers, layers=[1], grid=16).attention
    loss.backward()
    assert sum(float(p.grad.abs().sum()) for p in net.layers[0].parameters()) > 0
    assert all(p.grad is None for p in net.layers[1].parameters())  # only the layers asked for
    assert all(p.grad is None for p in (*net.classifier.parameters(), *net.aux_heads.parameters()))

    layer = net.layers[0]
    first, last = _optimise(layer, lambda: guidance_loss(net, out, fetchers, layers=[1], grid=16).attention)
    assert last < first - 0.2
    # the windows cover each slide's square canvas; the first layer's logits over them follow the scores
    win = window_scores(net, fetchers, [[Square(0, 0, 1500)]] * 2, grid=16)
    views, _ = net.whole_slide_view(fetchers, torch.device("cpu"))
    with torch.no_grad():
        pooled = torch.nn.functional.adaptive_avg_pool2d(layer.attention_logits(views), 16)
    per_stack = layer.num_stacks  # every stack of the slide's view against the same windows
    _assert_logits_follow(win.scores[:, 0].flatten(1).repeat_interleave(per_stack, 0),
                          pooled.flatten(2).flatten(0, 1), win.tissue[:, 0].flatten(1).repeat_interleave(per_stack, 0))
    # with both layers and a grid per layer, both get the gradient
    net.zero_grad()
    guidance_loss(net, out, fetchers, layers=[1, 2], grid=[16, 8]).attention.backward()
    assert all(sum(float(p.grad.abs().sum()) for p in net.layers[k].parameters() if p.grad is not None) > 0
               for k in (0, 1))


def test_a_standardised_target_does_not_follow_the_heads_logit_scale():
    fetchers = _fetchers()
    net = _model().train()
    out = net(fetchers)
    head = net.aux_heads[str(net.config.num_layers)]
    pull = {}  # the gradient's norm on the attention stacks: how hard the target pulls the maps
    for scale in (20.0, 0.2):  # a confident head, and the same head with logits a hundred times closer
        head.patch_logits = lambda patches, k=scale: k * patches[:, :, 0].mean((-1, -2))
        for standardise in (False, True):
            net.zero_grad()
            guidance_loss(net, out, fetchers, layers=[1, 2], grid=[16, 8], standardise=standardise).attention.backward()
            pull[scale, standardise] = sum(float(p.grad.norm()) ** 2 for layer in net.layers
                                           for p in layer.parameters() if p.grad is not None) ** 0.5
    assert pull[20.0, True] == pytest.approx(pull[0.2, True], rel=1e-3)
    assert pull[0.2, False] < 0.5 * pull[20.0, False]  # without it, a flat head gives a flat target: little pull
    scores = torch.tensor([[[1.0, 2.0, 3.0, 100.0]]])
    allowed = torch.tensor([[[True, True, True, False]]])
    z = _standardised(scores, allowed)
    torch.testing.assert_close(z[..., :3], torch.tensor([[[-1.2247, 0.0, 1.2247]]]), atol=1e-4, rtol=0)


def test_guidance_runs_on_exploring_trees_and_limits_slides():
    fetchers = _fetchers()
    net = _model().train()
    _red_scorer(net)
    labels = torch.tensor([1.0, 0.0])
    terms, tree = warmup_step(net, fetchers, labels, torch.Generator().manual_seed(0), trees=2)
    assert len(tree.trees) == 4  # tree-major: 2 trees x 2 slides
    one = guidance_loss(net, tree, fetchers, slides=1).attention
    two = guidance_loss(net, tree, fetchers, slides=2).attention
    assert torch.isfinite(one) and torch.isfinite(two) and float(one) != float(two)
    (terms.total + one).backward()
    assert sum(float(p.grad.abs().sum()) for p in net.layers[1].parameters()) > 0
    with pytest.raises(ValueError, match="temperature"):
        guidance_loss(net, tree, fetchers, temperature=0)
    with pytest.raises(ValueError, match="guided layers"):
        guidance_loss(net, tree, fetchers, layers=[0])
    with pytest.raises(ValueError, match="guided layers"):
        guidance_loss(net, tree, fetchers, layers=[net.config.num_layers + 1])


def test_window_mil_trains_the_head_on_each_slides_best_window():
    fetchers = _fetchers()
    net = _model().train()
    out = net(fetchers)
    labels = torch.tensor([1.0, 0.0])
    assert float(guidance_loss(net, out, fetchers).window_mil) == 0.0  # no labels, no MIL
    terms = guidance_loss(net, out, fetchers, labels)
    # the loss is the head's logit on the best tissue window of each slide, against the slide label
    squares = [[Square(n.box[0], n.box[1], n.box[2]) for n in tree if n.layer == 1] for tree in out.trees]
    win = window_scores(net, fetchers, squares, grid=8)
    best = win.scores.flatten(1).masked_fill(~win.tissue.flatten(1), float("-inf")).amax(1)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(best, labels)
    torch.testing.assert_close(terms.window_mil.detach(), expected, rtol=1e-4, atol=1e-5)
    terms.window_mil.backward()
    head = net.aux_heads[str(net.config.num_layers)]
    assert sum(float(p.grad.abs().sum()) for p in head.parameters() if p.grad is not None) > 0
    others = [*net.classifier.parameters(), *net.aux_heads["1"].parameters(), *net.layers.parameters()]
    assert all(p.grad is None for p in others)


def test_label_evidence_signs_each_slides_window_scores_by_its_label():
    """``evidence="label"``: a label-0 slide's windows are scored by the negated logit (its own class's
    evidence), a label-1 slide's as before; the best window for the head's MIL is the best by that signed
    score, its raw logit trained towards the label."""
    fetchers = _fetchers()
    net = _model().train()
    out = net(fetchers)
    head = net.aux_heads[str(net.config.num_layers)]
    labels = torch.tensor([1.0, 0.0])
    rows = sum(1 for n in out.trees[0] if n.layer == 1)  # regions of slide 0 come first in the scorer's batch

    def red(patches):
        return 20 * patches[:, :, 0].mean((-1, -2))

    def red_signed(patches):  # the red scorer negated on slide 1's regions: what "label" should amount to
        sign = torch.ones(patches.shape[0], 1)
        sign[rows:] = -1.0
        return red(patches) * sign

    head.patch_logits = red_signed
    expected = guidance_loss(net, out, fetchers).attention
    head.patch_logits = red
    plain = guidance_loss(net, out, fetchers).attention
    terms = guidance_loss(net, out, fetchers, labels, evidence="label")
    torch.testing.assert_close(terms.attention, expected)
    assert float((terms.attention - plain).abs().detach()) > 1e-4  # the sign changed slide 1's target
    # all-positive labels: the same as the positive logit
    ones = torch.ones(2)
    torch.testing.assert_close(guidance_loss(net, out, fetchers, ones, layers=[1, 2], evidence="label").attention,
                               guidance_loss(net, out, fetchers, ones, layers=[1, 2]).attention)

    # the head's MIL: slide 1 (label 0) takes its *least* red tissue window, trained towards 0 on the raw logit
    squares = [[Square(n.box[0], n.box[1], n.box[2]) for n in tree if n.layer == 1] for tree in out.trees]
    win = window_scores(net, fetchers, squares, grid=8)
    signed = win.scores.flatten(1) * torch.tensor([[1.0], [-1.0]])
    best = signed.masked_fill(~win.tissue.flatten(1), float("-inf")).amax(1)
    raw = best * torch.tensor([1.0, -1.0])
    mil = guidance_loss(net, out, fetchers, labels, evidence="label").window_mil
    torch.testing.assert_close(mil.detach(), F.binary_cross_entropy_with_logits(raw, labels), rtol=1e-4, atol=1e-5)

    with pytest.raises(ValueError, match="evidence"):
        guidance_loss(net, out, fetchers, labels, evidence="negative")
    with pytest.raises(ValueError, match="pass labels"):
        guidance_loss(net, out, fetchers, evidence="label")


def test_the_loop_hands_the_recipes_guidance_fields_to_the_loss(monkeypatch):
    import magnet_zoo.train.guidance as guidance
    from magnet_zoo.train import SourceData, TrainConfig, fit, get_recipe
    from magnet_zoo.wsi import ArraySource

    seen, real = [], guidance.guidance_loss

    def record(*args, **kwargs):
        seen.append({k: kwargs[k] for k in ("evidence", "grid", "slides", "standardise")})
        return real(*args, **kwargs)

    monkeypatch.setattr(guidance, "guidance_loss", record)
    recipe = get_recipe("learn_to_look", guidance_weight=1.0, guidance_evidence="label", guidance_grid=(4,),
                        guidance_slides=1, steps=2, batch_size=2, revive_at=())
    config = TrainConfig(device="cpu", amp="off", threads=2, progress=False, baseline_eval=False, save_every=0,
                         log_every=1, tensorboard=False)
    img = tissue_image(1500, 1500)
    sources = [ArraySource(img), ArraySource(img[:, ::-1].copy())]
    result = fit(_model(), SourceData(sources, [1, 0]), config, recipe)
    assert seen == [{"evidence": "label", "grid": (4,), "slides": 1, "standardise": False}] * 2
    assert all(np.isfinite(row["guidance"]) for row in result.log)
