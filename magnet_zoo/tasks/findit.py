"""FindIt: an in-memory task where we know where the answer is (issue 7).

Every image holds one small pattern at a random position on a noisy background; the label is set by
a detail of the pattern that is invisible at the network's 56x56 overview (a ring or a cross of the
same colour and the same area, hence the same brightness once blurred). The ground-truth box is
known for every image and used only by the metrics, never for training.

Images are generated from ``(spec, seed)`` on demand (no files): :func:`make_image` returns the RGB
array, its label and its box, :func:`make_fetcher` wraps it in an :class:`~magnet_zoo.wsi.ArraySource`
behind a :class:`~magnet_zoo.wsi.SlideFetcher`, exactly as a real slide would be served.

Metrics (:func:`evaluate`): accuracy and AUROC of the classifier; the *hit rate* of every magnifying
layer's crops (the share of learned crops whose box contains the object's centre), the hit rate
that randomly placed crops of the same sizes would have, and the mean and spread of the scale per
layer.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from magnet_zoo.nn.magnet import MagNet, MagNetOutput
from magnet_zoo.nn.trees import INFERENCE_SOURCE, INFERENCE_UNIFORM, pooled_forward
from magnet_zoo.wsi import ArraySource, SlideFetcher

BACKGROUNDS = ("grey", "he")
PATTERNS = ("ring", "cross")
"""Label 0 is a ring, label 1 a cross."""

OBJECT_RGB = (70, 40, 130)
"""Haematoxylin-like purple: survives the grey filter on either background."""
DISTRACTOR_RGB = OBJECT_RGB


@dataclass(frozen=True)
class FindItSpec:
    """Parameters of one FindIt task."""

    image_size: int = 896
    """Side of the square image in pixels (448-4096 in the issue's range)."""
    object_frac: float = 0.03
    """Side of the pattern as a share of the image side (0.01-0.05)."""
    background: str = "grey"
    """``grey``: mid grey with noise (the grey filter turns it black apart from speckles);
    ``he``: pink H&E-like tissue with smooth texture and noise (survives the filter)."""
    noise: float = 12.0
    """Standard deviation of the pixel noise (0-255 scale)."""
    distractors: int = 0
    """Filled squares of the pattern's colour and area placed elsewhere (same in both classes)."""
    margin: float = 0.02
    """Keep the object at least this share of the side away from the border."""

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}, got {self.background!r}")
        if not 16 <= self.image_size <= 16384:
            raise ValueError(f"image_size must be in [16, 16384], got {self.image_size}")
        if not 0 < self.object_frac < 0.5:
            raise ValueError(f"object_frac must be in (0, 0.5), got {self.object_frac}")
        if self.distractors < 0:
            raise ValueError("distractors must be >= 0")

    @property
    def object_px(self) -> float:
        return self.object_frac * self.image_size

    def replace(self, **changes: Any) -> FindItSpec:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FindItSample:
    """One generated image with its label and ground truth (never shown to the network)."""

    image: np.ndarray
    """``(H, W, 3)`` uint8."""
    label: int
    box: tuple[float, float, float, float]
    """The pattern's ``(x, y, w, h)`` in pixels."""

    @property
    def centre(self) -> tuple[float, float]:
        x, y, w, h = self.box
        return x + w / 2, y + h / 2


# ---------------------------------------------------------------------------------------------- shapes
def _ring_mask(d: int, oversample: int = 4) -> np.ndarray:
    """Anti-aliased ring of outer diameter ``d`` px and thickness ``d / 6``: coverage in [0, 1]."""
    n = d * oversample
    c = (np.arange(n) + 0.5) / oversample - d / 2
    r = np.hypot(c[None, :], c[:, None])
    outer = d / 2
    inner = outer - d / 6
    fine = ((r <= outer) & (r >= inner)).astype(np.float32)
    return fine.reshape(d, oversample, d, oversample).mean(axis=(1, 3))


