"""benchmarks/synthmets_teacher.py: the head's best window (teacher) and the first layer's crops (student)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import synthmets_teacher as teacher  # noqa: E402
from baselines.common import load_split  # noqa: E402

from magnet_zoo.hub.checkpoint import save_pretrained  # noqa: E402
from magnet_zoo.synth import generate_dataset  # noqa: E402
from magnet_zoo.synth.mask import tumour_mask  # noqa: E402
from magnet_zoo.train.guidance import Windows  # noqa: E402
from tests.conftest import micro_magnet  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthmets")
    generate_dataset(root / "test", n=4, size=2048, seed=3, categories=("macro", "normal"), split="test",
                     progress=False, workers=1)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_pretrained(micro_magnet(aux_pooling="max"), tmp_path_factory.mktemp("ckpt") / "magnet")


def _oracle(sign: float):
    """A stand-in for window_scores whose scores are the tumour's share of each cell (times ``sign``)."""

    def scores(model, fetchers, squares, grid):
        (sidecar,) = _oracle.sidecars
        mask = torch.from_numpy(tumour_mask(sidecar, (grid * 8, grid * 8))).float()
        cells = torch.nn.functional.avg_pool2d(mask[None, None], 8)[0, 0]
        return Windows(sign * cells.view(1, 1, grid, grid), torch.ones(1, 1, grid, grid, dtype=torch.bool),
                       torch.zeros(1, 1, grid * grid, 3, 4, 4))

    return scores


def test_a_head_that_fires_on_tumour_is_a_perfect_teacher_and_one_that_avoids_it_is_not(data, monkeypatch):
    model = micro_magnet(aux_pooling="max").eval()
    tumour_slides = [s for s in load_split(data / "test" / "labels.csv", "test") if s.label]
    assert tumour_slides
    for sign, expect in ((1.0, 1.0), (-1.0, 0.0)):
        monkeypatch.setattr(teacher, "window_scores", _oracle(sign))
        for slide in tumour_slides:
            _oracle.sidecars = [slide.sidecar]
            row = teacher.score_slide(model, slide, grid=8)
            assert row["teacher"] == expect  # the window -> level-0 box mapping lands on (or off) the tumour
            assert 0 < row["teacher_random"] < 1 and row["crops"] == 2
            assert 0 <= row["student"] <= 1 and 0 <= row["agreement"] <= 1


def test_the_script_scores_each_checkpoint_on_the_tumour_slides(data, checkpoint, tmp_path):
    out = tmp_path / "t.json"
    subprocess.run([sys.executable, str(BENCH / "synthmets_teacher.py"), "--models", str(checkpoint), "--data",
                    str(data), "--grid", "8", "--threads", "1", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    result = json.loads(out.read_text())
    (res,) = result["results"]
    n = sum(1 for s in load_split(data / "test" / "labels.csv", "test") if s.label)
    assert res["all"]["slides"] == n == len(res["slides"]) and set(res["categories"]) == {"macro"}
    assert 0 <= res["all"]["teacher"] <= 1 and 0 <= res["all"]["agreement"] <= 1
    assert result["grid"] == 8 and "| magnet | macro |" in out.with_suffix(".md").read_text()


def test_a_head_that_pools_its_patches_is_refused(data, tmp_path):
    ckpt = save_pretrained(micro_magnet(aux_pooling="mean"), tmp_path / "mean")
    with pytest.raises(teacher.TeacherError, match="aux_pooling"):
        teacher.score_model(ckpt, load_split(data / "test" / "labels.csv", "test"), 8)


def test_refitting_the_student_trains_the_first_layer_alone(data):
    model = micro_magnet(aux_pooling="max").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    slides = load_split(data / "test" / "labels.csv", "test")
    losses = teacher.fit_student(model, slides, steps=3, grid=8, temperature=0.5, standardise=True, batch=2)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = model.state_dict()
    changed = {k.split(".")[0] + "." + k.split(".")[1] for k in before
               if before[k].dtype.is_floating_point and not torch.equal(before[k], after[k])}
    assert changed == {"layers.0"}  # the first layer's stacks (weights and batch statistics), nothing else
    assert not model.training


def test_guidance_without_a_forward_pass_guides_the_first_layer_only(data):
    from magnet_zoo.train.guidance import guidance_loss
    from magnet_zoo.wsi import SlideFetcher, open_slide

    model = micro_magnet(aux_pooling="max")
    (slide, *_) = load_split(data / "test" / "labels.csv", "test")
    with open_slide(slide.path) as src:
        fetchers = [SlideFetcher(src, 15)]
        assert torch.isfinite(guidance_loss(model, None, fetchers, layers=[1], grid=8).attention)
        with pytest.raises(ValueError, match="needs the forward pass"):
            guidance_loss(model, None, fetchers, layers=[1, 2], grid=8)
