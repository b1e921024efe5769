"""Do a MagNet's attention maps differ between training mode and eval mode? (DESIGN.md section 6, item 6)

The attention stacks use BatchNorm: in training mode a map is normalised with the batch's statistics, in
eval mode with the running ones. If the two differ, the network is trained on crops it will not choose
at inference. For each model this script runs the same slides through a copy in training mode (batch
statistics; no gradient, the running statistics of the copy are thrown away) and the model in eval
mode, and reports per layer: the entmax support size (positions with non-zero attention, of 3,136),
the total-variation distance between the two maps (0: identical, 1: disjoint), the mean distance
between the two crops' centres (normalised units of the view) and the largest change of the
classifier's probability.

    python benchmarks/attention_modes.py            # the demo model and an untrained micro MagNet
    python benchmarks/attention_modes.py --quick    # 4 slides (CI smoke test)

Writes ``benchmarks/results/attention_modes.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info  # noqa: E402

from magnet_zoo import create_model, load_pretrained  # noqa: E402
from magnet_zoo.nn.magnet import MagNet  # noqa: E402
from magnet_zoo.synth import generate_slide  # noqa: E402
from magnet_zoo.wsi import SlideFetcher, open_slide  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def compare(model: MagNet, paths: list[Path]) -> dict[str, Any]:
    """Training-mode (batch statistics) against eval-mode maps of ``model`` on the slides ``paths``."""
    cfg = model.config
    train_copy = copy.deepcopy(model).train()
    model.eval()
    sources = [open_slide(p) for p in paths]
    try:
        with torch.no_grad():
            out_t = train_copy([SlideFetcher(s, cfg.grey_threshold) for s in sources])
            out_e = model([SlideFetcher(s, cfg.grey_threshold) for s in sources])
    finally:
        for s in sources:
            s.close()
    layers = []
    for k, (a_t, a_e) in enumerate(zip(out_t.affines, out_e.affines, strict=True), start=1):
        layer = model.layers[k - 1]
        learned = (layer.slot >= 0).view(layer.num_nodes, layer.num_patches)
        p_t, p_e = a_t.probs[:, learned], a_e.probs[:, learned]  # (B, G, H, W)
        if p_t.numel() == 0:
            continue
        dist = torch.hypot(a_t.tx[:, learned] - a_e.tx[:, learned], a_t.ty[:, learned] - a_e.ty[:, learned])
        layers.append({
            "layer": k,
            "support_train": float((p_t > 0).flatten(2).sum(-1).float().mean()),
            "support_eval": float((p_e > 0).flatten(2).sum(-1).float().mean()),
            "total_variation": float(0.5 * (p_t - p_e).abs().flatten(2).sum(-1).mean()),
            "centre_distance": float(dist.mean()),
            "scale_train": float(a_t.scale[:, learned].mean()),
            "scale_eval": float(a_e.scale[:, learned].mean()),
        })
    return {"layers": layers, "max_prob_change": float((out_t.probs - out_e.probs).abs().max()),
            "slides": len(paths)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 slides of 2048 px")
    ap.add_argument("--n", type=int, default=8, help="SynthMets slides (half tumour)")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    n, size = (4, 2048) if args.quick else (args.n, args.size)
    torch.set_num_threads(2)
    started = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(n):
            path = Path(tmp) / f"s{i}.tif"
            generate_slide(path, size=size, category="macro" if i % 2 else "normal", seed=1000 + i)
            paths.append(path)
        torch.manual_seed(0)
        models = {
            "demo (magnet2_micro.synthmets_demo)": load_pretrained("magnet2_micro"),
            "untrained magnet2_micro, attention_init=random": create_model("magnet2_micro", attention_init="random"),
            "untrained magnet2_micro, attention_init=uniform": create_model("magnet2_micro", attention_init="uniform"),
        }
        for name, model in models.items():
            results[name] = compare(model, paths)
    print(f"{'model':48s} {'layer':>5s} {'support train':>13s} {'support eval':>12s} {'TV':>5s} "
          f"{'centre d':>8s} {'max dp':>7s}")
    for name, res in results.items():
        for row in res["layers"]:
            print(f"{name:48s} {row['layer']:5d} {row['support_train']:13.1f} {row['support_eval']:12.1f} "
                  f"{row['total_variation']:5.2f} {row['centre_distance']:8.3f} {res['max_prob_change']:7.3f}")
    doc = {"benchmark": "attention_modes", "slides": {"n": n, "size": size, "categories": "normal / macro"},
           "results": results, "machine": machine_info(), "seconds": round(time.perf_counter() - started, 1),
           "quick": args.quick, "also_running": "other experiments on the same 2 cores (timings not reported)"}
    out = args.out or RESULTS / ("attention_modes_quick.json" if args.quick else "attention_modes.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=lambda v: float(np.asarray(v))) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
