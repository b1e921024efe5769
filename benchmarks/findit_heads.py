"""Can the MagNet's classifier learn the FindIt object from what a first layer *on the object* gives it?

In the FindIt 1 % runs that fail, the first-layer boxes end on the object but the classifier stays at
ln 2 (docs/learn_to_look.md, grid ``issue14-box``). This separates the heads from the attention: the
classifier of ``magnet2_tiny`` alone, trained for the FindIt grid's 200 steps (batch 8, Adam 1e-3, the
recipe's warm-up and cosine), on the final patches a two-layer MagNet would give it if both first-layer
boxes held the object. Per box: the frozen patch (the whole box, read at 56 px from the pyramid and
grey-filtered, as the MagNet reads it), then one "learned" crop of 0.35 of the box at a uniformly random
place in it (mostly background, as in the failing runs). The object lies at a uniformly random place
inside each box (``--placement uniform``; the failing runs hold it anywhere in the box, often at an
edge) or at its centre (``--placement centre``). Training draws from ``--pool`` images per object size,
generated once (boxes drawn anew at every draw); evaluation uses ``--n-eval`` other images.
No attention, no auxiliary heads, no paradoxical loss.

    python benchmarks/findit_heads.py                       # 1 % and 3 % objects, boxes of 0.1 and 0.05, 3 seeds
    python benchmarks/findit_heads.py --settings 0.01:0.1 --seeds 0 --steps 20 --out /tmp/h.json   # quick

Prints a table and writes ``benchmarks/results/findit_heads.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _machine import machine_info  # noqa: E402

from magnet_zoo.factory import create_model  # noqa: E402
from magnet_zoo.nn.fetcher import Square  # noqa: E402
from magnet_zoo.tasks.findit import FindItSpec, auroc, make_fetcher, make_image  # noqa: E402
from magnet_zoo.train.schedules import lr_factor  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GREY_THRESHOLD = 15
CHILD = 0.35
"""The learned second-layer crop's side as a share of its box (the recipe's max_scale, where it sits)."""


@functools.cache
def _image(spec: FindItSpec, image_seed: int):
    sample = make_image(spec, image_seed)
    return sample, make_fetcher(sample, GREY_THRESHOLD)


def final_patches(spec: FindItSpec, image_seed: int, box: float, placement: str, rng: np.random.Generator,
                  size: int = 56) -> tuple[torch.Tensor, int]:
    """``(4, 3, size, size)`` patches of image ``image_seed`` in tree order (box 1: frozen, learned; box 2: the
    same), and its label. Images are generated once and kept (the boxes are drawn anew at every use)."""
    sample, fetcher = _image(spec, image_seed)
    x, y, d, _ = sample.box
    side = box * spec.image_size
    squares = []
    for _ in range(2):
        if placement == "centre":
            bx, by = x + d / 2 - side / 2, y + d / 2 - side / 2
        else:  # the whole object inside the box, anywhere
            bx = x - rng.uniform(0, max(side - d, 0))
            by = y - rng.uniform(0, max(side - d, 0))
        child = CHILD * side
        cx, cy = bx + rng.uniform(0, side - child), by + rng.uniform(0, side - child)
        squares += [Square(bx, by, side), Square(cx, cy, child)]
    return fetcher.fetch(squares, size).images, sample.label


def batch(spec: FindItSpec, seeds: list[int], box: float, placement: str, rng: np.random.Generator):
    got = [final_patches(spec, s, box, placement, rng) for s in seeds]
    return torch.stack([p for p, _ in got]), torch.tensor([float(label) for _, label in got])


def run(object_frac: float, box: float, placement: str, seed: int, steps: int, batch_size: int, n_eval: int,
        image_size: int, pool: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    spec = FindItSpec(image_size=image_size, object_frac=object_frac)
    model = create_model("magnet2_tiny", translation="clamp", attention_init="random")
    classifier = model.classifier.train()
    opt = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    curve = []
    running = []
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * lr_factor(step / steps, 20 / 300, "cosine", 1 / steps)
        images, labels = batch(spec, [int(i) for i in rng.integers(0, pool, batch_size)], box, placement, rng)
        loss = F.binary_cross_entropy_with_logits(classifier(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running.append(float(loss))
        if (step + 1) % 20 == 0 or step + 1 == steps:
            curve.append(round(statistics.mean(running[-20:]), 3))
    classifier.eval()
    scores, labels = [], []
    with torch.no_grad():
        for start in range(0, n_eval, 16):
            ids = [10**9 + start + i for i in range(min(16, n_eval - start))]
            images, lab = batch(spec, ids, box, placement, rng)
            scores += torch.sigmoid(classifier(images)).tolist()
            labels += lab.int().tolist()
    acc = statistics.mean(float((s > 0.5) == bool(y)) for s, y in zip(scores, labels, strict=True))
    return {"object_frac": object_frac, "box": box, "placement": placement, "seed": seed,
            "object_px_in_frozen_patch": object_frac / box * 56, "steps": steps, "pool": pool, "accuracy": acc,
            "auroc": auroc(scores, labels), "loss_every_20_steps": curve, "seconds": time.perf_counter() - t0}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| object | box | placement | object px in the frozen patch | seeds | accuracy, seed by seed | AUROC | "
             "loss over the last 20 steps |", "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["object_frac"], r["box"], r["placement"]), []).append(r)
    for (frac, box, placement), rs in groups.items():
        def each(key: str, rs: list[dict[str, Any]] = rs) -> str:
            return " / ".join(f"{r[key]:.2f}" for r in rs)

        last = " / ".join(f"{r['loss_every_20_steps'][-1]:.2f}" for r in rs)
        seeds = ", ".join(str(r["seed"]) for r in rs)
        lines.append(f"| {frac:.0%} | {box:g} | {placement} | {rs[0]['object_px_in_frozen_patch']:.1f} | {seeds} | "
                     f"{each('accuracy')} | {each('auroc')} | {last} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", default=["0.01:0.1", "0.01:0.05", "0.03:0.1"],
                    help="object_frac:box pairs (box: the first-layer box's side as a share of the image)")
    ap.add_argument("--placement", nargs="+", default=["uniform"], choices=["uniform", "centre"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--n-eval", type=int, default=96)
    ap.add_argument("--pool", type=int, default=400,
                    help="training images per object size, generated once and drawn from (each draw places new boxes)")
    ap.add_argument("--image-size", type=int, default=896)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--also-running", default=None, help="what else used the machine (written into the JSON)")
    ap.add_argument("--out", type=Path, default=RESULTS / "findit_heads.json")
    args = ap.parse_args(argv)
    try:
        settings = [tuple(float(v) for v in s.split(":")) for s in args.settings]
    except ValueError:
        ap.error("--settings takes object_frac:box pairs such as 0.01:0.1")
    if any(len(s) != 2 or not 0 < s[0] < s[1] <= 1 for s in settings) or args.steps < 1 or args.n_eval < 2:
        ap.error("need 0 < object_frac < box <= 1, --steps >= 1 and --n-eval >= 2")
    torch.set_num_threads(args.threads)
    rows = []
    for frac, box in settings:
        for placement in args.placement:
            for seed in args.seeds:
                row = run(frac, box, placement, seed, args.steps, args.batch_size, args.n_eval, args.image_size,
                          args.pool)
                print(f"object {frac:.0%} box {box:g} {placement} seed {seed}: accuracy {row['accuracy']:.2f} "
                      f"AUROC {row['auroc']:.2f} loss {row['loss_every_20_steps']} ({row['seconds']:.0f} s)",
                      flush=True)
                rows.append(row)
    text = table(rows)
    print(text)
    command = "python benchmarks/findit_heads.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"benchmark": "findit_heads", "command": command, "rows": rows, "also_running": args.also_running,
              "machine": machine_info()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
