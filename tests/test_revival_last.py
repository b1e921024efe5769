"""Last-layer revival (recipe field ``revive_last``): a dead learned last-layer patch gets the best one's stack."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from conftest import micro_magnet

from magnet_zoo.train.revival import BranchReviver


def _out(layer1: torch.Tensor, layer2: torch.Tensor) -> SimpleNamespace:
    return SimpleNamespace(aux_patch_logits={1: layer1, 2: layer2})


def test_a_dead_last_layer_patch_gets_the_best_patchs_stack_and_its_optimiser_state():
    net = micro_magnet(attention_init="random", aux_pooling="per_patch").train()
    layer = net.layers[-1]
    assert layer.num_nodes == 2 and layer.num_patches == 2 and layer.slot.tolist() == [-1, 0, -1, 1]
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    reviver = BranchReviver(net, (0.5,), margin=0.1, last=True)
    assert reviver.last and reviver.last_slots == [1, 3] and reviver.last_groups == [0, 1]
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0])
    right = torch.tensor([6.0, -6.0, 6.0, -6.0])  # confident and right
    layer1 = torch.stack([right, right], 1)  # both first-layer patches alike: no first-layer revival
    layer2 = torch.stack([right, right, right, -right], 1)  # column 3 (node 1's learned patch) always wrong
    for _ in range(5):
        reviver.observe(_out(layer1, layer2), labels)
    assert reviver.running_last.shape == (2,) and float(reviver.running_last[1] - reviver.running_last[0]) > 1
    views = torch.rand(3, 2, 3, 56, 56)
    views[:, 1] = views[:, 0]  # both nodes see the same view: alike stacks give alike maps
    layer.attention_logits(views).square().mean().backward()
    opt.step()  # some optimiser state to copy
    with torch.no_grad():
        before = layer.attention_logits(views)
    assert not torch.allclose(before[:, 0], before[:, 1])
    p0 = next(layer.stacks.parameters())
    assert not torch.allclose(opt.state[p0]["exp_avg"][p0.shape[0] // 2:], opt.state[p0]["exp_avg"][:p0.shape[0] // 2])
    assert reviver.maybe_revive(0.4, 4, net, opt) == []  # not yet at the revival point
    rows = reviver.maybe_revive(0.5, 5, net, opt)
    assert [(r["layer"], r["from"], r["to"]) for r in rows] == [(2, 1, 3)]
    layer.eval()  # BatchNorm's running statistics were copied too
    with torch.no_grad():
        after = layer.attention_logits(views)
    torch.testing.assert_close(after[:, 1], after[:, 0])
    for p in layer.stacks.parameters():  # Adam's moments too, so the two train alike
        n = p.shape[0] // layer.stacks.groups
        torch.testing.assert_close(opt.state[p]["exp_avg"][n:], opt.state[p]["exp_avg"][:n])
    assert float(reviver.running_last[1]) == float(reviver.running_last[0])
    assert reviver.maybe_revive(0.9, 9, net, opt) == []  # each point fires once

    state = reviver.state_dict()
    again = BranchReviver(net, (0.5, 0.8), margin=0.1, last=True)
    again.load_state_dict(state)
    torch.testing.assert_close(again.running_last, reviver.running_last)
    again.load_state_dict({"pending": [0.8], "running": None})  # a checkpoint from before the option
    assert again.running_last is None and again.pending == [0.8]


def test_last_layer_revival_is_off_without_the_last_layers_per_patch_logits():
    net = micro_magnet(attention_init="random", aux_pooling="per_patch", aux_layers=(1,))
    assert not BranchReviver(net, (0.5,), 0.1, last=True).last
    assert not BranchReviver(micro_magnet(aux_pooling="per_patch"), (), 0.1, last=True).last  # no points
    assert BranchReviver(micro_magnet(aux_pooling="per_patch"), (0.5,), 0.1).last is False  # not asked
