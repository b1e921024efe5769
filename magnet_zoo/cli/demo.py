"""``magnet-zoo demo``: the shipped demo MagNet on SynthMets slides (or on yours), fully offline.

Without a slide it generates one tumour and one normal SynthMets slide (16k x 16k by default, a few seconds
each), loads the demo checkpoint that ships with magnet_zoo, predicts both, and writes per slide the
prediction JSON (with the zoom tree and its cost), the explanation PNG (ROIs on the slide and the final
patches, as the paper's Fig. 5) and QuPath GeoJSON; then it prints a short table. For SynthMets slides the
table also says how many final patches landed on the tumour (the model was never told where it is).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

DEMO_SEED = 20240524
"""Seed of the generated demo slides (the tumour slide uses it, the normal one ``DEMO_SEED + 1``)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the shipped demo MagNet on two generated SynthMets slides (or on SLIDE): JSON, PNG, GeoJSON",
        description=(
            "Offline demo: generates a tumour and a normal SynthMets slide (unless SLIDE is given), predicts them "
            "with the demo checkpoint shipped in magnet_zoo, and writes the prediction JSON, the explanation PNG "
            "and QuPath GeoJSON for each. The demo model was trained on synthetic slides only."
        ),
    )
    p.add_argument("slides", nargs="*", metavar="SLIDE", help="slides to predict instead of the generated ones")
    p.add_argument("--out", default="magnet-zoo-demo", help="output folder (default: ./magnet-zoo-demo)")
    p.add_argument("--size", type=int, default=16384, help="side of the generated slides in pixels (default 16384)")
    p.add_argument("--category", default="macro", choices=("macro", "micro", "itc"),
                   help="tumour size of the generated tumour slide (default macro)")
    p.add_argument("--seed", type=int, default=DEMO_SEED, help="seed of the generated slides")
    p.add_argument("--model", default=None, help="checkpoint folder or hub repo instead of the shipped demo model")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--thumb-size", type=int, default=1024, help="side of the slide picture in the PNG")
    p.set_defaults(func=run_demo)


def _demo_slides(out: Path, size: int, category: str, seed: int) -> list[Path]:
    """Generate (or reuse) the tumour and the normal demo slides."""
    from magnet_zoo.synth import GENERATOR_VERSION, generate_slide

    folder = out / "slides"
    paths = []
    for name, cat, s in (("demo_tumour", category, seed), ("demo_normal", "normal", seed + 1)):
        path = folder / f"{name}_{size}.tif"
        sidecar = path.with_suffix(".json")
        keep = False
        if path.is_file() and sidecar.is_file():
            try:
                meta = json.loads(sidecar.read_text())
                keep = (meta.get("version"), meta.get("seed"), meta.get("category"), meta.get("width")) == (
                    GENERATOR_VERSION, s, cat, size)
            except (OSError, json.JSONDecodeError):
                keep = False
        if not keep:
            start = time.perf_counter()
            generate_slide(path, size=size, category=cat, seed=s)
            print(f"generated {path} ({cat}, {size} x {size}, {time.perf_counter() - start:.1f} s)", file=sys.stderr)
        paths.append(path)
    return paths


def _load(spec: str | None, device: str = "cpu") -> Any:
    if spec is None:
        from magnet_zoo.demo import load_demo_model

        return load_demo_model(device)
    from magnet_zoo.hub import load_pretrained

    return load_pretrained(spec, device=device)


def run_demo(args: argparse.Namespace) -> int:
    # Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning makes each
    # forward pass up to 20x slower. Must be set before torch starts its thread pool.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from magnet_zoo.demo import patches_on_tumour
    from magnet_zoo.explain import save_explanation, write_geojson
    from magnet_zoo.infer.predict import predict_slide
    from magnet_zoo.wsi.open import open_slide

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slides = [Path(s) for s in args.slides] or _demo_slides(out, args.size, args.category, args.seed)
    for s in slides:
        if not s.exists():
            raise FileNotFoundError(f"no slide at {s}")
    model = _load(args.model)
    with open_slide(slides[0]) as src:  # warm-up: the first forward pass sets up kernels
        predict_slide(model, src)

    from magnet_zoo.atomic import atomic_write_text
    from magnet_zoo.infer.provenance import provenance

    prov = provenance(model, {"threshold": 0.5, "backend": "auto"})
    rows = []
    for path in slides:
        with open_slide(path) as src:
            pred = predict_slide(model, src)
            pred.provenance = prov
            stem = path.stem
            png = save_explanation(src, pred, out / f"{stem}.magnet.png", thumb_size=args.thumb_size)
            geo = write_geojson(pred, out / f"{stem}.magnet.geojson", slide=str(path))
        record = pred.to_dict()
        sidecar = path.with_suffix(".json")
        truth = None
        if sidecar.is_file():
            meta = json.loads(sidecar.read_text())
            if meta.get("generator") == "magnet_zoo.synth":
                truth = meta
                hits = patches_on_tumour(pred.tree, meta) if meta.get("label") else []
                record["truth"] = {"label": model.config.labels[int(meta["label"])], "category": meta["category"]}
                record["final_patches_on_tumour"] = sum(hits)
        atomic_write_text(out / f"{stem}.magnet.json", json.dumps(record, indent=1))
        rows.append((path, pred, truth, record.get("final_patches_on_tumour"), png, geo))

    labels = model.config.labels
    head = f"{'slide':<28}{'truth':>14}{'p(' + labels[1] + ')':>12}{'predicted':>11}{'patches on tumour':>19}" \
           f"{'values fed':>12}{'px read':>10}{'seconds':>9}"
    print(head)
    for path, pred, truth, hits, _, _ in rows:
        n_final = len(pred.final_nodes)
        truth_s = "?" if truth is None else (truth["category"] if truth["label"] else labels[0])
        hits_s = "–" if hits is None or not (truth and truth["label"]) else f"{hits} / {n_final}"
        acc = pred.accounting
        print(f"{path.name[:27]:<28}{truth_s:>14}{pred.probability:>12.3f}{pred.label:>11}{hits_s:>19}"
              f"{acc['values_fed'] / 1e6:>10.2f} M{acc['pixels_read'] / 1e6:>8.2f} M{pred.seconds:>9.2f}")
    print(f"wrote {len(rows)} x (.magnet.json, .magnet.png, .magnet.geojson) to {out} "
          f"({time.perf_counter() - started:.0f} s)")
    if args.model is None:
        print("demo model: trained on synthetic SynthMets slides only (model card: magnet_zoo/demo/checkpoint/"
              "README.md); not for real tissue", file=sys.stderr)
    return 0
