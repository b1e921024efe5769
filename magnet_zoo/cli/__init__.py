"""``magnet-zoo``: the command line. One module per command group; each adds its own subparser."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from magnet_zoo import __version__

# Modules with an ``add_parser(subparsers)`` function, in the order ``--help`` lists them.
COMMAND_MODULES = [
    "magnet_zoo.cli.demo",
    "magnet_zoo.cli.models",
    "magnet_zoo.cli.predict",
    "magnet_zoo.cli.train",
    "magnet_zoo.synth.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="magnet-zoo",
        description="Magnifying Networks (MagNets) for whole-slide images.",
    )
    parser.add_argument("--version", action="version", version=f"magnet-zoo {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # user-facing errors: one clear line, no traceback unless -vv
        from magnet_zoo.cli.errors import is_user_error

        if not is_user_error(exc) or args.verbose >= 2:
            raise
        print(f"magnet-zoo {args.command}: error: {exc}", file=sys.stderr)
        return 1
