"""Can an attention map see a SynthMets tumour at all? A supervised probe per whole-slide view size.

A MagNet's first attention map decides where to look from the whole slide read as one ``size`` x ``size``
view (56 px in the paper and every registered model; grey-filtered). SynthMets tumours differ from normal
tissue in texture only (their mean colour is matched), and texture averages away when one view pixel
covers hundreds of level-0 pixels. This script measures how much of the tumour is left in the view: for
each view size it trains a small fully convolutional network *with the tumour mask* (supervision no
MagNet has) to mark tumour pixels, on the ``train`` slides' views, and scores it on the ``val`` slides.
What the probe finds on held-out slides is in the view: where it localises, a blind first layer is not
why a MagNet's first attention does not. (Where it fails, a larger probe might still succeed: the scores
are a lower bound on what each view shows, and only for the probe's 17-pixel receptive field.)

Two scores per view size, on tissue pixels only (the grey filter blacks glass out):

* pixel AUROC, tumour pixels of the tumour slides against tissue pixels of the normal slides, overall and
  by category (macro, micro, ITC);
* the attention's own question: on each tumour slide, is the probe's highest-scoring tissue pixel on
  tumour? Its hit rate against the tumour share of the tissue (a crop centre drawn on random tissue hits
  that often): the localisation a first layer with that view could reach.

With ``--supervision slide`` the map is trained from the slide labels alone, as the recipe's attention
MIL trains a MagNet's first map (:mod:`magnet_zoo.train.attention_mil`: its logits pooled over the view's
tissue into one slide logit), and ``--net attention`` makes it the MagNet's own attention network: the
same scores then say whether slide labels can teach that network, at that view size, where the tumour is.

With ``--checkpoint DIR`` nothing is trained: a trained MagNet's own first-layer attention logits (its
learned maps averaged) on the validation slides' views, read as the MagNet reads them, are scored the
same way: did training teach that map where the tumour is?

    python benchmarks/synthmets_visibility.py --data /tmp/synthmets            # views of 56, 112, 224, 448
    python benchmarks/synthmets_visibility.py --sizes 56 --supervision slide --net attention \
        --out benchmarks/results/synthmets_visibility_mil.json
    python benchmarks/synthmets_visibility.py --checkpoint /tmp/mz/ckpt --out /tmp/first_map.json
    python benchmarks/synthmets_visibility.py --data /tmp/synthmets_quick --sizes 56 112 --steps 20 --out /tmp/v.json

Needs the ``train`` and ``val`` splits of a ``synthmets.py`` data folder (slides and sidecars). Prints a
table and writes ``--out`` (JSON) and the same name with ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info  # noqa: E402
from baselines.common import Slide, jsonable, load_split, whole_slide_view  # noqa: E402

from magnet_zoo.nn.branch import BranchStack  # noqa: E402
from magnet_zoo.synth.mask import tumour_mask  # noqa: E402
from magnet_zoo.train.attention_mil import tissue_edge as edge_of  # noqa: E402
from magnet_zoo.train.attention_mil import top_share_mean  # noqa: E402
from magnet_zoo.train.metrics import auroc  # noqa: E402
from magnet_zoo.wsi import open_slide  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LEVEL0_MPP = 0.5
"""SynthMets slides' level-0 resolution (``magnet-zoo synth``'s default), for the table's µm per view pixel."""


class VisibilityError(ValueError):
    """The data folder cannot be probed (a split or its sidecars missing, slides that are not square)."""


@dataclass
class Views:
    """One split at one view size: grey-filtered views, tissue and tumour masks, and the slides."""

    rgb: np.ndarray  # (N, S, S, 3) uint8
    tissue: np.ndarray  # (N, S, S) bool
    tumour: np.ndarray  # (N, S, S) bool
    slides: list[Slide]


def read_views(slides: Sequence[Slide], size: int) -> Views:
    """Every slide's whole-slide view at ``size`` px (the MagNet's reading: area resize, grey filter) and
    its tissue and tumour masks at the same pixels."""
    rgbs, tissues, tumours = [], [], []
    for slide in slides:
        if slide.width != slide.height:
            raise VisibilityError(f"{slide.path}: {slide.width}x{slide.height} is not square; the probe maps "
                                  "the sidecar's tumour mask onto the view pixel for pixel")
        if not slide.sidecar.is_file():
            raise VisibilityError(f"{slide.path}: no sidecar {slide.sidecar.name}; regenerate the data with "
                                  "benchmarks/synthmets.py (same seeds)")
        with open_slide(slide.path) as source:
            rgb, _ = whole_slide_view(source, size)
        rgbs.append(rgb)
        tissues.append(rgb.max(axis=2) > 0)
        tumours.append(tumour_mask(slide.sidecar, (size, size)) if slide.label else np.zeros((size, size), bool))
    return Views(np.stack(rgbs), np.stack(tissues), np.stack(tumours), list(slides))


