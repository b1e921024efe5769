"""The ``magnet-zoo synth`` command: generate a SynthMets dataset folder.

``magnet-zoo synth OUT --n 100 --size 32768 --seed 0`` writes ``OUT/slide_0000.tif`` ... with JSON
sidecars and ``OUT/labels.csv``. The main CLI registers it with :func:`add_parser`.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from magnet_zoo.synth.layout import CATEGORIES

logger = logging.getLogger(__name__)


def _categories(text: str) -> tuple[str, ...]:
    cats = tuple(c.strip() for c in text.split(",") if c.strip())
    unknown = [c for c in cats if c not in CATEGORIES]
    if unknown or not cats:
        raise argparse.ArgumentTypeError(
            f"unknown categories {unknown}; choose a comma-separated subset of {','.join(CATEGORIES)}"
        )
    return cats


def add_parser(subparsers: Any) -> None:
    """Register the ``synth`` subcommand on an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "synth",
        help="generate SynthMets benchmark slides (pyramidal TIFFs with known tumour regions)",
        description=(
            "Generate a folder of procedural pyramidal slides: half normal, half with tumour regions "
            "of macro (>2 mm), micro (0.2-2 mm) or ITC (<0.2 mm) size whose mean colour matches normal "
            "tissue. Writes one JSON sidecar per slide and labels.csv."
        ),
    )
    parser.add_argument("out", help="output folder (created if missing; existing matching slides are kept)")
    parser.add_argument("--n", type=int, default=100, help="number of slides (default: 100)")
    parser.add_argument("--size", type=int, default=32768, help="level-0 side in pixels (default: 32768)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default: 0)")
    parser.add_argument("--mpp", type=float, default=0.5, help="microns per pixel at level 0 (default: 0.5)")
    parser.add_argument(
        "--tile", type=int, choices=(256, 512), default=256, help="TIFF tile side (default: 256)"
    )
    parser.add_argument("--quality", type=int, default=85, help="JPEG quality (default: 85)")
    parser.add_argument(
        "--categories",
        type=_categories,
        default=CATEGORIES,
        help=f"comma-separated categories to draw from (default: {','.join(CATEGORIES)})",
    )
    parser.add_argument("--split", default=None, help="value of a 'split' column in labels.csv (e.g. train)")
    parser.add_argument("--workers", type=int, default=None, help="threads per slide (default: up to 4)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Handler of ``magnet-zoo synth``; returns the process exit code."""
    from magnet_zoo.synth.dataset import generate_dataset

    try:
        labels = generate_dataset(
            args.out,
            n=args.n,
            size=args.size,
            seed=args.seed,
            categories=args.categories,
            split=args.split,
            progress=not args.no_progress,
            mpp=args.mpp,
            tile=args.tile,
            quality=args.quality,
            workers=args.workers,
        )
    except (ValueError, RuntimeError, OSError) as err:
        logger.error("synth: %s", err)
        return 2
    logger.info("wrote %s", labels)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``synth`` subcommand on its own (``python -m magnet_zoo.synth.cli synth OUT ...``)."""
    parser = argparse.ArgumentParser(prog="magnet-zoo")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
