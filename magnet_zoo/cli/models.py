"""``magnet-zoo list`` and ``magnet-zoo info NAME|DIR``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list registered models")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'magnet3*'")
    p.set_defaults(func=run_list)
    p = sub.add_parser("info", help="config, I/O contract, parameters and pixels per slide of a model")
    p.add_argument("model", help="registered name (see `magnet-zoo list`) or a checkpoint folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_info)


def run_list(args: argparse.Namespace) -> int:
    from magnet_zoo.registry import list_models, resolve

    names = list_models(args.pattern)
    width = max((len(n) for n in names), default=10)
    for name in names:
        _, _, arch, tag = resolve(name)
        if tag.hub_repo:
            weights = f"weights: {tag.hub_repo}@{tag.hub_revision}"
        else:
            weights = "weights: shipped in the package" if tag.packaged else "no published weights"
        print(f"{name:<{width}}  {arch.description}  [{weights}]")
    return 0


def describe(model_spec: str) -> dict:
    """What ``info`` reports, as a dict (used by ``--json`` and tests)."""
    from magnet_zoo.registry import get_config

    path = Path(model_spec)
    if path.is_dir():
        from magnet_zoo.hub import load_pretrained

        model = load_pretrained(path)
        cfg = model.config
        source = str(path)
    else:
        from magnet_zoo.registry import resolve

        arch, tag_name, _, tag = resolve(model_spec)
        if tag.packaged:  # the weights that `predict --model NAME` uses, with their own config
            from magnet_zoo.hub import load_pretrained

            model = load_pretrained(model_spec)
            cfg = model.config
            source = f"{arch}.{tag_name} (its shipped weights)"
        else:
            from magnet_zoo.nn.magnet import MagNet

            cfg = get_config(model_spec, backbone_pretrained=False)
            model = MagNet(cfg)  # only counted: no ImageNet download
            source = f"{arch}.{tag_name}"
    params = sum(p.numel() for p in model.parameters())
    attention = sum(p.numel() for p in model.layers.parameters())
    counts = model.counts()
    return {
        "model": source,
        "patches_per_layer": list(cfg.patches),
        "io": {
            "input_size": cfg.input_size,
            "iprime_factor": cfg.iprime_factor,
            "final_patch_size": cfg.final_patch_size,
            "grey_threshold": cfg.grey_threshold,
            "pixels": "RGB in [0, 1]; each backbone normalises with its own mean/std",
            "labels": list(cfg.labels),
            "slide_mpp": getattr(model, "trained_mpp", None),
        },
        "parameters": params,
        "attention_parameters": attention,
        "per_slide": counts,
        "config": cfg.to_dict(),
    }


def run_info(args: argparse.Namespace) -> int:
    info = describe(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    io = info["io"]
    images = ", ".join(f"{n} of {s}x{s}" for s, n in info["per_slide"]["images"].items())
    rows = [
        ("model", info["model"]),
        ("patches per layer", " -> ".join(map(str, info["patches_per_layer"]))),
        ("backbones", f"{info['config']['classifier_backbone']} (classifier), {info['config']['aux_backbone']} (aux)"),
        ("sampler", info["config"]["sampler"]),
        ("input", f"I {io['input_size']}px, I' x{io['iprime_factor']}, final patches {io['final_patch_size']}px"),
        ("grey filter", f"channel spread < {io['grey_threshold']} -> black"),
        ("labels", " / ".join(io["labels"])),
        ("trained at", f"{io['slide_mpp']:g} µm per pixel (level 0)" if io.get("slide_mpp") else "not recorded"),
        ("parameters", f"{info['parameters'] / 1e6:.2f} M ({info['attention_parameters'] / 1e3:.1f} k in attention)"),
        ("per slide", f"{images}; {info['per_slide']['values_fed'] / 1e6:.2f} M values fed to the networks"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
