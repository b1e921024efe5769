"""Probe: can the demo MagNet's small heads tell SynthMets tumour from normal tissue when a crop *is* on tumour?

A diagnostic for the SynthMets benchmark (README, "SynthMets classification"). It separates the "what"
from the "where": crops of a fixed level-0 side are taken from inside the macro / micro tumour boxes of
tumour slides (label 1) and from random tissue of normal slides (label 0), resized to 64 px, and a
``test_resnet`` (the heads of ``magnet2_micro``) is trained on them from scratch. If it separates the
test crops, the MagNet's failure on SynthMets is about where it looks, not about what its heads can see.

Needs the slides made by ``benchmarks/synthmets.py`` (default ``/tmp/synthmets``). Prints a table and
writes ``benchmarks/results/synthmets_probe.json``.

    PYTHONPATH=. python benchmarks/synthmets_probe.py [--data /tmp/synthmets] [--sides 256 1638]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SIZE = 64


def _slides(folder: Path) -> list[tuple[Path, str]]:
    with (folder / "labels.csv").open() as fh:
        return [(folder / row["path"], row["category"]) for row in csv.DictReader(fh)]


def _tissue_points(slide: Any, n: int, rng: np.random.Generator) -> list[tuple[float, float]]:
    level = slide.level_count - 1
    ds = slide.level_downsamples[level]
    rgb = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB")).astype(int)
    ys, xs = np.nonzero(rgb.sum(-1) < 690)  # not glass
    pick = rng.integers(0, len(xs), n)
    return [(float(xs[j] * ds), float(ys[j] * ds)) for j in pick]


def _crop(slide: Any, cx: float, cy: float, side: int) -> np.ndarray:
    from PIL import Image

    level = slide.get_best_level_for_downsample(side / SIZE)
    ds = slide.level_downsamples[level]
    n = max(int(side / ds), 1)
    region = slide.read_region((int(cx - side / 2), int(cy - side / 2)), level, (n, n)).convert("RGB")
    return np.asarray(region.resize((SIZE, SIZE), Image.BILINEAR))


def crops(folder: Path, side: int, per_slide: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops from inside the largest tumour (macro / micro slides) and from normal tissue; ITC skipped."""
    import openslide

    images, labels = [], []
    for path, category in _slides(folder):
        if category == "itc":
            continue
        slide = openslide.OpenSlide(str(path))
        try:
            if category == "normal":
                points, label = _tissue_points(slide, per_slide, rng), 0
            else:
                meta = json.loads(path.with_suffix(".json").read_text())
                x, y, w, h = next(t for t in meta["tumours"] if t["category"] == category)["box"]
                points = [
                    (x + w / 2 + rng.uniform(-0.15, 0.15) * w, y + h / 2 + rng.uniform(-0.15, 0.15) * h)
                    for _ in range(per_slide)
                ]
                label = 1
            for cx, cy in points:
                images.append(_crop(slide, cx, cy, side))
                labels.append(label)
        finally:
            slide.close()
    x = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return x, torch.tensor(labels, dtype=torch.float32)


def probe(data: Path, side: int, steps: int, seed: int) -> dict[str, Any]:
    import timm
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    start = time.perf_counter()
    x_train, y_train = crops(data / "train", side, 6, rng)
    x_test, y_test = crops(data / "test", side, 4, rng)
    net = timm.create_model("test_resnet", pretrained=False, num_classes=1)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    net.train()
    for _ in range(steps):
        i = torch.randint(0, len(x_train), (32,))
        logits = net((x_train[i] - 0.5) / 0.5).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y_train[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        p = torch.sigmoid(net((x_test - 0.5) / 0.5).squeeze(1))
    return {
        "crop_side_px": side,
        "level0_px_per_pixel": side / SIZE,
        "train_crops": len(y_train),
        "train_tumour_crops": int(y_train.sum()),
        "test_crops": len(y_test),
        "steps": steps,
        "final_train_loss": loss.item(),
        "test_auroc": float(roc_auc_score(y_test.numpy(), p.numpy())),
        "test_accuracy": float(((p > 0.5).float() == y_test).float().mean()),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("/tmp/synthmets"))
    ap.add_argument("--sides", type=int, nargs="+", default=[256, 1638], help="level-0 side of the crops")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "synthmets_probe.json")
    args = ap.parse_args(argv)
    if not (args.data / "train" / "labels.csv").exists():
        ap.error(f"no SynthMets slides under {args.data}: run benchmarks/synthmets.py first")
    torch.set_num_threads(args.threads)
    rows = [probe(args.data, side, args.steps, args.seed) for side in args.sides]
    print("| crop side (level-0 px) | px per pixel | train crops (tumour) | test crops | test AUROC | test acc | s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['crop_side_px']} | {r['level0_px_per_pixel']:.0f} | {r['train_crops']} ({r['train_tumour_crops']}) |"
            f" {r['test_crops']} | {r['test_auroc']:.3f} | {r['test_accuracy']:.3f} | {r['seconds']:.0f} |"
        )
    result = {"benchmark": "synthmets_probe", "command": " ".join(sys.argv), "data": str(args.data),
              "rows": rows, "machine": machine_info()}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
