"""Edges of the training loop's step and resume: a crash inside a gradient-accumulation window, gradient
clipping, the learning-rate floor ``min_lr``, and the AMP gradient scaler's state.

Runs on in-memory slides with the micro MagNet from conftest, pinned to the CPU; every file goes to
``tmp_path``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import micro_magnet

from magnet_zoo.train import SourceData, TrainConfig, get_recipe
from magnet_zoo.train.checkpointing import load_training_state, save_training_state
from magnet_zoo.train.loop import TrainLoop, clip_gradients
from magnet_zoo.train.schedules import lr_factor
from magnet_zoo.wsi import ArraySource


class Crash(RuntimeError):
    """Stands for the process dying."""


class CrashingData(SourceData):
    """In-memory slides that 'crash' when asked for micro-batch number ``crash_after`` (counted over the run)."""

    def __init__(self, sources, labels, crash_after: int | None = None) -> None:
        super().__init__(sources, labels)
        self.crash_after = crash_after
        self.served = 0

    def batches(self, epoch, start):
        for batch in super().batches(epoch, start):
            if self.crash_after is not None and self.served >= self.crash_after:
                raise Crash(f"killed before micro-batch {self.served}")
            self.served += 1
            yield batch


def _sources(n: int = 6) -> tuple[list[ArraySource], list[int]]:
    rng = np.random.default_rng(0)
    return [ArraySource(rng.integers(0, 255, (192, 192, 3), dtype=np.uint8)) for _ in range(n)], [
        i % 2 for i in range(n)
    ]


def _config(**changes) -> TrainConfig:
    base = {"device": "cpu", "amp": "off", "threads": 2, "progress": False, "baseline_eval": False,
            "save_every": 0, "log_every": 1, "tensorboard": False}
    return TrainConfig(**{**base, **changes})


def _loop(recipe, config, data=None) -> TrainLoop:
    sources, labels = _sources()
    return TrainLoop(config, recipe, data if data is not None else SourceData(sources, labels), model=micro_magnet())


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- a crash inside an accumulation window
@pytest.mark.slow
def test_a_crash_inside_an_accumulation_window_resumes_to_the_uninterrupted_weights(tmp_path):
    """Batches of 6 in micro-batches of 2 (3 per step), crash after the first micro-batch of step 3: the
    resumed run redoes step 3 from its first micro-batch (the partial gradient died with the process) and
    ends with exactly the weights of a run never interrupted. Jitter and clipping are on, so the restored
    RNG and the clipped step both matter."""
    sources, labels = _sources()
    recipe = get_recipe("learn_to_look", batch_size=6, steps=4, jitter=(0.05,), revive_at=())
    common = {"micro_batch": 2, "save_every": 1}
    reference = _loop(recipe, _config(out=str(tmp_path / "ref"), **common)).run()
    assert reference.global_step == 4

    run = tmp_path / "crashed"
    crashing = CrashingData(sources, labels, crash_after=2 * 3 + 1)
    with pytest.raises(Crash):
        _loop(recipe, _config(out=str(run), **common), crashing).run()
    saved = load_training_state(run / "checkpoints" / "state")
    assert saved["global_step"] == 2 and saved["step_in_epoch"] == 2  # the last complete step

    resumed_data = CrashingData(sources, labels)
    resumed = _loop(recipe, _config(out=str(run), resume=True, **common), resumed_data).run()
    assert resumed.global_step == 4
    assert resumed_data.served == 2 * 3  # steps 3 and 4, from step 3's first micro-batch
    ref, got = _state(reference.model), _state(resumed.model)
    different = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not different, different[:5]
    assert [r["total"] for r in resumed.log] == [r["total"] for r in reference.log]


# --------------------------------------------------------------------------- gradient clipping
def test_clip_gradients_clips_the_global_norm_or_each_groups():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=1.0)

    def set_grads():
        a.grad = torch.tensor([3.0, 4.0])  # norm 5
        b.grad = torch.tensor([12.0])  # norm 12; together 13

    set_grads()
    assert clip_gradients(opt, 1.0) == [pytest.approx(13.0)]
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 4.0]) / 13)
    torch.testing.assert_close(b.grad, torch.tensor([12.0]) / 13)
    set_grads()
    assert clip_gradients(opt, 1.0, per_group=True) == [pytest.approx(5.0), pytest.approx(12.0)]
    torch.testing.assert_close(a.grad, torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(b.grad, torch.tensor([1.0]))
    set_grads()
    assert clip_gradients(opt, 100.0) == [pytest.approx(13.0)]
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 4.0]))  # under the bound: unchanged


def _record_step_norms(loop: TrainLoop) -> list[list[float]]:
    """Per optimizer step, the gradient norm of each parameter group as the optimizer sees it."""
    seen: list[list[float]] = []
    step = loop.optimizer.step

    def recording_step(*args, **kwargs):
        norms = []
        for group in loop.optimizer.param_groups:
            grads = [p.grad.detach().flatten() for p in group["params"] if p.grad is not None]
            norms.append(float(torch.cat(grads).norm()) if grads else 0.0)
        seen.append(norms)
        return step(*args, **kwargs)

    loop.optimizer.step = recording_step
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("per_group", [False, True])
def test_the_loop_steps_with_clipped_gradients(per_group):
    clip = 1e-3  # far below the micro MagNet's gradient norms
    recipe = get_recipe("learn_to_look", batch_size=2, steps=3, grad_clip=clip, clip_per_group=per_group)
    loop = _loop(recipe, _config())
    seen = _record_step_norms(loop)
    loop.run()
    assert len(seen) == 3
    for norms in seen:
        if per_group:
            assert all(n == pytest.approx(clip, rel=1e-3) for n in norms), norms
        else:
            assert math.hypot(*norms) == pytest.approx(clip, rel=1e-3), norms
    unclipped = _loop(get_recipe("learn_to_look", batch_size=2, steps=3, grad_clip=None), _config())
    free = _record_step_norms(unclipped)
    unclipped.run()
    assert min(math.hypot(*n) for n in free) > 100 * clip  # so the bound above really did clip


# --------------------------------------------------------------------------- min_lr
def test_min_lr_is_the_floor_of_the_cosine_and_never_raises_a_smaller_rate():
    steps = 5
    recipe = get_recipe("learn_to_look", batch_size=2, steps=steps, lr=1e-3, attention_lr=2e-4, min_lr=5e-4,
                        warmup=0.0)
    seen = []

    def record(loop, row):
        seen.append([g["lr"] for g in loop.optimizer.param_groups])

    sources, labels = _sources()
    loop = TrainLoop(_config(), recipe, SourceData(sources, labels), model=micro_magnet(), callbacks=[record])
    loop.run()
    assert len(seen) == steps
    for step, (attention, heads) in enumerate(seen):
        f = lr_factor(step / steps, 0.0, "cosine", 1 / steps)
        assert heads == pytest.approx(5e-4 + (1e-3 - 5e-4) * f)
        assert attention == pytest.approx(2e-4)  # a base rate under the floor stays where it is
    assert seen[-1][1] < 0.6e-3 and seen[-1][1] > 5e-4  # near the floor at the end, not at zero


# --------------------------------------------------------------------------- the AMP gradient scaler
def test_gradient_scaler_state_round_trips_through_the_training_state(tmp_path):
    """``GradScaler`` is only enabled for float16 on CUDA in the loop; its state (scale, growth tracker,
    factors) is plain numbers, and it must survive the state files. Exercised with a CPU scaler."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**7, growth_interval=3, growth_factor=4.0)
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([param], lr=0.1)
    for _ in range(2):  # two finite steps: growth tracker 2, scale unchanged
        scaler.scale(param.sum()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    saved = scaler.state_dict()
    assert saved["_growth_tracker"] == 2 and saved["scale"] == 2.0**7
    save_training_state(tmp_path / "state", {"scaler": saved})
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(load_training_state(tmp_path / "state")["scaler"])
    assert restored.state_dict() == saved
    # one more step: the restored scaler grows on schedule, exactly as the original does
    for s in (scaler, restored):
        s.scale(param.sum()).backward()
        s.step(opt)
        s.update()
        opt.zero_grad()
    assert restored.get_scale() == scaler.get_scale() == 2.0**7 * 4.0


@pytest.mark.slow
def test_a_resumed_run_restores_the_gradient_scaler(tmp_path, monkeypatch):
    """The loop's scaler is off on the CPU; replace it by an enabled CPU scaler whose scale doubles every
    step. A run crashed after step 2 and resumed must continue from the saved scale (2^12 after 2 steps),
    not from a fresh one, and end where an uninterrupted run ends (2^14 after 4)."""
    real = torch.amp.GradScaler

    def enabled_scaler(device, enabled=True, **_):
        return real("cpu", init_scale=2.0**10, growth_interval=1, enabled=True)

    monkeypatch.setattr(torch.amp, "GradScaler", enabled_scaler)
    sources, labels = _sources()
    recipe = get_recipe("learn_to_look", batch_size=2, steps=4, revive_at=())
    reference = _loop(recipe, _config(out=str(tmp_path / "ref"), save_every=1))
    reference.run()
    assert reference.scaler.get_scale() == 2.0**14

    run = tmp_path / "crashed"
    with pytest.raises(Crash):
        _loop(recipe, _config(out=str(run), save_every=1), CrashingData(sources, labels, crash_after=2)).run()
    assert load_training_state(run / "checkpoints" / "state")["scaler"]["scale"] == 2.0**12
    resumed = _loop(recipe, _config(out=str(run), save_every=1, resume=True), CrashingData(sources, labels))
    assert resumed.scaler.get_scale() == 2.0**12
    result = resumed.run()
    assert resumed.scaler.get_scale() == reference.scaler.get_scale()
    ref, got = _state(reference.model), _state(result.model)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
