"""Learn-to-look experiment runner (issue 7): train and evaluate a grid of MagNet settings on FindIt.

Every run builds a small MagNet (``magnet2_tiny`` plus config overrides), trains it on fresh FindIt
images with :func:`magnet_zoo.tasks.train.train` (the one training loop, :func:`magnet_zoo.train.fit`),
evaluates it on held-out images and writes one JSON row (settings, metrics, timings) plus a Fig. 5-style
picture of a few test images with their crops.
At the end it writes all rows to ``<out>/<grid>.json`` and a markdown table to ``<out>/<grid>.md``
(per setting: median and worst seed). Every entry is a set of overrides of one base recipe, ``learn_to_look`` at
300 steps (:func:`_base`; FindIt's recipe when the grids were recorded, so a row named "recipe" is that).

    PYTHONPATH=. python benchmarks/learn_to_look.py --grid target --out benchmarks/results
    python benchmarks/learn_to_look.py --grid findit-recipe --steps 300 --parallel 3 --threads 1 --n-eval 96
    PYTHONPATH=. python benchmarks/learn_to_look.py --grid ablations --parallel 7 --threads 2

Runs go to separate processes (``--parallel``), each limited to ``--threads`` CPU threads, so a
grid on a 16-core machine runs 7 two-thread trainings at once; ``--device cuda`` trains on a GPU.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import fnmatch
import json
import logging
import math
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("learn_to_look")

RECIPE_CONFIG: dict[str, Any] = {}
"""Config overrides of the recipe on top of ``magnet2_tiny`` (filled from the trainer module)."""


RUN_KEYS = ("threads", "device", "log_every", "time_limit_s", "curriculum_start", "curriculum_frac", "eval_every",
            "eval_every_n")
"""Entries of a job's ``settings`` that are the run's, not the recipe's (everything else is a recipe field)."""


def _base():
    """The recipe every grid entry is written against: ``learn_to_look`` at 300 steps (FindIt's recipe when the
    grids were recorded; ``FINDIT_RECIPE`` has moved since, and an entry must not change with it)."""
    from magnet_zoo.train.recipe import get_recipe

    return get_recipe("learn_to_look", steps=300)


def _recipe() -> tuple[dict[str, Any], dict[str, Any]]:
    """``(network settings, trainer settings)`` of the grids' base recipe (:func:`_base`)."""
    base = _base()
    return dict(base.model_overrides), {"steps": base.steps}


def run_spec(name: str, cfg: dict[str, Any] | None = None, st: dict[str, Any] | None = None,
             task: dict[str, Any] | None = None, base_model: str = "magnet2_tiny",
             seeds: tuple[int, ...] | None = None) -> dict[str, Any]:
    """One grid entry: ``name`` plus overrides of the recipe's config, settings and the task; ``seeds``
    fixes the entry's seeds (default: the command line's ``--seeds``)."""
    rcfg, rst = _recipe()
    rcfg.update(cfg or {})
    rst.update(st or {})
    entry = {"name": name, "model": base_model, "config": rcfg, "settings": rst, "task": dict(task or {})}
    if seeds is not None:
        entry["seeds"] = list(seeds)
    return entry


