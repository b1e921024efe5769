"""One SynthMets slide: plan it, render its tiles, write the pyramid and the JSON sidecar.

Rendering a level-0 tile is cheap on purpose: background tiles are skipped (``None``), tissue tiles
are a slice of the slide's texture bank, and only tiles on a tissue or tumour border evaluate a
per-pixel mask. Every tile is a pure function of the plan and its position, so tiles can be rendered
in any order on any thread and the pixels depend only on the seed (and size, category, mpp, tile).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from magnet_zoo.synth.layout import CATEGORIES, Layout, plan_layout, stream
from magnet_zoo.synth.texture import BANK_PAD, TextureBank, edge_noise, slide_bank
from magnet_zoo.synth.tiff_writer import write_pyramid

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "1.0.0"
"""Bump when the same arguments would give different pixels; it is stored in every sidecar."""

MIN_SIZE, MAX_SIZE = 1024, 200_000


@dataclass(frozen=True)
class SlidePlan:
    """Everything needed to render any tile: geometry, textures and the glass colour."""

    layout: Layout
    bank: TextureBank
    glass: tuple[int, int, int]


def _glass(rng: np.random.Generator) -> tuple[int, int, int]:
    """A light, near-grey glass colour (channels within a few levels, so a grey filter removes it)."""
    base = rng.uniform(238.0, 247.0)
    r, g, b = base + rng.uniform(-2, 2), base + rng.uniform(-2, 2), base + rng.uniform(-1, 3)
    return int(round(r)), int(round(g)), int(round(b))


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    width, height = (size, size) if isinstance(size, int | np.integer) else size
    width, height = int(width), int(height)
    for side in (width, height):
        if not MIN_SIZE <= side <= MAX_SIZE:
            raise ValueError(f"slide sides must be in [{MIN_SIZE}, {MAX_SIZE}] pixels, got {width}x{height}")
    return width, height


def plan_slide(size: int | tuple[int, int], category: str, seed: int, mpp: float = 0.5) -> SlidePlan:
    """The full plan of a slide (``size`` is ``width`` or ``(width, height)`` in level-0 pixels)."""
    width, height = _size(size)
    if not 0.1 <= mpp <= 4.0:
        raise ValueError(f"mpp must be in [0.1, 4.0] microns per pixel, got {mpp}")
    mpp = float(mpp)
    layout = plan_layout(width, height, category, seed, mpp, edge_noise(round(mpp, 4)))
    style = stream(seed, "style")
    bank = slide_bank(style, mpp)
    return SlidePlan(layout, bank, _glass(style))


class _Renderer:
    """Renders level-0 tiles of a plan and records, thread-safely, what it drew (for the sidecar)."""

    def __init__(self, plan: SlidePlan, tile: int) -> None:
        if tile > BANK_PAD:
            raise ValueError(f"tile must be at most {BANK_PAD}, got {tile}")
        self.plan = plan
        self.tile = tile
        self.glass = np.asarray(plan.glass, np.uint8)
        self.cols = -(-plan.layout.width // tile)
        self._lock = threading.Lock()
        self.tissue_pixels = 0
        self.boxes: dict[int, list[int]] = {}

    def tile_at(self, x: int, y: int) -> np.ndarray | None:
        """The tile whose top-left level-0 pixel is ``(x, y)``, or ``None`` if it is plain glass."""
        layout, bank, t = self.plan.layout, self.plan.bank, self.tile
        state = layout.tissue.classify(x, y, t, t)
        if state < 0:
            return None  # tumours lie inside tissue: nothing else can be here
        tissue = None if state > 0 else layout.tissue.mask(x, y, t, t)
        if tissue is not None and not tissue.any():
            return None
        out = bank.crop("normal", x, y, t, t).copy()
        hits: list[tuple[int, list[int]]] = []
        for index, tumour in enumerate(layout.tumours):
            where = tumour.region.classify(x, y, t, t)
            if where < 0:
                continue
            if where > 0 and tissue is None:  # the whole tile is tumour
                out[...] = bank.crop("tumour", x, y, t, t)
                hits.append((index, [x, y, x + t, y + t]))
                continue
            mask = np.ones((t, t), bool) if where > 0 else tumour.region.mask(x, y, t, t)
            if tissue is not None:
                mask &= tissue
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            if rows.size == 0:
                continue
            np.copyto(out, bank.crop("tumour", x, y, t, t), where=mask[..., None])
            hits.append(
                (index, [x + int(cols[0]), y + int(rows[0]), x + int(cols[-1]) + 1, y + int(rows[-1]) + 1])
            )
        if tissue is not None:
            out[~tissue] = self.glass
        count = t * t if tissue is None else int(tissue.sum())
        with self._lock:
            self.tissue_pixels += count
            for index, (x0, y0, x1, y1) in hits:
                box = self.boxes.setdefault(index, [x0, y0, x1, y1])
                box[:] = [min(box[0], x0), min(box[1], y0), max(box[2], x1), max(box[3], y1)]
        return out

    def row(self, row: int) -> list[np.ndarray | None]:
        y = row * self.tile
        return [self.tile_at(col * self.tile, y) for col in range(self.cols)]


def generate_slide(
    path: str | os.PathLike[str],
    *,
    size: int | tuple[int, int],
    category: str,
    seed: int,
    mpp: float = 0.5,
    tile: int = 256,
    quality: int = 85,
    workers: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write one SynthMets slide (pyramidal TIFF at ``path``) and its sidecar (same stem, ``.json``).

    ``size`` is the level-0 side, or ``(width, height)``; ``category`` is ``"normal"``, ``"macro"``,
    ``"micro"`` or ``"itc"`` (the largest tumour region; smaller foci may accompany it). Same
    arguments give byte-identical pixels. Returns the sidecar dict: label, category, tumour boxes as
    ``[x, y, w, h]`` in level-0 pixels, sizes, mpp, seed and generator version.
    """
    if category not in CATEGORIES:
        raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
    if tile not in (256, 512):
        raise ValueError(f"tile must be 256 or 512, got {tile}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    plan = plan_slide(size, category, seed, mpp)
    layout = plan.layout
    renderer = _Renderer(plan, tile)
    description = f"SynthMets {GENERATOR_VERSION} seed={seed} category={category} mpp={mpp}"
    partial = path.with_name(path.name + ".part")
    try:
        sizes = write_pyramid(
            partial,
            layout.width,
            layout.height,
            renderer.row,
            tile=tile,
            quality=quality,
            mpp=mpp,
            background=plan.glass,
            description=description,
            workers=workers,
            progress=progress,
        )
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()

    tumours = []
    for index, tumour in enumerate(layout.tumours):
        if index not in renderer.boxes:  # placement keeps regions well inside tissue: a bug if it happens
            raise RuntimeError(f"{path.name}: a {tumour.category} region drew no pixels")
        x0, y0, x1, y1 = renderer.boxes[index]
        tumours.append(
            {
                "category": tumour.category,
                "box": [x0, y0, x1 - x0, y1 - y0],
                "extent_um": max(x1 - x0, y1 - y0) * mpp,
            }
        )
    meta: dict[str, Any] = {
        "generator": "magnet_zoo.synth",
        "version": GENERATOR_VERSION,
        "file": path.name,
        "label": int(category != "normal"),
        "category": category,
        "seed": int(seed),
        "width": layout.width,
        "height": layout.height,
        "size": [layout.width, layout.height],
        "mpp": mpp,
        "tile": tile,
        "quality": quality,
        "levels": [list(s) for s in sizes],
        "glass_rgb": list(plan.glass),
        "tissue_fraction": renderer.tissue_pixels / (layout.width * layout.height),
        "boxes": [t["box"] for t in tumours],
        "tumours": tumours,
    }
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    logger.info(
        "%s: %s %dx%d, %d tumour regions, %.1f s",
        path.name,
        category,
        layout.width,
        layout.height,
        len(tumours),
        time.perf_counter() - start,
    )
    return meta
