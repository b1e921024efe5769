"""Slide-level metrics: AUROC and accuracy, overall and per category (no scikit-learn needed).

AUROC is the probability that a random positive slide scores higher than a random negative one, ties
counting one half (the Mann-Whitney U statistic divided by ``n_pos * n_neg``); it is computed from the
average ranks of the scores, so it costs one sort.

Per category (``macro``, ``micro``, ``itc``, ``normal`` in SynthMets; whatever the CSV's ``category``
column says elsewhere), following the paper's "macro vs normal" reporting:

* a category whose slides are all positive is scored against *every negative slide* (its AUROC is
  how well that kind of tumour is told apart from normal tissue);
* a category whose slides are all negative has no AUROC (NaN); its accuracy is the specificity;
* a category holding both classes is scored on its own slides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``, ties sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    i = 0
    n = len(values)
    while i < n:
        j = i
        while j + 1 < n and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (1 = positive).

    Returns NaN when only one class is present (the area is undefined then). Ties count one half.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel() > 0.5
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite (got NaN or infinity)")
    n_pos = int(y.sum())
    n_neg = int(len(y) - n_pos)
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _ranks(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def accuracy(
    scores: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray, threshold: float = 0.5
) -> float:
    """Fraction of slides whose ``score >= threshold`` agrees with the label; NaN for no slides."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel() > 0.5
    if len(s) == 0:
        return math.nan
    return float(((s >= threshold) == y).mean())


def classification_metrics(
    probs: Sequence[float] | np.ndarray,
    labels: Sequence[float] | np.ndarray,
    categories: Sequence[str] | None = None,
    *,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """``{"n", "auroc", "accuracy", "per_category": {cat: {"n", "auroc", "accuracy"}}}``.

    ``probs`` are the positive-class probabilities; see the module docstring for how categories are
    scored. Undefined values are NaN.
    """
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = (np.asarray(labels).ravel() > 0.5).astype(np.int64)
    if p.shape != y.shape:
        raise ValueError(f"probs and labels differ in length: {p.shape[0]} vs {y.shape[0]}")
    out: dict[str, Any] = {
        "n": int(len(p)),
        "auroc": auroc(p, y) if len(p) else math.nan,
        "accuracy": accuracy(p, y, threshold),
        "per_category": {},
    }
    if categories is None:
        return out
    cats = np.asarray(list(categories), dtype=object)
    if cats.shape != p.shape:
        raise ValueError(f"categories and probs differ in length: {cats.shape[0]} vs {p.shape[0]}")
    negatives = y == 0
    for cat in sorted(set(cats.tolist())):
        mine = cats == cat
        cat_y = y[mine]
        if cat_y.min() == 1:  # a tumour category: against every negative slide
            pool = mine | negatives
            cat_auroc = auroc(p[pool], y[pool])
        elif cat_y.max() == 0:
            cat_auroc = math.nan
        else:
            cat_auroc = auroc(p[mine], cat_y)
        out["per_category"][str(cat)] = {
            "n": int(mine.sum()),
            "auroc": cat_auroc,
            "accuracy": accuracy(p[mine], cat_y, threshold),
        }
    return out


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"auroc": .., "per_category": {"macro": {"auroc": ..}}}`` -> ``{prefix + "auroc", prefix + "auroc_macro"}``."""
    flat: dict[str, float] = {}
    for key in ("n", "auroc", "accuracy"):
        if key in metrics:
            flat[f"{prefix}{key}"] = metrics[key]
    for cat, values in metrics.get("per_category", {}).items():
        for key in ("n", "auroc", "accuracy"):
            flat[f"{prefix}{key}_{cat}"] = values[key]
    return flat
