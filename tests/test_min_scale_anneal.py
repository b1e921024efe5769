"""The recipe's lower-scale-bound anneal (``min_scale_start``): a first-layer box held large early."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import micro_magnet

from magnet_zoo.config import ConfigError
from magnet_zoo.factory import create_model
from magnet_zoo.train import Recipe, SourceData, TrainConfig, fit, get_recipe
from magnet_zoo.train.schedules import anneals_done, apply_final, apply_progress
from magnet_zoo.wsi import ArraySource


def _model():
    torch.manual_seed(0)
    return create_model("magnet2_tiny", **get_recipe("learn_to_look").model_overrides)  # min_scale 0.1, max_scale 0.35


def test_the_first_layers_lower_bound_falls_from_its_start_to_the_configs_and_the_others_stay():
    model = _model()
    recipe = get_recipe("learn_to_look", max_scale_start=None, min_scale_start=(0.3, 0.1), min_scale_frac=0.5)
    seen = []
    for progress in (0.0, 0.125, 0.25, 0.5, 0.9):
        apply_progress(model, recipe, progress)
        seen.append([layer.min_scale for layer in model.layers])
    first = [row[0] for row in seen]
    assert first[0] == pytest.approx(0.3)
    assert first[2] == pytest.approx(0.2)  # half-way along the cosine
    assert first[0] > first[1] > first[2] > first[3]
    assert first[3] == pytest.approx(0.1) and first[4] == pytest.approx(0.1)
    assert all(row[1] == pytest.approx(0.1) for row in seen)  # the second layer's entry is its floor
    apply_progress(model, recipe, 0.0)
    apply_final(model)
    assert [layer.min_scale for layer in model.layers] == [0.1, 0.1]


def test_the_last_entry_repeats_and_the_bound_never_exceeds_the_upper_one():
    model = _model()
    recipe = get_recipe("learn_to_look", max_scale_start=None, min_scale_start=(0.5,))
    apply_progress(model, recipe, 0.0)
    # 0.5 asked, but the upper bound is the config's 0.35 (no max_scale anneal): the lower one stops there.
    assert [layer.min_scale for layer in model.layers] == [pytest.approx(0.35)] * 2
    with_max = get_recipe("learn_to_look", max_scale_start=1.0, min_scale_start=(0.5,))
    apply_progress(model, with_max, 0.0)
    assert [layer.min_scale for layer in model.layers] == [pytest.approx(0.5)] * 2


def test_the_crops_follow_the_annealed_bound():
    model = _model()
    images = torch.rand(4, 1, 3, 56, 56)
    layer = model.layers[0]
    layer.eval()
    real = layer.attention_logits

    def sharp(x):  # one peak per map: the spread alone gives the smallest crops
        logits = real(x)
        peak = torch.zeros_like(logits)
        peak[..., 20, 30] = 50.0
        return peak

    layer.attention_logits = sharp
    apply_progress(model, get_recipe("learn_to_look", min_scale_start=(0.3, 0.1)), 0.0)
    early = layer(images).scale
    apply_final(model)
    late = layer(images).scale
    assert early.min() >= 0.3 - 1e-6
    torch.testing.assert_close(late, torch.full_like(late, 0.1))  # without the anneal: the config's floor


def test_the_best_checkpoint_waits_for_the_lower_bound_anneal():
    recipe = get_recipe("learn_to_look", max_scale_start=None, min_scale_start=(0.3,), min_scale_frac=0.5)
    assert not anneals_done(recipe, 0.49) and anneals_done(recipe, 0.5)
    assert anneals_done(get_recipe("learn_to_look", max_scale_start=None), 0.0)

    rng = np.random.default_rng(0)
    sources = [ArraySource(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(4)]
    config = TrainConfig(device="cpu", amp="off", threads=2, progress=False, baseline_eval=False, save_every=0,
                         log_every=1, tensorboard=False, eval_every=2)

    class Scores:
        calls = 0

        def __call__(self, model, **_):
            self.calls += 1
            first = model.layers[0]
            # validation runs with the final bounds whatever the training progress
            assert math.isclose(first.min_scale, model.config.min_scale)
            value = [0.99, 0.1, 0.2, 0.3][min(self.calls - 1, 3)]
            return {"auroc": value, "accuracy": value, "loss": 1.0}

    result = fit(micro_magnet(), SourceData(sources, [0, 1, 0, 1]), config, recipe.replace(batch_size=2, steps=8),
                 Scores())
    assert [row["eligible"] for row in result.history] == [False, True, True, True]
    assert result.best_score == 0.3


@pytest.mark.parametrize("changes", [{"min_scale_start": (0.0,)}, {"min_scale_start": (0.3, 1.5)},
                                     {"min_scale_frac": 1.5}, {"min_scale_frac": -0.1}])
def test_bad_values_are_refused(changes):
    with pytest.raises(ConfigError):
        get_recipe("learn_to_look", **changes)


def test_the_fields_survive_a_round_trip_through_json():
    recipe = get_recipe("learn_to_look", min_scale_start=[0.3, 0.1], min_scale_frac=0.6)
    again = Recipe.from_dict(recipe.to_dict())
    assert again == recipe and again.min_scale_start == (0.3, 0.1)
