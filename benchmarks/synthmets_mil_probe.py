"""Probe: can the demo MagNet's small head learn SynthMets from slide labels when its crops are *random tissue*?

The second diagnostic for the SynthMets benchmark (``synthmets_probe.py`` is the first: it gives the head
crops known to be on tumour). Here nothing is known: each slide gets ``--crops`` random squares centred on
random tissue pixels, of side ``--side`` times the slide's side, read at ``--size`` px (the grey filter
applied, as the MagNet reads). A ``test_resnet`` (the heads of ``magnet2_micro``) with one linear layer is
trained from scratch, multiple-instance style, on slide labels only: each step takes 8 slides and 4 of
their crops, and the slide logit is the largest crop logit (``max``) or every crop is scored against the
slide label (``per_patch``, the learn-to-look recipe's auxiliary loss). Validation scores a slide by its
largest logit over all its crops.

If this learns while the MagNet does not, the heads and the signal are fine and the MagNet's trouble is in
the crops it chooses or in how it trains. Needs the slides of ``benchmarks/synthmets.py`` (default
``/tmp/synthmets``). Prints a table and writes ``benchmarks/results/synthmets_mil_probe.json``.

    PYTHONPATH=. python benchmarks/synthmets_mil_probe.py [--data /tmp/synthmets] [--steps 600]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info  # noqa: E402
from baselines.common import Slide, load_split, random_crops  # noqa: E402

from magnet_zoo.nn.heads import Backbone  # noqa: E402
from magnet_zoo.train.metrics import classification_metrics  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = ((0.25, 56, "max"), (0.25, 56, "per_patch"), (0.1, 64, "max"))
"""(crop side / slide side, crop px, pooling): a layer-1-like crop (~73 level-0 px per pixel on 16k slides)
and a final-patch-like one (~26 px per pixel)."""


def train_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, val: list[Slide],
                pooling: str, steps: int, lr: float, seed: int, every: int) -> list[dict[str, Any]]:
    torch.manual_seed(seed)
    backbone = Backbone("test_resnet", pretrained=False)
    fc = torch.nn.Linear(backbone.num_features, 1)
    opt = torch.optim.Adam([*backbone.parameters(), *fc.parameters()], lr)
    n, k = x_train.shape[:2]
    curve = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        backbone.train()
        idx = torch.randint(0, n, (8,))
        sub = torch.stack([torch.randperm(k)[:4] for _ in range(8)])
        x = x_train[idx[:, None], sub]
        if bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        logits = fc(backbone(x.flatten(0, 1))).view(8, 4)
        y = y_train[idx]
        if pooling == "max":
            loss = F.binary_cross_entropy_with_logits(logits.amax(1), y)
        else:
            loss = F.binary_cross_entropy_with_logits(logits, y[:, None].expand_as(logits))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            backbone.eval()
            with torch.no_grad():
                scores = fc(backbone(x_val.flatten(0, 1))).view(len(val), -1).amax(1)
            m = classification_metrics(scores.tolist(), [s.label for s in val], [s.category for s in val])
            curve.append({
                "step": step, "seconds": round(time.perf_counter() - start, 1), "val_auroc": m["auroc"],
                **{f"val_auroc_{c}": m["per_category"][c]["auroc"] for c in ("macro", "micro", "itc")},
            })
    return curve


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("/tmp/synthmets"))
    ap.add_argument("--crops", type=int, default=64, help="random crops per slide (default 64)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "synthmets_mil_probe.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for split in ("train", "val"):
        if not (args.data / split / "labels.csv").is_file():
            raise SystemExit(f"no {split} slides under {args.data}: run benchmarks/synthmets.py first")
    train = load_split(args.data / "train" / "labels.csv", "train")
    val = load_split(args.data / "val" / "labels.csv", "val")
    y_train = torch.tensor([float(s.label) for s in train])
    rows = []
    cache: dict[tuple[float, int], tuple[torch.Tensor, torch.Tensor, float]] = {}
    for side, size, pooling in SETTINGS:
        if (side, size) not in cache:
            t0 = time.perf_counter()
            xt = random_crops(train, args.crops, side, size, args.seed)
            xv = random_crops(val, args.crops, side, size, args.seed + 1)
            cache[(side, size)] = (xt, xv, time.perf_counter() - t0)
        xt, xv, read_s = cache[(side, size)]
        curve = train_probe(xt, y_train, xv, val, pooling, args.steps, args.lr, args.seed, every=100)
        px = side * max(val[0].width, val[0].height) / size
        rows.append({"side": side, "size": size, "level0_px_per_pixel": round(px, 1), "pooling": pooling,
                     "crops_per_slide": args.crops, "read_seconds": round(read_s, 1), "curve": curve,
                     "final": curve[-1]})
        f = curve[-1]
        print(f"side {side:.2f} x slide, {size} px ({px:.0f} px/pixel), {pooling:9s}: val AUROC {f['val_auroc']:.2f} "
              f"(macro {f['val_auroc_macro']:.2f}, micro {f['val_auroc_micro']:.2f}, ITC {f['val_auroc_itc']:.2f}) "
              f"after {f['step']} steps, {f['seconds']:.0f} s", flush=True)
    result = {
        "benchmark": "synthmets_mil_probe",
        "command": "python benchmarks/synthmets_mil_probe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "data": str(args.data),
        "train_slides": len(train),
        "val_slides": len(val),
        "steps": args.steps,
        "batch": "8 slides x 4 random crops of their --crops",
        "lr": args.lr,
        "machine": {**machine_info(), "torch_threads": args.threads},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
