"""Recentring (recipe field ``recentre_weight``): a parent's centre is pulled towards its learned children."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import micro_magnet

from magnet_zoo.config import ConfigError
from magnet_zoo.nn.attention import Affine
from magnet_zoo.train import SourceData, TrainConfig, fit, get_recipe
from magnet_zoo.train.recentre import recentre_loss
from magnet_zoo.wsi import ArraySource


def _affine(scale, tx, ty, grad=False) -> Affine:
    t = [torch.tensor(v, dtype=torch.float32, requires_grad=grad) for v in (scale, tx, ty)]
    return Affine(scale=t[0], tx=t[1], ty=t[2], probs=torch.zeros(1))


def _case():
    """One slide (label 1); layer 1: two patches; layer 2: per node a frozen patch (slot -1) and a learned one."""
    parent = _affine([[[0.1, 0.2]]], [[[0.3, -0.4]]], [[[0.0, 0.1]]], grad=True)
    child = _affine([[[1.0, 0.3], [1.0, 0.3]]], [[[0.9, 0.5], [0.7, -0.25]]], [[[0.9, 0.0], [0.0, 0.5]]], grad=True)
    # The frozen patches' logits say "right" too: if they were counted, the value would change.
    patch = torch.tensor([[8.0, 8.0, 8.0, 1.0]])
    out = SimpleNamespace(affines=[parent, child], aux_patch_logits={2: patch}, logits=torch.zeros(1))
    return out, parent, child


def test_the_term_is_each_learned_childs_offset_squared_weighted_by_its_confidence():
    net = micro_magnet(aux_pooling="per_patch")
    assert net.layers[1].slot.tolist() == [-1, 0, -1, 1]
    out, parent, child = _case()
    loss = recentre_loss(net, out, torch.tensor([1.0]))
    conf = 2 * torch.sigmoid(torch.tensor([8.0, 1.0])) - 1
    expected = (conf[0] * (0.5**2 + 0.0**2) + conf[1] * (0.25**2 + 0.5**2)) / 2
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert child.tx.grad is None or float(child.tx.grad.abs().sum()) == 0  # the child is never moved
    # d/dt_j of the mean of w (t_j - target)^2 / s^2 over the 2 learned children: -w t_c / s
    want = torch.stack([-conf[0] * 0.5 / 0.1, conf[1] * 0.25 / 0.2]).view(1, 1, 2)
    torch.testing.assert_close(parent.tx.grad, want)
    assert float(parent.tx.grad[0, 0, 0]) < 0  # descending moves parent 0 right, towards its child at +0.5
    assert float(parent.ty.grad[0, 0, 1]) < 0  # and parent 1 down, towards its child at +0.5
    assert parent.scale.grad is None or float(parent.scale.grad.abs().sum()) == 0


def test_a_child_that_does_not_classify_its_slide_pulls_nothing():
    net = micro_magnet(aux_pooling="per_patch")
    out, parent, _ = _case()
    out.aux_patch_logits[2] = torch.tensor([[8.0, -30.0, 8.0, -30.0]])  # learned children sure of the wrong label
    loss = recentre_loss(net, out, torch.tensor([1.0]))
    assert float(loss.detach()) < 1e-12
    flipped = recentre_loss(net, out, torch.tensor([0.0]))  # the same logits, now right
    assert float(flipped.detach()) > 0.05
    out.aux_patch_logits[2] = torch.tensor([[8.0, 0.0, 8.0, -0.1]])  # at chance (on background): no pull either
    assert float(recentre_loss(net, out, torch.tensor([1.0])).detach()) == 0


def test_training_logs_the_term_and_refuses_a_model_without_per_patch_logits():
    rng = np.random.default_rng(0)
    sources = [ArraySource(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(4)]
    data = SourceData(sources, [0, 1, 0, 1])
    config = TrainConfig(device="cpu", amp="off", threads=2, progress=False, baseline_eval=False, save_every=0,
                         log_every=1, tensorboard=False)
    recipe = get_recipe("learn_to_look", batch_size=2, steps=2, recentre_weight=1.0)
    result = fit(micro_magnet(aux_pooling="per_patch"), data, config, recipe)
    assert all(row["recentre"] > 0 for row in result.log)
    with pytest.raises(ConfigError, match="recentre_weight needs per-patch"):
        fit(micro_magnet(aux_pooling="mean"), data, config, recipe)
    with pytest.raises(ConfigError, match="recentre_weight must be >= 0"):
        get_recipe("learn_to_look", recentre_weight=-1.0)


def test_a_step_on_the_term_moves_real_first_layer_centres_towards_their_childrens_crops():
    from magnet_zoo.tasks.findit import FindItSpec, make_batch

    net = micro_magnet(aux_pooling="per_patch").train()
    fetchers, labels, _ = make_batch(FindItSpec(image_size=256), range(4))
    out = net(fetchers)
    loss = recentre_loss(net, out, labels)
    parent, child = out.affines
    b = child.scale.shape[0]
    target = torch.stack([parent.tx.reshape(b, -1) + parent.scale.reshape(b, -1) * child.tx[..., 1],
                          parent.ty.reshape(b, -1) + parent.scale.reshape(b, -1) * child.ty[..., 1]], -1).detach()
    before = (torch.stack([parent.tx.reshape(b, -1), parent.ty.reshape(b, -1)], -1).detach() - target).norm(dim=-1)
    assert float(before.mean()) > 1e-3
    first = [p for p in net.layers[0].parameters() if p.requires_grad]
    net.zero_grad()
    loss.backward()
    others = [p for name, p in net.named_parameters() if not name.startswith("layers.0.")]
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in others)  # only layer 1 is pulled
    with torch.no_grad():
        for p in first:
            if p.grad is not None:
                p -= 0.05 * p.grad / (p.grad.norm() + 1e-12)
        again = net(fetchers).affines[0]
    after = (torch.stack([again.tx.reshape(b, -1), again.ty.reshape(b, -1)], -1) - target).norm(dim=-1)
    assert float(after.mean()) < float(before.mean())


def test_positives_only_counts_label_one_slides_alone():
    net = micro_magnet(aux_pooling="per_patch")
    one, _, _ = _case()
    # Two slides with the same geometry: slide 0 positive (its learned children right), slide 1 negative with
    # learned children just as sure of "normal", which on SynthMets they would be anywhere.
    parent = _affine([[[0.1, 0.2]]] * 2, [[[0.3, -0.4]]] * 2, [[[0.0, 0.1]]] * 2, grad=True)
    child = _affine(*[torch.cat([t.detach()] * 2).tolist() for t in (one.affines[1].scale, one.affines[1].tx,
                                                                       one.affines[1].ty)], grad=True)
    logits = torch.tensor([[8.0, 8.0, 8.0, 1.0], [-8.0, -8.0, -8.0, -8.0]])
    out = SimpleNamespace(affines=[parent, child], aux_patch_logits={2: logits}, logits=torch.zeros(2))
    labels = torch.tensor([1.0, 0.0])
    both = recentre_loss(net, out, labels)
    only = recentre_loss(net, out, labels, positives_only=True)
    alone = recentre_loss(net, one, torch.tensor([1.0]))
    torch.testing.assert_close(only, alone)  # the mean runs over the positive slide's children only
    assert float(both.detach()) > float(only.detach()) + 1e-3  # the negative's confident children pull in "all" mode
    only.backward()
    assert float(parent.tx.grad[1].abs().sum()) == 0 and float(parent.tx.grad[0].abs().sum()) > 0
    none = recentre_loss(net, out, torch.tensor([0.0, 0.0]), positives_only=True)  # no positive slide at all
    assert float(none.detach()) == 0
    with pytest.raises(ConfigError, match="recentre_on must be one of"):
        get_recipe("learn_to_look", recentre_on="negative")