def _cross_mask(d: int, area: float) -> np.ndarray:
    """Plus sign spanning ``d`` px with exact (analytic) pixel coverage and total area ``area`` (px)."""
    edges = np.arange(d, dtype=np.float64)

    def render(w: float) -> np.ndarray:
        lo, hi = d / 2 - w / 2, d / 2 + w / 2
        f = np.clip(np.minimum(edges + 1, hi) - np.maximum(edges, lo), 0, 1)  # 1-D bar coverage
        fx, fy = f[None, :], f[:, None]
        return (fx + fy - fx * fy).astype(np.float32)  # union of the two bars, exact per pixel

    lo_w, hi_w = 0.0, float(d)
    for _ in range(40):
        mid = (lo_w + hi_w) / 2
        if render(mid).sum() < area:
            lo_w = mid
        else:
            hi_w = mid
    return render((lo_w + hi_w) / 2)


def pattern_mask(kind: str, d: int) -> np.ndarray:
    """Coverage mask ``(d, d)`` of a ``ring`` or a ``cross`` with the ring's area."""
    d = max(int(round(d)), 3)
    ring = _ring_mask(d)
    if kind == "ring":
        return ring
    if kind == "cross":
        return _cross_mask(d, float(ring.sum()))
    if kind == "square":
        side = math.sqrt(float(ring.sum()))
        m = np.zeros((d, d), np.float32)
        lo = (d - side) / 2
        c = np.arange(d) + 0.5
        inside = np.clip(np.minimum(c - lo, lo + side - c) + 0.5, 0, 1)
        m[:] = inside[None, :] * inside[:, None]
        return m
    raise ValueError(f"unknown pattern {kind!r}")


