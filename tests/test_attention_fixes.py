"""The correctness switches of the attention (DESIGN.md section 6): each against the behaviour it fixes."""

from __future__ import annotations

import pytest
import torch
from conftest import micro_magnet

from magnet_zoo.nn.attention import attention_to_affine
from magnet_zoo.nn.branch import BranchStack
from magnet_zoo.nn.losses import magnet_loss, paradoxical_loss
from magnet_zoo.train import get_recipe
from magnet_zoo.train.loop import build_optimizer, clip_gradients


def test_paradoxical_reference_constant_never_lowers_layer_one():
    targets = torch.tensor([1.0, 0.0])
    first = torch.tensor([2.0, -2.0], requires_grad=True)  # layer 1 leads (P1 = 0.88) ...
    later = torch.tensor([0.5, -0.5], requires_grad=True)  # ... layer 3 lags (P3 = 0.62)
    live = paradoxical_loss(first, later, targets, "live")
    g_first, g_later = torch.autograd.grad(live, (first, later))
    # the formula as written pushes layer 1's true-class probability down: its logit rises for label 0 ...
    assert float(g_first[0]) > 0 and float(g_first[1]) < 0
    const = paradoxical_loss(first, later, targets, "constant")
    c_first, c_later = torch.autograd.grad(const, (first, later), allow_unused=True)
    assert c_first is None or float(c_first.abs().max()) == 0.0
    torch.testing.assert_close(c_later, g_later)  # the later head gets the same push up
    assert float(const.detach()) == pytest.approx(float(live.detach()))


def test_aux_reduction_sums_the_heads_as_the_paper_sums_its_terms():
    targets = torch.tensor([1.0, 0.0, 1.0])
    logits = torch.tensor([0.3, -0.2, 1.0])
    aux = {1: torch.tensor([0.1, 0.4, -0.3]), 3: torch.tensor([1.0, -1.0, 0.2])}
    mean = magnet_loss(logits, aux, targets, aux_reduction="mean")
    total = magnet_loss(logits, aux, targets, aux_reduction="sum")
    assert float(total.auxiliary) == pytest.approx(2 * float(mean.auxiliary))
    assert float(total.total) == pytest.approx(float(total.paradoxical + total.auxiliary + total.classifier))


def _edge_logits(batch: int = 64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, 56, 56, generator=gen) * 3
    for i in range(batch):  # peaks at and near the border, where the bounds matter
        y, x = int(torch.randint(0, 56, (1,), generator=gen)), int(torch.randint(0, 3, (1,), generator=gen))
        logits[i, y, x if i % 2 else 55 - x] += 40
    return logits


def test_soft_bounds_keep_every_crop_inside_and_pass_a_gradient():
    logits = _edge_logits()
    clip = attention_to_affine(logits, min_scale=0.1, max_scale=0.35, translation="clamp", bounds="clip")
    outside = (torch.maximum(clip.tx.abs(), clip.ty.abs()) + clip.scale > 1 + 1e-6).sum()
    assert int(outside) > 0  # the paper's order: the min-scale clamp runs last, crops hang outside the view
    soft = attention_to_affine(logits, min_scale=0.1, max_scale=0.35, translation="clamp", bounds="soft")
    assert bool((torch.maximum(soft.tx.abs(), soft.ty.abs()) + soft.scale <= 1 + 1e-6).all())
    assert bool(((soft.scale > 0.1) & (soft.scale < 0.35)).all())
    # centres well inside the view are not moved (the limit bends only near the bound)
    interior = torch.full((3, 56, 56), -20.0)
    for i, (y, x) in enumerate(((28, 28), (10, 40), (45, 12))):
        interior[i, y, x] = 20.0
    plain = attention_to_affine(interior, min_scale=0.1, max_scale=0.35, translation="clamp", bounds="clip")
    kept = attention_to_affine(interior, min_scale=0.1, max_scale=0.35, translation="clamp", bounds="soft")
    torch.testing.assert_close(kept.tx, plain.tx)
    torch.testing.assert_close(kept.ty, plain.ty)

    # a map far wider than max_scale: clipped, its scale has no gradient; soft, it does
    wide = torch.zeros(1, 56, 56, requires_grad=True)
    s_clip = attention_to_affine(wide, min_scale=0.1, max_scale=0.35, bounds="clip").scale.sum()
    s_soft = attention_to_affine(wide, min_scale=0.1, max_scale=0.35, bounds="soft").scale.sum()
    (g_clip,) = torch.autograd.grad(s_clip, wide, allow_unused=True)
    (g_soft,) = torch.autograd.grad(s_soft, wide)
    assert g_clip is None or float(g_clip.abs().max()) == 0.0
    assert float(g_soft.abs().max()) > 0
    # in the interior the soft scale follows the spread with slope 1 at the middle of the bounds
    mid = attention_to_affine(torch.zeros(1, 56, 56), min_scale=0.5, max_scale=1.5 - 1e-9, bounds="soft")
    assert float(mid.scale) == pytest.approx(1.0, abs=0.02)  # a uniform map's spread is 1


