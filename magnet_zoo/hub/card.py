"""Model cards: the ``README.md`` of a checkpoint, rendered with plain string formatting (no Jinja2).

A card has Hugging Face metadata (YAML front matter: ``library_name: magnet-zoo``, license, tags,
datasets, metrics and, when numbers are given, a ``model-index``) and a body that states the intended
use, the I/O contract, the training data and recipe, the numbers with the command that reproduces
them, and the limits. :data:`CARD_TEMPLATE` is the single template; ``model_cards/TEMPLATE.md`` in the
repository is a copy of it for card authors (a test keeps the two identical).

This module needs neither torch nor huggingface_hub: it works on plain dicts.
"""

from __future__ import annotations

import json
import math
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

LIBRARY_NAME = "magnet-zoo"
BASE_TAGS = (
    "magnet-zoo",
    "pathology",
    "histopathology",
    "whole-slide-imaging",
    "image-classification",
    "pytorch",
    "safetensors",
)
NOT_DOCUMENTED = "_Not documented._"

PAPER_CITATION = """@article{dimitriou2024magnifying,
  title   = {Magnifying Networks for Histopathological Images with Billions of Pixels},
  author  = {Dimitriou, Neofytos and Arandjelovi{\\'c}, Ognjen and Harrison, David J.},
  journal = {Diagnostics},
  volume  = {14},
  number  = {5},
  pages   = {524},
  year    = {2024},
  doi     = {10.3390/diagnostics14050524}
}"""

CARD_TEMPLATE = """---
$metadata
---

# $title

$summary

A Magnifying Network (MagNet; Dimitriou, Arandjelović and Harrison, *Diagnostics* 2024) classifies a
whole-slide image from slide-level labels only: it looks at a ${input_size}x${input_size} view of the
whole slide, chooses where to magnify, and re-reads each chosen region from the slide's pyramid at the
level that region needs. Every prediction comes with its zoom tree (boxes, levels, scales) as the
explanation. Implementation: [magnet_zoo](https://pypi.org/project/magnet-zoo/) $magnet_zoo_version.

## Intended use

$intended_use

## Limitations

**Not for clinical use.** This model is a research artefact: it has not been validated for diagnosis,
prognosis or any decision about a patient, and it must not be used for them.

$limitations

## I/O contract

| | |
|---|---|
$io_table

## How to use

```python
from magnet_zoo import load_pretrained, open_slide, predict_slide

model = load_pretrained("$load_name")  # a Hub repo, a registered name or a local folder
with open_slide("slide.svs") as slide:
    prediction = predict_slide(model, slide)
print(prediction.label, prediction.probability)
```

Offline: `hf download $load_name --local-dir DIR`, then `load_pretrained("DIR")`; a model already
in the Hugging Face cache also loads with `HF_HUB_OFFLINE=1`.

## Training data

$training_data

## Training recipe

$training_recipe

## Results

$results

Reproduce:

```bash
$reproduce
```

## Files

- `config.json`: config version, magnet_zoo version, the network config and the I/O contract.
- `model.safetensors`: the weights (safetensors only; magnet_zoo never unpickles a checkpoint).
- `README.md`: this card.

## Citation

```bibtex
$citation
```
"""
"""The card template (``string.Template`` syntax: ``$name`` / ``${name}``)."""

DEFAULT_INTENDED_USE = (
    "Research on slide-level classification of whole-slide images (normal vs tumour by default), on\n"
    "modest GPUs or a CPU, and fine-tuning on one's own cohort with `magnet-zoo train`. The model\n"
    "returns a probability for the positive label and the regions it magnified to reach it."
)
DEFAULT_LIMITATIONS = (
    "- Performance outside the training data (other organs, stains, scanners, resolutions or label\n"
    "  definitions) is unknown; validate on your own data before drawing any conclusion.\n"
    "- Like the paper's model, it finds large lesions more reliably than small ones; it can miss\n"
    "  micro-metastases and isolated tumour cells.\n"
    "- The zoom tree shows where the model looked, not a segmentation of the lesion."
)


