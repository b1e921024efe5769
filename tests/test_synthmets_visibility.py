"""The SynthMets visibility probe (benchmarks/synthmets_visibility.py): its views, masks and scores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import synthmets_visibility as vis  # noqa: E402
from baselines.common import load_split  # noqa: E402

from magnet_zoo.synth import generate_dataset  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two tiny splits: macro and normal slides (macro tumours are large enough to show in a small view)."""
    root = tmp_path_factory.mktemp("synthmets")
    for split, seed in (("train", 1), ("val", 2)):
        generate_dataset(root / split, n=4, size=2048, seed=seed, categories=("macro", "normal"), split=split,
                         progress=False, workers=1)
    return root


def test_views_and_masks_line_up_pixel_for_pixel(data):
    views = vis.read_views(load_split(data / "val" / "labels.csv", "val"), 32)
    assert views.rgb.shape == (4, 32, 32, 3) and views.tissue.shape == views.tumour.shape == (4, 32, 32)
    for slide, tumour, tissue in zip(views.slides, views.tumour, views.tissue, strict=True):
        assert tumour.any() == bool(slide.label)  # normal slides get an empty mask, macro slides a region
        assert tissue.any() and not tissue.all()  # grey-filtered glass is black; tissue is not
        if slide.label:  # the tumour lies on tissue, not on glass
            assert (tumour & tissue).sum() >= 0.5 * tumour.sum()


def test_score_rewards_a_map_that_marks_the_tumour_and_not_a_flat_one(data):
    views = vis.read_views(load_split(data / "val" / "labels.csv", "val"), 32)
    oracle = vis.score(views.tumour.astype(np.float32), views)
    assert oracle["pixel_auroc"] == pytest.approx(1.0) and oracle["argmax_hit"] == pytest.approx(1.0)
    assert 0 < oracle["random_tissue_hit"] < 1 and oracle["ratio"] == pytest.approx(1 / oracle["random_tissue_hit"])
    flat = vis.score(np.zeros(views.tumour.shape, np.float32), views)
    assert flat["pixel_auroc"] == pytest.approx(0.5)  # every pixel tied
    inverse = vis.score(-views.tumour.astype(np.float32), views)
    assert inverse["pixel_auroc"] < 0.5 and inverse["argmax_hit"] == 0.0
    assert set(oracle["categories"]) == {"macro"}
    with pytest.raises(vis.VisibilityError, match="shape"):
        vis.score(np.zeros((1, 32, 32), np.float32), views)


def test_the_tissue_edge_and_a_map_drawn_to_it():
    tissue = np.zeros((6, 6), bool)
    tissue[1:5, 1:6] = True  # touches the view's right border
    edge = vis.tissue_edge(tissue)
    assert edge[1, 1] and edge[4, 3] and edge[2, 5]  # glass above/left/below, the view's border
    assert not edge[2, 2] and not edge[3, 4] and not edge[0, 0]  # inside; glass is never edge
    assert edge.sum() == 20 - 6


def test_score_reports_when_the_argmax_sits_on_the_tissue_edge(data):
    views = vis.read_views(load_split(data / "val" / "labels.csv", "val"), 32)
    edges = np.stack([vis.tissue_edge(t) for t in views.tissue]).astype(np.float32)
    drawn = vis.score(edges, views)
    assert drawn["argmax_on_edge"] == 1.0 and 0 < drawn["edge_share"] < 1
    inside = vis.score(-edges, views)
    assert inside["argmax_on_edge"] == 0.0 and inside["edge_share"] == drawn["edge_share"]


def test_non_square_slides_are_refused_with_the_reason(data):
    (slide, *_) = load_split(data / "val" / "labels.csv", "val")
    wide = vis.Slide(slide.path, slide.label, slide.category, slide.width + 1, slide.height, "val")
    with pytest.raises(vis.VisibilityError, match="not square"):
        vis.read_views([wide], 32)


def test_the_script_writes_one_row_per_view_size(data, tmp_path):
    out = tmp_path / "vis.json"
    subprocess.run([sys.executable, str(BENCH / "synthmets_visibility.py"), "--data", str(data), "--sizes", "16",
                    "32", "--steps", "3", "--batch", "4", "--crop", "16", "--threads", "1", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    result = json.loads(out.read_text())
    assert [r["size"] for r in result["rows"]] == [16, 32]
    assert result["rows"][0]["level0_px_per_view_px"] == pytest.approx(2048 / 16)
    for row in result["rows"]:
        assert 0 <= row["val"]["pixel_auroc"] <= 1 and row["val"]["slides"] == 2
    assert result["machine"]["cpu_count"] >= 1 and result["also_running"] == "nothing"
    assert "| 32 | 64 | 32 |" in out.with_suffix(".md").read_text()


def test_a_missing_split_says_how_to_make_it(tmp_path):
    with pytest.raises(vis.VisibilityError, match="synthmets.py"):
        vis.main(["--data", str(tmp_path), "--out", str(tmp_path / "v.json")])


def test_slide_supervision_trains_the_attention_network_from_labels_alone(data):
    views = vis.read_views(load_split(data / "train" / "labels.csv", "train"), 32)
    assert {s.label for s in views.slides} == {0, 1}
    model, losses = vis.train_mil(views, "attention", steps=30, batch=4, seed=0, top=0.05)
    assert isinstance(model, vis.AttentionNet) and len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5])  # the pooled slide logit learns the training labels
    maps = vis.probe_maps(model, views)
    assert maps.shape == (4, 32, 32) and np.isfinite(maps).all()
    normal_only = vis.Views(views.rgb[:0], views.tissue[:0], views.tumour[:0], [])
    with pytest.raises(vis.VisibilityError, match="tumour and normal"):
        vis.train_mil(normal_only, "probe", steps=1, batch=2, seed=0, top=0.05)


