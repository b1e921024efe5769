"""The documentation's commands are the commands that exist: every ``magnet-zoo`` line in the README and
the bundle docs parses with the real CLI, and every bundle command names only keys its config has."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from magnet_zoo.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "bundle" / "docs" / "README.md", REPO / "bundle" / "models" / "README.md"]


def _bash_lines(path: Path) -> list[str]:
    """Commands in the file's ```bash blocks, continuation lines joined, comments dropped."""
    lines, block, pending = [], False, ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.startswith("```"):
            block = raw.strip() == "```bash" if not block else False
            continue
        if not block:
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        line = re.split(r"\s#\s", line, maxsplit=1)[0].strip()
        if line:
            lines.append(line)
    return lines


def _cli_commands() -> list[tuple[str, list[str]]]:
    found = []
    for doc in DOCS:
        for line in _bash_lines(doc):
            for part in line.split("&&"):
                if " ... " in f" {part} ":  # an elided command (`magnet-zoo train ... --set x=1`): not runnable
                    continue
                words = shlex.split(re.sub(r"\[(--[^\]]+)\]", r"\1", part))  # `[--explain]`: optional flag
                for start, word in enumerate(words):
                    if word == "magnet-zoo" or (word == "magnet_zoo" and words[start - 1] == "-m"):
                        found.append((f"{doc.name}: {part.strip()}", words[start + 1 :]))
                        break
    return found


COMMANDS = _cli_commands()


def test_the_docs_have_cli_commands():
    assert len(COMMANDS) >= 8


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[c[0][:70] for c in COMMANDS])
def test_documented_cli_commands_parse(where, argv):
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's way of refusing
        pytest.fail(f"{where}: `magnet-zoo {' '.join(argv)}` is not a valid command (exit {exc.code})")


def test_bundle_commands_name_only_keys_of_their_configs():
    bundle = REPO / "bundle"
    runs = [line for line in _bash_lines(bundle / "docs" / "README.md") if "monai.bundle run" in line]
    assert len(runs) >= 3
    for line in runs:
        words = shlex.split(line)
        config = json.loads((bundle / words[words.index("--config_file") + 1]).read_text())
        keys = [w[2:] for w in words if w.startswith("--")]
        unknown = [k for k in keys if k not in config and k not in ("config_file", "meta_file")]
        assert not unknown, f"{line}: {unknown} are not keys of the config"


def test_docs_do_not_promise_a_pypi_package():
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        assert not re.search(r"pip install magnet-zoo\b", text), doc
