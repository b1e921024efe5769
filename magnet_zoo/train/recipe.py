"""Training recipes: named, serialisable data that says *how* a MagNet learns.

A recipe holds everything that shapes learning — the network settings it trains (``model_overrides``),
the optimiser and its parameter groups, the learning-rate schedule, the anneals of the scale bound and
the entmax temperature, crop jitter, branch revival, head warm-up, head-guided attention and head
pre-training. The one training loop (:mod:`magnet_zoo.train.loop`) reads it; nothing else does. *What*
is trained on (slides from a CSV, FindIt images, SynthMets sets), for how long on which machine, and
where files go are the run's settings (:class:`~magnet_zoo.train.settings.TrainConfig`), not the recipe's.

>>> from magnet_zoo.train.recipe import get_recipe, list_recipes
>>> list_recipes()
['learn_to_look', 'learn_to_look_centred', 'paper']
>>> get_recipe("paper", lr=1e-4).lr
0.0001

Every run writes its resolved recipe into ``train_config.json``, each checkpoint's ``config.json`` and
its model card, so a checkpoint says how it was trained.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from magnet_zoo.config import ConfigError, MagNetConfig

PRETRAIN_AUGMENTS = ("d4", "flips")
"""The attention pre-training phase's orientation sets (``Recipe.attention_pretrain_augment``)."""
ATTENTION_MIL_EDGES = ("pool", "negative", "below")
"""How attention MIL treats the tissue's edge (``Recipe.attention_mil_edges``)."""
RESTART_FROM = ("fresh", "continue")
"""What the phase starts again from when its loss ends on the plateau (``Recipe.attention_pretrain_restart_from``)."""
GUIDANCE_EVIDENCE = ("positive", "label")
"""What a window's score stands for in head guidance (``Recipe.guidance_evidence``)."""

SCHEDULES = ("cosine", "constant")
RECENTRE_ON = ("all", "positive")


class UnknownRecipeError(ConfigError):
    """A recipe name or a recipe field that does not exist; the message lists what does."""


