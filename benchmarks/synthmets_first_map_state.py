"""What a pre-trained first attention map has become, from inside: is it stuck on the phase's plateau?

The first layer's attention network ends in five ReLU'd feature channels and a 1x1 conv (weights ``w``, bias
``b``): a logit is ``b + sum_c w_c relu(f_c)``. For each checkpoint this script runs that network over every
training slide's whole-slide view (as attention pre-training sees them, tissue only) and reports, per
channel, its head weight and the share of inside-tissue pixels (the tissue's edge left out, as the phase
pools) where it is alive (> 0); and the pooled logit the phase trains (the mean of the top share of inside
tissue) averaged over tumour and over normal slides, with the AUROC it gives the slide labels. A map on the
phase's ln 2 plateau pools the same value on both classes (AUROC near 0.5).

    python benchmarks/synthmets_first_map_state.py --checkpoints /tmp/mz/pre_edge_s1 /tmp/mz/pre_edge2000_s5 \\
        --out benchmarks/results/synthmets_first_map_state.json

Prints a table and writes ``--out`` (JSON) and the same name with ``.md``. The data is the benchmark's
(``python benchmarks/synthmets.py`` writes it under ``/tmp/synthmets``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _machine import machine_info  # noqa: E402
from baselines.common import jsonable, load_split  # noqa: E402

from magnet_zoo.hub import load_pretrained  # noqa: E402
from magnet_zoo.train.attention_mil import read_views, tissue_edge, top_share_mean  # noqa: E402
from magnet_zoo.train.metrics import auroc  # noqa: E402


def first_map_state(model: Any, views: torch.Tensor, labels: np.ndarray, top: float) -> dict[str, Any]:
    """The first map's channels, head and pooled logits over ``views`` ``(N, 1, 3, S, S)`` (one learned map)."""
    layer = model.layers[0]
    if layer.num_stacks != 1:
        raise SystemExit(f"one learned first-layer map expected, this model has {layer.num_stacks}")
    stacks = layer.stacks
    layer.train()  # as the phase ran it (BatchNorm on the batch's statistics)
    features: dict[str, torch.Tensor] = {}
    hook = stacks.branches[-1].register_forward_hook(lambda mod, inp, out: features.__setitem__("f", out.detach()))
    chunks, feats = [], []
    with torch.no_grad():
        for i in range(0, len(views), 32):  # batches of 32, as the phase's
            chunks.append(layer.attention_logits(views[i:i + 32]))
            feats.append(features["f"])
    hook.remove()
    logits, f = torch.cat(chunks), torch.cat(feats)
    mask = layer.tissue_mask(views)
    edge = tissue_edge(mask)  # already inside the mask
    inside = mask & ~edge
    pooled = top_share_mean(logits, inside, top)[:, 0].numpy()
    return {
        "head_weights": [round(float(v), 3) for v in stacks.head.weight.detach().view(-1)],
        "head_bias": round(float(stacks.head.bias.detach()), 3),
        "alive_share": [round(float((f[:, c][inside[:, 0]] > 0).float().mean()), 3) for c in range(f.shape[1])],
        "pooled_tumour": float(pooled[labels > 0].mean()),
        "pooled_normal": float(pooled[labels == 0].mean()),
        "pooled_auroc": float(auroc(pooled, labels)),
        "edge_logit_mean": float(logits[:, 0][edge[:, 0]].mean()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("/tmp/synthmets"), help="the benchmark's slides")
    ap.add_argument("--checkpoints", nargs="+", required=True, help="checkpoint folders (one first-layer map)")
    ap.add_argument("--top", type=float, default=0.1, help="the pooled share (attention_mil_top)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--also-running", default="", help="what else shared the machine (written in the JSON)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    slides = load_split(args.data / "train" / "labels.csv", "train")
    labels = np.array([s.label for s in slides])
    rows, views = [], None
    for path in args.checkpoints:
        model = load_pretrained(path)
        if views is None:
            views = read_views(model, [s.path for s in slides]).float()
        rows.append({"checkpoint": str(path), **first_map_state(model, views, labels, args.top)})
    out = {"what": "the first attention map's head, channels and pooled logits over the training views",
           "command": shlex.join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
           "slides": len(slides), "top": args.top, "rows": rows, "machine": machine_info(),
           "also_running": args.also_running or "nothing"}
    args.out.write_text(json.dumps(jsonable(out), indent=1, allow_nan=False) + "\n")
    lines = ["| checkpoint | head weights (bias) | channels alive on inside tissue | pooled logit, tumour / normal "
             "slides | pooled AUROC | edge logit |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {Path(r['checkpoint']).name} | {' '.join(f'{w:+.2f}' for w in r['head_weights'])} "
                     f"({r['head_bias']:+.2f}) | {' '.join(f'{a:.2f}' for a in r['alive_share'])} | "
                     f"{r['pooled_tumour']:+.2f} / {r['pooled_normal']:+.2f} | {r['pooled_auroc']:.2f} | "
                     f"{r['edge_logit_mean']:+.1f} |")
    table = "\n".join(lines)
    args.out.with_suffix(".md").write_text(f"# First maps from inside\n\n`{out['command']}`\n\n{table}\n")
    print(table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
