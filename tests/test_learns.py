"""The MagNet learns where to look from the label alone (issue 7 done-criterion 3, issue 2 test 5).

Tiny FindIt settings trained with the learn-to-look recipe (``magnet_zoo.tasks.train.RECIPE_*``) on
2 CPU threads. The assertions compare the final crops' hit rate (share of the classifier's crops whose
box contains the object centre) with the same network at initialisation and with randomly placed
crops of the same sizes; they fail if attention does not move onto the object.

Measured with the recipe (random attention init, scale clamped to [0.1, 0.35] with the upper bound
annealed from 1.0, clamp translation, per-patch auxiliary loss; docs/learn_to_look.md), 2 CPU
threads on a shared machine: tiny setting, 150 steps, 81 s: hit rate 0.34 vs 0.11 before training and
0.04 for random crops, accuracy 0.98; 1.8 % object, 200 steps, 240 s: hit rate 0.42 vs 0.10 and 0.006,
accuracy 1.00.
"""

from __future__ import annotations

import time

import pytest
import torch

from magnet_zoo.factory import create_model
from magnet_zoo.tasks.findit import FindItSpec, evaluate
from magnet_zoo.tasks.train import RECIPE_CONFIG, eval_seeds, train


def _train_and_measure(spec: FindItSpec, steps: int, n_eval: int = 48, **config: object) -> dict[str, float]:
    torch.manual_seed(0)
    model = create_model("magnet2_tiny", **{**RECIPE_CONFIG, **config})
    before, _ = evaluate(model, spec, eval_seeds(n_eval))
    started = time.perf_counter()
    train(model, spec, steps=steps, seed=0, threads=2, log_every=0)
    seconds = time.perf_counter() - started
    after, _ = evaluate(model, spec, eval_seeds(n_eval))
    return {
        "hit_before": before.hit_rate,
        "hit_after": after.hit_rate,
        "random": after.random_hit_rate,
        "any_after": after.hit_rate_any,
        "accuracy": after.accuracy,
        "seconds": seconds,
    }


@pytest.mark.slow
def test_attention_learns_to_look_tiny_setting():
    """448 px images, object 5% of the side (22 px: a 3 px blob in the 56 px overview)."""
    spec = FindItSpec(image_size=448, object_frac=0.05)
    r = _train_and_measure(spec, steps=150, final_patch_size=32)
    # Clear margins: several times random placement and well above the untrained network.
    assert r["hit_after"] > 3 * r["random"] + 0.05, r
    assert r["hit_after"] > r["hit_before"] + 0.15, r
    assert r["any_after"] > 0.5, r


@pytest.mark.slow
def test_attention_learns_small_object_under_two_percent():
    """Issue 2 test 5: 896 px images, object 1.8% of the side at a random place, a few hundred steps."""
    spec = FindItSpec(image_size=896, object_frac=0.018)
    r = _train_and_measure(spec, steps=200)
    assert r["hit_after"] > 3 * r["random"] + 0.05, r
    assert r["hit_after"] > r["hit_before"] + 0.15, r
