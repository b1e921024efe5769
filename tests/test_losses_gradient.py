"""The paradoxical loss's gradient: which head receives it, in which direction, and when it is zero.

L1 = mean(relu(P_first - P_later)) with P the probability of the *true* class. Where layer 1 leads
(P_first > P_later) the gradient pushes the later head's true-class probability up and, with the
``live`` reference, the first head's down; where it does not lead the term contributes nothing.
"""

from __future__ import annotations

import pytest
import torch

from magnet_zoo.nn.losses import magnet_loss, paradoxical_loss


def _grads(first: list[float], later: list[float], targets: list[float], reference: str = "live"):
    a = torch.tensor(first, requires_grad=True)
    b = torch.tensor(later, requires_grad=True)
    loss = paradoxical_loss(a, b, torch.tensor(targets), reference)
    loss.backward()
    return loss, a.grad, b.grad


def test_active_term_raises_the_later_heads_true_class_probability_and_lowers_the_firsts():
    # slide 0 (positive): layer 1 says 0.88, the later layer 0.5 -> active
    # slide 1 (negative): layer 1 gives the true class 1 - sigmoid(-2) = 0.88, the later 0.5 -> active
    loss, ga, gb = _grads([2.0, -2.0], [0.0, 0.0], [1.0, 0.0])
    s2, s0 = torch.sigmoid(torch.tensor(2.0)), torch.sigmoid(torch.tensor(0.0))
    assert float(loss) == pytest.approx(float(s2 - s0), rel=1e-6)
    # d/dlogit of P_true = +sigmoid' for a positive slide, -sigmoid' for a negative one; mean over 2 slides
    d2, d0 = float(s2 * (1 - s2)), float(s0 * (1 - s0))
    torch.testing.assert_close(ga, torch.tensor([d2 / 2, -d2 / 2]))
    torch.testing.assert_close(gb, torch.tensor([-d0 / 2, d0 / 2]))
    # gradient descent therefore moves the later head towards the true class (logit up for the positive
    # slide, down for the negative one) and the first head away from it
    assert ga[0] > 0 > gb[0] and ga[1] < 0 < gb[1]


def test_inactive_slides_get_exactly_zero_gradient():
    # slide 0: the later head is better (inactive); slide 1: layer 1 leads (active)
    loss, ga, gb = _grads([0.0, -3.0], [2.0, 0.0], [1.0, 0.0])
    assert float(ga[0]) == 0.0 and float(gb[0]) == 0.0
    assert float(ga[1]) != 0.0 and float(gb[1]) != 0.0
    # and when no slide is active the whole term and its gradient vanish
    loss, ga, gb = _grads([-1.0, 1.0], [1.0, -1.0], [1.0, 0.0])
    assert float(loss) == 0.0
    assert float(ga.abs().sum()) == 0.0 and float(gb.abs().sum()) == 0.0


def test_constant_reference_sends_the_gradient_to_the_later_head_only():
    loss_live, ga_live, gb_live = _grads([2.0], [0.0], [1.0], "live")
    loss_const, ga_const, gb_const = _grads([2.0], [0.0], [1.0], "constant")
    assert float(loss_const) == pytest.approx(float(loss_live))
    assert ga_const is None or float(ga_const.abs().sum()) == 0.0
    torch.testing.assert_close(gb_const, gb_live)
    assert float(ga_live.abs().sum()) > 0


def test_magnet_loss_compares_the_first_and_second_auxiliary_layers():
    """``aux_logits`` keyed by layer: the term is built from the lowest layer and the next one, whatever the
    dict's insertion order, and only they (not the classifier) receive its gradient."""
    targets = torch.tensor([1.0, 1.0])
    logits = torch.zeros(2, requires_grad=True)
    low = torch.tensor([2.0, 2.0], requires_grad=True)
    high = torch.tensor([0.0, 0.0], requires_grad=True)
    terms = magnet_loss(logits, {3: high, 1: low}, targets, auxiliary=False, classifier=False)
    s2 = torch.sigmoid(torch.tensor(2.0))
    assert float(terms.paradoxical) == pytest.approx(float(s2 - 0.5), rel=1e-6)
    terms.total.backward()
    assert logits.grad is None or float(logits.grad.abs().sum()) == 0.0
    assert bool((low.grad > 0).all()) and bool((high.grad < 0).all())
    # switched off: no term and no gradient path to the heads
    off = magnet_loss(logits, {1: low, 3: high}, targets, paradoxical=False, auxiliary=False, classifier=False)
    assert float(off.total) == 0.0 and not off.total.requires_grad
