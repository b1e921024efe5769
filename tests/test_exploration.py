"""Branch revival (copying a branch's attention stacks) and crop-centre jitter (issue 7's recipe)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from magnet_zoo.factory import create_model
from magnet_zoo.nn.attention import attention_to_affine
from magnet_zoo.train.loop import build_optimizer
from magnet_zoo.train.recipe import get_recipe
from magnet_zoo.train.revival import BranchReviver

LOOK = get_recipe("learn_to_look", steps=300)
"""The recipe whose branch revival these tests exercise (FindIt's until it moved to ``learn_to_look_centred``)."""
RECIPE_CONFIG = dict(LOOK.model_overrides)


def _logit_maps(model, layer_i, images):
    return model.layers[layer_i].attention_logits(images)


def test_subtree_stacks_follow_the_tree():
    m2 = create_model("magnet2_tiny", **RECIPE_CONFIG)
    # (2, 2) with the frozen patch: one learned layer-2 stack per layer-1 patch.
    assert m2.subtree_stacks(0) == [(0, 0), (1, 0)]
    assert m2.subtree_stacks(1) == [(0, 1), (1, 1)]
    m3 = create_model("magnet3_tiny", **RECIPE_CONFIG)
    # (3, 2, 3): layer 2 has 3 nodes x 1 learned patch; layer 3 has 6 nodes x 3 patches.
    assert m3.subtree_stacks(2) == [(0, 2), (1, 2), *[(2, g) for g in range(12, 18)]]
    with pytest.raises(IndexError):
        m3.subtree_stacks(3)


def test_copy_branch_duplicates_stacks_and_optimiser_state_only_for_the_target():
    torch.manual_seed(0)
    model = create_model("magnet2_tiny", **RECIPE_CONFIG)
    opt = build_optimizer(model, LOOK)
    # One optimiser step so Adam has state to copy.
    loss = sum(p.float().pow(2).sum() for p in model.layers.parameters())
    loss.backward()
    opt.step()
    model.eval()
    x1 = torch.rand(2, 1, 3, 56, 56)
    x2 = torch.rand(2, 2, 3, 56, 56)
    before1, before2 = _logit_maps(model, 0, x1), _logit_maps(model, 1, x2)
    assert not torch.allclose(before1[:, 0], before1[:, 1])

    model.copy_branch(0, 1, opt)
    after1, after2 = _logit_maps(model, 0, x1), _logit_maps(model, 1, x2)
    torch.testing.assert_close(after1[:, 1], after1[:, 0])
    torch.testing.assert_close(after1[:, 0], before1[:, 0])  # the source is untouched
    # Layer 2: stack 1 now computes on node 1's image what stack 0 computes on node 0's.
    same_input = x2[:, :1].expand(-1, 2, -1, -1, -1).contiguous()
    maps = _logit_maps(model, 1, same_input)
    torch.testing.assert_close(maps[:, 1], maps[:, 0])
    torch.testing.assert_close(after2[:, 0], before2[:, 0])

    head = model.layers[0].stacks.head.weight
    state = opt.state[head]
    torch.testing.assert_close(state["exp_avg"][1], state["exp_avg"][0])
    torch.testing.assert_close(state["exp_avg_sq"][1], state["exp_avg_sq"][0])


def _fake_output(bad_patch: int, batch: int = 8, patches: int = 2):
    labels = torch.arange(batch) % 2
    logits = torch.where(labels[:, None] > 0, 4.0, -4.0).float().repeat(1, patches)
    logits[:, bad_patch] = 0.0  # chance: BCE log 2
    return SimpleNamespace(aux_patch_logits={1: logits}), labels


def test_reviver_copies_the_best_branch_into_a_dead_one_once_per_point():
    torch.manual_seed(0)
    model = create_model("magnet2_tiny", **RECIPE_CONFIG)
    opt = build_optimizer(model, LOOK)
    reviver = BranchReviver(model, revive_at=(0.5,), margin=0.15)
    out, labels = _fake_output(bad_patch=0)
    for _ in range(5):
        reviver.observe(out, labels)
    assert reviver.maybe_revive(0.4, 4, model, opt) == []  # not yet
    rows = reviver.maybe_revive(0.5, 5, model, opt)
    assert [(r["from"], r["to"]) for r in rows] == [(1, 0)]
    assert rows[0]["loss_to"] > rows[0]["loss_from"] + 0.15
    model.eval()
    x = torch.rand(1, 1, 3, 56, 56)
    maps = _logit_maps(model, 0, x)
    torch.testing.assert_close(maps[:, 0], maps[:, 1])
    assert reviver.maybe_revive(0.9, 9, model, opt) == []  # each point fires once


def test_reviver_leaves_healthy_branches_alone_and_needs_per_patch_logits(caplog):
    model = create_model("magnet2_tiny", **RECIPE_CONFIG)
    opt = build_optimizer(model, LOOK)
    reviver = BranchReviver(model, revive_at=(0.1,), margin=0.15)
    labels = torch.arange(8) % 2
    good = torch.where(labels[:, None] > 0, 4.0, -4.0).float().repeat(1, 2)
    reviver.observe(SimpleNamespace(aux_patch_logits={1: good}), labels)
    assert reviver.maybe_revive(0.2, 2, model, opt) == []
    mean_pooled = create_model("magnet2_tiny", **{**RECIPE_CONFIG, "aux_pooling": "mean"})
    off = BranchReviver(mean_pooled, revive_at=(0.5,), margin=0.15)
    assert "per-patch" in caplog.text
    off.observe(SimpleNamespace(aux_patch_logits={1: good}), labels)
    assert off.maybe_revive(0.9, 9, mean_pooled, build_optimizer(mean_pooled, LOOK)) == []


def test_jitter_moves_crop_centres_only_in_training_and_stays_in_view():
    torch.manual_seed(0)
    logits = torch.randn(64, 14, 14)
    plain = attention_to_affine(logits, min_scale=0.1, max_scale=0.35, translation="clamp")
    jittered = attention_to_affine(logits, min_scale=0.1, max_scale=0.35, translation="clamp", jitter=0.5)
    shift = (jittered.tx - plain.tx).abs()
    assert shift.mean() > 0.1
    assert jittered.tx.abs().max() <= 1 and jittered.ty.abs().max() <= 1
    torch.testing.assert_close(jittered.probs, plain.probs)

    model = create_model("magnet2_tiny", **RECIPE_CONFIG)
    layer = model.layers[0]
    layer.jitter = 0.5
    images = torch.rand(2, 1, 3, 56, 56)
    layer.eval()
    a, b = layer(images), layer(images)
    torch.testing.assert_close(a.tx, b.tx)
    layer.train()  # batch statistics: compare two training-mode passes with and without jitter
    layer.jitter = 0.0
    c0 = layer(images)
    layer.jitter = 0.5
    c = layer(images)
    assert not torch.allclose(c.tx, c0.tx)

