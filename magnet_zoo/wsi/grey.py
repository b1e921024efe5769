"""The paper's grey filter (section 3.3.1): pixels whose R, G, B differ pairwise by less than a
threshold (15 on 0-255) become black. It removes the glass background (white is a grey) and
scanning artefacts, and makes the background match the black padding outside the slide."""

from __future__ import annotations

import numpy as np


def grey_filter(rgb: np.ndarray, threshold: int = 15) -> np.ndarray:
    """Black out grey pixels of an ``(..., 3)`` uint8 array, in place; returns it."""
    if threshold <= 0:
        return rgb
    spread = rgb.max(axis=-1).astype(np.int16) - rgb.min(axis=-1)
    rgb[spread < threshold] = 0
    return rgb
