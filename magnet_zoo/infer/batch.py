"""Predict a cohort: many slides, resumable, error-tolerant, sharded across ``torchrun`` ranks.

Output folder layout::

    OUT/slides/<key>.json          one prediction per slide (probability, label, ROI tree, accounting, timings)
    OUT/slides/<key>.png|.geojson  explanations, with ``explain=True``
    OUT/predictions.csv            one row per predicted slide (rebuilt from the JSONs at the end)
    OUT/errors.csv                 one row per slide that could not be predicted, with the reason

    OUT/run.json                   provenance of the latest run (model, revision, weights hash, settings)

``<key>`` is the file stem plus a hash of the absolute path, so two ``slide.svs`` in different folders
do not collide. Every JSON (and every error row) carries the *run key* of the run that wrote it (a hash
of the weights, the network config and the settings; see :mod:`magnet_zoo.infer.provenance`). A rerun
skips a slide only when its JSON has the same run key (and, with ``explain=True``, its PNG and GeoJSON
exist): rerunning after a crash does only the missing work, while another model, revision or threshold
predicts every slide again. Slides that failed with this run key are skipped unless
``retry_errors=True``; ``force=True`` redoes everything.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from magnet_zoo.atomic import atomic_write_text
from magnet_zoo.infer.predict import (
    Prediction,
    check_trees,
    policy_kwargs,
    predict_fetcher,
    resolution_report,
    tree_settings,
)
from magnet_zoo.infer.provenance import provenance as make_provenance
from magnet_zoo.nn.magnet import MagNet
from magnet_zoo.nn.trees import TreePolicy
from magnet_zoo.wsi.errors import SlideError
from magnet_zoo.wsi.fetch import SlideFetcher
from magnet_zoo.wsi.open import BACKENDS, open_slide

log = logging.getLogger(__name__)

SLIDE_SUFFIXES = {
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".dcm", ".btf", ".qptiff",
    ".png", ".jpg", ".jpeg",
}
PREFETCH_BATCHES = 2
PREDICTION_COLUMNS = [
    "slide", "path", "probability", "label", "seconds", "pixels_read", "values_fed", "slide_mpp",
    "resolution_warning", "model", "weights_sha256", "run_key",
]
ERROR_COLUMNS = ["key", "path", "error", "message", "run_key"]


class InputError(ValueError):
    """The list of slides to predict is invalid (a missing path, a CSV without a path column)."""


def slide_key(path: Path) -> str:
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    return f"{path.stem}-{digest}"


def _from_csv(csv_path: Path) -> list[Path]:
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        column = next((c for c in ("path", "slide", "image", "filename") if c in columns), None)
        if column is None:
            raise InputError(f"{csv_path}: needs a column named path, slide, image or filename; found {columns}")
        base = csv_path.parent
        return [(base / row[column]) if not Path(row[column]).is_absolute() else Path(row[column]) for row in reader]


def collect_slides(inputs: Iterable[str | os.PathLike], recursive: bool = False) -> list[Path]:
    """Expand files, folders (slides with known suffixes) and CSV lists into a sorted, unique list."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            pattern = "**/*" if recursive else "*"
            found += sorted(q for q in p.glob(pattern) if q.is_file() and q.suffix.lower() in SLIDE_SUFFIXES)
        elif p.suffix.lower() == ".csv" and p.is_file():
            found += _from_csv(p)
        elif p.exists():
            found.append(p)
        else:
            raise InputError(f"{p}: no such file or folder")
    unique: dict[Path, None] = {}
    for p in found:
        unique.setdefault(p, None)
    return list(unique)


def read_errors(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        return {row["key"]: row for row in csv.DictReader(fh)}


def write_errors(path: Path, rows: dict[str, dict[str, str]]) -> None:
    lines = [ERROR_COLUMNS] + [
        [r.get(c, "") for c in ERROR_COLUMNS] for r in sorted(rows.values(), key=lambda r: r["key"])
    ]
    text = "".join(",".join(_csv_cell(c) for c in row) + "\n" for row in lines)
    atomic_write_text(path, text)


def _csv_cell(value: object) -> str:
    s = str(value).replace("\n", " ")
    return f'"{s.replace(chr(34), chr(34) * 2)}"' if any(c in s for c in ',"') else s


def write_predictions_csv(out_dir: Path) -> Path:
    """Rebuild ``predictions.csv`` from every per-slide JSON in ``out_dir/slides``."""
    rows = []
    for j in sorted((out_dir / "slides").glob("*.json")):
        d = json.loads(j.read_text())
        acc = d.get("accounting", {})
        prov = d.get("provenance") or {}
        model = prov.get("model") or {}
        res = d.get("resolution") or {}
        mpp = res.get("slide_mpp")
        rows.append(
            [j.stem, d["slide"], f"{d['probability']:.6f}", d["label"], f"{d['seconds']:.4f}",
             acc.get("pixels_read", ""), acc.get("values_fed", ""),
             "" if not mpp else f"{(mpp[0] + mpp[1]) / 2:.4g}", res.get("warning") or "",
             model.get("name") or "", model.get("weights_sha256") or "", prov.get("run_key") or ""]
        )
    path = out_dir / "predictions.csv"
    text = "".join(",".join(_csv_cell(c) for c in row) + "\n" for row in [PREDICTION_COLUMNS, *rows])
    atomic_write_text(path, text)
    return path


@dataclass
class RunSummary:
    total: int = 0
    skipped: int = 0
    """Slides not predicted again: done before with the same run key, or failed before with it."""
    done_before: int = 0
    """Of ``skipped``: those with a result from an earlier run of the same run key."""
    predicted: int = 0
    failed: int = 0
    """Slides that failed in this run, plus those skipped because they failed before."""
    redone: int = 0
    """Slides that had a result from another model or other settings, predicted again."""
    run_key: str = ""
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def all_failed(self) -> bool:
        """True when there were slides and not one of them has a result (the CLI exits non-zero then).

        A rerun (``retry_errors`` included) in which the corrupt slides fail again while the others
        were done before is a success."""
        return self.total > 0 and self.predicted + self.done_before == 0


def shard(items: Sequence[Path], rank: int, world: int) -> list[Path]:
    """Rank ``rank`` of ``world`` takes every ``world``-th slide: disjoint, together complete."""
    return list(items[rank::world])


def _open(path: Path, backend: str) -> tuple[Path, object]:
    try:
        return path, open_slide(path, backend)
    except Exception as exc:  # reported per slide, never fatal
        return path, exc


def predict_many(
    model: MagNet,
    slides: Sequence[Path],
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 1,
    workers: int = 4,
    backend: str = "auto",
    explain: bool = False,
    retry_errors: bool = False,
    force: bool = False,
    threshold: float = 0.5,
    rank: int = 0,
    world: int = 1,
    progress: Callable[[Iterable], Iterable] | None = None,
    trees: int | None = None,
    tree_seed: int = 0,
    tree_policy: TreePolicy | None = None,
) -> RunSummary:
    """Predict every slide in ``slides`` (this rank's shard of it) into ``out_dir``; see module doc.

    ``threshold`` turns the probability into the label (``p >= threshold`` is the positive class).
    ``trees`` ``K > 1`` pools ``K`` sampled zoom trees per slide (``predict_slide(trees=K, seed=tree_seed)``;
    ``K`` times the cost, and the slides then run one at a time whatever ``batch_size``, so that a slide's
    trees depend on the seed only); ``tree_policy`` says how they are drawn and pooled (default: the
    inference default, mean-pooled; a tree-MIL checkpoint's own: ``trained_inference``). All are settings of
    the run key.
    """
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    out = Path(out_dir)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    trees = check_trees(trees)
    prov = make_provenance(model, {"threshold": float(threshold), "backend": backend,
                                   **tree_settings(trees, tree_seed, tree_policy)})
    key_now = prov["run_key"]
    if rank == 0:
        atomic_write_text(out / "run.json", json.dumps(prov, indent=1) + "\n")
    errors_path = out / ("errors.csv" if world == 1 else f"errors.rank{rank}.csv")
    redo_errors = retry_errors or force
    known_errors = {} if redo_errors else {
        k: row for k, row in _all_errors(out).items() if row.get("run_key") == key_now
    }
    mine = shard(slides, rank, world)
    summary = RunSummary(total=len(mine), run_key=key_now)
    todo = []
    for p in mine:
        key = slide_key(p)
        state = "todo" if force else _done_state(out / "slides", key, key_now, explain)
        if state == "done":
            summary.skipped += 1
            summary.done_before += 1
        elif key in known_errors:
            summary.skipped += 1
            summary.failed += 1
        else:
            summary.redone += state == "other"
            todo.append(p)
    if summary.redone:
        log.warning(
            "%d slide(s) in %s have results from another model or other settings; predicting them again",
            summary.redone, out,
        )
    new_errors = read_errors(errors_path) if not redo_errors else {}
    if not redo_errors:  # rows of other runs are stale: this run decides about those slides again
        new_errors = {k: row for k, row in new_errors.items() if row.get("run_key") == key_now}
    model.eval()
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    iterator: Iterable = progress(batches) if progress is not None else batches
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="magnet-open")
    ahead: deque = deque()

    def submit(i: int) -> None:
        if i < len(batches):
            ahead.append([pool.submit(_open, p, backend) for p in batches[i]])

    cleared: dict[str, dict[str, str]] = {}  # sharded runs: the slides this rank has predicted so far
    try:
        for i in range(PREFETCH_BATCHES):  # open the next slides while the current batch runs
            submit(i)
        for i, _ in enumerate(iterator):
            opened = [f.result() for f in ahead.popleft()]
            submit(i + PREFETCH_BATCHES)
            good = []
            for path, src in opened:
                if isinstance(src, Exception):
                    _record_error(new_errors, path, src, summary)
                else:
                    good.append((path, src))
            if good:
                _predict_batch(model, good, out, explain, new_errors, summary, prov, threshold, trees, tree_seed,
                               tree_policy)
            if world > 1:  # a rank's file also names the slides it predicted: their old rows are stale
                cleared.update({slide_key(p): _cleared_row(p, key_now) for p in batches[i]
                                if slide_key(p) not in new_errors})
                write_errors(errors_path, {**cleared, **new_errors})
            elif new_errors or errors_path.is_file():
                write_errors(errors_path, new_errors)
    finally:
        pool.shutdown(wait=True)
    if world == 1:
        write_predictions_csv(out)
    return summary


def _done_state(folder: Path, key: str, key_now: str, explain: bool) -> str:
    """``done`` (a result of this run key, with its explanation files if asked), ``other`` (a result of
    another model or other settings) or ``todo`` (no readable result, or explanation files missing)."""
    path = folder / f"{key}.json"
    if not path.is_file():
        return "todo"
    try:
        prov = json.loads(path.read_text()).get("provenance") or {}
    except (OSError, ValueError, AttributeError):
        return "todo"
    if prov.get("run_key") != key_now:
        return "other"
    if explain and not ((folder / f"{key}.png").is_file() and (folder / f"{key}.geojson").is_file()):
        return "todo"
    return "done"


def _all_errors(out: Path) -> dict[str, dict[str, str]]:
    """Every slide's error row: ``errors.csv`` updated by the ranks' files of a sharded run, in which a row
    with no error (:func:`_cleared_row`) says that the rank has since predicted that slide."""
    rows = read_errors(out / "errors.csv")
    for extra in sorted(out.glob("errors.rank*.csv")):
        rows.update(read_errors(extra))
    return {k: row for k, row in rows.items() if row.get("error")}


def _cleared_row(path: Path, run_key: str) -> dict[str, str]:
    return {"key": slide_key(path), "path": str(path), "error": "", "message": "predicted", "run_key": run_key}


def _record_error(errors: dict, path: Path, exc: BaseException, summary: RunSummary) -> None:
    key = slide_key(path)
    errors[key] = {
        "key": key, "path": str(path), "error": type(exc).__name__, "message": str(exc), "run_key": summary.run_key,
    }
    summary.failed += 1
    summary.errors[str(path)] = f"{type(exc).__name__}: {exc}"
    log.warning("skipping %s: %s: %s", path, type(exc).__name__, exc)


def _predict_batch(
    model: MagNet,
    opened,
    out: Path,
    explain: bool,
    errors: dict,
    summary: RunSummary,
    prov: dict,
    threshold: float,
    trees: int | None = None,
    tree_seed: int = 0,
    tree_policy: TreePolicy | None = None,
) -> None:
    labels = model.config.labels
    if trees is not None and len(opened) > 1:  # sampled trees: one slide at a time (module doc)
        for item in opened:
            _predict_batch(model, [item], out, explain, errors, summary, prov, threshold, trees, tree_seed,
                           tree_policy)
        return
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            if trees is not None:
                sampled = predict_fetcher(model, SlideFetcher(opened[0][1], model.config.grey_threshold),
                                          threshold=threshold, trees=trees, seed=tree_seed,
                                          **policy_kwargs(tree_policy))
            else:
                result = model([SlideFetcher(src, model.config.grey_threshold) for _, src in opened])
    except (SlideError, OSError, ValueError) as exc:
        if len(opened) == 1:
            path, src = opened[0]
            _record_error(errors, path, exc, summary)
            src.close()
            return
        for item in opened:  # find the bad slide(s): one by one
            _predict_batch(model, [item], out, explain, errors, summary, prov, threshold, trees, tree_seed,
                           tree_policy)
        return
    seconds = (time.perf_counter() - start) / len(opened)
    for i, (path, src) in enumerate(opened):
        if trees is not None:
            pred = sampled
            pred.slide, pred.provenance, pred.seconds = str(path), prov, seconds
        else:
            prob = float(result.probs[i])
            pred = Prediction(
                slide=str(path),
                probability=prob,
                label=labels[1] if prob >= threshold else labels[0],
                aux_probabilities={},
                tree=result.trees[i],
                accounting=result.accounting[i],
                seconds=seconds,
                final_patches=result.final_patches[i].detach().cpu(),
                threshold=threshold,
                resolution=resolution_report(model, src, result.trees[i]),
                provenance=prov,
                labels=tuple(labels),
            )
        if pred.resolution["warning"] and pred.resolution["relative_difference"] is not None:
            log.warning("%s: %s", path, pred.resolution["warning"])
        key = slide_key(path)
        if explain:
            from magnet_zoo.explain import save_explanation, write_geojson

            save_explanation(src, pred, out / "slides" / f"{key}.png")
            write_geojson(pred, out / "slides" / f"{key}.geojson", slide=str(path))
        # The JSON last: it marks the slide done, so a crash before it redoes the explanation too.
        atomic_write_text(out / "slides" / f"{key}.json", json.dumps(pred.to_dict(), indent=1))
        summary.predicted += 1
        errors.pop(key, None)
        src.close()


def merge_rank_outputs(out_dir: str | os.PathLike) -> Path:
    """After every rank finished: one ``errors.csv`` and one ``predictions.csv`` for the folder."""
    out = Path(out_dir)
    rows = _all_errors(out)
    write_errors(out / "errors.csv", rows)
    for extra in out.glob("errors.rank*.csv"):
        extra.unlink()
    if not rows:
        (out / "errors.csv").unlink(missing_ok=True)
    return write_predictions_csv(out)
