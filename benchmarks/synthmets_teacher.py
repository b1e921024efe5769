"""First-layer guidance on SynthMets, teacher and student apart: does the head point at the tumour, and
does the first attention map follow it?

Head guidance of the first layer (``--recipe-field guidance_layers=[1,2]``, :mod:`magnet_zoo.train.guidance`)
trains the first attention map towards the last auxiliary head's scores on a ``grid x grid`` set of windows
over the whole slide. When the first layer's crops then land on tumour no more often than random crops,
that can be the teacher's fault (the head's best window is not on tumour) or the student's (the map does
not follow the head). This script scores both on a trained checkpoint, on the held-out slides of a
``synthmets.py`` data folder (sidecars give the tumour masks; training used none):

* teacher: per tumour slide, is the head's highest-scoring tissue window on tumour? Against a window drawn
  on random tissue (the same windows, uniformly over the tissue cells).
* student: the share of the first layer's crops (the expected crop, as at inference) on tumour, against
  squares of the same sides centred on random tissue pixels;
* agreement: the share of first-layer crops that contain the centre of the head's best window.

With ``--fit-student N`` each checkpoint is scored twice: as trained, and after ``N`` further steps that
train *only* its first layer's attention stacks on the guidance loss (the head frozen as the teacher, no
other loss, ``--fit-split`` slides; their labels are not used, or only to keep the tumour slides with
``--fit-positives``: on a normal slide the head's best window is by definition not tumour, so the target
there teaches the map what the head's favourite *normal* tissue looks like). If the student then follows the teacher,
what kept it from doing so in training was the rest of the loop; if it does not, the first layer cannot
learn the head's judgement from its 56 px view in that many steps.

    python benchmarks/synthmets_teacher.py --models /tmp/mz/ckpt_guide1_s0 --data /tmp/synthmets
    python benchmarks/synthmets_teacher.py --models CKPT --data /tmp/synthmets_quick --split val --out /tmp/t.json
    python benchmarks/synthmets_teacher.py --models CKPT --fit-student 300 --standardise --temperature 0.5

Prints a table and writes ``--out`` (JSON) and the same name with ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info  # noqa: E402
from baselines.common import Slide, jsonable, load_split, tissue_view  # noqa: E402
from baselines.magnet import tumour_integral  # noqa: E402

from magnet_zoo.hub.checkpoint import load_checkpoint_dir  # noqa: E402
from magnet_zoo.nn.tree import root_square  # noqa: E402
from magnet_zoo.train.guidance import guidance_loss, window_scores  # noqa: E402
from magnet_zoo.wsi import SlideFetcher, open_slide  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class TeacherError(ValueError):
    """The checkpoint or the data cannot be scored (no per-patch last head, no tumour slides)."""


def score_slide(model: Any, slide: Slide, grid: int, samples: int = 256) -> dict[str, float]:
    """Teacher, student and agreement on one tumour slide (see the module docstring)."""
    integral = tumour_integral(slide)
    rng = np.random.default_rng([zlib.crc32(Path(slide.path).name.encode()), slide.width, 5])
    with open_slide(slide.path) as src, torch.inference_mode():
        fetcher = SlideFetcher(src, model.config.grey_threshold)
        canvas = root_square(*fetcher.slide_size)
        win = window_scores(model, [fetcher], [[canvas]], grid)
        out = model([fetcher])
        rgb, view_ds, _ = tissue_view(src, 1024)
    scores, tissue = win.scores[0, 0].numpy(), win.tissue[0, 0].numpy()
    if not tissue.any():
        raise TeacherError(f"{slide.path}: no tissue cell in the {grid}x{grid} windows")
    cell = canvas.side / grid  # windows are centred on their cells and twice as wide
    side = 2 * cell

    def window_hit(r: int, c: int) -> float:
        return integral.hit(canvas.x + (c + 0.5) * cell - side / 2, canvas.y + (r + 0.5) * cell - side / 2, side)[0]

    best = np.unravel_index(int(np.argmax(np.where(tissue, scores, -np.inf))), scores.shape)
    cells = np.argwhere(tissue)
    teacher_random = float(np.mean([window_hit(int(r), int(c)) for r, c in cells]))
    bx, by = canvas.x + (best[1] + 0.5) * cell, canvas.y + (best[0] + 0.5) * cell
    crops = [n.box[:3] for n in out.trees[0] if n.layer == 1]
    ty, tx = np.nonzero(rgb.any(axis=-1))
    student, student_random, agree = [], [], []
    for x, y, s in crops:
        student.append(integral.hit(x, y, s)[0])
        agree.append(float(x <= bx <= x + s and y <= by <= y + s))
        pick = rng.integers(0, len(tx), samples)
        cx, cy = (tx[pick] + 0.5) * view_ds, (ty[pick] + 0.5) * view_ds
        student_random.append(float(np.mean([integral.hit(a - s / 2, b - s / 2, s)[0] for a, b in zip(cx, cy,
                                                                                                    strict=True)])))
    return {"teacher": window_hit(int(best[0]), int(best[1])), "teacher_random": teacher_random,
            "student": float(np.mean(student)), "student_random": float(np.mean(student_random)),
            "agreement": float(np.mean(agree)), "crops": len(crops)}


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {"slides": 0}
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("teacher", "teacher_random", "student",
                                                               "student_random", "agreement")}
    mean["teacher_ratio"] = mean["teacher"] / mean["teacher_random"] if mean["teacher_random"] > 0 else None
    mean["student_ratio"] = mean["student"] / mean["student_random"] if mean["student_random"] > 0 else None
    return {"slides": len(rows), **mean}


def fit_student(model: Any, slides: Sequence[Slide], *, steps: int, grid: int, temperature: float,
                standardise: bool, lr: float = 3e-3, batch: int = 8, seed: int = 0) -> list[float]:
    """Train only the first layer's attention stacks on the first-layer guidance loss over ``slides`` (random
    batches; the rest of the model frozen, in eval mode). Returns the loss per step."""
    from tqdm.auto import tqdm

    layer = model.layers[0]
    model.eval()
    layer.train()  # the stacks' batch statistics as in training; everything else as at inference
    for p in model.parameters():
        p.requires_grad_(False)
    for p in layer.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    sources = [open_slide(s.path) for s in slides]
    losses = []
    try:
        for _ in tqdm(range(steps), desc="refitting the first layer", unit="step", mininterval=10):
            pick = rng.choice(len(sources), size=min(batch, len(sources)), replace=False)
            fetchers = [SlideFetcher(sources[i], model.config.grey_threshold) for i in pick]
            loss = guidance_loss(model, None, fetchers, layers=[1], grid=grid, temperature=temperature,
                                 standardise=standardise).attention
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        for src in sources:
            src.close()
    model.eval()
    return losses


def score_model(path: Path, slides: Sequence[Slide], grid: int, fit: dict[str, Any] | None = None) -> dict[str, Any]:
    """Teacher, student and agreement of one checkpoint on ``slides``; with ``fit`` (``fit_student``'s keyword
    arguments and ``slides`` to fit on) after fitting its student alone."""
    model = load_checkpoint_dir(path).eval()
    cfg = model.config
    if cfg.num_layers not in cfg.active_aux_layers or cfg.aux_pooling == "mean":
        raise TeacherError(f"{path}: the last layer's auxiliary head must score patches one by one "
                           f"(aux_pooling {cfg.aux_pooling!r}, aux_layers {tuple(cfg.aux_layers)})")
    fitted: dict[str, Any] = {}
    if fit:
        fit = dict(fit)
        fit_slides, positives_only = fit.pop("slides"), fit.pop("positives_only", False)
        losses = fit_student(model, fit_slides, grid=grid, **fit)
        fit["positives_only"] = positives_only
        first_last = [float(np.mean(losses[:10])), float(np.mean(losses[-10:]))]
        fitted = {"fit_student": {**fit, "loss_first_last": first_last}}
    per_slide = []
    for s in slides:
        row = score_slide(model, s, grid)
        per_slide.append({"slide": Path(s.path).name, "category": s.category, **row})
    by_cat = {c: summarise([r for r in per_slide if r["category"] == c])
              for c in sorted({r["category"] for r in per_slide})}
    return {"model": str(path), **fitted, "all": summarise(per_slide), "categories": by_cat, "slides": per_slide}


def _fmt(v: Any, nd: int = 2, suffix: str = "") -> str:
    return "–" if v is None else f"{v:.{nd}f}{suffix}"


def table(results: Sequence[dict[str, Any]]) -> str:
    lines = ["| model | tumours | slides | head's best window on tumour | random tissue window | ratio | "
             "first-layer crops on tumour | random on tissue | ratio | crops holding the head's best window |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        label = Path(res["model"]).name
        if "fit_student" in res:
            fs = res["fit_student"]
            label += f", student refit {fs['steps']} steps" + (" on tumour slides" if fs.get("positives_only") else "")
        for name, s in (("all", res["all"]), *res["categories"].items()):
            lines.append(f"| {label} | {name} | {s['slides']} | {_fmt(s['teacher'])} | "
                         f"{_fmt(s['teacher_random'])} | {_fmt(s['teacher_ratio'], 1, 'x')} | {_fmt(s['student'])} | "
                         f"{_fmt(s['student_random'])} | {_fmt(s['student_ratio'], 1, 'x')} | "
                         f"{_fmt(s['agreement'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, nargs="+", required=True, help="checkpoint folders (save_pretrained)")
    ap.add_argument("--data", type=Path, default=Path("/tmp/synthmets"), help="a synthmets.py data folder")
    ap.add_argument("--split", default="test", help="which split's tumour slides to score (default test)")
    ap.add_argument("--grid", type=int, default=16, help="windows per side over the slide (the guidance grid)")
    ap.add_argument("--fit-student", type=int, default=0, metavar="N",
                    help="also score each checkpoint after N steps training its first layer alone on the guidance")
    ap.add_argument("--fit-split", default="train", help="slides the student is refitted on (default train)")
    ap.add_argument("--fit-positives", action="store_true", help="refit on the tumour slides of --fit-split only")
    ap.add_argument("--temperature", type=float, default=1.0, help="guidance temperature of the refit")
    ap.add_argument("--standardise", action="store_true", help="standardised guidance target in the refit")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--also-running", default="", help="what else shared the machine (written in the JSON)")
    ap.add_argument("--out", type=Path, default=RESULTS / "synthmets_teacher.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    csv_path = args.data / args.split / "labels.csv"
    if not csv_path.is_file():
        raise TeacherError(f"no {csv_path}; generate the data with benchmarks/synthmets.py --data {args.data}")
    slides = [s for s in load_split(csv_path, args.split) if s.label]
    if not slides:
        raise TeacherError(f"{csv_path} holds no tumour slide")
    results = [score_model(path, slides, args.grid) for path in args.models]
    if args.fit_student:
        fit_csv = args.data / args.fit_split / "labels.csv"
        if not fit_csv.is_file():
            raise TeacherError(f"no {fit_csv} to refit the student on")
        fit_slides = [s for s in load_split(fit_csv, args.fit_split) if s.label or not args.fit_positives]
        fit = {"slides": fit_slides, "steps": args.fit_student, "positives_only": args.fit_positives,
               "temperature": args.temperature, "standardise": args.standardise}
        results += [score_model(path, slides, args.grid, fit) for path in args.models]
    md = table(results)
    print(md)
    out = {"command": shlex.join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
           "data": str(args.data), "split": args.split, "grid": args.grid, "results": results,
           "machine": machine_info(), "also_running": args.also_running or "nothing"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(jsonable(out), indent=1, allow_nan=False) + "\n")
    args.out.with_suffix(".md").write_text(
        f"# First-layer guidance: teacher and student\n\n`{out['command']}`\n\n{md}\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
