"""The MagNet network end to end on in-memory slides: counts, tree, gradients, losses, layering."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import magnet_zoo
from magnet_zoo.nn.branch import BranchStack, GroupedBranch, MaxPool3x3
from magnet_zoo.nn.losses import magnet_loss, paradoxical_loss
from magnet_zoo.wsi import ArraySource, SlideFetcher
from tests.conftest import tissue_image


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "n56", "n224", "values_m"),
    [("magnet3_inception_v3", 10, 18, 2.80), ("magnet4_inception_v3", 28, 36, 5.68)],
)
def test_paper_configurations_feed_the_papers_image_counts(name, n56, n224, values_m):
    model = magnet_zoo.create_model(name, backbone_pretrained=False).eval()
    pred = magnet_zoo.predict_slide(model, ArraySource(tissue_image()))
    acc = pred.accounting
    assert acc["images"] == {"56": n56, "224": n224}
    assert acc["values_fed"] == 3 * (n56 * 56 * 56 + n224 * 224 * 224)
    assert abs(acc["values_fed"] / 1e6 - values_m) < 0.01
    assert acc["pixels_read"] > 0
    assert pred.final_patches.shape == (n224, 3, 224, 224)
    # Tree: the root, then every layer's nodes; the last layer holds the final patches.
    per_layer = [sum(1 for n in pred.tree if n.layer == k) for k in range(len(model.config.patches) + 1)]
    assert per_layer[-1] == n224 and sum(per_layer[:-1]) == n56
    # the prediction is the network's own output on that slide, and its label follows the 0.5 threshold
    with torch.no_grad():
        direct = model([SlideFetcher(ArraySource(tissue_image()), model.config.grey_threshold)])
    assert pred.probability == pytest.approx(float(direct.probs[0]), abs=1e-5)
    assert pred.label == model.config.labels[int(pred.probability >= 0.5)]


def test_tree_names_geometry_and_levels():
    model = magnet_zoo.create_model("magnet3_tiny").eval()
    src = ArraySource(tissue_image(1600, 1200), coarsest=128)
    out = model([SlideFetcher(src)])
    tree = out.trees[0]
    names = [n.name for n in tree]
    assert names[:4] == ["I_1", "I_11", "I_12", "I_13"]
    assert names[4:6] == ["I_111", "I_112"] and names[-1] == "I_1323"
    assert len(names) == len(set(names)) == 1 + 3 + 6 + 18
    by_name = {n.name: n for n in tree}
    assert by_name["I_1"].box == (0.0, 0.0, 1200.0, 1600.0)
    for node in tree[1:]:
        parent = by_name[node.parent]
        px, py, pw, ph = parent.box if parent.layer else (-200.0, 0.0, 1600.0, 1600.0)  # root canvas
        x, y, w, h = node.box
        assert w == pytest.approx(node.scale * pw)
        cx, cy = x + w / 2, y + h / 2
        assert cx == pytest.approx(px + pw / 2 + node.translation[0] * pw / 2)
        assert cy == pytest.approx(py + ph / 2 + node.translation[1] * ph / 2)
        # A crop stays inside its parent's view.
        assert x >= px - 1e-4 * pw and x + w <= px + pw + 1e-4 * pw
    # The frozen patch (first of layer 2) is the identity: same box as its parent.
    assert by_name["I_111"].frozen and by_name["I_111"].box == by_name["I_11"].box
    assert not by_name["I_112"].frozen
    # Reads go to finer levels as ROIs shrink, never coarser than the parent's.
    for node in tree[1:]:
        if node.layer < 3:
            assert node.level <= by_name[node.parent].level


@pytest.mark.slow
def test_every_parameter_gets_a_finite_nonzero_gradient():
    torch.manual_seed(0)
    model = magnet_zoo.create_model("magnet3_tiny", attention_init="random").train()
    fetchers = [SlideFetcher(ArraySource(tissue_image(seed=s))) for s in (1, 2)]
    out = model(fetchers)
    assert set(out.aux_logits) == {1, 3}
    # Make the paradoxical term active so that its gradient path is exercised too.
    targets = torch.tensor([0.0, 1.0])
    loss = model.loss(out, targets)
    assert torch.isfinite(loss.total)
    loss.total.backward()
    missing = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)
    ]
    # The one justified exception: timm initialises the last BatchNorm of every residual block to zero
    # when training from scratch (`zero_init_last`), so the branch in front of it has exactly zero
    # gradient until that BatchNorm's weight moves (its own weight does get a gradient, checked here).
    excused = set()
    for name, module in model.named_modules():
        bn2 = getattr(module, "bn2", None)
        if bn2 is not None and hasattr(module, "conv1") and float(bn2.weight.abs().sum()) == 0:
            assert bn2.weight.grad is not None and bn2.weight.grad.abs().sum() > 0, name
            excused |= {f"{name}.{p}" for p, _ in module.named_parameters() if not p.startswith("bn2")}
    assert [m for m in missing if m not in excused] == []
    assert not any(m.startswith("layers.") for m in missing)  # every attention stack learns
    # The frozen patch has no Branch stack: layer 2 of (3, 2, 3) learns 3 of its 6 positions.
    assert model.layers[1].num_stacks == 3 and model.layers[0].num_stacks == 3 and model.layers[2].num_stacks == 18


def test_branch_groups_are_independent():
    torch.manual_seed(0)
    branch = GroupedBranch(groups=3, c_in=3, features=2).eval()
    x = torch.randn(1, 9, 16, 16)
    y = branch(x)
    assert y.shape == (1, 3 * 10, 16, 16)
    x2 = x.clone()
    x2[:, 3:6] += 1.0  # change group 1's input only
    y2 = branch(x2)
    assert torch.equal(y[:, :10], y2[:, :10]) and torch.equal(y[:, 20:], y2[:, 20:])
    assert not torch.equal(y[:, 10:20], y2[:, 10:20])
    stack = BranchStack(groups=4)
    assert stack(torch.randn(2, 12, 56, 56)).shape == (2, 4, 56, 56)


def test_the_pooling_path_matches_plain_max_pooling_values_and_gradient_ties_included():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(4, 12, 17, 19))  # ReLU outputs: many tied zeros in every window
    g = torch.randn(4, 12, 17, 19)
    grads = []
    for pool in (MaxPool3x3(), torch.nn.MaxPool2d(3, stride=1, padding=1)):
        xi = x.clone().requires_grad_()
        y = pool(xi)
        (y * g).sum().backward()
        assert y.is_contiguous() and y.shape == x.shape
        grads.append((y.detach(), xi.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_losses_follow_the_paper():
    targets = torch.tensor([1.0, 0.0])
    first = torch.tensor([2.0, 2.0])  # P(true): sigmoid(2)=0.88 for slide 0, 0.12 for slide 1
    later = torch.tensor([0.0, 0.0])  # P(true) 0.5 for both
    # Layer 3 worse than layer 1 on slide 0 only.
    expect = (torch.sigmoid(torch.tensor(2.0)) - 0.5) / 2
    assert paradoxical_loss(first, later, targets) == pytest.approx(float(expect))
    terms = magnet_loss(later, {1: first, 3: later}, targets)
    assert float(terms.total) == pytest.approx(float(terms.paradoxical + terms.auxiliary + terms.classifier))
    assert float(terms.classifier) == pytest.approx(float(torch.log(torch.tensor(2.0))))
    off = magnet_loss(later, {1: first, 3: later}, targets, paradoxical=False, auxiliary=False)
    assert float(off.total) == pytest.approx(float(terms.classifier))
    assert float(off.paradoxical) == 0 and float(off.auxiliary) == 0


def test_predict_slide_accepts_numpy_and_restores_training_mode():
    model = magnet_zoo.create_model("magnet2_tiny").train()
    pred = magnet_zoo.predict_slide(model, tissue_image(300, 500))
    assert model.training
    assert pred.accounting["images"] == {"56": 3, "64": 4}
    d = pred.to_dict()
    assert d["tree"][0]["name"] == "I_1" and len(d["tree"]) == 1 + 2 + 4
    with pytest.raises(TypeError, match="expected a slide source"):
        magnet_zoo.predict_slide(model, "not a slide")


@pytest.mark.slow
def test_importing_nn_loads_no_slide_library():
    code = (
        "import sys, magnet_zoo; magnet_zoo.create_model, magnet_zoo.predict_slide; "
        "bad = [m for m in ('openslide', 'tifffile', 'tiatoolbox', 'monai') if m in sys.modules]; "
        "print(bad)"
    )
    nn_only = (
        "import sys, magnet_zoo.nn; "
        "bad = [m for m in ('openslide', 'tifffile', 'tiatoolbox', 'monai', 'magnet_zoo.wsi') "
        "if m in sys.modules]; print(bad)"
    )
    # (PIL is imported by timm's torchvision, so it is not on the list; it reads no slides.)
    for snippet in (nn_only, code):
        res = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, check=True)
        assert res.stdout.strip() == "[]", res.stdout
