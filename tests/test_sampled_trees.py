"""Exploration by sampled trees (issue 14 item 3): sampled crop centres and their score-function gradient."""

from __future__ import annotations

import pytest
import torch
from conftest import micro_magnet

from magnet_zoo.nn.attention import attention_to_affine
from magnet_zoo.train import SourceData, TrainConfig, fit, get_recipe
from magnet_zoo.train.exploration import score_function_loss, set_exploration
from magnet_zoo.wsi import ArraySource, SlideFetcher


def test_sampled_centres_follow_the_policy_and_carry_a_log_probability():
    torch.manual_seed(0)
    logits = torch.full((64, 8, 8), -20.0)
    logits[:, 2, 5] = 20.0  # all the policy's mass on pixel (row 2, column 5)
    logits.requires_grad_(True)
    a = attention_to_affine(logits, translation="clamp", sample={"temperature": 1.0, "uniform": 0.0})
    assert bool(((a.tx > 0.25) & (a.tx < 0.5) & (a.ty > -0.5) & (a.ty < -0.25)).all())  # inside that pixel
    assert float(a.log_prob.detach().abs().max()) < 1e-6
    (grad,) = torch.autograd.grad(a.log_prob.sum() - 0.0, logits, allow_unused=True)
    assert grad is not None
    spread = attention_to_affine(logits.detach(), sample={"temperature": 1.0, "uniform": 1.0})
    assert float(spread.tx.std()) > 0.4  # the uniform share reaches the whole view
    left = torch.zeros(64, 8, 8, dtype=torch.bool)
    left[..., :4] = True
    masked = attention_to_affine(logits.detach(), mask=left, sample={"temperature": 1.0, "uniform": 0.5})
    assert bool((masked.tx < 0).all())  # only where the mask allows


def test_entmax_source_draws_inside_the_sparse_map_the_softmax_source_does_not():
    torch.manual_seed(0)
    logits = torch.zeros(256, 8, 8)
    logits[:, 1, 1] = logits[:, 6, 6] = 4.0  # two modes; entmax keeps only them, the softmax spreads out
    a = attention_to_affine(logits, translation="clamp")
    support = a.probs[0] > 0
    assert int(support.sum()) == 2  # the expected crop sits between the modes, on neither

    def col(t: torch.Tensor) -> torch.Tensor:  # a centre in [-1, 1] -> its pixel index of 8
        return ((t + 1) * 4 - 0.5).round().long().clamp(0, 7)

    drawn = attention_to_affine(logits, translation="clamp", sample={"temperature": 1.0, "uniform": 0.0,
                                                                      "source": "entmax"})
    rows, cols = col(drawn.ty), col(drawn.tx)
    assert bool(support[rows, cols].all())  # every centre inside the map's support
    assert 0.3 < float((rows == 1).float().mean()) < 0.7  # and both modes drawn, about equally
    assert float(drawn.log_prob.max()) == pytest.approx(torch.log(a.probs[0, 1, 1]).item(), abs=1e-5)
    dense = attention_to_affine(logits, translation="clamp", sample={"temperature": 1.0, "uniform": 0.0})
    assert not bool(support[col(dense.ty), col(dense.tx)].all())  # the softmax tail reaches elsewhere
    with pytest.raises(ValueError, match="sampling source"):
        attention_to_affine(logits, sample={"temperature": 1.0, "uniform": 0.0, "source": "gumbel"})


def test_eval_mode_never_samples():
    model = micro_magnet(attention_init="random")
    set_exploration(model, 1.0, 0.5)
    images = torch.rand(2, 1, 3, 56, 56)
    model.eval()
    a, b = model.layers[0](images), model.layers[0](images)
    assert a.log_prob is None and torch.equal(a.tx, b.tx)
    model.train()
    assert model.layers[0](images).log_prob is not None
    set_exploration(model, None)
    assert model.layers[0](images).log_prob is None


def test_score_function_gradient_uses_a_leave_one_out_baseline():
    cost = torch.tensor([1.0, 0.0, 3.0, 2.0, 2.0, 2.0])  # 3 trees of 2 slides, tree-major
    log_prob = torch.zeros(6, requires_grad=True)
    (grad,) = torch.autograd.grad(score_function_loss(cost, log_prob, 3), log_prob)
    # slide 0: costs 1, 3, 2 -> baselines 2.5, 1.5, 2 -> advantages -1.5, 1.5, 0
    torch.testing.assert_close(grad[[0, 2, 4]], torch.tensor([-1.5, 1.5, 0.0]) / 6)
    # slide 1: costs 0, 2, 2 -> advantages -2, 1, 1
    torch.testing.assert_close(grad[[1, 3, 5]], torch.tensor([-2.0, 1.0, 1.0]) / 6)
    same = torch.autograd.grad(score_function_loss(torch.ones(6), log_prob, 3), log_prob)[0]
    assert float(same.abs().max()) == 0.0
    with pytest.raises(ValueError, match="at least 2 trees"):
        score_function_loss(cost, log_prob, 1)