class Probe(nn.Sequential):
    """A small fully convolutional tumour marker: 3x3 convs with dilations 1, 2, 4, 1 (a receptive field of
    17 view pixels), 32 channels, then a 1x1 conv to one logit per pixel."""

    def __init__(self, width: int = 32) -> None:
        layers: list[nn.Module] = []
        c_in = 3
        for dilation in (1, 2, 4, 1):
            layers += [nn.Conv2d(c_in, width, 3, padding=dilation, dilation=dilation), nn.ReLU(inplace=True)]
            c_in = width
        layers.append(nn.Conv2d(width, 1, 1))
        super().__init__(*layers)


class AttentionNet(nn.Module):
    """The MagNet's own first-layer attention network (one :class:`~magnet_zoo.nn.branch.BranchStack`;
    ``random`` init by default, ``uniform`` as the registered models; ``replicate`` padding by default,
    ``zeros`` as the registered models) on views scaled to ``[0, 1]`` as a MagNet reads them."""

    def __init__(self, padding: str = "replicate", init: str = "random") -> None:
        super().__init__()
        self.stack = BranchStack(1, init=init, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack((x + 1.0) / 2.0)


NETS = {"probe": Probe, "attention": AttentionNet}


def _normalise(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_mil(views: Views, net: str, *, steps: int, batch: int, seed: int, top: float, lr: float = 1e-3,
              flips: bool = True, padding: str = "replicate", init: str = "random") -> tuple[nn.Module, list[float]]:
    """Fit a map from the *slide labels* alone (no mask): each whole view's logits, pooled over its tissue as
    attention MIL pools them (:func:`magnet_zoo.train.attention_mil.top_share_mean`), trained towards the
    slide's label with BCE; batches balanced between tumour and normal slides, each randomly mirrored unless
    ``flips`` is off (the training loop's attention MIL does not mirror); Adam at ``lr``; ``padding`` and
    ``init`` are the attention network's (``--net attention`` only). Returns the loss curve."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    rgb, tissue = _normalise(views.rgb), torch.from_numpy(views.tissue)
    labels = torch.tensor([float(s.label) for s in views.slides])
    pos = (labels > 0).nonzero().squeeze(1)
    neg = (labels == 0).nonzero().squeeze(1)
    if len(pos) == 0 or len(neg) == 0:
        raise VisibilityError("slide supervision needs tumour and normal training slides")
    model = AttentionNet(padding, init) if net == "attention" else NETS[net]()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        half = batch // 2
        idx = torch.cat([pos[torch.randint(len(pos), (half,), generator=gen)],
                         neg[torch.randint(len(neg), (batch - half,), generator=gen)]])
        x, m = rgb[idx], tissue[idx]
        if flips and bool(torch.randint(2, (1,), generator=gen)):
            x, m = x.flip(-1), m.flip(-1)
        if flips and bool(torch.randint(2, (1,), generator=gen)):
            x, m = x.flip(-2), m.flip(-2)
        pooled = top_share_mean(model(x)[:, 0], m, top)
        loss = nn.functional.binary_cross_entropy_with_logits(pooled, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


def train_probe(views: Views, *, steps: int, crop: int, batch: int, seed: int) -> tuple[Probe, list[float]]:
    """Fit a :class:`Probe` on random ``crop`` x ``crop`` windows of the views (a fully convolutional net
    learns the same from windows as from whole views), half of each batch from windows holding tumour.
    Loss: BCE on tissue pixels, tumour pixels weighted to balance the two classes. Returns the loss curve."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    rgb, tissue, tumour = _normalise(views.rgb), torch.from_numpy(views.tissue), torch.from_numpy(views.tumour)
    n, _, size, _ = rgb.shape
    crop = min(crop, size)
    positives = [i for i in range(n) if views.tumour[i].any()]
    pos_frac = float(views.tumour.sum()) / max(float(views.tissue.sum()), 1.0)
    pos_weight = torch.tensor(min((1 - pos_frac) / max(pos_frac, 1e-6), 100.0))
    model = Probe()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        xs, ms, ys = [], [], []
        for b in range(batch):
            if b % 2 == 0 and positives:
                i = positives[int(torch.randint(len(positives), (1,), generator=gen))]
                rows, cols = np.nonzero(views.tumour[i])
                j = int(torch.randint(len(rows), (1,), generator=gen))
                # A window holding tumour pixel (r, c) somewhere inside it.
                r0 = int(np.clip(rows[j] - int(torch.randint(crop, (1,), generator=gen)), 0, size - crop))
                c0 = int(np.clip(cols[j] - int(torch.randint(crop, (1,), generator=gen)), 0, size - crop))
            else:
                i = int(torch.randint(n, (1,), generator=gen))
                r0 = int(torch.randint(size - crop + 1, (1,), generator=gen))
                c0 = int(torch.randint(size - crop + 1, (1,), generator=gen))
            xs.append(rgb[i, :, r0:r0 + crop, c0:c0 + crop])
            ms.append(tissue[i, r0:r0 + crop, c0:c0 + crop])
            ys.append(tumour[i, r0:r0 + crop, c0:c0 + crop])
        x, m, y = torch.stack(xs), torch.stack(ms), torch.stack(ys).float()
        if bool(torch.randint(2, (1,), generator=gen)):  # a mirror image is as likely a slide
            x, m, y = x.flip(-1), m.flip(-1), y.flip(-1)
        logits = model(x)[:, 0]
        if not m.any():
            continue
        loss = nn.functional.binary_cross_entropy_with_logits(logits[m], y[m], pos_weight=pos_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


@torch.no_grad()
def first_layer_maps(model: Any, views: Views) -> np.ndarray:
    """A MagNet's ``(N, S, S)`` first-layer attention logits (its learned maps averaged) for each slide's
    whole-slide view, read by the MagNet itself (``S`` must be its ``input_size``)."""
    from magnet_zoo.wsi import SlideFetcher

    if model.config.input_size != views.rgb.shape[1]:
        raise VisibilityError(f"the model's first view is {model.config.input_size} px, the views "
                              f"{views.rgb.shape[1]} px: pass --sizes {model.config.input_size}")
    model.eval()
    layer = model.layers[0]
    maps = []
    for slide in views.slides:
        with open_slide(slide.path) as source:
            view = model.whole_slide_view([SlideFetcher(source, model.config.grey_threshold)], torch.device("cpu"))[0]
        maps.append(layer.attention_logits(view)[0].mean(0))
    return torch.stack(maps).numpy()


@torch.no_grad()
def probe_maps(model: nn.Module, views: Views) -> np.ndarray:
    """The probe's ``(N, S, S)`` tumour logits for every view."""
    model.eval()
    return torch.cat([model(_normalise(views.rgb[i:i + 8]))[:, 0] for i in range(0, len(views.slides), 8)]).numpy()


def tissue_edge(tissue: np.ndarray) -> np.ndarray:
    """``(S, S)`` bool: the tissue pixels with a non-tissue 4-neighbour or on the view's border (the edge
    attention MIL's ``edges="negative"`` leaves out)."""
    return edge_of(torch.from_numpy(np.ascontiguousarray(tissue))).numpy()


def score(maps: np.ndarray, views: Views) -> dict[str, Any]:
    """Of ``(N, S, S)`` tumour scores for the views: pixel AUROC (tumour pixels of tumour slides against
    tissue of normal slides; overall and per category), the argmax hit rate on tumour slides against the
    tumour share of their tissue, and how often the argmax sits on the tissue's edge (:func:`tissue_edge`)
    against the edge's share of the tissue (a map drawn to the tissue/glass boundary shows there)."""
    if maps.shape != views.tumour.shape:
        raise VisibilityError(f"maps of shape {maps.shape} for views of shape {views.tumour.shape}")
    normal = [i for i, s in enumerate(views.slides) if not s.label]
    negatives = np.concatenate([maps[i][views.tissue[i]] for i in normal]) if normal else np.zeros(0)
    out: dict[str, Any] = {"categories": {}}
    by_cat: dict[str, list[int]] = {}
    for i, s in enumerate(views.slides):
        if s.label:
            by_cat.setdefault(s.category, []).append(i)
    every = [i for idx in by_cat.values() for i in idx]

    def summary(idx: list[int]) -> dict[str, Any]:
        pos = [maps[i][views.tumour[i] & views.tissue[i]] for i in idx]
        pos_px = np.concatenate(pos) if pos else np.zeros(0)
        hits, shares, visible = [], [], 0
        on_edge, edge_shares = [], []
        for i in idx:
            top = int(np.argmax(np.where(views.tissue[i], maps[i], -np.inf)))  # the top tissue pixel, flat
            if views.tissue[i].any():
                edge = tissue_edge(views.tissue[i])
                on_edge.append(float(edge.flat[top]))
                edge_shares.append(float(edge.sum()) / float(views.tissue[i].sum()))
            on = views.tumour[i] & views.tissue[i]
            if not on.any():  # the tumour left no tissue pixel in this view (ITC at small sizes)
                hits.append(0.0)
                shares.append(0.0)
                continue
            visible += 1
            hits.append(float(views.tumour[i].flat[top]))
            shares.append(float(on.sum()) / float(views.tissue[i].sum()))
        hit, share = float(np.mean(hits)) if hits else float("nan"), float(np.mean(shares)) if shares else float("nan")
        scores = np.concatenate([pos_px, negatives])
        labels = np.concatenate([np.ones(len(pos_px)), np.zeros(len(negatives))])
        area = auroc(scores, labels) if len(pos_px) and len(negatives) else float("nan")
        return {"slides": len(idx), "slides_with_tumour_pixels": visible, "tumour_pixels": int(len(pos_px)),
                "pixel_auroc": area, "argmax_hit": hit, "random_tissue_hit": share,
                "ratio": hit / share if share > 0 else None,
                "argmax_on_edge": float(np.mean(on_edge)) if on_edge else float("nan"),
                "edge_share": float(np.mean(edge_shares)) if edge_shares else float("nan")}

    out.update(summary(every))
    for cat, idx in sorted(by_cat.items()):
        out["categories"][cat] = summary(idx)
    out["normal_tissue_pixels"] = int(len(negatives))
    return out


def _fmt(v: Any, nd: int = 2) -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{nd}f}"


def table(rows: list[dict[str, Any]], categories: Sequence[str]) -> str:
    head = ("| view px | level-0 px per view px | µm per view px | pixel AUROC | "
            + " | ".join(f"{c} AUROC" for c in categories)
            + " | argmax on tumour | random tissue pixel | ratio | "
            + " | ".join(f"{c} ratio" for c in categories) + " | argmax on tissue edge | edge share of tissue |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        s = r["val"]
        cats = s["categories"]
        lines.append(
            f"| {r['size']} | {r['level0_px_per_view_px']:.0f} | {r['um_per_view_px']:.0f} | "
            f"{_fmt(s['pixel_auroc'])} | "
            + " | ".join(_fmt(cats.get(c, {}).get("pixel_auroc")) for c in categories)
            + f" | {_fmt(s['argmax_hit'])} | {_fmt(s['random_tissue_hit'])} | {_fmt(s['ratio'], 1)} | "
            + " | ".join(_fmt(cats.get(c, {}).get("ratio"), 1) for c in categories)
            + f" | {_fmt(s.get('argmax_on_edge'))} | {_fmt(s.get('edge_share'))} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/tmp/synthmets"),
                    help="a synthmets.py data folder (its train/ and val/ splits)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[56, 112, 224, 448], help="whole-slide view sides")
    ap.add_argument("--steps", type=int, default=400, help="probe optimiser steps per view size")
    ap.add_argument("--crop", type=int, default=48, help="training window side, in view pixels")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--supervision", choices=("mask", "slide"), default="mask",
                    help="train on the tumour masks (default), or on the slide labels alone as attention MIL does")
    ap.add_argument("--net", choices=sorted(NETS), default="probe",
                    help="the 17-px probe (default) or the MagNet's attention network (BranchStack)")
    ap.add_argument("--checkpoint", default=None,
                    help="score this trained MagNet's first-layer map (a folder or registered name) instead of "
                    "training a probe")
    ap.add_argument("--top", type=float, default=0.02,
                    help="with --supervision slide: share of tissue pixels pooled into the slide logit")
    ap.add_argument("--lr", type=float, default=1e-3, help="with --supervision slide: Adam's learning rate")
    ap.add_argument("--no-flips", action="store_true",
                    help="with --supervision slide: no random mirroring (as the training loop's attention MIL)")
    ap.add_argument("--padding", choices=("replicate", "zeros"), default="replicate",
                    help="with --net attention: the 3x3 convolutions' padding (zeros: as the registered models)")
    ap.add_argument("--init", choices=("random", "uniform"), default="random",
                    help="with --net attention: its initialisation (uniform: the last 1x1 conv starts near zero, "
                         "as the registered models' attention_init)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-train", type=int, default=None, help="use at most this many training slides")
    ap.add_argument("--also-running", default="", help="what else shared the machine (written in the JSON)")
    ap.add_argument("--out", type=Path, default=RESULTS / "synthmets_visibility.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    splits = {}
    for split in ("train", "val"):
        csv_path = args.data / split / "labels.csv"
        if not csv_path.is_file():
            raise VisibilityError(f"no {csv_path}; generate the data with benchmarks/synthmets.py --data {args.data}")
        splits[split] = load_split(csv_path, split)
    if args.max_train:
        splits["train"] = splits["train"][: args.max_train]
    categories = sorted({s.category for s in splits["val"] if s.label})
    side = splits["val"][0].size

    rows = []
    for size in args.sizes:
        t0 = time.perf_counter()
        train, val = read_views(splits["train"], size), read_views(splits["val"], size)
        read_s = time.perf_counter() - t0
        if args.checkpoint:
            from magnet_zoo.hub import load_pretrained

            model, losses = load_pretrained(args.checkpoint, device="cpu"), []
            maps = {"train": first_layer_maps(model, train), "val": first_layer_maps(model, val)}
        else:
            if args.supervision == "slide":
                model, losses = train_mil(train, args.net, steps=args.steps, batch=args.batch, seed=args.seed,
                                          top=args.top, lr=args.lr, flips=not args.no_flips,
                                          padding=args.padding, init=args.init)
            elif args.net == "probe":
                model, losses = train_probe(train, steps=args.steps, crop=args.crop, batch=args.batch,
                                            seed=args.seed)
            else:
                raise VisibilityError("--net attention is for --supervision slide (the mask probe is the 17-px net)")
            maps = {"train": probe_maps(model, train), "val": probe_maps(model, val)}
        row = {
            "size": size,
            "level0_px_per_view_px": side / size,
            "um_per_view_px": side / size * LEVEL0_MPP,
            "train": score(maps["train"], train),
            "val": score(maps["val"], val),
            "loss_first_last": [float(np.mean(losses[:20])), float(np.mean(losses[-20:]))] if losses else None,
            "seconds": {"read": round(read_s, 1), "total": round(time.perf_counter() - t0, 1)},
        }
        rows.append(row)
        v = row["val"]
        print(f"view {size:4d} px ({side / size:5.0f} level-0 px each): val pixel AUROC {_fmt(v['pixel_auroc'])}, "
              f"argmax on tumour {_fmt(v['argmax_hit'])} vs random tissue {_fmt(v['random_tissue_hit'])} "
              f"({row['seconds']['total']:.0f} s)", flush=True)

    md = table(rows, categories)
    print(md)
    if args.checkpoint:
        what = (f"the first-layer attention map of the trained MagNet {args.checkpoint} (its learned maps "
                "averaged), scored as the probes are")
        loss = None
    elif args.supervision == "mask":
        what = ("supervised per-pixel tumour probe on whole-slide views: an upper bound on what a first attention "
                "map with that view can see")
        loss = "BCE on tissue pixels, tumour pixels weighted by the class balance (at most 100)"
    else:
        what = ("a map trained from slide labels alone (attention MIL): where it rises on held-out slides is what "
                "attention MIL can teach a first attention map with that view")
        loss = (f"BCE of the mean of each view's top {args.top:g} share of tissue logits against the slide label "
                f"(balanced batches of whole views, {'no' if args.no_flips else 'random'} flips, Adam {args.lr:g})")
    layers = {"probe": "3x3 convs, dilations 1-2-4-1, 32 channels, 1x1 to a logit; receptive field 17 view px",
              "attention": f"the MagNet's BranchStack (three Branches, 1x1 to a logit), {args.padding} padding, "
                           f"{args.init} init",
              }[args.net]
    out = {
        "what": what,
        "command": shlex.join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "data": {"root": str(args.data), "train": len(splits["train"]), "val": len(splits["val"]),
                 "slide_side": side},
        "probe": {"net": "checkpoint" if args.checkpoint else args.net,
                  "checkpoint": args.checkpoint, "supervision": None if args.checkpoint else args.supervision,
                  "layers": "the checkpoint's first attention layer" if args.checkpoint else layers,
                  "steps": args.steps, "crop": args.crop if args.supervision == "mask" else None,
                  "top": args.top if args.supervision == "slide" else None,
                  "batch": args.batch, "seed": args.seed, "loss": loss,
                  "lr": args.lr if args.supervision == "slide" else None,
                  "flips": not args.no_flips if args.supervision == "slide" else None,
                  "padding": args.padding if args.net == "attention" else None,
                  "init": args.init if args.net == "attention" else None},
        "rows": rows,
        "machine": machine_info(),
        "also_running": args.also_running or "nothing",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(jsonable(out), indent=1, allow_nan=False) + "\n")
    args.out.with_suffix(".md").write_text(
        f"# SynthMets: what a whole-slide view shows of the tumour\n\n{what}.\n\n`{out['command']}`\n\n{md}\n"
    )
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