@dataclass
class CardData:
    """What a card says beyond what the network itself tells (all optional).

    ``metrics`` are the reported numbers (e.g. ``{"roc_auc": 0.84, "accuracy": 0.77}``) measured on
    ``metrics_dataset``; ``training`` is the recipe as key/value pairs; ``reproduce`` is the command
    line that reproduces the numbers.
    """

    model_name: str | None = None
    license: str = "apache-2.0"
    datasets: Sequence[str] = ()
    tags: Sequence[str] = ()
    summary: str | None = None
    intended_use: str | None = None
    limitations: str | None = None
    training_data: str | None = None
    training: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    metrics_dataset: str | None = None
    reproduce: str | None = None

    @classmethod
    def coerce(cls, data: CardData | Mapping[str, Any] | None) -> CardData:
        """A :class:`CardData` from ``None``, a mapping of its fields or itself (copied)."""
        if data is None:
            return cls()
        if isinstance(data, CardData):
            return cls(**{f.name: getattr(data, f.name) for f in fields(cls)})
        if not isinstance(data, Mapping):
            raise TypeError(f"card_data must be a CardData or a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown card_data fields: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**dict(data))


# --------------------------------------------------------------------------- YAML without a YAML library
def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"card metadata cannot hold a non-finite number ({value!r})")
        return json.dumps(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid double-quoted YAML scalar
    raise TypeError(f"card metadata cannot hold a {type(value).__name__} ({value!r})")


def _is_block(value: Any) -> bool:
    return isinstance(value, (Mapping, list, tuple)) and len(value) > 0


def _yaml_lines(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str) or not key or not all(c.isalnum() or c in "-_" for c in key):
                raise ValueError(f"card metadata keys must be plain identifiers, got {key!r}")
            if _is_block(item):
                lines.append(f"{pad}{key}:")
                lines.extend(_yaml_lines(item, indent + 2))
            elif isinstance(item, Mapping):
                lines.append(f"{pad}{key}: {{}}")
            elif isinstance(item, (list, tuple)):
                lines.append(f"{pad}{key}: []")
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
    elif isinstance(value, (list, tuple)):
        for item in value:
            if _is_block(item):
                inner = _yaml_lines(item, indent + 2)
                inner[0] = f"{pad}- {inner[0][indent + 2 :]}"
                lines.extend(inner)
            else:
                lines.append(f"{pad}- {_scalar(item)}")
    else:
        lines.append(f"{pad}{_scalar(value)}")
    return lines


def to_yaml(data: Mapping[str, Any]) -> str:
    """Block-style YAML for nested dicts / lists of strings, numbers, booleans and ``None``."""
    return "\n".join(_yaml_lines(data, 0))


# --------------------------------------------------------------------------- card pieces
def card_metadata(card: CardData, model_name: str) -> dict[str, Any]:
    """The card's front matter as a dict (Hugging Face model card metadata)."""
    tags = list(dict.fromkeys([*BASE_TAGS, *card.tags]))
    meta: dict[str, Any] = {
        "library_name": LIBRARY_NAME,
        "license": card.license,
        "pipeline_tag": "image-classification",
        "tags": tags,
    }
    if card.datasets:
        meta["datasets"] = list(card.datasets)
    if card.metrics:
        meta["metrics"] = list(card.metrics)
        dataset = card.metrics_dataset or (card.datasets[0] if card.datasets else None)
        if dataset:
            meta["model-index"] = [
                {
                    "name": model_name,
                    "results": [
                        {
                            "task": {"type": "image-classification", "name": "Slide-level classification"},
                            "dataset": {"type": dataset, "name": dataset},
                            "metrics": [
                                {"type": name, "value": float(value), "name": name}
                                for name, value in card.metrics.items()
                            ],
                        }
                    ],
                }
            ]
    return meta


def _table(rows: Sequence[tuple[str, str]]) -> str:
    return "\n".join(f"| {k} | {v} |" for k, v in rows)


def _oversampled(k: Any, size: Any) -> str:
    """The view row's note for ``view_oversample`` (nothing for the paper's 1)."""
    if not isinstance(k, int) or k <= 1 or not isinstance(size, int):
        return ""
    return f" (read at {k * size}x{k * size}, grey-filtered, then averaged over {k}x{k} blocks)"


def io_table(io: Mapping[str, Any]) -> str:
    """Rows of the I/O contract table from a checkpoint's ``io`` dict (see ``checkpoint.io_contract``)."""
    labels = io.get("labels", ["?", "?"])
    size = io.get("input_size")
    final = io.get("final_patch_size")
    rows = [
        ("input", str(io.get("input", "an RGB whole-slide image"))),
        ("view `I`", f"{size}x{size}: the whole slide (or ROI), longer side resized to {size}, black padding"
                     + _oversampled(io.get("view_oversample", 1), size)),
        ("`I'` factor", f"{io.get('iprime_factor')}x the size of the crops a layer produces"),
        ("final patches", f"{final}x{final}, {io.get('num_final_patches', '?')} per slide"),
        ("grey filter", f"pixels whose R, G, B differ pairwise by less than {io.get('grey_threshold')} become black"),
        ("pixels", str(io.get("pixel_range", "RGB scaled to [0, 1]"))),
    ]
    for module, norm in (io.get("normalisation") or {}).items():
        mean = ", ".join(f"{v:.3f}" for v in norm.get("mean", []))
        std = ", ".join(f"{v:.3f}" for v in norm.get("std", []))
        rows.append((f"normalisation `{module}`", f"{norm.get('backbone', '?')}: mean ({mean}), std ({std})"))
    mpp = io.get("slide_mpp")
    tol = io.get("mpp_tolerance")
    rows.append((
        "resolution",
        f"trained on slides of {mpp:g} µm per pixel at level 0; predictions warn beyond ±{100 * tol:.0f} %"
        if isinstance(mpp, (int, float)) and isinstance(tol, (int, float))
        else "training slides' µm per pixel not recorded: predictions cannot check a slide's resolution",
    ))
    rows.append(("labels", f"0 = `{labels[0]}`, 1 = `{labels[1]}`"))
    rows.append(("output", f"one logit per slide; sigmoid = probability of `{labels[1]}`"))
    return _table(rows)


def _recipe(training: Mapping[str, Any]) -> str:
    if not training:
        return NOT_DOCUMENTED
    rows = [("setting", "value"), ("---", "---")]
    rows += [(str(k), f"`{v}`" if not isinstance(v, str) else v) for k, v in training.items()]
    return _table(rows)


def _results(card: CardData) -> str:
    if not card.metrics:
        return "_No numbers reported for these weights._"
    dataset = card.metrics_dataset or (card.datasets[0] if card.datasets else "not stated")
    rows = [("metric", f"value ({dataset})"), ("---", "---")]
    rows += [(name, f"{float(value):.4g}") for name, value in card.metrics.items()]
    return _table(rows)


def _summary(config: Mapping[str, Any], counts: Mapping[str, Any]) -> str:
    patches = tuple(config.get("patches", ()))
    images = ", ".join(f"{n} images of {s}x{s}" for s, n in counts.get("images", {}).items())
    values = counts.get("values_fed")
    fed = f" ({values:,} values)" if isinstance(values, int) else ""
    return (
        f"A {len(patches)}-layer MagNet with {patches} patches per layer, "
        f"`{config.get('classifier_backbone')}` classifier and `{config.get('aux_backbone')}` auxiliary "
        f"backbones. Per slide it feeds {images} to its networks{fed}."
    )


def _load_name(model_name: str | None) -> str:
    """What ``load_pretrained`` takes for this model: its repo id or registered name, else a placeholder."""
    from magnet_zoo.registry import UnknownModelError, resolve

    if not model_name:
        return "org/name"
    if "/" in model_name:
        return model_name
    try:
        has_weights = resolve(model_name)[3].has_weights
    except UnknownModelError:
        return "org/name"
    return model_name if has_weights else "org/name"


def render_card(
    card: CardData,
    *,
    config: Mapping[str, Any],
    io: Mapping[str, Any],
    counts: Mapping[str, Any],
    magnet_zoo_version: str,
    template: str = CARD_TEMPLATE,
) -> str:
    """The card's Markdown text for a network ``config`` (``MagNetConfig.to_dict()``), its I/O contract
    ``io`` and per-slide ``counts`` (``MagNet.counts()``)."""
    name = card.model_name or "MagNet"
    summary = card.summary or _summary(config, counts)
    values = {
        "metadata": to_yaml(card_metadata(card, name)),
        "title": name,
        "summary": summary.strip(),
        "input_size": str(io.get("input_size", config.get("input_size"))),
        "magnet_zoo_version": magnet_zoo_version,
        "intended_use": (card.intended_use or DEFAULT_INTENDED_USE).strip(),
        "limitations": (card.limitations or DEFAULT_LIMITATIONS).strip(),
        "io_table": io_table(io),
        "load_name": _load_name(card.model_name),
        "training_data": (card.training_data or NOT_DOCUMENTED).strip(),
        "training_recipe": _recipe(card.training),
        "results": _results(card),
        "reproduce": (card.reproduce or "# not recorded for these weights").strip(),
        "citation": PAPER_CITATION,
    }
    return string.Template(template).substitute(values)


# --------------------------------------------------------------------------- cards that survive a re-save
_ORDERED = ("training", "metrics")
"""Card fields whose order is shown: kept as ``[key, value]`` pairs, since config.json sorts its keys."""


def card_to_dict(card: CardData) -> dict[str, Any]:
    """``card`` as JSON-ready data (``config.json["card"]``), so that a loaded model re-saves its card."""
    out: dict[str, Any] = {}
    for f in fields(CardData):
        value = getattr(card, f.name)
        if isinstance(value, Mapping):
            value = [[str(k), v] for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            value = list(value)
        out[f.name] = value
    return json.loads(json.dumps(out, default=str))


def card_from_dict(data: Mapping[str, Any]) -> CardData:
    """The inverse of :func:`card_to_dict`."""
    fixed = dict(data)
    for name in _ORDERED:
        if isinstance(fixed.get(name), list):
            fixed[name] = {str(k): v for k, v in fixed[name]}
    return CardData.coerce(fixed)


def _sections(body: str) -> tuple[str, str, dict[str, str]]:
    """``(title, text before the first section, {section title: text})`` of a card's Markdown body."""
    title, intro, sections, current, lines = "", [], {}, None, []
    for line in body.splitlines():
        if line.startswith("# ") and not title and current is None:
            title = line[2:].strip()
        elif line.startswith("## "):
            if current is not None:
                sections[current] = "\n".join(lines).strip()
            current, lines = line[3:].strip(), []
        elif current is None:
            intro.append(line)
        else:
            lines.append(line)
    if current is not None:
        sections[current] = "\n".join(lines).strip()
    return title, "\n".join(intro).strip(), sections


def _table_rows(text: str) -> list[tuple[str, str]]:
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and not set(cells[1]) <= {"-", " "}:
            rows.append((cells[0], cells[1]))
    return rows[1:] if rows else rows  # the header row


def _recipe_value(text: str) -> Any:
    if text.startswith("`") and text.endswith("`"):
        inner = text[1:-1]
        try:
            return json.loads(inner)
        except ValueError:
            return {"True": True, "False": False, "None": None}.get(inner, inner)
    return text


def parse_card(text: str) -> CardData:
    """The :class:`CardData` a card written by :func:`render_card` was made from (as far as it shows).

    Used for checkpoints saved before ``config.json`` kept the card's data: the front matter gives the
    license, datasets, tags and exact metrics; the sections give the summary, intended use,
    limitations, training data, recipe and the reproduce command. Defaults come back as ``None``.
    """
    import yaml

    meta: dict[str, Any] = {}
    body = text
    if text.startswith("---"):
        _, front, body = text.split("---", 2)
        meta = yaml.safe_load(front) or {}
    title, intro, sections = _sections(body)
    summary = intro.split("\nA Magnifying Network (MagNet;")[0].strip() or None
    if summary and summary.startswith("A Magnifying Network (MagNet;"):
        summary = None

    def section(name: str, default: str | None = None) -> str | None:
        value = sections.get(name, "").strip()
        return None if not value or value == NOT_DOCUMENTED or value == (default or "").strip() else value

    limitations = sections.get("Limitations", "")
    fixed = "**Not for clinical use.**"
    if limitations.startswith(fixed):
        parts = limitations.split("\n\n", 1)
        limitations = parts[1] if len(parts) > 1 else ""
    metrics: dict[str, float] = {}
    metrics_dataset = None
    for entry in meta.get("model-index") or []:
        for result in entry.get("results") or []:
            metrics_dataset = (result.get("dataset") or {}).get("name") or metrics_dataset
            for m in result.get("metrics") or []:
                metrics[str(m.get("type") or m.get("name"))] = float(m["value"])
    results = sections.get("Results", "")
    reproduce = None
    if "```" in results:
        block = results.split("```", 2)[1]
        reproduce = block.split("\n", 1)[1].strip() if "\n" in block else block.strip()
        if reproduce.startswith("# not recorded"):
            reproduce = None
    recipe = sections.get("Training recipe", "")
    training = {} if recipe.strip() == NOT_DOCUMENTED else {k: _recipe_value(v) for k, v in _table_rows(recipe)}
    tags = [t for t in meta.get("tags") or [] if t not in BASE_TAGS]
    datasets = list(meta.get("datasets") or [])
    if metrics_dataset and datasets and metrics_dataset == datasets[0]:
        metrics_dataset = None
    return CardData(
        model_name=title if title and title != "MagNet" else None,
        license=str(meta.get("license") or "apache-2.0"),
        datasets=datasets,
        tags=tags,
        summary=summary,
        intended_use=section("Intended use", DEFAULT_INTENDED_USE),
        limitations=(limitations.strip() or None) if limitations.strip() != DEFAULT_LIMITATIONS else None,
        training_data=section("Training data"),
        training=training,
        metrics=metrics,
        metrics_dataset=metrics_dataset,
        reproduce=reproduce,
    )
