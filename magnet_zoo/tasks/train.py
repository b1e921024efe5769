"""Train a MagNet on FindIt through the one training loop (:mod:`magnet_zoo.train.loop`).

FindIt is data, not a loop: :class:`FindItData` draws fresh images every step (seeds
``seed * 10**6 + micro_batch_index * batch + i``; an optional curriculum on object size starts the object
``curriculum_start`` times larger and shrinks it to the task's size over the first ``curriculum_frac`` of
training), and :class:`FindItValidator` scores the network on a disjoint, fixed set of held-out images
(accuracy, AUROC, final-crop hit). The recipe is :data:`FINDIT_RECIPE`: ``learn_to_look_centred`` with the
first view read at 4x (``view_oversample=4``), 300 steps.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from magnet_zoo.nn.magnet import MagNet
from magnet_zoo.tasks.findit import EvalResult, FindItSpec, evaluate, make_fetcher, make_image
from magnet_zoo.train.loop import fit
from magnet_zoo.train.recipe import Recipe, get_recipe
from magnet_zoo.train.schedules import cosine
from magnet_zoo.train.settings import TrainConfig
from magnet_zoo.train.sources import FetcherBatch

logger = logging.getLogger(__name__)

EVAL_SEED_BASE = 7_000_000_000
"""Evaluation images use seeds from here on; training seeds stay far below."""

FINDIT_RECIPE: Recipe = get_recipe("learn_to_look_centred", steps=300, model_overrides={"view_oversample": 4})
"""FindIt's recipe: ``learn_to_look_centred`` with the 56 px view read at 224 px and area-averaged
(``view_oversample=4``: a 1 % object otherwise leaves no pixel in it), at FindIt's length (300 steps of 8 images).
Measured (``benchmarks/learn_to_look.py``, grids ``issue14-box`` and ``findit-recipe``, 896 px, 96 test images,
``magnet2_tiny``): the 1 % object classified in 6 of 6 seeds (accuracy 0.99-1.00; ``learn_to_look``: 0.48-0.51 in
3 of 3); the 3 % object in 7 of 7 (accuracy 1.00), its final crops on the object in 0.50-1.00 of the images (the
learned second-layer crop dead in seed 1, reading the object's edge in seed 5). Attention MIL (the default
recipe's) does not apply where both classes carry an object. The models these numbers come from were built with
:data:`RECIPE_CONFIG`."""
RECIPE_CONFIG: dict[str, Any] = dict(FINDIT_RECIPE.model_overrides)
"""The recipe's network settings (on top of ``magnet2_tiny``)."""


def eval_seeds(n: int, offset: int = 0) -> list[int]:
    return [EVAL_SEED_BASE + offset + i for i in range(n)]


class FindItData:
    """FindIt images drawn per micro-batch: endless training data for the loop."""

    def __init__(self, spec: FindItSpec, *, curriculum_start: float = 1.0, curriculum_frac: float = 0.5) -> None:
        self.spec = spec
        self.curriculum_start = curriculum_start
        self.curriculum_frac = curriculum_frac

    def setup(self, model_config: Any, micro: int, info: Any, seed: int, augment: bool, total_steps: int,
              accumulation: int) -> None:
        self.micro, self.seed, self.total, self.accum = micro, seed, max(total_steps, 1), accumulation
        self.rank, self.world = info.rank, info.world_size

    def micro_batches_per_epoch(self) -> None:
        return None

    def samples_in_epoch(self) -> None:
        return None

    def spec_at(self, step: int) -> FindItSpec:
        if self.curriculum_start == 1.0:
            return self.spec
        mult = cosine(step / max(self.total * self.curriculum_frac, 1e-9), self.curriculum_start, 1.0)
        return self.spec.replace(object_frac=min(self.spec.object_frac * mult, 0.4))

    def batches(self, epoch: int, start: int) -> Iterator[FetcherBatch]:
        index = start
        while True:
            spec = self.spec_at(index // self.accum)
            base = self.seed * 10**6 + (index * self.world + self.rank) * self.micro
            samples = [make_image(spec, base + i) for i in range(self.micro)]
            makers = [_maker(s) for s in samples]
            yield FetcherBatch(makers, torch.tensor([float(s.label) for s in samples]), samples)
            index += 1


def _maker(sample: Any) -> Any:
    return lambda grey: make_fetcher(sample, grey)


class FindItValidator:
    """Accuracy, AUROC and where the crops land on ``n`` held-out FindIt images."""

    def __init__(self, spec: FindItSpec, n: int = 32, offset: int = 10**6) -> None:
        self.spec, self.seeds = spec, eval_seeds(n, offset)

    def __call__(self, model: MagNet, **_: Any) -> dict[str, Any]:
        ev, _ = evaluate(model, self.spec, self.seeds)
        d = ev.as_dict()
        return {k: v for k, v in d.items() if isinstance(v, int | float) and not isinstance(v, bool)}


@dataclass
class FindItResult:
    steps_done: int
    train_seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    """Training-loss rows (every ``log_every`` steps)."""
    evals: list[dict[str, Any]] = field(default_factory=list)
    """Interim validations on held-out images (``eval_every``)."""
    revived: list[dict[str, Any]] = field(default_factory=list)
    recipe: dict[str, Any] = field(default_factory=dict)


def network_mismatch(model: MagNet, recipe: Recipe) -> dict[str, tuple[Any, Any]]:
    """The recipe's network settings that ``model`` was built without: ``{field: (model's, recipe's)}``."""
    out = {}
    for key, wanted in recipe.model_overrides.items():
        have = getattr(model.config, key)
        if json.loads(json.dumps(have)) != json.loads(json.dumps(wanted)):
            out[key] = (have, wanted)
    return out


def train(
    model: MagNet,
    spec: FindItSpec,
    recipe: Recipe | str = FINDIT_RECIPE,
    *,
    seed: int = 0,
    threads: int | None = 2,
    device: str = "cpu",
    curriculum_start: float = 1.0,
    curriculum_frac: float = 0.5,
    time_limit: float | None = None,
    eval_every: int = 0,
    eval_every_n: int = 32,
    log_every: int = 10,
    progress: bool = False,
    **recipe_overrides: Any,
) -> FindItResult:
    """Train ``model`` on FindIt images of ``spec`` with ``recipe`` (plus single-field overrides)."""
    recipe = get_recipe(recipe, **recipe_overrides)
    mismatch = network_mismatch(model, recipe)
    if mismatch:
        logger.warning(
            "the model was built without the network settings of recipe %r (%s); the recipe's FindIt figures are "
            "for a model built with them: create_model(name, **recipe.model_overrides), or RECIPE_CONFIG for FindIt's",
            recipe.name, ", ".join(f"{k}={w!r}, model has {h!r}" for k, (h, w) in mismatch.items()))
    config = TrainConfig(model="findit", seed=seed,
                         threads=threads, device=device, time_limit=time_limit, eval_every=eval_every,
                         baseline_eval=False, log_every=log_every, progress=progress, amp="off", save_every=0)
    data = FindItData(spec, curriculum_start=curriculum_start, curriculum_frac=curriculum_frac)
    validator = FindItValidator(spec, eval_every_n) if eval_every else None
    torch.manual_seed(seed)
    res = fit(model, data, config, recipe, validator)
    evals = [{"step": r["step"], **{k[4:]: v for k, v in r.items() if k.startswith("val_")}} for r in res.history]
    return FindItResult(res.global_step, res.seconds, res.log, evals, res.revived, res.recipe)


def train_and_evaluate(model: MagNet, spec: FindItSpec, recipe: Recipe | str = FINDIT_RECIPE, n_eval: int = 128,
                       **kwargs: Any) -> tuple[FindItResult, EvalResult]:
    """Train, then evaluate on ``n_eval`` held-out images."""
    res = train(model, spec, recipe, **kwargs)
    ev, _ = evaluate(model, spec, eval_seeds(n_eval))
    return res, ev


__all__ = ["FINDIT_RECIPE", "RECIPE_CONFIG", "FindItData", "FindItResult", "FindItValidator", "eval_seeds",
           "network_mismatch", "train", "train_and_evaluate"]
