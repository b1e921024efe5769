"""A folder of SynthMets slides with a ``labels.csv``: balanced normal vs tumour, reproducible by seed.

Half of the slides are normal (when ``"normal"`` is among the categories), the other half are tumour
slides spread evenly over the tumour categories asked for. Slide ``i`` gets its own seed derived from
``(seed, i)``; the order of categories is shuffled by ``seed`` so any prefix of the list is roughly
balanced. Slides already present with a matching sidecar are kept, so an interrupted run resumes.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from magnet_zoo.synth.layout import CATEGORIES
from magnet_zoo.synth.slide import GENERATOR_VERSION, generate_slide

logger = logging.getLogger(__name__)

LABELS_FILE = "labels.csv"
COLUMNS = ("path", "label", "category", "seed", "width", "height", "mpp")


def slide_seed(seed: int, index: int) -> int:
    """The seed of slide ``index`` of a dataset drawn with ``seed`` (a 31-bit integer)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint32)[0] >> 1)


def assign_categories(n: int, seed: int, categories: Sequence[str] = CATEGORIES) -> list[str]:
    """Categories of ``n`` slides: half normal, the rest round-robin over the tumour categories."""
    unknown = sorted(set(categories) - set(CATEGORIES))
    if unknown or not categories:
        raise ValueError(f"categories must be a non-empty subset of {CATEGORIES}, got {list(categories)}")
    tumour = [c for c in CATEGORIES if c in categories and c != "normal"]
    if not tumour:
        cats = ["normal"] * n
    elif "normal" not in categories:
        cats = [tumour[i % len(tumour)] for i in range(n)]
    else:
        n_tumour = n // 2
        cats = ["normal"] * (n - n_tumour) + [tumour[i % len(tumour)] for i in range(n_tumour)]
    order = np.random.default_rng([int(seed), 0xCA7]).permutation(n)
    return [cats[i] for i in order]


def _reusable(sidecar: Path, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The existing sidecar if it and its slide match what would be generated now."""
    tif = sidecar.with_suffix(".tif")
    if not (sidecar.is_file() and tif.is_file()):
        return None
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same = all(meta.get(k) == v for k, v in expected.items())
    return meta if same else None


def generate_dataset(
    out_dir: str | os.PathLike[str],
    *,
    n: int,
    size: int,
    seed: int,
    categories: Sequence[str] = CATEGORIES,
    split: str | None = None,
    progress: bool = True,
    mpp: float = 0.5,
    tile: int = 256,
    quality: int = 85,
    workers: int | None = None,
) -> Path:
    """Generate ``n`` slides of ``size`` x ``size`` pixels in ``out_dir``; return the ``labels.csv`` path.

    ``labels.csv`` has columns ``path`` (file name relative to the folder), ``label`` (0/1),
    ``category``, ``seed``, ``width``, ``height``, ``mpp``, and ``split`` when one is given.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cats = assign_categories(n, seed, tuple(categories))
    width = max(4, len(str(n - 1)))
    indices: Any = range(n)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc=f"SynthMets {out.name}", unit="slide")
    rows = []
    for i in indices:
        path = out / f"slide_{i:0{width}d}.tif"
        s = slide_seed(seed, i)
        expected = {
            "version": GENERATOR_VERSION,
            "seed": s,
            "size": [size, size],
            "mpp": float(mpp),
            "tile": tile,
            "quality": quality,
            "category": cats[i],
        }
        meta = _reusable(path.with_suffix(".json"), expected)
        if meta is None:
            meta = generate_slide(
                path,
                size=size,
                category=cats[i],
                seed=s,
                mpp=mpp,
                tile=tile,
                quality=quality,
                workers=workers,
            )
        else:
            logger.info("%s exists with a matching sidecar; kept", path.name)
        row = {k: meta[k] for k in ("label", "category", "seed", "width", "height", "mpp")}
        row["path"] = path.name
        if split is not None:
            row["split"] = split
        rows.append(row)
    columns = list(COLUMNS) + (["split"] if split is not None else [])
    labels = out / LABELS_FILE
    # A temporary file of its own: two processes reusing one folder (two benchmark runs started together)
    # each write a complete labels.csv and neither replaces a half-written or vanished one.
    fd, partial = tempfile.mkstemp(dir=out, prefix=labels.name + ".", suffix=".part")
    with os.fdopen(fd, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.chmod(partial, 0o644)  # mkstemp's 0600 would hide the labels from other users of a shared folder
    os.replace(partial, labels)
    logger.info("wrote %d slides and %s", n, labels)
    return labels


def read_labels(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a ``labels.csv`` with typed values and ``path`` made absolute."""
    path = Path(path)
    rows = []
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            typed: dict[str, Any] = dict(row)
            typed["path"] = str((path.parent / row["path"]).resolve())
            for key in ("label", "seed", "width", "height"):
                if key in row:
                    typed[key] = int(row[key])
            if "mpp" in row:
                typed["mpp"] = float(row["mpp"])
            rows.append(typed)
    return rows
