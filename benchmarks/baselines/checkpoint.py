"""Write the benchmark's trained MagNet as a checkpoint folder with a model card (the demo checkpoint)."""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

from magnet_zoo.hub import CardData, save_pretrained
from magnet_zoo.nn.magnet import MagNet
from magnet_zoo.synth import generate_dataset

SYNTHMETS_MPP = float(inspect.signature(generate_dataset).parameters["mpp"].default)
"""µm per pixel at level 0 of the benchmark's slides (``synthmets.py`` generates them at the generator's default)."""


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def save_demo_checkpoint(model: MagNet, directory: Path, result: dict[str, Any], note: str = "") -> Path:
    """Save ``model`` to ``directory`` with a card stating its data, recipe, test metrics and command."""
    magnet = result["methods"]["magnet"]
    met = magnet["summary"]["metrics"]
    metrics = {"roc_auc": met["auroc"], "accuracy": met["accuracy"]}
    for cat, values in met["per_category"].items():
        if cat != "normal":
            metrics[f"roc_auc_{cat}"] = values["auroc"]
    metrics = {k: float(v) for k, v in metrics.items() if _finite(v)}
    loc = (result.get("localisation") or {}).get("by_category", {})
    for cat, d in loc.items():
        if _finite(d.get("hit")):
            metrics[f"final_patches_on_tumour_{cat}"] = float(d["hit"])
        if _finite(d.get("random_hit")):
            metrics[f"random_patches_on_tumour_{cat}"] = float(d["random_hit"])
    splits = result["data"]["splits"]
    data = "; ".join(
        f"{name}: {v['n']} slides of {v['size']} x {v['size']} px at {SYNTHMETS_MPP:g} mpp (dataset seed {v['seed']}; "
        + ", ".join(f"{c} {n}" for c, n in v["categories"].items()) + ")"
        for name, v in splits.items()
    )
    trainer = magnet["settings"]["trainer"]
    # The optimisation settings are the recipe's (``settings["recipe"]``, since the one training loop);
    # older results kept them in ``trainer`` under the benchmark's option names.
    recipe = magnet["settings"].get("recipe") or {
        "lr": trainer["lr"], "attention_lr": trainer["attention_lr"], "warmup": trainer["warmup_frac"],
        "max_scale_start": trainer["max_scale_start"], "anneal_frac": trainer["anneal_frac"],
        "grad_clip": trainer["grad_clip"], "batch_size": trainer["batch_size"],
        "head_warmup": trainer.get("head_warmup_frac", 0.0), "guidance_weight": trainer.get("guidance_weight", 0.0),
    }
    training = {
        "recipe": recipe.get("name", "learn_to_look"),
        "optimizer": "Adam (attention stacks at their own learning rate)",
        "lr (heads)": recipe["lr"],
        "lr (attention)": recipe["attention_lr"],
        "schedule": trainer["schedule"],
        "warm-up share": round(recipe["warmup"], 4),
        "max_scale anneal": f"{recipe['max_scale_start']} -> {model.config.max_scale} over the first "
        f"{recipe['anneal_frac']:.0%}",
        "gradient clip": recipe["grad_clip"],
        "batch size": recipe["batch_size"],
        "head warm-up share": recipe.get("head_warmup", 0.0),
        "head-guided attention weight": recipe.get("guidance_weight", 0.0),
    }
    if recipe.get("attention_pretrain_steps") or recipe.get("attention_mil_weight"):
        top, top_start = recipe.get("attention_mil_top"), recipe.get("attention_pretrain_top_start")
        pooled = (f"top {top} of the tissue pooled" if top_start is None else
                  f"top {top_start} of the tissue pooled, narrowed to {top} over the phase's first half")
        training |= {
            "attention MIL (first map from slide labels)": (
                f"{recipe.get('attention_pretrain_steps', 0)} pre-training steps, in-loop weight "
                f"{recipe.get('attention_mil_weight', 0)}; {pooled}; tissue edge: "
                f"{recipe.get('attention_mil_edges', 'pool')}; only teacher of the first map: "
                f"{bool(recipe.get('attention_mil_only'))}"
            ),
        }
    training |= {
        "steps": magnet["training"]["steps"],
        "best step (validation AUROC)": magnet["training"]["best_step"],
        "wall-clock budget (s)": trainer["budget_s"],
        "augmentation": trainer["augmentation"],
        "threads": result["threads"],
        "seed": trainer["seed"],
    }
    quick = " This checkpoint comes from a --quick smoke run: its numbers mean nothing." if result["quick"] else ""
    card = CardData(
        model_name=f"MagNet SynthMets demo ({magnet['settings']['model']}, small backbones)",
        datasets=["SynthMets"],
        tags=["synthmets", "demo"],
        summary=(
            "The small MagNet that `benchmarks/synthmets.py` trains on a CPU, shipped inside magnet_zoo for "
            "`magnet-zoo demo`. It was trained on SynthMets procedural slides only (synthetic H&E-like tissue "
            "with tumour regions whose mean colour matches normal tissue): it demonstrates the method and the "
            "tooling; it knows nothing about real tissue." + quick + (f" {note}" if note else "")
        ),
        intended_use=(
            "Offline demonstrations and tests of magnet_zoo (`magnet-zoo demo`) on SynthMets slides. Not for "
            "real slides: it has never seen one."
        ),
        training_data=f"SynthMets ({result['data']['generator_version']}): {data}.",
        training=training,
        metrics=metrics,
        metrics_dataset="SynthMets test split",
        reproduce=result["command"],
    )
    # The recipe in config.json lets `magnet-zoo evaluate --as-trained` score a tree-MIL model as it was tested
    # (older results recorded no full recipe: their checkpoints carry none).
    return save_pretrained(model, directory, card_data=card, recipe=recipe if "name" in recipe else None,
                           slide_mpp=SYNTHMETS_MPP)