def _paper() -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``paper`` recipe as a grid entry's overrides: its network settings, and its trainer fields where
    they differ from the FindIt recipe (FindIt's batch of 8 and 200-300 steps are kept)."""
    from magnet_zoo.train.recipe import get_recipe

    paper = get_recipe("paper").to_dict()
    keys = ("lr", "attention_lr", "warmup", "grad_clip", "max_scale_start", "revive_at", "jitter")
    return dict(paper["model_overrides"]), {k: paper[k] for k in keys}


def grid(name: str) -> list[dict[str, Any]]:
    """Named grids of settings (seeds are added by the caller)."""
    r = run_spec
    if name == "target":
        return [r("recipe")]
    if name == "onepct":
        return [r("recipe-1pct", task={"object_frac": 0.01})]
    if name == "search":
        return [
            r("recipe"),
            r("paper-like", cfg={"translation": "tanh"}, st={"max_scale_start": None, "curriculum_start": 1.0,
                                                            "scale_weight": 0.0, "lr": 1e-3, "attention_lr": 1e-3}),
            r("random-init", cfg={"attention_init": "random"}),
            r("no-anneal", st={"max_scale_start": None}),
            r("no-curriculum", st={"curriculum_start": 1.0}),
            r("tanh", cfg={"translation": "tanh"}),
            r("bilinear", cfg={"sampler": "bilinear"}),
            r("att-lr-1e-4", st={"attention_lr": 1e-4}),
            r("att-lr-3e-3", st={"attention_lr": 3e-3}),
            r("prior-0.3", st={"max_scale_start": None, "scale_weight": 1.0}),
            r("no-frozen", cfg={"frozen_patch": False}),
            r("no-aux-par", cfg={"loss_auxiliary": False, "loss_paradoxical": False}),
            r("patches-3-2", cfg={"patches": (3, 2)}),
            r("max-scale-0.5", cfg={"max_scale": 0.5}),
            r("temp-anneal", st={"temperature_start": 4.0}),
        ]
    if name == "cpu":
        # The final recipe (3 seeds) and one-seed ablations around it, sized for 2 CPU cores.
        return [
            r("recipe", seeds=(0, 1, 2)),
            r("no branch revival", st={"revive_at": ()}),
            r("+ jitter (0, 0.3) on layer-2 centres", st={"jitter": (0.0, 0.3)}),
            r("+ jitter 0.3 on all centres", st={"jitter": (0.3,)}),
            r("init=uniform", cfg={"attention_init": "uniform"}),
            r("sampler=bilinear", cfg={"sampler": "bilinear"}),
            r("aux_pooling=mean (no revival)", cfg={"aux_pooling": "mean"}, st={"revive_at": ()}),
            r("frozen_patch=off", cfg={"frozen_patch": False}),
            r("recipe, object 1%", task={"object_frac": 0.01}),
        ]
    if name == "fixes":
        # Issue 14 item 1 (DESIGN.md section 6): the correctness switches, together and one at a time.
        fixes = {"paradoxical_reference": "constant", "scale_bounds": "soft", "attention_padding": "replicate"}
        return [
            r("recipe + all fixes", cfg=fixes, st={"clip_per_group": True}, seeds=(0, 1, 2)),
            r("+ paradoxical_reference=constant", cfg={"paradoxical_reference": "constant"}),
            r("+ scale_bounds=soft", cfg={"scale_bounds": "soft"}),
            r("+ attention_padding=replicate", cfg={"attention_padding": "replicate"}),
            r("+ clip_per_group", st={"clip_per_group": True}),
            r("paper recipe", *_paper()),
        ]
    if name == "geometry":
        # Issue 14 item 2: fixed-frame geometry (ancestors get the gradient of the pixels the heads see),
        # and the next layer's view detached (no gradient through the attention input).
        return [
            r("recipe + geometry=frame", cfg={"geometry": "frame"}),
            r("recipe + geometry=frame, view_gradient=off", cfg={"geometry": "frame", "view_gradient": False}),
            r("recipe + all fixes + geometry=frame",
              cfg={"paradoxical_reference": "constant", "scale_bounds": "soft", "attention_padding": "replicate",
                   "geometry": "frame"}, st={"clip_per_group": True}),
        ]
    if name == "issue14":
        # Issue 14 item 4: the recipe's seeds 3 and 4; exploration on top of the four switches (3 seeds); the
        # second layer's attention starting flat (3 seeds; 3 and 4 in issue14-seeds); each switch alone (seed 1
        # first, where the switches together matter most, then seed 0); the soft bound with the flat start;
        # the switches on the 1 % object. Recorded in three invocations (docs/learn_to_look.md): issue14 without
        # the 1 % entry, stopped after the first three single switches; issue14-seeds, stopped after its first
        # three runs; issue14-last. Then the entries of issue14-centre (listed here so that one table holds
        # them all), recorded by invocations of that grid with --only / --skip.
        fixes = {"paradoxical_reference": "constant", "scale_bounds": "soft", "attention_padding": "replicate"}
        singles = [("+ paradoxical_reference=constant", {"paradoxical_reference": "constant"}, {}),
                   ("+ scale_bounds=soft", {"scale_bounds": "soft"}, {}),
                   ("+ attention_padding=replicate", {"attention_padding": "replicate"}, {}),
                   ("+ clip_per_group", {}, {"clip_per_group": True})]
        return [
            r("recipe", seeds=(3, 4)),  # seeds 0-2 of the recipe: learn_to_look_one_loop.*
            r("recipe + all fixes + explore (2 trees)", cfg=fixes, st={"clip_per_group": True, "explore_trees": 2},
              seeds=(0, 1, 2)),
            r("recipe + attention_init=(random, uniform)", cfg={"attention_init": ("random", "uniform")},
              seeds=(0, 1, 2)),
            *[r(name, cfg=cfg, st=st, seeds=(seed,)) for seed in (1, 0) for name, cfg, st in singles],
            r("recipe + scale_bounds=soft + attention_init=(random, uniform)",
              cfg={"scale_bounds": "soft", "attention_init": ("random", "uniform")}, seeds=(0, 2)),
            r("recipe + all fixes, object 1%", cfg=fixes, st={"clip_per_group": True}, task={"object_frac": 0.01},
              seeds=(0, 1)),
            *grid("issue14-centre"),
            *grid("issue14-look"),
            *grid("issue14-combine"),
            *grid("issue14-view"),
        ]
    if name == "issue14-centre":
        # Layer 1 holds the object off-centre and layer 2 learns a constant offset (docs/learn_to_look.md):
        # jitter on the layer-1 centre moves the object around in layer 2's view, so a fixed offset no
        # longer works and a box with the object at its edge loses it. And a larger scale range: the
        # learned layer-2 crop sits near max_scale (0.35 of a box of 0.1 of the image: the object's own
        # size), so any offset leaves the object's centre out. On top of the flat start.
        flat = {"attention_init": ("random", "uniform")}
        return [
            r("recipe + attention_init=(random, uniform) + layer-1 jitter 0.05", cfg=flat, st={"jitter": (0.05, 0.0)},
              seeds=(2, 4, 0)),
            r("recipe + attention_init=(random, uniform) + max_scale 0.6", cfg={**flat, "max_scale": 0.6},
              seeds=(2, 4, 0)),
            # BatchNorm's training maps (batch statistics) differ from its eval maps (running ones; layer 2 by
            # a total variation of 0.25 on the demo model): GroupNorm gives one map in both modes.
            r("recipe + attention_init=(random, uniform) + attention_norm=group",
              cfg={**flat, "attention_norm": "group"}, seeds=(2, 4, 0)),
            # A second-layer map on background gets no gradient towards the object: last-layer revival gives a
            # dead learned second-layer patch the better one's stack (at the recipe's revival points).
            r("recipe + attention_init=(random, uniform) + revive_last", cfg=flat, st={"revive_last": True},
              seeds=(2, 4, 0)),
            # The flat start on the 1 % object (the target: accuracy >= 0.9 in 3/3 seeds), and more seeds of
            # the flat start and the recipe (their entries in issue14 hold seeds 0-4).
            r("recipe + attention_init=(random, uniform), object 1%", cfg=flat, task={"object_frac": 0.01},
              seeds=(0, 1, 2)),
            r("recipe + attention_init=(random, uniform)", cfg=flat, seeds=(5, 6)),
            # The recipe's seeds 6-8 were run later (--seeds 6 7 8 --override-seeds), to pair it with the
            # confirmation seeds of issue14-combine's layer-2 jitter entry.
            r("recipe", seeds=(5, 6, 7, 8)),
        ]
    if name == "issue14-look":
        # The flat start's misses share a learned second-layer map whose support lies on background, where
        # entmax gives no gradient towards the object: exploration (2 trees sampled from the softmax, with a
        # score-function gradient for every position) on top of the flat start.
        flat = {"attention_init": ("random", "uniform")}
        return [
            r("recipe + attention_init=(random, uniform) + explore (2 trees)", cfg=flat, st={"explore_trees": 2},
              seeds=(0, 2, 4)),
            # Nothing asks layer 1 to centre the object (the failing seeds hold it at a box edge): recentring
            # pulls each first-layer centre towards its learned second-layer crop, weighted by that crop's
            # auxiliary confidence (magnet_zoo.train.recentre). This entry was recorded with the term's first
            # weight, q itself (commit 391016a); the code now weights by max(0, 2 q - 1).
            r("recipe + attention_init=(random, uniform) + recentre 1.0", cfg=flat, st={"recentre_weight": 1.0},
              seeds=(0, 2, 4, 6)),
            # Its seed 2 (and the jitter run's seed 0) lost the second-layer crop to its box's border at the
            # smallest scale: replicate padding instead of zeros, alone and with recentring (the margin weight:
            # a crop on background, at chance, pulls nothing).
            r("recipe + attention_init=(random, uniform) + replicate padding",
              cfg={**flat, "attention_padding": "replicate"}, seeds=(0, 2, 4)),
            # Seeds 0, 2 and 4 chose it (the flat start's failing seeds); 1, 3 and 5 were run to confirm it (with
            # --seeds 1 3 5 --override-seeds); two of them miss the targets (docs/learn_to_look.md).
            r("recipe + attention_init=(random, uniform) + replicate padding + recentre 1.0 (margin weight)",
              cfg={**flat, "attention_padding": "replicate"}, st={"recentre_weight": 1.0}, seeds=(0, 2, 4, 1, 3, 5)),
        ]
    if name == "issue14-combine":
        # Replicate padding + recentring misses in seeds 1 and 5 (docs/learn_to_look.md): a learned second-layer
        # crop at a fixed offset beside the object (a piece of it classifies), or on background, where it pulls
        # nothing. Three additions, chosen on those seeds: a larger scale range (at max_scale 0.35 of a box of 0.1
        # of the image the learned crop is about the object's own size, so any offset cuts the object),
        # last-layer revival (a dead learned crop gets the better one's stack) and second-layer jitter (below).
        # The larger scale range met the targets in seed 5 and nearly in seed 1 (final-crop hit 0.74); seeds 6, 7
        # and 8, then 0, 2, 3 and 4, were run afterwards to confirm it (--seeds ... --override-seeds): 5 of 9
        # meet the targets, seed 3 loses its learned crops (docs/learn_to_look.md). Last-layer revival never
        # fired in seeds 1 and 5.
        base = {"attention_init": ("random", "uniform"), "attention_padding": "replicate"}
        return [
            r("recipe + attention_init=(random, uniform) + replicate padding + recentre 1.0 + max_scale 0.6",
              cfg={**base, "max_scale": 0.6}, st={"recentre_weight": 1.0}, seeds=(1, 5, 6, 7, 8, 0, 2, 3, 4)),
            r("recipe + attention_init=(random, uniform) + replicate padding + recentre 1.0 + revive_last",
              cfg=base, st={"recentre_weight": 1.0, "revive_last": True}, seeds=(1, 5)),
            # A piece of the object classifies as well as all of it, so nothing moves a learned crop from a fixed
            # offset onto the object's centre; jitter on the second-layer centres (0.2 of the box's half side,
            # about 9 px, fading out over the first 60 %) makes a crop that only just touches the object lose
            # it, and the mean gradient is that of the loss smoothed over the jitter, lowest where the whole
            # object stays in the crop. It met the targets in both seeds that chose it (1 and 5); seeds 0, 2, 3,
            # 4, 6, 7 and 8 were run afterwards to confirm it (--seeds ... --override-seeds): 7 of 9 meet the
            # targets, seed 6 fails (0.50). It is the registered recipe learn_to_look_centred
            # (tests/test_recipes.py ties the two), not the default (docs/learn_to_look.md).
            r("recipe + attention_init=(random, uniform) + replicate padding + recentre 1.0 + layer-2 jitter 0.2",
              cfg=base, st={"recentre_weight": 1.0, "jitter": (0.0, 0.2)}, seeds=(1, 5, 0, 2, 3, 4, 6, 7, 8)),
            # The same on the 1 % object (the target: accuracy >= 0.9 in 3/3 seeds; the flat start alone stays at
            # chance there, its first layer never finding the object). It stays at chance too: the object leaves
            # no pixel in the 56 px view (benchmarks/findit_visibility.py).
            r("recipe + attention_init=(random, uniform) + replicate padding + recentre 1.0 + layer-2 jitter 0.2,"
              " object 1%", cfg=base, st={"recentre_weight": 1.0, "jitter": (0.0, 0.2)}, task={"object_frac": 0.01},
              seeds=(0, 1, 2)),
            # Both on the two seeds where the larger scale range alone misses (1: final-crop hit 0.74; 7: learned
            # layer-2 hit 0.698).
            r("recipe + attention_init=(random, uniform) + replicate padding + recentre 1.0 + max_scale 0.6"
              " + layer-2 jitter 0.2", cfg={**base, "max_scale": 0.6},
              st={"recentre_weight": 1.0, "jitter": (0.0, 0.2)}, seeds=(1, 7)),
        ]
    if name == "issue14-view":
        # The 1 % object leaves no pixel in the 56 px view (the grey filter blacks out the area average of object
        # and glass: benchmarks/findit_visibility.py). view_oversample=4 reads the view at 224 px, filters it
        # there and area-averages it to 56 px: the object leaves 1-3 dark but coloured pixels. On top of
        # learn_to_look_centred (the best-measured 3 % setting), on the 1 % object and, to check that it costs
        # nothing there, on the 3 % object (same seeds as the recipe's entry in issue14-combine).
        centred = {"attention_init": ("random", "uniform"), "attention_padding": "replicate", "view_oversample": 4}
        st = {"recentre_weight": 1.0, "jitter": (0.0, 0.2)}
        return [
            r("learn_to_look_centred + view_oversample 4, object 1%", cfg=centred, st=st, task={"object_frac": 0.01},
              seeds=(0, 1, 2)),
            r("learn_to_look_centred + view_oversample 4", cfg=centred, st=st, seeds=(0, 1, 2)),
            # The 1 % object's misses (seeds 1 and 3): both first-layer boxes sit beside the object, following it
            # from image to image, and the classifier stays at ln 2: the map responds to the object's pixel with an
            # offset, and a box that misses the object gets no gradient towards it. Two ways to give it one,
            # chosen on seeds 1 and 3, with seed 0 (found the object) as the check that nothing breaks: jitter on
            # the first-layer centres (0.2 of the view's half side, about 90 px: the size of the misses' offset and
            # of a first-layer box; fading out over the first 60 %), and the fixed-frame geometry (the gradient of
            # the pixels the heads see reaches the first-layer crop).
            r("learn_to_look_centred + view_oversample 4 + layer-1 jitter 0.2, object 1%", cfg=centred,
              st={**st, "jitter": (0.2, 0.2)}, task={"object_frac": 0.01}, seeds=(1, 3, 0)),
            r("learn_to_look_centred + view_oversample 4 + geometry frame, object 1%",
              cfg={**centred, "geometry": "frame"}, st=st, task={"object_frac": 0.01}, seeds=(1, 3, 0)),
        ]
    if name == "issue14-box":
        # The 1 % misses (seeds 1 and 3 of issue14-view) hold both first-layer boxes about a box beside the object:
        # a first-layer box held larger early (the lower scale bound annealed from 0.3 or 0.2 of the view to the
        # config's 0.1 over the first half, recipe field min_scale_start) still holds the object, so the second
        # layer can learn to find it and recentring can pull the box onto it before it shrinks. Chosen on seeds 1
        # and 3, with seed 0 (found the object) as the check that nothing breaks.
        centred = {"attention_init": ("random", "uniform"), "attention_padding": "replicate", "view_oversample": 4}
        st = {"recentre_weight": 1.0, "jitter": (0.0, 0.2)}
        return [
            r("learn_to_look_centred + view_oversample 4 + layer-1 min_scale 0.3 -> 0.1, object 1%", cfg=centred,
              st={**st, "min_scale_start": (0.3, 0.1)}, task={"object_frac": 0.01}, seeds=(1, 3, 0)),
            r("learn_to_look_centred + view_oversample 4 + layer-1 min_scale 0.2 -> 0.1, object 1%", cfg=centred,
              st={**st, "min_scale_start": (0.2, 0.1)}, task={"object_frac": 0.01}, seeds=(1, 3, 0)),
            # With the box held at 0.3 the first-layer boxes end on the object in 5 of 6 runs, but the heads stay
            # at ln 2 in four: the box reaches 0.1 (the object large enough to tell apart in the frozen patch) at
            # half-way, with the learning rate already half gone. A shorter anneal (first quarter, --steps 200), and
            # the same anneal over FindIt's own 300 steps (run with --steps 300).
            r("learn_to_look_centred + view_oversample 4 + layer-1 min_scale 0.3 -> 0.1 over 25 %, object 1%",
              cfg=centred, st={**st, "min_scale_start": (0.3, 0.1), "min_scale_frac": 0.25},
              task={"object_frac": 0.01}, seeds=(1, 3, 0)),
            r("learn_to_look_centred + view_oversample 4 + layer-1 min_scale 0.3 -> 0.1, object 1%, 300 steps",
              cfg=centred, st={**st, "min_scale_start": (0.3, 0.1)}, task={"object_frac": 0.01}, seeds=(1, 3, 0)),
            # The four settings above end with the first-layer boxes on the object in 8 of 12 runs, but the heads
            # learn in 4: at a box of 0.1 the 9 px object is 5.6 px in the frozen final patch (the 3 % object 17
            # px). A smaller final box (min_scale 0.05: 11 px), with and without the box held at 0.3 early.
            r("learn_to_look_centred + view_oversample 4 + min_scale 0.05, object 1%",
              cfg={**centred, "min_scale": 0.05}, st=st, task={"object_frac": 0.01}, seeds=(1, 3, 0)),
            r("learn_to_look_centred + view_oversample 4 + min_scale 0.05 + layer-1 min_scale 0.3 -> 0.05, object 1%",
              cfg={**centred, "min_scale": 0.05}, st={**st, "min_scale_start": (0.3, 0.1)},
              task={"object_frac": 0.01}, seeds=(1, 3, 0)),
            # FindIt's own 300 steps without the anneal (the steps alone; run with --steps 300): the heads alone,
            # given boxes on the object, need 60-120 steps to learn the 1 % task (benchmarks/findit_heads.py).
            r("learn_to_look_centred + view_oversample 4, object 1%, 300 steps", cfg=centred, st=st,
              task={"object_frac": 0.01}, seeds=(1, 3, 0)),
            # The recipe itself at the same 300 steps (run with --steps 300): its 1 % rows so far are at 200 steps.
            r("recipe, object 1%, 300 steps", task={"object_frac": 0.01}, seeds=(0, 1, 2)),
            # The min_scale 0.05 one found the object in seeds 1 and 0 (not 3): its seeds 2, 4 and 5 (all found by
            # learn_to_look_centred + view_oversample 4; run with --seeds 2 4 5 --override-seeds), and the 3 %
            # object, seeds 0-2.
            r("learn_to_look_centred + view_oversample 4 + min_scale 0.05 + layer-1 min_scale 0.3 -> 0.05",
              cfg={**centred, "min_scale": 0.05}, st={**st, "min_scale_start": (0.3, 0.1)}, seeds=(0, 1, 2)),
        ]
    if name == "findit-recipe":
        # The candidate for FindIt's recipe: learn_to_look_centred + view_oversample=4 found the 1 % object in 6 of
        # 6 seeds at FindIt's own 300 steps (issue14-box; the recipe: 0 of 3). The 3 % object at the same 300
        # steps (run with --steps 300): seeds 0-2, and 3 and 7, the two that missed the 0.8 hit rate at 200 steps;
        # then 4 and 5, to count the seeds it fails in.
        centred = {"attention_init": ("random", "uniform"), "attention_padding": "replicate", "view_oversample": 4}
        st = {"recentre_weight": 1.0, "jitter": (0.0, 0.2)}
        return [r("learn_to_look_centred + view_oversample 4, 300 steps", cfg=centred, st=st,
                  seeds=(0, 1, 2, 3, 7, 4, 5))]
    if name == "findit-guided":
        # FindIt's recipe with head guidance of the second layer (never tried on FindIt): each first-layer box
        # cut into 4 x 4 windows scored by the last layer's head, the second-layer map trained towards where
        # the head finds the evidence for the image's *own* label (guidance_evidence="label": the positive logit
        # would turn the map away from the ring in every cross image). For seed 1 (findit-recipe: its learned
        # crop on background in every image) with seeds 0 and 2 as the check that nothing breaks, then 3 and 7:
        # it revives seed 1 but kills seed 3's learned crop (0.95 -> 0.00) and halves seed 7's (1.00 -> 0.57).
        centred = {"attention_init": ("random", "uniform"), "attention_padding": "replicate", "view_oversample": 4}
        st = {"recentre_weight": 1.0, "jitter": (0.0, 0.2), "guidance_weight": 1.0, "guidance_evidence": "label",
              "guidance_grid": (4,), "guidance_slides": 4}
        return [r("learn_to_look_centred + view_oversample 4 + label-guided layer 2, 300 steps", cfg=centred, st=st,
                  seeds=(1, 0, 2, 3, 7)),
                # The same on the 1 % object (FindIt's recipe: 6 of 6 seeds), before it can become FindIt's recipe.
                r("learn_to_look_centred + view_oversample 4 + label-guided layer 2, object 1%, 300 steps", cfg=centred,
                  st=st, task={"object_frac": 0.01}, seeds=(0, 1, 2))]
    if name == "issue14-seeds":
        # The flat-start second layer and the recipe on seeds 3 and 4, then two more single switches.
        entries = {e["name"]: e for e in grid("issue14")}
        flat = dict(entries["recipe + attention_init=(random, uniform)"], seeds=[3, 4])
        return [flat, entries["recipe"], dict(entries["+ clip_per_group"], seeds=[1]),
                dict(entries["+ paradoxical_reference=constant"], seeds=[0])]
    if name == "issue14-last":
        # The recipe's fifth seed, and the two changes that lifted the learned second-layer crop most.
        entries = {e["name"]: e for e in grid("issue14")}
        both = entries["recipe + scale_bounds=soft + attention_init=(random, uniform)"]
        return [dict(entries["recipe"], seeds=[4]), both]
    if name == "explore":
        # Issue 14 item 3: sampled trees with a score-function gradient, on top of the recipe.
        return [r("recipe + explore (2 trees, 70 %)", st={"explore_trees": 2}, seeds=(0, 1, 2))]
    if name == "patches":
        return [
            r("recipe, patches (1,2)", cfg={"patches": (1, 2)}),
            r("recipe, patches (2,2)"),
        ]
    if name == "final":
        return [
            r("recipe"),
            r("aux_pooling=mean", cfg={"aux_pooling": "mean"}),
            r("attention lr 1e-3", st={"attention_lr": 1e-3}),
            r("sampler=bilinear", cfg={"sampler": "bilinear"}),
            r("translation=tanh", cfg={"translation": "tanh"}),
            r("curriculum 4x->1x", st={"curriculum_start": 4.0, "curriculum_frac": 0.5}),
            r("init=random", cfg={"attention_init": "random"}),
            r("frozen_patch=off", cfg={"frozen_patch": False}),
            r("recipe, object 1%", task={"object_frac": 0.01}),
        ]
    if name == "ablations":
        return [
            r("recipe"),
            r("sampler=bilinear", cfg={"sampler": "bilinear"}),
            r("init=random", cfg={"attention_init": "random"}),
            r("frozen_patch=off", cfg={"frozen_patch": False}),
            r("patches=(3,2)", cfg={"patches": (3, 2)}),
            r("patches=(3,2,3)", cfg={"patches": (3, 2, 3), "aux_layers": (1, 3)}),
            r("loss-paradoxical", cfg={"loss_paradoxical": False}),
            r("loss-auxiliary", cfg={"loss_auxiliary": False, "loss_paradoxical": False}),
            r("loss-classifier(aux only)", cfg={"loss_classifier": False}),
            r("translation=tanh", cfg={"translation": "tanh"}),
            r("no max_scale anneal", st={"max_scale_start": None}),
            r("scale prior instead of anneal", st={"max_scale_start": None, "scale_weight": 1.0}),
            r("temperature anneal 4->1", st={"temperature_start": 4.0}),
            r("attention lr 3e-5 (paper)", st={"attention_lr": 3e-5}),
            r("curriculum 4x->1x", st={"curriculum_start": 4.0, "curriculum_frac": 0.5}),
        ]
    raise SystemExit(f"unknown grid {name!r}")


# ------------------------------------------------------------------------------------------ one run
def picture(kept: list[Any], path: Path, image_px: int = 320) -> None:
    """Fig. 5-style sheet: each row one test image (object box green, layer-1 crops blue, final crops
    red) followed by its final patches as the classifier saw them."""
    from PIL import Image, ImageDraw

    rows = []
    for smp, out, i in kept:
        n = smp.image.shape[0]
        k = image_px / n
        img = Image.fromarray(smp.image).resize((image_px, image_px), Image.Resampling.BOX)
        draw = ImageDraw.Draw(img)
        x, y, w, h = smp.box
        draw.rectangle([x * k - 2, y * k - 2, (x + w) * k + 2, (y + h) * k + 2], outline=(0, 200, 0), width=2)
        last = max(node.layer for node in out.trees[i])
        for node in out.trees[i]:
            if node.layer == 0:
                continue
            bx, by, bw, bh = node.box
            colour = (255, 0, 0) if node.layer == last else (0, 90, 255)
            draw.rectangle([bx * k, by * k, (bx + bw) * k, (by + bh) * k], outline=colour, width=1)
        patches = out.final_patches[i].detach().float().cpu().clamp(0, 1).numpy()
        tiles = [Image.fromarray((p.transpose(1, 2, 0) * 255).astype(np.uint8)).resize((image_px // 2,) * 2)
                 for p in patches]
        row = Image.new("RGB", (image_px + len(tiles) * (image_px // 2 + 4), image_px), (255, 255, 255))
        row.paste(img, (0, 0))
        for j, t in enumerate(tiles):
            row.paste(t, (image_px + 4 + j * (image_px // 2 + 4), 0))
        rows.append(row)
    if not rows:
        return
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height + 4 for r in rows)), (255, 255, 255))
    yy = 0
    for r in rows:
        sheet.paste(r, (0, yy))
        yy += r.height + 4
    sheet.save(path)


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate one (setting, seed); returns the JSON row. Runs in a worker process."""
    import torch

    from magnet_zoo.factory import create_model
    from magnet_zoo.tasks.findit import FindItSpec, evaluate
    from magnet_zoo.tasks.train import eval_seeds, train

    label = job["name"].replace("%", "%%")
    logging.basicConfig(level=logging.INFO, format=f"[{label}/s{job['seed']}] %(message)s", force=True)
    st = dict(job["settings"])
    run = {k: st.pop(k) for k in RUN_KEYS if k in st}
    run["time_limit"] = run.pop("time_limit_s", None)
    recipe = _base().replace(**st)
    threads = run.pop("threads", 2) or 2
    device = run.pop("device", "cpu")
    torch.set_num_threads(threads)
    torch.manual_seed(job["seed"])
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in job["config"].items()}
    model = create_model(job["model"], **cfg)
    spec = FindItSpec(**job["task"])
    t0 = time.perf_counter()
    res = train(model, spec, recipe, seed=job["seed"], threads=threads, device=device, **run)
    ev, kept = evaluate(model, spec, eval_seeds(job["n_eval"]), keep_outputs=4)
    pooled = {}
    for k in job.get("eval_trees") or ():
        for temp in job.get("eval_tree_temperatures") or (1.0,):
            key = str(k) if temp == 1.0 else f"{k}@T{temp:g}"
            pooled[key] = evaluate(model, spec, eval_seeds(job["n_eval"]), trees=k, tree_seed=job["seed"],
                                   tree_temperature=temp, tree_source="softmax", tree_uniform=0.05)[0].as_dict()
        if job.get("eval_tree_entmax"):  # centres drawn from each layer's sparse map, no uniform share
            pooled[f"{k}@entmax"] = evaluate(model, spec, eval_seeds(job["n_eval"]), trees=k, tree_seed=job["seed"],
                                             tree_source="entmax", tree_uniform=0.0)[0].as_dict()
    row = {
        "name": job["name"],
        "seed": job["seed"],
        "model": job["model"],
        "config": model.config.to_dict(),
        "recipe": res.recipe,
        "run": {**run, "threads": threads, "device": device, "loop": "magnet_zoo.train.fit"},
        "task": spec.to_dict(),
        "steps_done": res.steps_done,
        "train_seconds": round(res.train_seconds, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "metrics": ev.as_dict(),
        "metrics_trees": pooled,
        "interim": res.evals,
        "final_train_loss": float(res.history[-1]["total"]) if res.history else math.nan,
        "threads": threads,
        "device": device,
    }
    if job.get("also_running"):
        row["also_running"] = job["also_running"]
    if job.get("pictures"):
        pic = Path(job["pictures"]) / f"{_slug(job['name'])}_s{job['seed']}.png"
        pic.parent.mkdir(parents=True, exist_ok=True)
        picture(kept, pic)
        row["picture"] = str(pic)
    return row


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# ------------------------------------------------------------------------------------------ tables
def _fmt(v: float, nd: int = 2) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def _pooled_median(rs: list[dict[str, Any]], k: str, key: str) -> str:
    """Median over the seeds that have it of a metric evaluated with ``k`` sampled trees."""
    return _fmt(statistics.median(r["metrics_trees"][k][key] for r in rs if k in r.get("metrics_trees", {})))


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per setting, medians over seeds and the worst seed's values."""
    by: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by.setdefault(row["name"], []).append(row)
    head = (
        "| setting | seeds | acc median (worst) | AUROC median | final-crop hit median (worst) | random-crop hit |"
        " hit per layer (learned crops) | scale per layer (mean ± sd) | final side / image | steps | train s |"
        " acc / hit with K sampled trees |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for name, rs in by.items():
        m = [r["metrics"] for r in rs]
        acc = [x["accuracy"] for x in m]
        hit = [x["hit_rate"] for x in m]
        au = [x["auroc"] for x in m]
        rnd = [x["random_hit_rate"] for x in m]
        layers = sorted(m[0]["layer_scale_mean"])
        layer_hits = ", ".join(
            _fmt(statistics.median(x["layer_hit_rate"].get(k, float("nan")) for x in m)) for k in layers
        )
        scales = ", ".join(
            f"{statistics.median(x['layer_scale_mean'][k] for x in m):.2f}±"
            f"{statistics.median(x['layer_scale_std'][k] for x in m):.2f}"
            for k in layers
        )
        side = statistics.median(x["final_side_frac"] for x in m)
        ks = sorted({k for r in rs for k in r.get("metrics_trees") or {}}, key=lambda k: (int(k.split("@")[0]), k))
        pooled = "; ".join(
            f"K={k.replace('@', ', ')}: {_pooled_median(rs, k, 'accuracy')} / {_pooled_median(rs, k, 'hit_rate')}"
            for k in ks
        ) or "-"
        lines.append(
            f"| {name} | {len(rs)} | {_fmt(statistics.median(acc))} ({_fmt(min(acc))}) |"
            f" {_fmt(statistics.median(au))} |"
            f" {_fmt(statistics.median(hit))} ({_fmt(min(hit))}) | {_fmt(statistics.median(rnd), 3)} |"
            f" {layer_hits} | {scales} | {side:.3f} |"
            f" {int(statistics.median(r['steps_done'] for r in rs))} |"
            f" {int(statistics.median(r['train_seconds'] for r in rs))} | {pooled} |"
        )
    return head + "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="target",
                    help="target | onepct | cpu | fixes | geometry | issue14 | issue14-seeds | issue14-last"
                         " | issue14-centre | issue14-look | issue14-combine | issue14-view | issue14-box"
                         " | findit-recipe | findit-guided | explore | search | final | ablations | patches")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--override-seeds", action="store_true",
                    help="use --seeds for every entry, also those that fix their own seeds")
    ap.add_argument("--only", default="*", help="shell pattern on setting names")
    ap.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                    help="leave out the settings whose name matches this shell pattern (repeatable)")
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds of training per run")
    ap.add_argument("--n-eval", type=int, default=128)
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default=None, help="file stem (default learn_to_look_<grid>)")
    ap.add_argument("--no-pictures", action="store_true")
    ap.add_argument("--eval-trees", type=int, nargs="*", default=[],
                    help="also evaluate each run with K sampled trees pooled, for each K given")
    ap.add_argument("--eval-tree-temperatures", type=float, nargs="*", default=[1.0],
                    help="the sampling policy's softmax temperatures for --eval-trees (default 1)")
    ap.add_argument("--eval-tree-entmax", action="store_true",
                    help="with --eval-trees, also draw the trees' centres from each layer's sparse entmax map"
                         " (no uniform share) instead of the softmax")
    ap.add_argument("--also-running", default=None,
                    help="what else shares the machine, written into every row (the timings depend on it)")
    ap.add_argument("--tables-only", action="store_true",
                    help="train nothing: rebuild <tag>.json and <tag>.md from the runs already in <tag>.jsonl")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.tag or f"learn_to_look_{args.grid}"
    jobs = []
    for entry in grid(args.grid):
        if not fnmatch.fnmatch(entry["name"], args.only) or any(fnmatch.fnmatch(entry["name"], p) for p in args.skip):
            continue
        for seed in (args.seeds if args.override_seeds else entry.get("seeds", args.seeds)):
            job = json.loads(json.dumps(entry))
            job["seed"] = seed
            job["n_eval"] = args.n_eval
            job["settings"]["threads"] = args.threads
            job["settings"]["device"] = args.device
            job["settings"]["log_every"] = 20  # each row: the mean over its 20 steps
            if args.steps is not None:
                job["settings"]["steps"] = args.steps
            if args.time_limit is not None:
                job["settings"]["time_limit_s"] = args.time_limit
            job["pictures"] = None if args.no_pictures else str(out / f"{stem}_pictures")
            job["eval_trees"] = list(args.eval_trees)
            job["eval_tree_temperatures"] = list(args.eval_tree_temperatures)
            job["eval_tree_entmax"] = args.eval_tree_entmax
            job["also_running"] = args.also_running
            jobs.append(job)
    rows: list[dict[str, Any]] = []
    jsonl = out / f"{stem}.jsonl"
    if args.tables_only:
        if not jsonl.is_file():
            raise SystemExit(f"{jsonl}: no runs to tabulate (--tables-only reads the rows a grid appended there)")
        jobs = []
        rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    logger.info("%d runs, %d at a time", len(jobs), args.parallel)
    with cf.ProcessPoolExecutor(max_workers=args.parallel, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(run_one, j): j for j in jobs}
        for fut in cf.as_completed(futures):
            job = futures[fut]
            try:
                row = fut.result()
            except Exception:  # a failed run is reported and the grid goes on
                logger.exception("run %s seed %s failed", job["name"], job["seed"])
                continue
            rows.append(row)
            with jsonl.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            m = row["metrics"]
            logger.info(
                "%s seed %d: acc %.3f hit %.3f (random %.4f) layer hits %s scales %s in %.0fs",
                row["name"], row["seed"], m["accuracy"], m["hit_rate"], m["random_hit_rate"],
                m["layer_hit_rate"], m["layer_scale_mean"], row["train_seconds"],
            )
    order: dict[str, int] = {}
    for k, e in enumerate(grid(args.grid)):
        order.setdefault(e["name"], k)  # a setting listed again (more seeds) keeps its first place
    rows.sort(key=lambda r: (order.get(r["name"], 99), r["seed"]))
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    (out / f"{stem}.md").write_text(table(rows))
    sys.stdout.write(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
