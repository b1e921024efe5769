"""Mean-RGB logistic regression: the paper's RGB baseline (Dimitriou et al. 2024, AUROC 58 on Camelyon).

Features: the mean R, G and B of the slide's tissue (pixels that survive the grey filter, so glass does not
count) on a whole-slide view whose longer side is about 1024 px. Standardised, then scikit-learn's
``LogisticRegression``; its inverse regularisation ``C`` is chosen on the validation split. SynthMets
matches the mean colour of tumour and normal tissue, so this baseline should stay near chance: it checks
that the benchmark cannot be solved by colour.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from magnet_zoo.train.metrics import auroc
from magnet_zoo.wsi import open_slide

from .common import Budget, MethodReport, Slide, SlideResult, tissue_view

logger = logging.getLogger(__name__)

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def features(path: str, view_side: int = 1024) -> tuple[np.ndarray, int]:
    """Mean RGB (0-255) of the tissue of one slide, and the pixels read."""
    with open_slide(path) as src:
        rgb, _, read = tissue_view(src, view_side)
    tissue = rgb.any(axis=-1)
    if not tissue.any():
        return np.zeros(3), read
    return rgb[tissue].mean(axis=0).astype(np.float64), read


def run(
    train: Sequence[Slide], val: Sequence[Slide], test: Sequence[Slide], *, view_side: int = 1024, seed: int = 0
) -> MethodReport:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    budget = Budget(None)
    x_train = np.stack([features(s.path, view_side)[0] for s in train])
    x_val = np.stack([features(s.path, view_side)[0] for s in val])
    y_train = np.array([s.label for s in train])
    y_val = np.array([s.label for s in val])
    scores: dict[str, Any] = {}
    best_c, best = C_GRID[0], -1.0
    for c in C_GRID:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000, random_state=seed))
        model.fit(x_train, y_train)
        score = auroc(model.predict_proba(x_val)[:, 1], y_val)
        scores[str(c)] = score
        if np.isfinite(score) and score > best:
            best_c, best = c, score
    model = make_pipeline(StandardScaler(), LogisticRegression(C=best_c, max_iter=1000, random_state=seed))
    model.fit(x_train, y_train)
    train_seconds = budget.elapsed

    results = []
    for s in test:
        start = time.perf_counter()
        x, read = features(s.path, view_side)
        prob = float(model.predict_proba(x[None])[0, 1])
        results.append(
            SlideResult(s.path, s.label, s.category, s.size, prob, 3, read, time.perf_counter() - start,
                        {"mean_rgb": [round(float(v), 3) for v in x]})
        )
    mean_by_class = {
        name: x_train[y_train == label].mean(axis=0).round(2).tolist() for label, name in ((0, "normal"), (1, "tumour"))
    }
    return MethodReport(
        name="mean_rgb",
        description="mean RGB of the tissue (grey-filtered ~1024 px view) -> logistic regression (paper's baseline)",
        results=results,
        training={
            "seconds": train_seconds,
            "val_auroc_by_C": scores,
            "chosen_C": best_c,
            "train_mean_rgb_by_class": mean_by_class,
        },
        settings={"view_side": view_side, "C_grid": list(C_GRID)},
    )