def test_score_function_moves_the_attention_onto_evidence_it_never_covered():
    """A sparse map whose support sits on the left half; the 'evidence' is on the right. The expected crop
    never moves (no gradient reaches it); sampled trees with the score-function term do."""
    torch.manual_seed(0)
    logits = torch.zeros(1, 8, 8)
    logits[..., :3] = 2.0  # entmax support: the three left columns only
    logits.requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=0.1)
    trees, slides = 4, 16
    for _ in range(60):
        a = attention_to_affine(logits.expand(trees * slides, 8, 8), translation="clamp",
                                sample={"temperature": 1.0, "uniform": 0.05})
        cost = (a.tx < 0).float()  # a tree that looks at the left half misses the evidence
        loss = score_function_loss(cost, a.log_prob, trees)
        opt.zero_grad()
        loss.backward()
        opt.step()
    before = attention_to_affine(torch.zeros(1, 8, 8).index_fill(2, torch.arange(3), 2.0), translation="clamp")
    expected = attention_to_affine(logits.detach(), translation="clamp")
    assert float(before.tx) < -0.5
    assert float(expected.tx) > 0.0  # the map's expectation, the crop used at inference, crossed over
    assert float(expected.probs[..., 4:].sum()) > 0.6  # and the entmax map's mass is mostly on the right
    assert float(torch.softmax(logits.detach().flatten(), 0).view(8, 8)[:, 4:].sum()) > 0.9


def test_the_loop_explores_for_its_share_of_training_then_trains_the_expected_crops():
    torch.manual_seed(0)
    sources = [ArraySource((torch.rand(128, 128, 3) * 255).to(torch.uint8).numpy()) for _ in range(2)]
    recipe = get_recipe("learn_to_look", batch_size=2, steps=4, explore_trees=2, explore_frac=0.5)
    config = TrainConfig(device="cpu", amp="off", threads=2, progress=False, baseline_eval=False, save_every=0,
                         log_every=1, tensorboard=False)
    result = fit(micro_magnet(), SourceData(sources, [0, 1]), config, recipe)
    assert ["explore" in row for row in result.log] == [True, True, False, False]
    assert all(torch.isfinite(torch.tensor(row["total"])) for row in result.log)
    assert all(layer.sample_policy is None for layer in result.model.layers)  # switched off again


def test_tree_mil_needs_several_trees():
    from magnet_zoo.config import ConfigError

    with pytest.raises(ConfigError, match="tree_mil needs explore_trees"):
        get_recipe("learn_to_look", tree_mil=True)
    assert get_recipe("learn_to_look", explore_trees=3, tree_mil=True).tree_mil


def test_multiple_instance_output_takes_each_slides_best_tree_and_pools_every_trees_patches():
    from magnet_zoo.nn.trees import multiple_instance_output

    torch.manual_seed(3)
    net = micro_magnet(aux_pooling="max").train()
    images = [(torch.rand(160, 160, 3) * 255).to(torch.uint8).numpy() for _ in range(2)]
    fetchers = [SlideFetcher(ArraySource(img), 15) for img in images]
    set_exploration(net, 1.0, 0.05)
    try:
        tree = net(fetchers * 3, auxiliary=True)  # 3 sampled trees of 2 slides, tree-major
    finally:
        set_exploration(net, None)
    out = multiple_instance_output(net, tree, 3)
    torch.testing.assert_close(out.logits, tree.logits.view(3, 2).amax(0))
    assert len(set(tree.logits.view(3, 2)[:, 0].tolist())) == 3  # the trees differ, or max proves nothing
    for layer, per_patch in tree.aux_patch_logits.items():
        n = per_patch.shape[1]
        assert out.aux_patch_logits[layer].shape == (2, 3 * n)
        for slide in range(2):
            mine = torch.cat([per_patch[t * 2 + slide] for t in range(3)])
            torch.testing.assert_close(out.aux_patch_logits[layer][slide], mine)
            torch.testing.assert_close(out.aux_logits[layer][slide], mine.max())
    with pytest.raises(ValueError, match="cannot be 4 trees"):
        multiple_instance_output(net, tree, 4)


def test_the_loop_with_tree_mil_scores_each_slide_over_its_trees(monkeypatch):
    from magnet_zoo.train.exploration import mil_inference

    torch.manual_seed(0)
    sources = [ArraySource((torch.rand(128, 128, 3) * 255).to(torch.uint8).numpy()) for _ in range(2)]
    recipe = get_recipe("learn_to_look", batch_size=2, steps=3, explore_trees=2, explore_frac=1.0, tree_mil=True,
                        explore_uniform=0.2)
    trees, policy = mil_inference(recipe)
    assert trees == 2 and policy.pool == "max" and policy.source == "softmax" and policy.uniform == 0.2
    assert mil_inference(get_recipe("learn_to_look", explore_trees=2)) is None
    config = TrainConfig(device="cpu", amp="off", threads=2, progress=False, baseline_eval=False, save_every=0,
                         log_every=1, tensorboard=False)
    import magnet_zoo.nn.trees as trees_module

    calls = []
    real = trees_module.multiple_instance_output

    def spy(model, tree, k):
        out = real(model, tree, k)
        calls.append((len(tree.logits), k, len(out.logits)))
        return out

    monkeypatch.setattr(trees_module, "multiple_instance_output", spy)
    result = fit(micro_magnet(), SourceData(sources, [0, 1]), config, recipe)
    assert all("explore" in row for row in result.log) and len(result.log) == 3
    assert calls == [(4, 2, 2)] * 3  # every step scores 2 trees of 2 slides as 2 bags
    assert all(torch.isfinite(torch.tensor(row["total"])) for row in result.log)
    calls.clear()
    fit(micro_magnet(), SourceData(sources, [0, 1]), config, recipe.replace(tree_mil=False))
    assert calls == []  # without it each tree is scored on its own
