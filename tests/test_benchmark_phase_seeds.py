"""``benchmarks/synthmets_phase_seeds.py``: the attention pre-training phase's first maps side by side over seeds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import synthmets_phase_seeds as phase  # noqa: E402


def _scored(path: Path, seed: int, hit: float, area: float, command: str | None = None) -> Path:
    val = {"slides": 25, "pixel_auroc": area, "argmax_hit": hit, "argmax_on_edge": 0.0}
    cmd = command or f"synthmets_visibility.py --sizes 56 --checkpoint /tmp/mz/pre_x_s{seed} --threads 1"
    path.write_text(json.dumps({"command": cmd, "rows": [{"size": 56, "val": val, "train": {}}]}))
    return path


def test_maps_are_ordered_by_seed_and_found_only_from_the_share_on(tmp_path):
    files = [_scored(tmp_path / "b.json", 3, 0.4, 0.91), _scored(tmp_path / "a.json", 1, 0.36, 0.88),
             _scored(tmp_path / "c.json", 0, 0.64, 0.97)]
    out = tmp_path / "phase.json"
    assert phase.main(["--setting", "x=" + ",".join(str(f) for f in files), "--out", str(out)]) == 0
    row = json.loads(out.read_text())["settings"][0]
    assert row["seeds"] == [0, 1, 3] and row["found"] == 2 and row["of"] == 3  # 9 of 25 is not found, 10 is
    assert [m["top_on_tumour"] for m in row["maps"]] == [16, 9, 10]
    assert row["pixel_auroc_range"] == [0.88, 0.97]
    table = out.with_suffix(".md").read_text()
    assert "| x | 0 / 1 / 3 | 2 of 3 | 0.97 / 0.88 / 0.91 | 16/25 / 9/25 / 10/25 |" in table


def test_a_probe_score_or_an_unreadable_file_is_refused(tmp_path, capsys):
    probe = _scored(tmp_path / "p.json", 0, 0.5, 0.9, command="synthmets_visibility.py --sizes 56 112")
    assert phase.main(["--setting", f"x={probe}", "--out", str(tmp_path / "o.json")]) == 2
    assert "scores a probe" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(phase.PhaseSeedsError, match="cannot read"):
        phase.map_row(tmp_path / "bad.json")
    with pytest.raises(SystemExit):
        phase.main(["--setting", "no-files"])
    assert phase.seed_of("/tmp/mz/pre_below_s12") == 12 and phase.seed_of("/tmp/mz/demo") is None