def _background(spec: FindItSpec, rng: np.random.Generator) -> np.ndarray:
    n = spec.image_size
    if spec.background == "grey":
        base = np.full((n, n, 3), 150.0, np.float32)
        base += spec.noise * rng.standard_normal((n, n, 1), dtype=np.float32)  # luminance noise: stays grey
        base += spec.noise / 3 * rng.standard_normal((n, n, 3), dtype=np.float32)  # a few colour speckles
        return base
    # H&E-like: pink eosin with a smooth texture (low-resolution noise upsampled) and pixel noise.
    k = max(n // 32, 2)
    low = rng.normal(0, 1, (k, k, 1)).astype(np.float32)
    tex = np.kron(low, np.ones((n // k + 1, n // k + 1, 1), np.float32))[:n, :n]
    pink = np.array([225.0, 150.0, 195.0], np.float32)
    noise = spec.noise * rng.standard_normal((n, n, 3), dtype=np.float32)
    return pink + 18 * tex * np.array([0.6, 1.0, 0.7], np.float32) + noise


def _stamp(img: np.ndarray, mask: np.ndarray, x: int, y: int, rgb: Sequence[int]) -> None:
    d = mask.shape[0]
    m = mask[..., None]
    region = img[y : y + d, x : x + d]
    region[:] = region * (1 - m) + np.asarray(rgb, np.float32) * m


def make_image(spec: FindItSpec, seed: int, label: int | None = None) -> FindItSample:
    """Generate image ``seed`` of the task (deterministic). ``label`` forces the class."""
    rng = np.random.default_rng(seed)
    if label is None:
        label = int(rng.integers(0, 2))
    img = _background(spec, rng)
    d = max(int(round(spec.object_px)), 3)
    lo = int(spec.margin * spec.image_size)
    hi = spec.image_size - d - lo
    if hi <= lo:
        raise ValueError(f"object of {d} px does not fit in a {spec.image_size} px image with its margin")
    x, y = (int(v) for v in rng.integers(lo, hi + 1, size=2))
    taken = [(x, y)]
    for _ in range(spec.distractors):
        for _attempt in range(50):
            dx, dy = (int(v) for v in rng.integers(lo, hi + 1, size=2))
            if all(abs(dx - ox) > 2 * d or abs(dy - oy) > 2 * d for ox, oy in taken):
                break
        taken.append((dx, dy))
        _stamp(img, pattern_mask("square", d), dx, dy, DISTRACTOR_RGB)
    _stamp(img, pattern_mask(PATTERNS[label], d), x, y, OBJECT_RGB)
    out = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return FindItSample(image=out, label=label, box=(float(x), float(y), float(d), float(d)))


def make_fetcher(sample: FindItSample, grey_threshold: int = 15) -> SlideFetcher:
    """Serve a sample as a slide: in-memory pyramid, grey filter, serial reads."""
    return SlideFetcher(ArraySource(sample.image, name="findit"), grey_threshold, serial=True)


def make_batch(
    spec: FindItSpec, seeds: Sequence[int], grey_threshold: int = 15
) -> tuple[list[SlideFetcher], torch.Tensor, list[FindItSample]]:
    """Fetchers, float labels ``(B,)`` and the samples (for the metrics) of images ``seeds``."""
    samples = [make_image(spec, int(s)) for s in seeds]
    fetchers = [make_fetcher(s, grey_threshold) for s in samples]
    labels = torch.tensor([float(s.label) for s in samples])
    return fetchers, labels, samples


# ---------------------------------------------------------------------------------------------- metrics
def flat_attention(model: MagNet, layer: int) -> MagNet:
    """A copy of ``model`` whose layer ``layer`` (1-based) attention map is constant, as a dead attention's is:
    its crops sit centred in their parents. The baseline a learned crop of that layer must beat."""
    dead = copy.deepcopy(model)
    head = dead.layers[layer - 1].stacks.head
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    return dead


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve (Mann-Whitney U with ties counted half); NaN with one class only."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels).astype(bool)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def random_hit_probability(side: float, image_size: float, centre: tuple[float, float]) -> float:
    """Chance that a square of ``side`` placed uniformly inside the image contains ``centre``."""
    if side >= image_size:
        return 1.0
    p = 1.0
    for c in centre:
        # The crop's top-left corner u is uniform in [0, image_size - side]; it hits iff u <= c <= u + side.
        lo, hi = max(c - side, 0.0), min(c, image_size - side)
        p *= max(hi - lo, 0.0) / (image_size - side)
    return p


@dataclass
class CropRecord:
    """Per image and layer: the learned crops' boxes and scales (frozen identity patches excluded)."""

    layer: int
    boxes: list[tuple[float, float, float, float]]
    scales: list[float]


def crop_records(output: MagNetOutput, index: int) -> dict[int, CropRecord]:
    """Learned crops of slide ``index`` by layer, from the forward pass's ROI tree."""
    recs: dict[int, CropRecord] = {}
    for node in output.trees[index]:
        if node.layer == 0:
            continue
        rec = recs.setdefault(node.layer, CropRecord(node.layer, [], []))
        if node.frozen:
            continue
        rec.boxes.append(node.box)
        rec.scales.append(node.scale)
    return recs


def final_crop_boxes(output: MagNetOutput, index: int) -> list[tuple[float, float, float, float]]:
    """Every final-layer crop of slide ``index`` (the classifier's input), frozen ones included."""
    last = max(n.layer for n in output.trees[index])
    return [n.box for n in output.trees[index] if n.layer == last]


def _contains(box: tuple[float, float, float, float], point: tuple[float, float]) -> bool:
    x, y, w, h = box
    return x <= point[0] <= x + w and y <= point[1] <= y + h


@dataclass
class EvalResult:
    """Everything :func:`evaluate` measures; ``as_dict`` is one JSON-ready row."""

    accuracy: float
    auroc: float
    hit_rate: float
    """Share of final-layer crops (the classifier's inputs) whose box contains the object centre."""
    hit_rate_any: float
    """Share of images where at least one final crop contains the centre."""
    random_hit_rate: float
    """Expected hit rate of final crops of the same sizes placed uniformly at random."""
    layer_hit_rate: dict[int, float]
    layer_random_hit_rate: dict[int, float]
    layer_scale_mean: dict[int, float]
    layer_scale_std: dict[int, float]
    final_side_frac: float
    """Mean side of the final crops as a share of the image side."""
    n: int

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("layer_hit_rate", "layer_random_hit_rate", "layer_scale_mean", "layer_scale_std"):
            d[k] = {str(layer): v for layer, v in d[k].items()}
        return d


@torch.no_grad()
def evaluate(
    model: MagNet,
    spec: FindItSpec,
    seeds: Sequence[int],
    batch_size: int = 16,
    keep_outputs: int = 0,
    trees: int | None = None,
    tree_seed: int = 0,
    tree_temperature: float = 1.0,
    tree_source: str = INFERENCE_SOURCE,
    tree_uniform: float = INFERENCE_UNIFORM,
) -> tuple[EvalResult, list[tuple[FindItSample, MagNetOutput, int]]]:
    """Run ``model`` (eval mode) over images ``seeds`` and measure accuracy and where it looked.

    ``trees=K`` runs ``K`` sampled zoom trees per image (:func:`magnet_zoo.nn.trees.pooled_forward`,
    tree seeds from ``tree_seed`` and the batch's start, centres from ``tree_source`` (by default each
    layer's entmax map; ``"softmax"`` with temperature ``tree_temperature``) mixed with a uniform share
    ``tree_uniform``):
    accuracy and AUROC are those of the pooled
    probability, and the crop metrics count the crops of all ``K`` trees. ``None``: the expected crop.

    Returns the metrics and, for the first ``keep_outputs`` images, ``(sample, output, index)`` for
    pictures (with ``trees``, the first tree's output).
    """
    was_training = model.training
    model.eval()
    probs: list[float] = []
    labels: list[int] = []
    final_hits: list[float] = []
    final_rand: list[float] = []
    any_hits: list[float] = []
    final_sides: list[float] = []
    layer_hits: dict[int, list[float]] = {}
    layer_rand: dict[int, list[float]] = {}
    layer_scales: dict[int, list[float]] = {}
    kept: list[tuple[FindItSample, MagNetOutput, int]] = []
    seeds = list(seeds)
    for start in range(0, len(seeds), batch_size):
        fetchers, _, samples = make_batch(spec, seeds[start : start + batch_size], model.config.grey_threshold)
        if trees is None:
            out = model(fetchers, auxiliary=False)
            outs, batch_probs = [out], out.probs
        else:
            pooled = pooled_forward(model, fetchers, trees=trees, seed=tree_seed + start,
                                    temperature=tree_temperature, source=tree_source, uniform=tree_uniform,
                                    auxiliary=False)
            outs, batch_probs = pooled.outputs, pooled.probs
        probs += batch_probs.float().cpu().tolist()
        for i, smp in enumerate(samples):
            labels.append(smp.label)
            centre = smp.centre
            image_hits = []
            for out in outs:
                finals = final_crop_boxes(out, i)
                hits = [_contains(b, centre) for b in finals]
                image_hits += hits
                final_hits += [float(h) for h in hits]
                final_rand += [random_hit_probability(b[2], spec.image_size, centre) for b in finals]
                final_sides += [b[2] / spec.image_size for b in finals]
                for layer, rec in crop_records(out, i).items():
                    layer_hits.setdefault(layer, []).extend(float(_contains(b, centre)) for b in rec.boxes)
                    layer_rand.setdefault(layer, []).extend(
                        random_hit_probability(b[2], spec.image_size, centre) for b in rec.boxes
                    )
                    layer_scales.setdefault(layer, []).extend(rec.scales)
            any_hits.append(float(any(image_hits)))
            if len(kept) < keep_outputs:
                kept.append((smp, outs[0], i))
    model.train(was_training)
    p = np.asarray(probs)
    y = np.asarray(labels)

    def mean(v: Sequence[float]) -> float:
        return float(np.mean(v)) if len(v) else float("nan")

    result = EvalResult(
        accuracy=float(((p > 0.5) == (y > 0.5)).mean()),
        auroc=auroc(p.tolist(), y.tolist()),
        hit_rate=mean(final_hits),
        hit_rate_any=mean(any_hits),
        random_hit_rate=mean(final_rand),
        layer_hit_rate={k: mean(v) for k, v in sorted(layer_hits.items())},
        layer_random_hit_rate={k: mean(v) for k, v in sorted(layer_rand.items())},
        layer_scale_mean={k: mean(v) for k, v in sorted(layer_scales.items())},
        layer_scale_std={k: float(np.std(v)) if v else float("nan") for k, v in sorted(layer_scales.items())},
        final_side_frac=mean(final_sides),
        n=len(labels),
    )
    return result, kept
