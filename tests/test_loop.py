"""The one training loop: schedules, stopping rules, the best weights, and what it writes.

Runs on in-memory slides (:class:`~magnet_zoo.train.SourceData`) with the micro MagNet from conftest, so
every step takes a fraction of a second; the device is pinned to the CPU.
"""

from __future__ import annotations

import csv
import itertools
import math

import numpy as np
import pytest
import torch
from conftest import micro_magnet

from magnet_zoo.config import ConfigError
from magnet_zoo.train import SourceData, TrainConfig, fit, get_recipe
from magnet_zoo.train.schedules import lr_factor
from magnet_zoo.wsi import ArraySource


def _sources(n: int = 4) -> tuple[list[ArraySource], list[int]]:
    rng = np.random.default_rng(0)
    sources = [ArraySource(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(n)]
    return sources, [i % 2 for i in range(n)]


def _config(**changes) -> TrainConfig:
    base = {"device": "cpu", "amp": "off", "threads": 2, "progress": False, "baseline_eval": False,
            "save_every": 0, "log_every": 1, "tensorboard": False}
    return TrainConfig(**{**base, **changes})


class ScriptedValidator:
    """Returns the next of ``scores`` as the AUROC at each call (the loss falls slowly)."""

    def __init__(self, scores):
        self.scores = list(scores)
        self.calls = 0

    def __call__(self, model, **_):
        value = self.scores[min(self.calls, len(self.scores) - 1)]
        self.calls += 1
        return {"auroc": value, "accuracy": value, "loss": 1.0 - 0.01 * self.calls}


def test_lr_factor_warms_up_linearly_then_anneals_along_a_cosine():
    n, warm = 100, 0.1
    assert lr_factor(0.0, warm, "cosine", 1 / n) == pytest.approx(1 / 10)  # step 0 of a 10-step warm-up
    assert lr_factor(0.05, warm, "cosine", 1 / n) == pytest.approx(6 / 10)
    assert lr_factor(0.1, warm, "cosine", 1 / n) == pytest.approx(1.0)
    assert lr_factor(0.55, warm, "cosine", 1 / n) == pytest.approx(0.5)  # halfway through the cosine
    assert lr_factor(1.0, warm, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0.7, 0.0, "constant") == 1.0


@pytest.mark.slow
def test_steps_groups_and_learning_rates_follow_the_recipe():
    sources, labels = _sources()
    recipe = get_recipe("learn_to_look", batch_size=2, lr=1e-3, attention_lr=4e-3, warmup=0.25, steps=8)
    seen = []

    def record(loop, row):
        seen.append((row["step"], [g["lr"] for g in loop.optimizer.param_groups]))

    result = fit(micro_magnet(), SourceData(sources, labels), _config(), recipe, callbacks=[record])
    assert result.global_step == 8 and [s for s, _ in seen] == list(range(1, 9))
    for step, (att, heads) in seen:
        f = lr_factor((step - 1) / 8, 0.25, "cosine", 1 / 8)
        assert att == pytest.approx(4e-3 * f) and heads == pytest.approx(1e-3 * f)
    assert [row["step"] for row in result.log] == list(range(1, 9))
    assert all(math.isfinite(row["total"]) for row in result.log)


def test_the_loops_schedules_share_the_time_the_pretraining_phases_leave():
    import time

    from magnet_zoo.train.loop import TrainLoop

    sources, labels = _sources()
    recipe = get_recipe("learn_to_look", batch_size=2, steps=10_000, head_warmup=0.4)
    loop = TrainLoop(_config(time_limit=100.0), recipe, SourceData(sources, labels), model=micro_magnet())
    loop.elapsed, loop._segment_start = 70.0, time.perf_counter()
    assert loop.progress() == pytest.approx(0.7, abs=1e-3) and not loop.in_head_warmup()
    loop.attention_pretrain = {"seconds": 45.0}
    loop.pretrain = {"seconds": 15.0}  # 60 of the 100 s before the first step: 10 of the 40 left are used
    assert loop.phase_seconds() == 60.0
    assert loop.progress() == pytest.approx(0.25, abs=1e-3) and loop.in_head_warmup()
    loop.attention_pretrain = {"seconds": 120.0}  # the phases took the whole limit
    assert loop.progress() == 1.0


def test_time_limit_stops_the_run_and_drives_the_schedule():
    sources, labels = _sources()
    recipe = get_recipe("learn_to_look", batch_size=2, steps=10_000)
    result = fit(micro_magnet(), SourceData(sources, labels), _config(time_limit=3.0), recipe)
    assert result.stopped_by == "time_limit" and 1 <= result.global_step < 10_000
    assert result.seconds >= 3.0
    # the schedule ran on the clock: each step's rate is the schedule at the share of the 3 s used when it
    # started (about when the step before it was logged; seconds are logged to 0.1 s). Going by steps, a
    # handful of the 10 000 planned would still be deep in the linear warm-up, at a rate near zero.
    # (Steps that start in the short warm-up, where the rate climbs steeply, are not compared.)
    checked = 0
    for before, row in itertools.pairwise(result.log):
        p = min(before["seconds"] / 3.0, 1.0)
        if p < recipe.warmup + 0.05:
            continue
        expected = recipe.lr * lr_factor(p, recipe.warmup, recipe.schedule, 1 / 10_000)
        assert row["lr"] == pytest.approx(expected, abs=0.1 * recipe.lr), (before, row)
        checked += 1
    assert checked >= 1, result.log
    assert result.log[-1]["lr"] < recipe.lr


@pytest.mark.slow
def test_early_stopping_on_the_monitored_metric_and_the_best_weights_in_memory():
    sources, labels = _sources()
    recipe = get_recipe("learn_to_look", batch_size=2, steps=40, max_scale_start=None)
    validator = ScriptedValidator([0.5, 0.9, 0.7, 0.6, 0.6, 0.6])
    snapshots = {}

    def keep(loop, row):
        snapshots[row["step"]] = {k: v.clone() for k, v in loop.model.state_dict().items()}

    config = _config(eval_every=2, patience=3, monitor="auroc")
    result = fit(micro_magnet(), SourceData(sources, labels), config, recipe, validator, callbacks=[keep])
    assert result.stopped_by == "early_stopping"
    assert [row["step"] for row in result.history] == [2, 4, 6, 8, 10]  # best at 4, then 3 without progress
    assert result.best_score == 0.9
    assert all(torch.equal(result.best_state[k], snapshots[4][k]) for k in result.best_state)
    assert not all(torch.equal(result.best_state[k], snapshots[10][k]) for k in result.best_state)


@pytest.mark.slow
def test_best_is_only_chosen_once_the_anneal_is_over():
    sources, labels = _sources()
    recipe = get_recipe("learn_to_look", batch_size=2, steps=8, max_scale_start=1.0, anneal_frac=0.5)
    validator = ScriptedValidator([0.99, 0.1, 0.2, 0.3])  # the best score comes while annealing
    result = fit(micro_magnet(), SourceData(sources, labels), _config(eval_every=2), recipe, validator)
    assert [row["eligible"] for row in result.history] == [False, True, True, True]
    assert result.best_score == 0.3


@pytest.mark.slow
def test_the_best_checkpoint_holds_the_best_validations_weights_and_ties_go_to_the_lower_loss(tmp_path):
    """Validations at steps 2, 4, 6, 8, 10 score 0.6, 0.8, NaN, 0.8, 0.7 while the loss keeps falling: step 4
    is the first best, step 6 (NaN) never counts, step 8 ties step 4's AUROC with a lower loss and replaces
    it, step 10 is worse. ``checkpoints/best`` must hold step 8's weights, ``last`` step 10's."""
    from magnet_zoo.hub import load_pretrained

    sources, labels = _sources()
    recipe = get_recipe("learn_to_look", batch_size=2, steps=10, max_scale_start=None)
    validator = ScriptedValidator([0.6, 0.8, math.nan, 0.8, 0.7])
    snapshots = {}

    def keep(loop, row):
        snapshots[row["step"]] = {k: v.detach().clone() for k, v in loop.model.state_dict().items()}

    out = tmp_path / "run"
    result = fit(micro_magnet(), SourceData(sources, labels), _config(out=str(out), eval_every=2), recipe,
                 validator, callbacks=[keep])
    assert [row["step"] for row in result.history] == [2, 4, 6, 8, 10]
    assert result.best_score == 0.8 and result.best == out / "checkpoints" / "best"

    def same(folder, step):
        saved = load_pretrained(folder).state_dict()
        return all(torch.equal(saved[k], snapshots[step][k]) for k in saved)

    assert same(out / "checkpoints" / "best", 8)
    assert not same(out / "checkpoints" / "best", 4)
    assert same(out / "checkpoints" / "last", 10)


def test_metrics_csv_per_validation_and_checkpoints_with_the_recipe(tmp_path):
    import json

    sources, labels = _sources()
    recipe = get_recipe("paper", batch_size=2, steps=4)
    out = tmp_path / "run"
    config = _config(out=str(out), eval_every=2, tensorboard=True, baseline_eval=True)
    fit(micro_magnet(), SourceData(sources, labels), config, recipe, ScriptedValidator([0.5, 0.6, 0.7]))
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    assert rows[0]["train_loss"] == ""  # step 0: the untrained model
    for row in rows[1:]:  # the training loss: the mean of the enabled terms' sum over the steps since the last row
        terms = [float(row[f"train_{t}"]) for t in ("paradoxical", "auxiliary", "classifier")]
        assert float(row["train_loss"]) == pytest.approx(sum(terms)) and min(terms[1:]) > 0
    assert [float(r["val_auroc"]) for r in rows] == [0.5, 0.6, 0.7]
    saved = json.loads((out / "checkpoints" / "best" / "config.json").read_text())
    assert saved["recipe"]["name"] == "paper"
    try:
        import tensorboard  # noqa: F401
    except ImportError:  # optional: no event files, and no error
        assert not (out / "tensorboard").exists()
    else:
        assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_endless_data_needs_a_number_of_steps():
    sources, labels = _sources()
    with pytest.raises(ConfigError, match="needs a number of steps"):
        fit(micro_magnet(), SourceData(sources, labels), _config(), get_recipe("paper", batch_size=2))


def test_under_torchrun_the_default_recipe_is_refused_with_the_way_out(monkeypatch):
    """The default recipe's head warm-up, guidance and attention MIL run outside DDP's forward: two processes
    refuse it before any step, naming the recipe and the recipes that do run there."""
    import magnet_zoo.train.loop as loop_module
    from magnet_zoo.train.distributed import DistInfo

    monkeypatch.setattr(loop_module, "setup_distributed", lambda device: DistInfo(rank=0, world_size=2))
    sources, labels = _sources(2)
    model = micro_magnet(attention_tissue_only=True)
    with pytest.raises(ConfigError, match=r"'learn_to_look_mil'.*--recipe learn_to_look"):
        fit(model, SourceData(sources, labels), _config(), get_recipe(TrainConfig().recipe, steps=2))