@dataclass(frozen=True)
class Recipe:
    """How to train a MagNet. Fractions (``warmup``, ``anneal_frac``, ...) are shares of the planned
    training (optimizer steps done / steps planned, or the share of ``--time-limit`` used, whichever is
    larger), so a recipe means the same for a 300-step FindIt run and a 200-epoch cohort."""

    name: str = "custom"
    summary: str = ""
    model_overrides: Mapping[str, Any] = field(default_factory=dict)
    """:class:`~magnet_zoo.config.MagNetConfig` fields the recipe trains with (shape-preserving: they
    apply to a checkpoint being fine-tuned too); the run's own ``--model-override`` wins over them."""

    # ---- length
    epochs: int = 200
    """Passes over the training slides (ignored when ``steps`` is set, or for endless data)."""
    steps: int | None = None
    """Optimizer steps; overrides ``epochs``. Endless data (FindIt) needs it."""

    # ---- optimiser and schedule
    lr: float = 3e-5
    """Adam learning rate of the classifier and auxiliary heads (and of everything without its own)."""
    attention_lr: float | None = None
    """Learning rate of the magnifying layers' attention stacks (``None``: ``lr``)."""
    weight_decay: float = 0.0
    batch_size: int | None = None
    """Slides per optimizer step over all processes; ``None``: 16 up to three layers, 8 for four (paper)."""
    warmup: float = 0.0
    """Share of training with a linear learning-rate warm-up."""
    schedule: str = "cosine"
    """After the warm-up: ``cosine`` annealing to ``min_lr``, or ``constant``."""
    min_lr: float = 0.0
    """Floor of the cosine annealing (absolute)."""
    grad_clip: float | None = None
    """Clip the gradient norm to this (``None``: off)."""
    clip_per_group: bool = False
    """Clip each parameter group's gradient norm on its own (the attention's gradient spikes then do not
    shrink the heads' step), instead of the global norm."""
    augment: bool = True
    """D4 augmentation (flips and quarter turns) of the whole slide."""

    # ---- anneals and exploration
    max_scale_start: float | None = None
    """Anneal the scale clamp's upper bound from this to the config's ``max_scale`` (``None``: no anneal)."""
    temperature_start: float | None = None
    """Anneal the entmax temperature from this to the config's (``None``: no anneal)."""
    anneal_frac: float = 0.3
    """Share of training over which the anneals run (cosine)."""
    min_scale_start: tuple[float, ...] = ()
    """Per layer (the last entry repeats): anneal the scale clamp's *lower* bound from this to the config's
    ``min_scale`` over ``min_scale_frac`` (empty: no anneal; an entry at or below ``min_scale`` leaves that
    layer alone). A first-layer box held large early still holds a small object that the first map points
    beside, so the next layer can learn to find it before the box shrinks (docs/learn_to_look.md)."""
    min_scale_frac: float = 0.5
    """Share of training over which the lower bound falls (cosine)."""
    jitter: tuple[float, ...] = ()
    """Per layer (the last entry repeats): noise on the learned crop centres at the start (normalised
    units of the layer's view), falling to zero over ``jitter_frac`` (empty: none)."""
    jitter_frac: float = 0.6
    scale_weight: float = 0.0
    """Weight of the scale prior ``mean(relu(s - scale_target_l)^2)`` (0: off)."""
    scale_target: tuple[float, ...] = (0.3,)
    recentre_weight: float = 0.0
    """Weight of the recentring term (:mod:`magnet_zoo.train.recentre`): each layer's centre is pulled
    towards where its learned children's crops lie, weighted by their auxiliary heads' margin over chance
    (0: off; left out during head warm-up and exploration)."""
    recentre_on: str = "all"
    """Which slides' children pull: ``"all"`` (FindIt: both classes carry an object to centre) or
    ``"positive"`` (multiple-instance tasks such as SynthMets: only label-1 slides hold evidence to centre;
    a negative slide's crops classify it wherever they look)."""
    revive_at: tuple[float, ...] = ()
    """Shares of training at which a dead first-layer branch gets the best branch's attention stacks
    (:class:`~magnet_zoo.train.revival.BranchReviver`; empty: never)."""
    revive_margin: float = 0.15
    revive_last: bool = False
    """At the same points, also revive the *last* layer's learned patches: one whose running auxiliary BCE
    exceeds the best learned last-layer patch's by ``revive_margin`` gets that patch's attention stack
    (a second-layer map on background gets no gradient towards the evidence; docs/learn_to_look.md)."""

    # ---- helping the heads first
    head_warmup: float = 0.0
    """Share of training spent training the heads on random zoom trees before the attention chooses
    (:mod:`magnet_zoo.train.warmup`; 0: off)."""
    head_warmup_trees: int = 4
    guidance_weight: float = 0.0
    """Weight of head-guided attention (:mod:`magnet_zoo.train.guidance`; 0: off)."""
    guidance_temperature: float = 1.0
    guidance_slides: int = 4
    guidance_layers: tuple[int, ...] = ()
    """The layers whose attention is guided (empty: every layer after the first). With 1 the first layer is
    guided too, from windows over the whole slide."""
    guidance_grid: tuple[int, ...] = (8,)
    """Windows per side over each guided region, per entry of ``guidance_layers`` (the last repeats)."""
    guidance_standardise: bool = False
    """Standardise each region's window scores over its tissue cells before ``guidance_temperature`` (the
    target's sharpness then does not follow the head's logit scale)."""
    guidance_evidence: str = "positive"
    """What a window's score is: ``"positive"`` the head's logit (evidence for label 1: multiple-instance
    tasks, where only positive slides carry something to find); ``"label"`` the logit signed by the slide's
    label (evidence for its own class: tasks where every class carries an object, FindIt)."""
    attention_mil_weight: float = 0.0
    """Weight of attention MIL (:mod:`magnet_zoo.train.attention_mil`; 0: off): each learned first-layer
    map, pooled over the whole-slide view's tissue, trained as a slide classifier from the label, from the
    first step (head warm-up included). For multiple-instance tasks (SynthMets), not FindIt."""
    attention_mil_top: float = 0.02
    """Share of the view's tissue pixels whose largest logits are averaged into the slide logit."""
    attention_mil_negatives: str = "top"
    """On a normal slide, ``top``: the pooled logit is trained towards 0 as a tumour slide's is towards 1;
    ``all``: every tissue pixel of the view is (each one is a normal instance)."""
    attention_mil_edges: str = "pool"
    """``pool``: the tissue's edge (pixels next to glass or the view's border) is pooled like any tissue;
    ``negative``: it is left out of the pooling and trained towards 0 on every slide (the boundary with the
    glass is never the evidence); ``below``: left out of the pooling and trained only to sit a margin below the
    map's pooled logit (a hinge on ``edge - pooled + 1``, the pooled level taken as a constant): the edge must
    not outrank the evidence, but nothing pulls the whole map down. Needs ``attention_tissue_only``."""
    attention_mil_only: bool = False
    """The first layer's attention stacks learn from attention MIL alone: the forward that feeds the heads'
    losses (and every other term) runs with those parameters frozen, so the crops' geometry no longer pulls
    the first map. Needs ``attention_mil_weight`` or ``attention_pretrain_steps``; with the weight at 0 the
    first map learns in the pre-training phase only and is fixed in the loop."""
    attention_pretrain_steps: int = 0
    """Attention MIL as a phase before the first step: steps of 32 first-layer views (every training slide's
    view read once, balanced classes, one orientation per batch, Adam at ``lr``; 0: off). Needs slide files."""
    attention_pretrain_augment: str = "d4"
    """The phase's orientations: ``d4`` (the eight turns and mirrorings) or ``flips`` (the four mirrorings
    only, as the standalone trainer of ``benchmarks/synthmets_visibility.py``)."""
    attention_pretrain_candidates: int = 1
    """Maps the phase trains side by side from different starts (the first layer's own and fresh ones, same
    batches), on all but a fifth of each class's training slides; the one whose pooled logits best separate
    those held-out slides is kept. Each candidate costs the phase's steps again."""
    attention_pretrain_restarts: int = 0
    """More phases allowed when the phase's loss ends on the plateau: the mean over its last 50 steps at
    ``attention_pretrain_plateau`` or more (ln 2 = 0.693: the pooled logits do not separate the classes). Only
    while one more fits in nine tenths of the run's time left (``time_limit``): the loop keeps at least a
    tenth. The phase with the lowest final loss is kept; a phase that leaves the plateau costs nothing more."""
    attention_pretrain_restart_from: str = "fresh"
    """What a further phase trains: ``fresh`` maps (new initialisation) or the same map, ``continue``d at the
    final pooled share (:func:`magnet_zoo.train.attention_mil.pretrain_attention`)."""
    attention_pretrain_plateau: float = 0.68
    """The phase's final loss at or above which it counts as on the plateau (``attention_pretrain_restarts``).
    Measured on SynthMets: the phase's starts that found the tumours ended at 0.44-0.64, those that did not at
    0.686-0.697, and in one seed (12) at 0.658, which this test misses (docs/synthmets_magnet.md)."""
    attention_pretrain_top_start: float | None = None
    """The phase's pooled share at its first step, narrowed geometrically to ``attention_mil_top`` over the
    phase's first half (None: ``attention_mil_top`` from the start). 1 starts from the mean over the tissue,
    which always includes a tumour slide's tumour pixels (:func:`magnet_zoo.train.attention_mil.annealed_top`).
    With ``attention_mil_edges="below"`` (``learn_to_look_mil`` sets both) the phase found the SynthMets tumours
    in 6 of 6 seeds (with neither, as that recipe was until 2026-12-07: 4 of 6; docs/synthmets_magnet.md, "A
    milder edge term")."""
    attention_pretrain_edge_start: float = 0.0
    """With ``attention_mil_edges`` ``negative`` or ``below``: the share of the phase's steps before the edge
    term counts (the edge is left out of the pooling throughout). Pushed towards 0 from the first step, the edge term
    teaches every feature channel alive on tissue a negative weight; a map that ends up so pools the same
    value on both classes and stays on the loss's ln 2 plateau (docs/synthmets_magnet.md, "The phase's
    plateau")."""
    head_pretrain_windows: int = 0
    """Random tissue windows per training slide, read once, to pre-train the last auxiliary head on
    (:mod:`magnet_zoo.train.head_pretrain`; 0: off)."""
    head_pretrain_steps: int = 600
    head_pretrain_side: tuple[float, float] = (0.025, 0.1)

    # ---- exploration
    explore_trees: int = 0
    """Zoom trees sampled per slide while exploring (:mod:`magnet_zoo.train.exploration`; 0: off, else >= 2)."""
    explore_frac: float = 0.7
    """Share of the attention's training spent exploring; the rest trains on the expected crops."""
    explore_weight: float = 1.0
    """Weight of the score-function term."""
    explore_temperature: float = 1.0
    """Softmax temperature of the sampling policy over the attention logits."""
    explore_uniform: float = 0.05
    """Share of the sampling policy that is uniform over the view (or its tissue)."""
    tree_mil: bool = False
    """While exploring, score each slide as multiple-instance learning over its ``explore_trees`` sampled
    trees (the classifier's logit the largest over the trees, the auxiliary heads pooled over all trees'
    patches, as in the head warm-up) instead of averaging the trees' own losses; the score-function term
    still weighs each tree by its own loss. Such a model is meant to be *used* the same way: ``K`` trees
    drawn from the training policy, max-pooled (:func:`magnet_zoo.train.exploration.mil_inference`)."""

    def __post_init__(self) -> None:
        for name in ("jitter", "min_scale_start", "scale_target", "revive_at", "head_pretrain_side"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        for name in ("guidance_layers", "guidance_grid"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        # JSON gives lists where MagNetConfig's per-layer fields hold tuples: a recipe read back compares equal.
        overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(self.model_overrides).items()}
        object.__setattr__(self, "model_overrides", overrides)
        bad = sorted(set(self.model_overrides) - {f.name for f in dataclasses.fields(MagNetConfig)})
        if bad:
            raise ConfigError(f"recipe {self.name!r}: model_overrides has unknown MagNetConfig fields {bad}")
        if self.epochs < 1:
            raise ConfigError(f"recipe {self.name!r}: epochs must be >= 1, got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"recipe {self.name!r}: steps must be >= 1, got {self.steps}")
        for name in ("lr", "attention_lr"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"recipe {self.name!r}: {name} must be > 0, got {value}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"recipe {self.name!r}: batch_size must be >= 1, got {self.batch_size}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"recipe {self.name!r}: schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("warmup", "anneal_frac", "jitter_frac", "min_scale_frac", "head_warmup"):
            value = getattr(self, name)
            if not 0 <= value < 1 and not (name in ("anneal_frac", "jitter_frac", "min_scale_frac") and value == 1):
                raise ConfigError(f"recipe {self.name!r}: {name} must be in [0, 1), got {value}")
        if any(not 0 < v <= 1 for v in self.min_scale_start):
            raise ConfigError(f"recipe {self.name!r}: min_scale_start entries must be in (0, 1] (shares of the "
                              f"layer's view side), got {list(self.min_scale_start)}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"recipe {self.name!r}: grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.attention_pretrain_steps < 0:
            raise ConfigError(f"recipe {self.name!r}: attention_pretrain_steps must be >= 0, got "
                              f"{self.attention_pretrain_steps}")
        if self.attention_mil_only and not self.trains_attention_mil:
            raise ConfigError(f"recipe {self.name!r}: attention_mil_only needs attention_mil_weight > 0 or "
                              "attention_pretrain_steps > 0 (the first map would learn nothing)")
        if self.attention_pretrain_candidates < 1:
            raise ConfigError(f"recipe {self.name!r}: attention_pretrain_candidates must be >= 1, got "
                              f"{self.attention_pretrain_candidates}")
        if self.attention_pretrain_restarts < 0:
            raise ConfigError(f"recipe {self.name!r}: attention_pretrain_restarts must be >= 0, got "
                              f"{self.attention_pretrain_restarts}")
        if self.attention_pretrain_restart_from not in RESTART_FROM:
            raise ConfigError(f"recipe {self.name!r}: attention_pretrain_restart_from must be one of {RESTART_FROM}, "
                              f"got {self.attention_pretrain_restart_from!r}")
        if not 0 < self.attention_pretrain_plateau:
            raise ConfigError(f"recipe {self.name!r}: attention_pretrain_plateau must be > 0, got "
                              f"{self.attention_pretrain_plateau}")
        if not 0 <= self.attention_pretrain_edge_start < 1:
            raise ConfigError(f"recipe {self.name!r}: attention_pretrain_edge_start must be in [0, 1), got "
                              f"{self.attention_pretrain_edge_start}")
        start = self.attention_pretrain_top_start
        if start is not None and not self.attention_mil_top <= start <= 1:
            raise ConfigError(f"recipe {self.name!r}: attention_pretrain_top_start must be None or in "
                              f"[attention_mil_top, 1] = [{self.attention_mil_top}, 1], got {start}")
        if self.attention_pretrain_augment not in PRETRAIN_AUGMENTS:
            raise ConfigError(f"recipe {self.name!r}: attention_pretrain_augment must be one of {PRETRAIN_AUGMENTS}, "
                              f"got {self.attention_pretrain_augment!r}")
        if self.attention_mil_edges not in ATTENTION_MIL_EDGES:
            raise ConfigError(f"recipe {self.name!r}: attention_mil_edges must be one of {ATTENTION_MIL_EDGES}, "
                              f"got {self.attention_mil_edges!r}")
        if self.attention_mil_negatives not in ("top", "all"):
            raise ConfigError(f"recipe {self.name!r}: attention_mil_negatives must be 'top' or 'all', got "
                              f"{self.attention_mil_negatives!r}")
        if self.attention_mil_weight < 0 or not 0 < self.attention_mil_top <= 1:
            raise ConfigError(f"recipe {self.name!r}: need attention_mil_weight >= 0 and attention_mil_top in "
                              f"(0, 1], got {self.attention_mil_weight} and {self.attention_mil_top}")
        if self.recentre_weight < 0:
            raise ConfigError(f"recipe {self.name!r}: recentre_weight must be >= 0, got {self.recentre_weight}")
        if self.recentre_on not in RECENTRE_ON:
            raise ConfigError(
                f"recipe {self.name!r}: recentre_on must be one of {RECENTRE_ON}, got {self.recentre_on!r}"
            )
        if any(k < 1 for k in self.guidance_layers) or len(set(self.guidance_layers)) != len(self.guidance_layers):
            raise ConfigError(f"recipe {self.name!r}: guidance_layers must be distinct layer numbers >= 1, "
                              f"got {list(self.guidance_layers)}")
        if self.guidance_evidence not in GUIDANCE_EVIDENCE:
            raise ConfigError(f"recipe {self.name!r}: guidance_evidence must be one of {GUIDANCE_EVIDENCE}, "
                              f"got {self.guidance_evidence!r}")
        if not self.guidance_grid or any(g < 2 for g in self.guidance_grid):
            raise ConfigError(f"recipe {self.name!r}: guidance_grid needs values >= 2, got {list(self.guidance_grid)}")
        if self.head_warmup_trees < 1:
            raise ConfigError(f"recipe {self.name!r}: head_warmup_trees must be >= 1")
        if self.explore_trees == 1 or self.explore_trees < 0:
            raise ConfigError(f"recipe {self.name!r}: explore_trees must be 0 (off) or >= 2, got {self.explore_trees}")
        if self.tree_mil and self.explore_trees < 2:
            raise ConfigError(f"recipe {self.name!r}: tree_mil needs explore_trees >= 2")
        if not 0 <= self.explore_frac <= 1 or not 0 <= self.explore_uniform <= 1 or self.explore_temperature <= 0:
            raise ConfigError(f"recipe {self.name!r}: need explore_frac and explore_uniform in [0, 1] and "
                              "explore_temperature > 0")

    # ------------------------------------------------------------------ data in, data out
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        _check_fields(data, "recipe")
        return cls(**dict(data))

    @property
    def trains_attention_mil(self) -> bool:
        """Whether attention MIL teaches the first map, in the pre-training phase or in the loop."""
        return bool(self.attention_mil_weight or self.attention_pretrain_steps)

    def replace(self, **changes: Any) -> Recipe:
        """A copy with single fields changed (``name`` keeps its value unless given)."""
        _check_fields(changes, f"recipe {self.name!r}")
        if "model_overrides" in changes:
            changes["model_overrides"] = {**self.model_overrides, **dict(changes["model_overrides"])}
        return dataclasses.replace(self, **changes)


def _check_fields(data: Mapping[str, Any], what: str) -> None:
    known = [f.name for f in dataclasses.fields(Recipe)]
    unknown = [k for k in data if k not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise UnknownRecipeError(f"{what}: no such field {', '.join(hints)}; fields: {', '.join(known)}")


# --------------------------------------------------------------------------- the registered recipes
PAPER = Recipe(
    name="paper",
    summary="the paper's section 3.3: Adam 3e-5, cosine, batch 16 (<=3 layers) / 8, 200 epochs, D4, tanh "
    "translation, the three losses",
    model_overrides={
        "translation": "tanh",
        "min_scale": 0.05,
        "max_scale": 1.0,
        "attention_init": "uniform",
        "aux_pooling": "mean",
        "loss_paradoxical": True,
        "loss_auxiliary": True,
        "loss_classifier": True,
    },
    epochs=200,
    lr=3e-5,
    schedule="cosine",
)

LEARN_TO_LOOK = Recipe(
    name="learn_to_look",
    summary="the others' base: clamp translation, random attention init, scale in [0.1, 0.35] (bound annealed "
    "from 1), per-patch aux loss, Adam 1e-3 (attention 3e-3), warm-up + cosine, clip 5, branch revival",
    model_overrides={
        "translation": "clamp",
        "max_scale": 0.35,
        "min_scale": 0.1,
        "attention_init": "random",
        "aux_pooling": "per_patch",
    },
    epochs=200,
    lr=1e-3,
    attention_lr=3e-3,
    batch_size=8,
    warmup=20 / 300,
    grad_clip=5.0,
    max_scale_start=1.0,
    anneal_frac=0.3,
    revive_at=(0.35, 0.5, 0.65),
    revive_margin=0.15,
)

LEARN_TO_LOOK_CENTRED = LEARN_TO_LOOK.replace(
    name="learn_to_look_centred",
    summary="learn_to_look + a flat-start second layer (attention_init random, uniform), replicate padding, "
    "recentring (weight 1) and second-layer jitter 0.2: the best FindIt 3 % record (both classes carry an "
    "object); on multiple-instance slides add --set recentre_on=positive (SynthMets, 2 seeds: at chance)",
    model_overrides={"attention_init": ("random", "uniform"), "attention_padding": "replicate"},
    recentre_weight=1.0,
    jitter=(0.0, 0.2),
)

LEARN_TO_LOOK_MIL = LEARN_TO_LOOK.replace(
    name="learn_to_look_mil",
    summary="for slide labels that mean 'tumour somewhere' (SynthMets, CAMELYON): learn_to_look + the first map "
    "pre-trained 1000 steps as a detector from slide labels alone (attention MIL: the mean over the tissue "
    "narrowed to its top 10 %, the tissue's edge kept a margin below the pooled logit) and then taught by "
    "nothing else, a flat-start second layer, re-read crops, tissue-only attention, max-pooled aux heads, head "
    "warm-up 0.4 and head guidance 1; not for tasks where both classes carry an object (FindIt: "
    "learn_to_look_centred)",
    model_overrides={
        "attention_init": ("random", "uniform"),
        "attention_tissue_only": True,
        "crop_source": "reread",
        "aux_pooling": "max",
    },
    head_warmup=0.4,
    guidance_weight=1.0,
    attention_pretrain_steps=1000,
    attention_mil_top=0.1,
    attention_mil_edges="below",
    attention_pretrain_top_start=1.0,
    attention_pretrain_restarts=1,
    attention_pretrain_restart_from="continue",
    attention_mil_only=True,
)

RECIPES: dict[str, Recipe] = {
    r.name: r for r in (LEARN_TO_LOOK, LEARN_TO_LOOK_CENTRED, LEARN_TO_LOOK_MIL, PAPER)
}
DEFAULT_RECIPE = "learn_to_look_mil"
"""What ``magnet-zoo train`` uses without ``--recipe``: the recipe for slide labels ("tumour somewhere on this
slide"), the only one measured to make the MagNet look at the evidence on multiple-instance slides (SynthMets)."""


def list_recipes() -> list[str]:
    return sorted(RECIPES)


def get_recipe(name: str | Recipe | Mapping[str, Any] = DEFAULT_RECIPE, **overrides: Any) -> Recipe:
    """A registered recipe by name (or a :class:`Recipe`, or a recipe dict), with single fields overridden."""
    if isinstance(name, Recipe):
        base = name
    elif isinstance(name, Mapping):
        base = Recipe.from_dict(name)
    else:
        if name not in RECIPES:
            close = difflib.get_close_matches(str(name), list(RECIPES), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UnknownRecipeError(f"no recipe named {name!r}{hint} (recipes: {', '.join(list_recipes())})")
        base = RECIPES[name]
    return base.replace(**overrides) if overrides else base


def describe_recipes() -> str:
    """One line per registered recipe (the CLI's listing)."""
    lines = []
    for name in list_recipes():
        tag = " (default)" if name == DEFAULT_RECIPE else ""
        lines.append(f"  {name}{tag}: {RECIPES[name].summary}")
    return "\n".join(lines)


def parse_recipe_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["lr=1e-3", "revive_at=[0.5]", "grad_clip=null"]`` -> a dict; field names are checked."""
    from magnet_zoo.train.settings import parse_overrides

    out = parse_overrides(items, flag="--set")
    _check_fields(out, "--set")
    return out
