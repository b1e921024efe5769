"""Head pre-training on windows read once (``magnet_zoo.train.head_pretrain``, a phase of the training loop)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from magnet_zoo.factory import create_model
from magnet_zoo.synth import generate_slide

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from baselines.common import Slide, random_crops  # noqa: E402

from magnet_zoo.train.head_pretrain import pretrain_heads  # noqa: E402


def _slides(tmp_path):
    out = []
    for i, cat in enumerate(("macro", "normal")):
        path = tmp_path / f"s{i}.tif"
        generate_slide(path, size=2048, category=cat, seed=i)
        out.append(Slide(str(path), int(cat != "normal"), cat, 2048, 2048, "train"))
    return out


def test_random_crops_sit_on_tissue_at_the_requested_size(tmp_path):
    slides = _slides(tmp_path)
    crops = random_crops(slides, 5, (0.05, 0.1), 32, seed=0)
    assert crops.shape == (2, 5, 3, 32, 32)
    # centred on tissue: the centre pixels are not glass (black after the grey filter)
    assert bool((crops[..., 14:18, 14:18].amax(2) > 0.02).float().mean() > 0.8)


def test_pretrain_heads_trains_the_last_head_and_copies_it(tmp_path):
    slides = _slides(tmp_path)
    torch.manual_seed(0)
    model = create_model("magnet2_micro", aux_pooling="max", final_patch_size=32)
    before = {k: v.clone() for k, v in model.aux_heads["2"].state_dict().items()}
    paths, labels = [s.path for s in slides], [s.label for s in slides]
    kwargs = {"steps": 3, "side": (0.025, 0.1), "lr": 1e-3, "seed": 0}
    record = pretrain_heads(model, paths, labels, windows=4, **kwargs)
    assert record["steps"] == 3 and record["windows_per_slide"] == 4 and record["classifier_backbone_copied"]
    after = model.aux_heads["2"].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    for k, v in model.aux_heads["1"].state_dict().items():
        assert torch.equal(v, after[k])
    for k, v in model.classifier.backbone.state_dict().items():
        assert torch.equal(v, model.aux_heads["2"].backbone.state_dict()[k])
    assert pretrain_heads(model, paths, labels, windows=0, **kwargs) == {"seconds": 0.0, "steps": 0}
