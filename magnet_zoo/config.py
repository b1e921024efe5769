"""One versioned, JSON-serialisable configuration for a whole MagNet.

Every choice that shapes the network (tree, sizes, backbones, sampler, heads, losses) lives here so
that a checkpoint's ``config.json`` rebuilds exactly the network that produced it. Defaults follow
the paper (Dimitriou et al., Diagnostics 2024) and ``DESIGN.md`` section 2.

No ``from __future__ import annotations`` here on purpose: dataclass fields must keep real types so
that :meth:`MagNetConfig.from_dict` can validate and round-trip them.
"""

import dataclasses
import json
from dataclasses import dataclass, fields
from typing import Any

CONFIG_VERSION = 1
"""Version of the config schema. Bump when a field changes meaning; loaders refuse newer versions."""

MPP_TOLERANCE = 0.25
"""The resolution contract's tolerance: a slide whose level-0 microns per pixel differ from the training
slides' (``config.json["io"]["slide_mpp"]``) by more than this share gets a warning with its prediction
(0.25 accepts 0.4-0.6 µm/px for a model trained at 0.5; it flags 20x scans for a 40x model)."""

SAMPLERS = ("linearized", "bilinear")
ATTENTION_INITS = ("uniform", "random")
TRANSLATIONS = ("tanh", "clamp")
CROP_SOURCES = ("iprime", "reread")
GEOMETRIES = ("reread", "frame")
AUX_POOLINGS = ("mean", "per_patch", "max")
PARADOXICAL_REFERENCES = ("live", "constant")
AUX_REDUCTIONS = ("mean", "sum")
SCALE_BOUNDS = ("clip", "soft")
ATTENTION_PADDINGS = ("zeros", "replicate")
ATTENTION_NORMS = ("batch", "group")


class ConfigError(ValueError):
    """A MagNet configuration is invalid or cannot be read."""


