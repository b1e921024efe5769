"""FindIt task generation and the learn-to-look metrics (issue 7)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from magnet_zoo.factory import create_model
from magnet_zoo.tasks.findit import (
    FindItSpec,
    auroc,
    evaluate,
    make_batch,
    make_image,
    pattern_mask,
    random_hit_probability,
)


def test_images_are_deterministic_and_balanced():
    spec = FindItSpec(image_size=448, object_frac=0.05)
    a, b = make_image(spec, 3), make_image(spec, 3)
    assert np.array_equal(a.image, b.image) and a.box == b.box and a.label == b.label
    labels = [make_image(spec, s).label for s in range(40)]
    assert 10 < sum(labels) < 30
    x, y, w, h = a.box
    assert a.image.shape == (448, 448, 3) and a.image.dtype == np.uint8
    assert 0 <= x and x + w <= 448 and 0 <= y and y + h <= 448 and w == h == 22


def test_ring_and_cross_have_equal_brightness_and_differ_only_in_detail():
    for d in (9, 27, 45):
        ring, cross = pattern_mask("ring", d), pattern_mask("cross", d)
        assert ring.sum() == pytest.approx(cross.sum(), rel=0.05)
        assert np.abs(ring - cross).mean() > 0.2  # clearly different shapes at full resolution
    # At the 56 px overview of an 896 px image (16x smaller) a 27 px ring and a cross are both a
    # 2x2-pixel blob of the same total brightness; only the split of that brightness between the
    # blob's pixels differs a little (measured: under a third of the full-resolution contrast).
    spec = FindItSpec(image_size=896, object_frac=0.03, noise=0.0)
    ring, cross = make_image(spec, 5, label=0), make_image(spec, 5, label=1)
    assert ring.box == cross.box

    def overview(img: np.ndarray) -> np.ndarray:
        return img.astype(np.float32).reshape(56, 16, 56, 16, 3).mean(axis=(1, 3))

    diff = np.abs(overview(ring.image) - overview(cross.image)).max()
    full = np.abs(ring.image.astype(np.float32) - cross.image.astype(np.float32)).max()
    assert diff < 0.35 * full


def test_backgrounds_and_distractors():
    he = make_image(FindItSpec(image_size=256, object_frac=0.05, background="he", distractors=2), 1)
    spread = he.image.max(-1).astype(int) - he.image.min(-1)
    assert (spread >= 15).mean() > 0.9  # H&E-like tissue survives the grey filter
    grey = make_image(FindItSpec(image_size=256, object_frac=0.05), 1)
    spread = grey.image.max(-1).astype(int) - grey.image.min(-1)
    assert (spread < 15).mean() > 0.9  # the grey background is filtered to black
    with pytest.raises(ValueError):
        FindItSpec(background="blue")


def test_random_hit_probability_matches_monte_carlo():
    rng = np.random.default_rng(0)
    n, side, centre = 500.0, 120.0, (40.0, 300.0)
    u = rng.uniform(0, n - side, size=(200_000, 2))
    mc = ((u[:, 0] <= centre[0]) & (centre[0] <= u[:, 0] + side) & (u[:, 1] <= centre[1])
          & (centre[1] <= u[:, 1] + side)).mean()
    assert random_hit_probability(side, n, centre) == pytest.approx(mc, abs=0.005)
    assert random_hit_probability(n, n, centre) == 1.0


def test_auroc():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auroc([0.5, 0.5], [0, 1]) == 0.5
    assert np.isnan(auroc([0.5, 0.4], [1, 1]))


def test_evaluate_reports_every_metric():
    torch.manual_seed(0)
    model = create_model("magnet2_tiny", final_patch_size=32)
    spec = FindItSpec(image_size=256, object_frac=0.05)
    fetchers, labels, samples = make_batch(spec, range(2))
    assert len(fetchers) == 2 and labels.shape == (2,)
    assert labels.tolist() == [float(s.label) for s in samples]
    res, kept = evaluate(model, spec, range(4), batch_size=2, keep_outputs=1)
    d = res.as_dict()
    assert res.n == 4 and len(kept) == 1
    assert set(d["layer_hit_rate"]) == {"1", "2"} and set(d["layer_scale_mean"]) == {"1", "2"}
    # Untrained, near-uniform attention: every learned crop sits at the clamp, centred.
    assert d["layer_scale_mean"]["1"] == pytest.approx(1.0, abs=0.05)


def test_evaluate_with_sampled_trees_pools_their_probabilities_and_counts_all_their_crops(monkeypatch):
    from magnet_zoo.nn.trees import pooled_forward
    from magnet_zoo.tasks.findit import crop_records

    torch.manual_seed(0)
    model = create_model("magnet2_tiny", final_patch_size=32, attention_init="random").eval()
    spec = FindItSpec(image_size=256, object_frac=0.05)
    seeds = list(range(4))
    res, kept = evaluate(model, spec, seeds, batch_size=4, trees=3, tree_seed=5, keep_outputs=1)
    fetchers, labels, _ = make_batch(spec, seeds)
    with torch.no_grad():
        pooled = pooled_forward(model, fetchers, trees=3, seed=5, auxiliary=False)
        expected = model(fetchers, auxiliary=False)
    p, y = pooled.probs.numpy(), labels.numpy()
    assert res.accuracy == pytest.approx(float(((p > 0.5) == (y > 0.5)).mean()))
    assert res.auroc == pytest.approx(auroc(p.tolist(), y.tolist()))
    # the crops of every tree are counted: the learned layer-1 centres, tree by tree, match the pooled pass
    def layer1(out):
        return np.array([n.box for n in out.trees[0] if n.layer == 1])

    boxes = [layer1(o) for o in pooled.outputs]
    np.testing.assert_allclose(layer1(kept[0][1]), boxes[0], rtol=1e-5)
    assert not np.allclose(boxes[0], boxes[1])  # sampled, so the trees differ
    assert not np.allclose(boxes[0], layer1(expected))  # and are not the expected crop
    scales = [s for o in pooled.outputs for i in range(4) for s in crop_records(o, i)[2].scales]
    assert res.layer_scale_mean[2] == pytest.approx(float(np.mean(scales)))
    assert res.n == 4
    import magnet_zoo.tasks.findit as findit

    seen = []

    def spy(*args, **kwargs):
        seen.append((kwargs["trees"], kwargs["seed"], kwargs["temperature"], kwargs["source"]))
        return pooled_forward(*args, **kwargs)

    monkeypatch.setattr(findit, "pooled_forward", spy)
    evaluate(model, spec, seeds, batch_size=2, trees=2, tree_seed=7, tree_temperature=0.25, tree_source="softmax")
    evaluate(model, spec, seeds[:2], batch_size=2, trees=2, tree_seed=7)
    # each batch its own tree seeds, the temperature and the source passed on (by default the entmax map)
    assert seen == [(2, 7, 0.25, "softmax"), (2, 9, 0.25, "softmax"), (2, 7, 1.0, "entmax")]


class _Node(SimpleNamespace):
    pass


class ScriptedNetwork:
    """Stands in for a (2, 2) MagNet: for each FindIt image it returns an ROI tree whose crops are placed
    by hand around the object's centre, and a chosen probability, so every rate :func:`evaluate` reports
    has a known value.

    Image ``j`` (side ``n``, object centre ``(cx, cy)``): layer 1 has a crop A of side 40 centred on the
    object (a hit) and a crop B centred on the *transposed* point ``(cy, cx)`` (a miss; a hit for a test
    that mixes up x and y). Layer 2 holds, per layer-1 crop, its frozen copy and one learned crop: inside A
    a crop of side 10 on the object for even ``j`` and beside it for odd ``j``; inside B a miss."""

    training = False

    def __init__(self, samples, probs) -> None:
        self.samples, self.probs = list(samples), list(probs)
        self.config = SimpleNamespace(grey_threshold=15)
        self.calls = 0

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def tree(self, j, sample, n):
        cx, cy = sample.centre

        def square(x, y, side, layer, frozen=False):
            return _Node(layer=layer, frozen=frozen, box=(x - side / 2, y - side / 2, side, side), scale=side / n)

        a, b = square(cx, cy, 40, 1), square(cy, cx, 40, 1)
        inner = square(cx, cy, 10, 2) if j % 2 == 0 else square(cx + 12, cy, 10, 2)
        return [_Node(layer=0, frozen=False, box=(0, 0, n, n), scale=1.0), a, b,
                _Node(layer=2, frozen=True, box=a.box, scale=a.scale), inner,
                _Node(layer=2, frozen=True, box=b.box, scale=b.scale), square(cy + 12, cx, 10, 2)]

    def __call__(self, fetchers, auxiliary=True):
        first = self.calls
        self.calls += len(fetchers)
        idx = range(first, first + len(fetchers))
        n = self.samples[0].image.shape[0]
        return SimpleNamespace(trees=[self.tree(j, self.samples[j], n) for j in idx],
                               probs=torch.tensor([self.probs[j] for j in idx]))


def test_evaluate_measures_the_scripted_crops_and_probabilities():
    spec = FindItSpec(image_size=448, object_frac=0.05)
    # images whose object centre is far from the diagonal, so that (cx, cy) and (cy, cx) are far apart
    seeds, samples = [], []
    for seed in range(200):
        sample = make_image(spec, seed)
        if abs(sample.centre[0] - sample.centre[1]) > 60:
            seeds.append(seed)
            samples.append(sample)
        if len(seeds) == 8:
            break
    labels = [s.label for s in samples]
    assert 0 < sum(labels) < len(labels)
    probs = [0.9 if y else 0.2 for y in labels]
    wrong = labels.index(1)
    probs[wrong] = 0.1  # one positive image scored below every negative one
    res, _ = evaluate(ScriptedNetwork(samples, probs), spec, seeds, batch_size=3)
    d = res.as_dict()
    assert res.n == 8
    assert d["layer_hit_rate"] == {"1": 0.5, "2": 0.25}  # learned crops only, never the frozen copies
    assert d["hit_rate"] == pytest.approx((1 + 0.5 + 0 + 0) / 4)  # A's frozen copy, A's inner, B's two
    assert d["hit_rate_any"] == 1.0
    assert d["layer_scale_mean"] == {"1": pytest.approx(40 / 448), "2": pytest.approx(10 / 448)}
    assert d["final_side_frac"] == pytest.approx((40 + 10) / 2 / 448)
    expected_random = np.mean([random_hit_probability(w, 448, s.centre) for s in samples for w in (40, 10, 40, 10)])
    assert d["random_hit_rate"] == pytest.approx(expected_random)
    assert d["accuracy"] == pytest.approx(7 / 8)
    assert d["auroc"] == pytest.approx(1 - 1 / sum(labels))  # one positive of sum(labels) loses to every negative


def test_recipe_options_translation_clamp_and_per_patch_auxiliary_loss():
    from magnet_zoo.nn.attention import attention_to_affine

    logits = torch.full((1, 56, 56), -50.0)
    logits[0, 28, 54] = 50.0  # all attention near the right edge
    assert float(attention_to_affine(logits, translation="tanh").tx) < 0.77
    assert float(attention_to_affine(logits, translation="clamp").tx) > 0.9

    torch.manual_seed(0)
    model = create_model("magnet2_tiny", final_patch_size=32, aux_pooling="per_patch").train()
    fetchers, labels, _ = make_batch(FindItSpec(image_size=256, object_frac=0.05), range(2))
    out = model(fetchers)
    assert set(out.aux_patch_logits) == {1, 2} and out.aux_patch_logits[1].shape == (2, 2)
    assert torch.allclose(out.aux_logits[1], out.aux_patch_logits[1].mean(1))
    terms = model.loss(out, labels)
    assert torch.isfinite(terms.total) and float(terms.auxiliary) > 0
    terms.total.backward()


@pytest.mark.slow
def test_training_warns_when_the_model_lacks_the_recipes_network_settings(caplog):
    """FindIt's recipe was measured on a network with the view read at 4x (and its attention settings): a model
    built without them trains something else, and says so; one built with RECIPE_CONFIG does not."""
    from magnet_zoo.tasks.train import FINDIT_RECIPE, RECIPE_CONFIG, network_mismatch, train

    assert "attention_padding" in network_mismatch(create_model("magnet2_tiny"), FINDIT_RECIPE)
    plain = create_model("magnet2_tiny", final_patch_size=32, **{**RECIPE_CONFIG, "view_oversample": 1})
    assert network_mismatch(plain, FINDIT_RECIPE) == {"view_oversample": (1, 4)}
    built = create_model("magnet2_tiny", final_patch_size=32, **RECIPE_CONFIG)
    assert network_mismatch(built, FINDIT_RECIPE) == {}
    spec = FindItSpec(image_size=224, object_frac=0.1)
    with caplog.at_level("WARNING", logger="magnet_zoo.tasks.train"):
        train(plain, spec, steps=1, batch_size=2, threads=1, log_every=0)
    assert "view_oversample=4, model has 1" in caplog.text and "RECIPE_CONFIG" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="magnet_zoo.tasks.train"):
        train(built, spec, steps=1, batch_size=2, threads=1, log_every=0)
    assert "network settings" not in caplog.text