def test_replicate_padding_leaves_a_flat_view_flat():
    """On a flat (near-black) view, zero padding makes the border the only distinct place: with batch
    statistics (training mode) the corners' logits stand out by several units and entmax puts its mass
    there. Replicate padding leaves a flat view flat."""
    view = torch.full((2, 3, 56, 56), 0.05)  # a near-black view: glass after the grey filter
    for padding, flat in (("zeros", False), ("replicate", True)):
        torch.manual_seed(0)
        stack = BranchStack(1, init="random", padding=padding).train()
        with torch.no_grad():
            logits = stack(view)[0, 0]
        spread = float(logits.max() - logits.min())
        assert (spread < 1e-5) is flat, (padding, spread)
        if not flat:
            assert spread > 1.0 and float(logits[0, 0] - logits[28, 28]) > 1.0  # a corner stands out


def test_attention_runs_in_fp32_under_autocast():
    model = micro_magnet(attention_init="random").train()
    seen = []
    model.layers[0].stacks.head.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    images = torch.rand(2, 1, 3, 56, 56)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        affine = model.layers[0](images)
    assert seen == [torch.float32] and affine.scale.dtype == torch.float32


def test_gradient_clipping_per_parameter_group():
    model = micro_magnet(attention_init="random")
    opt = build_optimizer(model, get_recipe("learn_to_look"))
    for group, scale in zip(opt.param_groups, (1000.0, 1e-5), strict=True):
        for p in group["params"]:
            p.grad = torch.full_like(p, scale)
    before = clip_gradients(opt, 1.0, per_group=True)
    assert before[0] > 1.0 > before[1]
    after = [float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in g["params"]])))
             for g in opt.param_groups]
    assert after[0] == pytest.approx(1.0, rel=1e-4)
    assert after[1] == pytest.approx(before[1], rel=1e-6)  # the small group is left alone
    for group, scale in zip(opt.param_groups, (1000.0, 1e-5), strict=True):
        for p in group["params"]:
            p.grad = torch.full_like(p, scale)
    clip_gradients(opt, 1.0, per_group=False)  # the global norm: the heads' step shrinks with the attention's
    heads = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in opt.param_groups[1]["params"]])))
    assert heads < 0.01 * before[1]


def test_group_norm_attention_is_the_same_in_training_and_eval_mode():
    images = torch.rand(4, 2 * 3, 56, 56)
    for norm, same in (("batch", False), ("group", True)):
        torch.manual_seed(0)
        stack = BranchStack(2, init="random", norm=norm)
        with torch.no_grad():
            train_maps = stack.train()(images)
            eval_maps = stack.eval()(images)
        assert torch.allclose(train_maps, eval_maps, atol=1e-5) is same, norm
    stack.copy_group(0, 1)  # branch revival copies a GroupNorm stack too
    with torch.no_grad():
        out = stack(torch.cat([images[:, :3], images[:, :3]], 1))
    torch.testing.assert_close(out[:, 0], out[:, 1])
