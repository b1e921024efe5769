"""FindIt task generation and the learn-to-look metrics (issue 7)."""

from __future__ import annotations

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
    res, kept = evaluate(model, spec, range(4), batch_size=2, keep_outputs=1)
    d = res.as_dict()
    assert res.n == 4 and len(kept) == 1
    assert 0 <= d["hit_rate"] <= 1 and 0 <= d["random_hit_rate"] <= 1
    assert set(d["layer_hit_rate"]) == {"1", "2"} and set(d["layer_scale_mean"]) == {"1", "2"}
    # Untrained, near-uniform attention: every learned crop sits at the clamp, centred.
    assert d["layer_scale_mean"]["1"] == pytest.approx(1.0, abs=0.05)


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