def test_slide_supervision_honours_padding_learning_rate_and_flips(data):
    import torch
    from torch import nn

    views = vis.read_views(load_split(data / "train" / "labels.csv", "train"), 32)
    pads = {m.padding_mode for m in vis.AttentionNet("zeros").modules() if isinstance(m, nn.Conv2d)}
    assert pads == {"zeros"}
    assert "replicate" in {m.padding_mode for m in vis.AttentionNet().modules() if isinstance(m, nn.Conv2d)}
    frozen, _ = vis.train_mil(views, "attention", steps=3, batch=4, seed=0, top=0.05, lr=0.0, padding="zeros")
    torch.manual_seed(0)
    fresh = vis.AttentionNet("zeros")
    for a, b in zip(frozen.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)  # Adam at lr 0 leaves the weights as initialised (BatchNorm's buffers move)
    # without flips the first loss is that of the unmirrored balanced batch, reproduced by hand
    _, losses = vis.train_mil(views, "attention", steps=1, batch=4, seed=0, top=0.05, flips=False)
    labels = torch.tensor([float(s.label) for s in views.slides])
    pos, neg = (labels == 1).nonzero().squeeze(1), (labels == 0).nonzero().squeeze(1)
    gen = torch.Generator().manual_seed(0)
    idx = torch.cat([pos[torch.randint(len(pos), (2,), generator=gen)],
                     neg[torch.randint(len(neg), (2,), generator=gen)]])
    torch.manual_seed(0)
    net = vis.AttentionNet()
    rgb = vis._normalise(views.rgb)
    with torch.no_grad():
        pooled = vis.top_share_mean(net(rgb[idx])[:, 0], torch.from_numpy(views.tissue)[idx], 0.05)
        want = nn.functional.binary_cross_entropy_with_logits(pooled, labels[idx]).item()
    assert losses[0] == pytest.approx(want, rel=1e-5)


def test_the_mask_probe_is_the_only_net_for_mask_supervision(data, tmp_path):
    with pytest.raises(vis.VisibilityError, match="--net attention"):
        vis.main(["--data", str(data), "--sizes", "16", "--net", "attention", "--out", str(tmp_path / "v.json")])


def test_a_trained_magnets_own_first_map_is_read_from_its_own_views(data):
    import torch

    from magnet_zoo.factory import create_model

    views = vis.read_views(load_split(data / "val" / "labels.csv", "val"), 32)
    torch.manual_seed(0)
    model = create_model("magnet2_micro", input_size=32, final_patch_size=32, gru_hidden=8, mlp_hidden=(8,))
    maps = vis.first_layer_maps(model, views)
    assert maps.shape == (4, 32, 32) and np.isfinite(maps).all()
    assert not model.training  # scored as used: BatchNorm on its running statistics
    assert len({float(m.std()) for m in maps}) == 4  # each slide's own view, not one map for all
    assert 0 <= vis.score(maps, views)["pixel_auroc"] <= 1
    with pytest.raises(vis.VisibilityError, match="--sizes 56"):
        vis.first_layer_maps(create_model("magnet2_micro", final_patch_size=32), views)


def test_the_uniform_init_starts_the_attention_network_near_flat():
    import torch

    torch.manual_seed(0)
    flat, default = vis.AttentionNet(init="uniform"), vis.AttentionNet()
    assert flat.stack.head.weight.detach().abs().max() < 0.01 < default.stack.head.weight.detach().abs().max()


def test_attention_pretraining_alone_saves_a_first_map_the_probe_scores(data, tmp_path):
    import synthmets_attention_pretrain as pre
    import torch

    ckpt = tmp_path / "pre"
    args = ["--data", str(data), "--steps", "3", "--batch", "4", "--threads", "1", "--save", str(ckpt),
            "--magnet-override", 'attention_init=["random", "uniform"]', "--magnet-override", "input_size=32",
            "--magnet-override", "final_patch_size=32"]
    assert pre.main(args) == 0
    run = json.loads((ckpt / "pretrain.json").read_text())
    assert run["attention_init"] == ["random", "uniform"] and run["slides"] == 4 and run["steps"] == 3
    assert len(run["result"]["loss_per_50_steps"]) == 1 and (ckpt / "model.safetensors").is_file()
    with pytest.raises(vis.VisibilityError, match="--sizes 32"):  # a 32 px first view is scored at 32 px
        vis.main(["--data", str(data), "--sizes", "56", "--checkpoint", str(ckpt), "--out", str(tmp_path / "v.json")])
    assert vis.main(["--data", str(data), "--sizes", "32", "--checkpoint", str(ckpt), "--threads", "1",
                     "--out", str(tmp_path / "v.json")]) == 0
    assert json.loads((tmp_path / "v.json").read_text())["probe"]["checkpoint"] == str(ckpt)

    more = tmp_path / "more"  # the phase goes on from the saved model: its first map moves, nothing else
    assert pre.main(["--data", str(data), "--steps", "2", "--batch", "4", "--threads", "1", "--save", str(more),
                     "--init-from", str(ckpt)]) == 0
    from magnet_zoo.hub import load_pretrained

    before, after = load_pretrained(ckpt).state_dict(), load_pretrained(more).state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("layers.0.stacks.") for k in moved)
    assert json.loads((more / "pretrain.json").read_text())["init_from"] == str(ckpt)
    with pytest.raises(SystemExit):  # the checkpoint brings its configuration
        pre.main(["--data", str(data), "--steps", "1", "--save", str(tmp_path / "x"), "--init-from", str(ckpt),
                  "--magnet-override", "input_size=32"])