@dataclass(frozen=True)
class MagNetConfig:
    """Everything needed to build a MagNet.

    Sizes follow the paper: every magnifying layer looks at an ``input_size`` view ``I`` (56x56) and
    samples its crops from ``I'``, a view ``iprime_factor`` times larger than the crops it produces
    (112x112 for 56x56 crops, 448x448 for the last layer's ``final_patch_size`` crops of 224x224).
    """

    patches: tuple[int, ...] = (3, 2, 3)
    """Patches (regions of interest) extracted per incoming node, one entry per magnifying layer."""
    input_size: int = 56
    iprime_factor: int = 2
    final_patch_size: int = 224
    crop_source: str = "iprime"
    """Where a crop's pixel values come from: ``iprime`` (the paper: sampled from its node's ``I'``, so a
    crop holds at most ``iprime_factor x`` its parent's detail and a small crop is an upsampled blur) or
    ``reread`` (its own region read from the slide at its output size, at the level that region needs;
    the sampled crop's gradient is passed straight through, so the attention learns as in the paper).
    Not in the paper; costs one extra read of the final patches. See docs/synthmets_magnet.md."""
    geometry: str = "reread"
    """How a crop's pixels depend on its *ancestors'* crop parameters: ``reread`` (the paper: each child's
    ``I'`` is read from the slide for its box, a constant, so an ancestor learns only through the next
    attention map's input) or ``frame`` (each child's pixels are read for a fixed frame, its box grown by
    ``frame_margin`` on every side, and its crops are sampled from that frame with the ancestors'
    transforms composed relative to it: the forward is the same, and every ancestor gets the gradient of
    the sharp pixels the heads see; DESIGN.md section 6, item 2). Costs the margin's extra pixels read."""
    frame_margin: float = 0.125
    """With ``geometry="frame"``: the frame's margin on each side, as a share of the child's side (rounded
    to whole ``I'`` pixels)."""
    view_gradient: bool = True
    """Whether a layer's crops pass gradient to its crop parameters through the next layer's attention
    input (its view ``I``). ``False`` feeds the next layer ``crops.detach()``: an ancestor then learns only
    through the pixels the heads see (with ``geometry="frame"``) or not at all."""
    frozen_patch: bool = True
    """Fix the first patch of layer 2 to the identity transform (paper section 3.3.3)."""
    sampler: str = "linearized"
    linearized_samples: int = 8
    """Points per output pixel for linearized multi-sampling (the query point plus jittered ones)."""

    attention_init: str | tuple[str, ...] = "uniform"
    """Last 1x1 conv of each Branch stack: ``uniform`` (near-zero: the map starts uniform, looking at
    the whole view) or ``random`` (PyTorch's default init, as in the paper); or one of these per
    magnifying layer, e.g. ``("random", "uniform")``, the last entry repeating for deeper layers (so a
    recipe's ``("random", "uniform")`` gives any deeper network flat maps after the first layer)."""
    attention_temperature: float = 1.0
    translation: str = "tanh"
    """How the expected position becomes the crop centre: ``tanh`` (paper eq. 2-3; centres beyond
    ``tanh(1) = 0.76`` are unreachable) or ``clamp`` (the expected position itself, which always
    lies inside the view)."""
    min_scale: float = 0.05
    max_scale: float = 1.0
    attention_tissue_only: bool = False
    """Attend to tissue only: positions whose view pixel is black (glass removed by the grey filter, or
    outside the slide) get zero attention, unless a view has no tissue at all. Not in the paper; it
    keeps crops from being spent on empty glass (see docs/synthmets_magnet.md)."""

    classifier_backbone: str = "inception_v3"
    aux_backbone: str = "resnet18"
    aux_layers: tuple[int, ...] = (1, 3)
    """Magnifying layers (1-based) whose patches feed an auxiliary head; the paradoxical loss
    compares the first two. Layers beyond the network's depth are dropped at build time."""
    aux_pooling: str = "mean"
    """How an auxiliary head turns a layer's patches into a slide logit: ``mean`` (average the
    features, one linear layer) or ``per_patch`` (one logit per patch; the slide logit is their mean
    and the auxiliary loss is the mean BCE over patches, so every patch must see the evidence) or
    ``max`` (one logit per patch; the slide logit is their maximum and the loss its BCE: multiple-
    instance pooling, where a positive slide needs one patch on the evidence and a negative slide
    teaches every patch what normal looks like)."""
    backbone_pretrained: bool = True
    gru_hidden: int = 512
    mlp_hidden: tuple[int, ...] = (512, 256)
    dropout: float = 0.0

    grey_threshold: int = 15
    view_oversample: int = 1
    """How the whole-slide view ``I`` of the first layer is made: ``1`` (the paper) reads it at
    ``input_size`` and grey-filters it, so an object smaller than a view pixel is averaged with the glass
    around it, comes out grey and is blacked out; ``k > 1`` reads it at ``k x input_size``, grey-filters it
    there and area-averages ``k x k`` blocks, so the glass is black *before* the averaging and a small
    object leaves a dark but coloured pixel (the FindIt 1 % object leaves none at ``1`` and a trace at
    ``4``: ``benchmarks/findit_visibility.py``). Costs ``k^2 x input_size^2`` pixels read, once per slide
    (none when ``k x input_size`` is layer 1's ``I'``, which is then pooled); the attention still sees
    ``input_size^2`` values. Not in the paper."""
    loss_paradoxical: bool = True
    loss_auxiliary: bool = True
    loss_classifier: bool = True
    paradoxical_reference: str = "live"
    """L1's first head: ``live`` (``relu(P1 - P3)`` passes gradient into both heads, so whenever layer 1
    leads, the loss lowers layer 1's true-class probability) or ``constant`` (``P1`` is a constant: L1 only
    asks the later head to catch up, layer 1 being the reference it must beat; DESIGN.md section 6)."""
    aux_reduction: str = "mean"
    """L2 over the auxiliary heads: ``mean`` or ``sum`` (the paper sums its loss terms)."""
    scale_bounds: str = "clip"
    """How the crop's scale and centre are bounded: ``clip`` (the paper: ``s = min(s, 1 - max|t|)``, then
    clamped to ``[min_scale, max_scale]``; on a bound the scale has no gradient and the clamp can leave the
    crop outside the view) or ``soft`` (``s`` squashed smoothly into ``(min_scale, max_scale)``, slope 1 at
    the middle, then the centre squashed into ``[-(1 - s), 1 - s]`` so the crop stays inside the view;
    both keep a gradient everywhere)."""
    attention_padding: str = "zeros"
    """Padding of the attention stacks' 3x3 convolutions: ``zeros`` (as the paper's listing) or
    ``replicate`` (the border is not the only distinct place on a dark view)."""
    attention_norm: str = "batch"
    """Normalisation in the attention stacks: ``batch`` (the paper's BatchNorm: training-mode maps use the
    batch's statistics, eval-mode maps the running ones, and they differ; ``benchmarks/attention_modes.py``)
    or ``group`` (GroupNorm over each stack's channels per image: the same map in both modes)."""

    labels: tuple[str, ...] = ("normal", "tumour")
    """Names of the negative and positive class."""
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.attention_init, list):  # one per layer, as JSON and command lines give it
            object.__setattr__(self, "attention_init", tuple(self.attention_init))
        self.validate()

    # ---------------------------------------------------------------- derived sizes
    @property
    def num_layers(self) -> int:
        return len(self.patches)

    def output_size(self, layer: int) -> int:
        """Side of the crops that magnifying layer ``layer`` (1-based) produces."""
        return self.final_patch_size if layer == self.num_layers else self.input_size

    def view_read_size(self) -> int:
        """Side at which the first layer's whole-slide view is read (then area-averaged to ``input_size``)."""
        return self.input_size * self.view_oversample

    def iprime_size(self, layer: int) -> int:
        """Side of ``I'``, the view layer ``layer`` samples its crops from."""
        return self.iprime_factor * self.output_size(layer)

    def frame_pixels(self, layer: int) -> int:
        """With ``geometry="frame"``: the margin, in pixels of ``I'``, of the frames read for layer
        ``layer``'s nodes (0 for the first layer, whose frame is the slide's canvas)."""
        if self.geometry != "frame" or layer == 1:
            return 0
        return int(round(self.frame_margin * self.iprime_size(layer)))

    def nodes_entering(self, layer: int) -> int:
        """Number of images that enter magnifying layer ``layer`` (1 for the first)."""
        n = 1
        for p in self.patches[: layer - 1]:
            n *= p
        return n

    @property
    def num_final_patches(self) -> int:
        return self.nodes_entering(self.num_layers + 1)

    @property
    def active_aux_layers(self) -> tuple[int, ...]:
        return tuple(layer for layer in self.aux_layers if 1 <= layer <= self.num_layers)

    def layer_attention_init(self, layer: int) -> str:
        """The ``attention_init`` of magnifying layer ``layer`` (1-based)."""
        if isinstance(self.attention_init, str):
            return self.attention_init
        return self.attention_init[min(layer, len(self.attention_init)) - 1]

    def is_frozen(self, layer: int, patch: int) -> bool:
        """Whether patch ``patch`` (0-based) of layer ``layer`` (1-based) is the identity."""
        return self.frozen_patch and layer == 2 and patch == 0

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        if not self.patches or any(int(p) < 1 for p in self.patches):
            raise ConfigError(f"patches must be a non-empty sequence of positive ints, got {self.patches!r}")
        if self.input_size < 8:
            raise ConfigError(f"input_size must be at least 8, got {self.input_size}")
        if self.final_patch_size < 8:
            raise ConfigError(f"final_patch_size must be at least 8, got {self.final_patch_size}")
        if self.iprime_factor < 1:
            raise ConfigError(f"iprime_factor must be >= 1, got {self.iprime_factor}")
        if self.geometry not in GEOMETRIES:
            raise ConfigError(f"geometry must be one of {GEOMETRIES}, got {self.geometry!r}")
        if not 0 <= self.frame_margin <= 1:
            raise ConfigError(f"frame_margin must be in [0, 1] (a share of the child's side), got {self.frame_margin}")
        if self.crop_source not in CROP_SOURCES:
            raise ConfigError(f"crop_source must be one of {CROP_SOURCES}, got {self.crop_source!r}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        inits = (self.attention_init,) if isinstance(self.attention_init, str) else tuple(self.attention_init)
        if any(init not in ATTENTION_INITS for init in inits) or not 1 <= len(inits) <= self.num_layers:
            raise ConfigError(
                f"attention_init must be one of {ATTENTION_INITS} or a sequence of them with one entry per "
                f"magnifying layer ({self.num_layers}; the last entry repeats for deeper layers), got "
                f"{self.attention_init!r}"
            )
        if self.translation not in TRANSLATIONS:
            raise ConfigError(f"translation must be one of {TRANSLATIONS}, got {self.translation!r}")
        for name, allowed in (("paradoxical_reference", PARADOXICAL_REFERENCES), ("aux_reduction", AUX_REDUCTIONS),
                              ("scale_bounds", SCALE_BOUNDS), ("attention_padding", ATTENTION_PADDINGS),
                              ("attention_norm", ATTENTION_NORMS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.aux_pooling not in AUX_POOLINGS:
            raise ConfigError(f"aux_pooling must be one of {AUX_POOLINGS}, got {self.aux_pooling!r}")
        if not 0 < self.min_scale <= self.max_scale <= 1:
            raise ConfigError(
                f"need 0 < min_scale <= max_scale <= 1, got min_scale={self.min_scale}, "
                f"max_scale={self.max_scale}"
            )
        if self.attention_temperature <= 0:
            raise ConfigError(f"attention_temperature must be > 0, got {self.attention_temperature}")
        if self.view_oversample < 1:
            raise ConfigError(f"view_oversample must be >= 1 (1 reads the view at input_size), "
                              f"got {self.view_oversample}")
        if not 0 <= self.grey_threshold <= 255:
            raise ConfigError(f"grey_threshold must be in [0, 255], got {self.grey_threshold}")
        if len(self.labels) != 2:
            raise ConfigError(f"labels must name the negative and positive class, got {self.labels!r}")
        if self.linearized_samples < 3:
            raise ConfigError("linearized_samples must be >= 3 (a plane fit needs three points)")
        if self.version > CONFIG_VERSION:
            raise ConfigError(
                f"config version {self.version} is newer than this magnet_zoo understands "
                f"({CONFIG_VERSION}); upgrade with `pip install -U magnet-zoo`"
            )

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MagNetConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a MagNet config must be a JSON object, got {type(data).__name__}")
        version = data.get("version", CONFIG_VERSION)
        if not isinstance(version, int) or version > CONFIG_VERSION:
            raise ConfigError(
                f"config version {version!r} is not supported by this magnet_zoo (it reads up to "
                f"{CONFIG_VERSION}); upgrade with `pip install -U magnet-zoo`"
            )
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown MagNet config fields: {', '.join(unknown)}")
        kwargs = {}
        for name, value in data.items():
            default = known[name].default
            kwargs[name] = tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> "MagNetConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def replace(self, **overrides: Any) -> "MagNetConfig":
        """A copy with ``overrides`` applied; unknown names raise :class:`ConfigError`."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(
                f"unknown MagNet config fields: {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        return dataclasses.replace(self, **fixed)

