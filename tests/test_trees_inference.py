"""Inference with K sampled zoom trees pooled (``predict_slide(trees=K)``, ``--trees K``, the toolkits)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import micro_magnet, tissue_image

import magnet_zoo
from magnet_zoo.nn.tree import root_square
from magnet_zoo.nn.trees import PooledOutput, pooled_forward, sampled_trees
from magnet_zoo.train.exploration import set_exploration
from magnet_zoo.wsi import SlideFetcher

DEVICE = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    return micro_magnet(attention_init="random").to(DEVICE).eval()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return tissue_image(600, 450, seed=1)


def _source(image: np.ndarray):
    return magnet_zoo.ArraySource(image, name="tissue")


def _boxes(tree) -> list[tuple[float, ...]]:
    return [tuple(n.box) for n in tree]


def _fetchers(model, image: np.ndarray, n: int = 1) -> list[SlideFetcher]:
    return [SlideFetcher(_source(image), model.config.grey_threshold) for _ in range(n)]


def test_default_and_one_tree_are_the_expected_crop_exactly(model, image):
    with torch.inference_mode():
        reference = model(_fetchers(model, image))
    default = magnet_zoo.predict_slide(model, _source(image))
    one = magnet_zoo.predict_slide(model, _source(image), trees=1, seed=7)
    for pred in (default, one):
        assert pred.probability == float(reference.probs[0])
        assert _boxes(pred.tree) == _boxes(reference.trees[0])
        assert pred.accounting == reference.accounting[0]
        assert pred.trees is None and pred.sampling is None
        d = pred.to_dict()
        assert "trees" not in d and "sampling" not in d and "trees" not in d["accounting"]
    assert default.to_dict()["tree"] == one.to_dict()["tree"]


def test_sampled_trees_are_reproducible_by_seed_and_leave_the_global_rng_alone(model, image):
    rng = torch.get_rng_state()
    a = magnet_zoo.predict_slide(model, _source(image), trees=3, seed=0)
    assert torch.equal(torch.get_rng_state(), rng)  # the draws come from the trees' own generators
    b = magnet_zoo.predict_slide(model, _source(image), trees=3, seed=0)
    c = magnet_zoo.predict_slide(model, _source(image), trees=3, seed=1)
    two = magnet_zoo.predict_slide(model, _source(image), trees=2, seed=0)
    expected = magnet_zoo.predict_slide(model, _source(image))
    assert len(a.trees) == 3
    assert [_boxes(t) for t in a.trees] == [_boxes(t) for t in b.trees]
    assert a.tree_probabilities == b.tree_probabilities and a.probability == b.probability
    assert all(_boxes(x) != _boxes(y) for x in a.trees for y in c.trees)  # another seed, other trees
    assert len({tuple(_boxes(t)) for t in a.trees}) == 3  # the trees of one seed differ from each other
    assert all(_boxes(t) != _boxes(expected.tree) for t in a.trees)  # sampled in eval mode, not expected
    assert [_boxes(t) for t in two.trees] == [_boxes(t) for t in a.trees[:2]]  # tree k depends on (seed, k)
    assert all(layer.sample_policy is None for layer in model.layers)  # switched off again


def test_pooled_probability_is_the_mean_of_the_trees(model, image):
    with torch.inference_mode():
        pooled = pooled_forward(model, _fetchers(model, image, 2), trees=4, seed=5, uniform=0.5)
    assert isinstance(pooled, PooledOutput) and pooled.num_trees == 4
    for k, out in enumerate(pooled.outputs):
        torch.testing.assert_close(pooled.tree_probs[k], out.probs.float(), rtol=0, atol=0)
    torch.testing.assert_close(pooled.probs, pooled.tree_probs.mean(0), rtol=0, atol=1e-7)
    torch.testing.assert_close(torch.sigmoid(pooled.logits), pooled.probs, rtol=0, atol=1e-6)

    pred = magnet_zoo.predict_slide(model, _source(image), trees=4, seed=5, uniform=0.5)
    probs = pred.tree_probabilities
    assert len(set(probs)) > 1  # otherwise any pooling would pass
    assert pred.probability == pytest.approx(sum(probs) / len(probs), abs=1e-7)
    assert pred.probability != pytest.approx(max(probs), abs=1e-9)
    gaps = [abs(p - pred.probability) for p in probs]
    assert pred.tree_index == gaps.index(min(gaps))
    assert pred.tree is pred.trees[pred.tree_index]
    assert pred.label == model.config.labels[int(pred.probability >= 0.5)]
    d = json.loads(json.dumps(pred.to_dict()))
    assert d["sampling"]["tree_probabilities"] == probs and d["sampling"]["tree_index"] == pred.tree_index
    assert d["sampling"]["trees"] == 4 and d["sampling"]["seed"] == 5 and d["sampling"]["uniform"] == 0.5
    assert d["sampling"]["source"] == "entmax"  # inference draws from the sparse maps by default
    assert [[tuple(n["box"]) for n in t] for t in d["trees"]] == [_boxes(t) for t in pred.trees]
    assert d["tree"] == d["trees"][pred.tree_index]  # the shown tree, with the same per-node mpp


def test_accounting_sums_the_cost_of_every_tree(model, image):
    one = magnet_zoo.predict_slide(model, _source(image))
    pred = magnet_zoo.predict_slide(model, _source(image), trees=3, seed=2)
    acc = pred.accounting
    assert acc["trees"] == 3
    assert acc["values_fed"] == 3 * one.accounting["values_fed"] == 3 * model.counts()["values_fed"]
    assert acc["images"] == {k: 3 * v for k, v in one.accounting["images"].items()}
    assert len(acc["pixels_read_per_tree"]) == 3 and min(acc["pixels_read_per_tree"]) > 0
    assert acc["pixels_read"] == sum(acc["pixels_read_per_tree"])


def test_sampled_centres_stay_inside_the_view(model, image):
    fetchers = _fetchers(model, image, 2)
    with torch.inference_mode():
        pooled = pooled_forward(model, fetchers, trees=6, seed=3, uniform=1.0)  # the uniform share: anywhere
    centres = []
    for out in pooled.outputs:
        for affine in out.affines:
            assert affine.log_prob is not None  # sampled, in eval mode
            assert float(affine.tx.abs().max()) <= 1 and float(affine.ty.abs().max()) <= 1
            centres.append(affine.tx.flatten())
        for tree, fetcher in zip(out.trees, fetchers, strict=True):
            view = root_square(*fetcher.slide_size)  # the root's view: the slide's square canvas
            boxes = {n.name: n.box for n in tree} | {tree[0].name: (view.x, view.y, view.side, view.side)}
            for node in tree[1:]:
                px, py, pw, ph = boxes[node.parent]
                x, y, w, h = node.box
                assert px - 1e-6 <= x + w / 2 <= px + pw + 1e-6 and py - 1e-6 <= y + h / 2 <= py + ph + 1e-6
    spread = torch.cat(centres)
    assert float(spread.min()) < -0.3 and float(spread.max()) > 0.3  # really spread over the view


def test_inference_trees_draw_each_centre_inside_its_layers_sparse_map_by_default(model, image):
    with torch.inference_mode():
        pooled = pooled_forward(model, _fetchers(model, image, 2), trees=3, seed=1)
    assert pooled.source == "entmax" and pooled.uniform == 0.0
    checked = 0
    for out in pooled.outputs:
        for affine in out.affines:
            probs = affine.probs.flatten(0, -3)  # (maps, H, W); the frozen patch's map is empty
            h, w = probs.shape[-2:]
            cols = ((affine.tx.flatten() + 1) * w / 2 - 0.5).round().long().clamp(0, w - 1)
            rows = ((affine.ty.flatten() + 1) * h / 2 - 0.5).round().long().clamp(0, h - 1)
            for m in range(probs.shape[0]):
                if float(probs[m].sum()) > 0:
                    assert float(probs[m, rows[m], cols[m]]) > 0  # drawn from the support
                    checked += 1
    assert checked >= 6
    with pytest.raises(ValueError, match="sampling source"):
        pooled_forward(model, _fetchers(model, image), trees=2, source="mode")
    pred = magnet_zoo.predict_slide(model, _source(image), trees=2, seed=1, tree_source="softmax", uniform=0.5)
    assert pred.sampling["source"] == "softmax" and pred.sampling["uniform"] == 0.5


def test_sampling_context_restores_the_training_policy(model, image):
    set_exploration(model, 2.0, 0.1)
    try:
        before = [layer.sample_policy for layer in model.layers]
        with sampled_trees(model, 1.0, 0.05, generator=torch.Generator().manual_seed(0)):
            assert all(layer.sample_policy["eval"] for layer in model.layers)
        assert [layer.sample_policy for layer in model.layers] == before
        assert before[0] == {"temperature": 2.0, "uniform": 0.1}  # set_exploration's policy, as before
        with torch.inference_mode():
            assert model.layers[0](torch.rand(1, 1, 3, 56, 56)).log_prob is None  # eval: still expected crops
    finally:
        set_exploration(model, None)
    with pytest.raises(ValueError, match="trees"):
        magnet_zoo.predict_slide(model, _source(image), trees=0)
    with pytest.raises(ValueError, match="temperature"):
        magnet_zoo.predict_slide(model, _source(image), trees=2, temperature=0.0)


def _checkpoint(model, folder):
    from magnet_zoo.hub import save_pretrained

    return save_pretrained(model, folder / "micro")


def test_cli_trees_writes_every_tree_and_its_settings(model, image, tmp_path, capsys):
    from PIL import Image

    from magnet_zoo.cli import build_parser, main

    ckpt = _checkpoint(model, tmp_path)
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(image).save(slides / name)
    out = tmp_path / "out"
    argv = ["predict", str(slides), "--model", str(ckpt), "--out", str(out), "--device", "cpu"]
    assert main([*argv, "--trees", "2", "--tree-seed", "3", "--batch-size", "2"]) == 0
    docs = [json.loads(p.read_text()) for p in sorted((out / "slides").glob("*.json"))]
    assert len(docs) == 2
    d = docs[0]
    assert len(d["trees"]) == 2 and d["sampling"]["trees"] == 2 and d["sampling"]["seed"] == 3
    assert d["accounting"]["trees"] == 2 and d["accounting"]["values_fed"] == 2 * model.counts()["values_fed"]
    settings = d["provenance"]["settings"]
    assert settings["trees"] == 2 and settings["tree_seed"] == 3
    assert docs[1]["trees"] == d["trees"]  # a batch of two runs them one at a time: same slide, same trees
    reference = magnet_zoo.predict_slide(magnet_zoo.load_pretrained(str(ckpt)), magnet_zoo.open_slide(slides / "a.png"),
                                         trees=2, seed=3)
    assert d["probability"] == pytest.approx(reference.probability, abs=1e-6)
    assert d["sampling"]["tree_probabilities"] == pytest.approx(reference.tree_probabilities, abs=1e-6)
    rows = (out / "predictions.csv").read_text().splitlines()
    assert str(2 * model.counts()["values_fed"]) in rows[1]
    key = d["provenance"]["run_key"]

    capsys.readouterr()
    assert main([*argv, "--trees", "2", "--tree-seed", "3"]) == 0
    assert "0 predicted, 2 already done" in capsys.readouterr().err
    assert main([*argv, "--trees", "2", "--tree-seed", "4"]) == 0  # another seed is other work
    assert "2 predicted" in capsys.readouterr().err
    assert main(argv) == 0  # the default: one expected tree, no sampling settings in the run key
    plain = json.loads(sorted((out / "slides").glob("*.json"))[0].read_text())
    assert "trees" not in plain and "trees" not in plain["provenance"]["settings"]
    assert plain["provenance"]["run_key"] != key
    figures = tmp_path / "figures"
    assert main(["explain", str(slides / "a.png"), "--model", str(ckpt), "--out", str(figures), "--trees", "2",
                 "--tree-seed", "3", "--thumb-size", "256"]) == 0
    explained = json.loads((figures / "a.magnet.json").read_text())
    assert explained["trees"] == d["trees"] and explained["provenance"]["settings"]["trees"] == 2
    assert (figures / "a.magnet.png").is_file() and (figures / "a.magnet.geojson").is_file()
    assert build_parser().parse_args(["predict", "x", "--model", "m", "--out", "o"]).trees == 1
    with pytest.raises(SystemExit):
        build_parser().parse_args(["predict", "x", "--model", "m", "--out", "o", "--trees", "0"])


def test_monai_inferer_passes_trees_through(model, image):
    pytest.importorskip("monai")
    from magnet_zoo.integrations.monai import MagNetInferer

    fetchers = _fetchers(model, image, 2)
    with torch.no_grad():
        plain = MagNetInferer()(fetchers, model)
        one = MagNetInferer(trees=1)(fetchers, model)
        pooled = MagNetInferer(trees=3, seed=4, uniform=0.5)(fetchers, model)
        logits = MagNetInferer("logits", trees=3, seed=4, uniform=0.5)(fetchers, model)
        full = MagNetInferer("full", trees=3, seed=4, uniform=0.5)(fetchers, model)
        reference = pooled_forward(model, fetchers, trees=3, seed=4, uniform=0.5)
    torch.testing.assert_close(one, plain, rtol=0, atol=0)
    torch.testing.assert_close(pooled, reference.probs, rtol=0, atol=0)
    assert not torch.equal(pooled, plain)
    torch.testing.assert_close(torch.sigmoid(logits), reference.probs, rtol=0, atol=1e-6)
    assert isinstance(full, PooledOutput) and full.num_trees == 3 and full.source == "entmax"
    with torch.no_grad():
        dense = MagNetInferer("full", trees=3, seed=4, uniform=0.5, source="softmax")(fetchers, model)
        dense_ref = pooled_forward(model, fetchers, trees=3, seed=4, uniform=0.5, source="softmax")
    assert dense.source == "softmax"
    torch.testing.assert_close(dense.probs, dense_ref.probs, rtol=0, atol=0)
    with pytest.raises(ValueError, match="trees"):
        MagNetInferer(trees=0)


def _slides_csv(folder, stem: str, shapes: list[tuple[int, int]], labels: tuple[int, ...], seed: int,
                split: str | None = None):
    """Tissue PNGs ``{stem}{i}.png`` of ``shapes`` (width, height) with ``labels`` (image ``i`` seeded
    ``seed + i``), listed in ``folder/slides.csv`` (normal / macro; every row in ``split`` if given)."""
    from PIL import Image

    rows = ["path,label,category" + (",split" if split else "")]
    for i, ((width, height), label) in enumerate(zip(shapes, labels, strict=True)):
        path = folder / f"{stem}{i}.png"
        Image.fromarray(tissue_image(width, height, seed=seed + i)).save(path)
        rows.append(f"{path},{label},{'normal' if label == 0 else 'macro'}" + (f",{split}" if split else ""))
    csv_path = folder / "slides.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    return csv_path


def test_evaluate_with_trees_scores_each_slide_as_predict_slide_does_whatever_the_batch(model, tmp_path):
    from magnet_zoo.cli import main
    from magnet_zoo.train.evaluate import evaluate

    csv_path = _slides_csv(tmp_path, "s", [(400 + 60 * i, 360) for i in range(3)], (0, 1, 1), seed=10)
    kwargs = dict(num_workers=0, device="cpu", progress=False)
    pooled = [evaluate(model, csv_path, batch_size=b, trees=3, tree_seed=5, **kwargs) for b in (1, 3)]
    plain = evaluate(model, csv_path, batch_size=3, **kwargs)
    assert evaluate(model, csv_path, batch_size=3, trees=1, **kwargs).predictions == plain.predictions
    assert plain.sampling is None and pooled[0].sampling["trees"] == 3 and pooled[0].sampling["seed"] == 5
    for a, b, row in zip(pooled[0].predictions, pooled[1].predictions, plain.predictions, strict=True):
        reference = magnet_zoo.predict_slide(model, magnet_zoo.open_slide(a["path"]), trees=3, seed=5)
        assert a["probability"] == pytest.approx(reference.probability, abs=1e-6)
        assert b["probability"] == pytest.approx(reference.probability, abs=1e-6)  # batched: the same trees
        expected = magnet_zoo.predict_slide(model, magnet_zoo.open_slide(row["path"]))
        assert row["probability"] == pytest.approx(expected.probability, abs=1e-6)
    assert all(np.isfinite(v) for v in pooled[0].loss.values())

    ckpt = _checkpoint(model, tmp_path)
    report = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(ckpt), "--data", str(csv_path), "--workers", "0", "--device", "cpu",
                 "--no-progress", "--trees", "3", "--tree-seed", "5", "--out", str(report)]) == 0
    written = json.loads(report.read_text())
    assert written["sampling"]["trees"] == 3 and written["sampling"]["seed"] == 5
    assert [r["probability"] for r in written["predictions"]] == pytest.approx(
        [r["probability"] for r in pooled[0].predictions], abs=1e-6)
    with pytest.raises(ValueError, match="trees"):
        evaluate(model, csv_path, trees=0, **kwargs)


def test_max_pooling_takes_the_best_tree_everywhere_trees_are_pooled(model, image, tmp_path):
    from magnet_zoo.nn.trees import TreePolicy
    from magnet_zoo.train.evaluate import evaluate
    from magnet_zoo.train.sources import SlideValidator

    with torch.inference_mode():
        mean = pooled_forward(model, _fetchers(model, image, 2), trees=4, seed=5, uniform=0.5)
        best = pooled_forward(model, _fetchers(model, image, 2), trees=4, seed=5, uniform=0.5, pool="max")
    torch.testing.assert_close(best.tree_probs, mean.tree_probs, rtol=0, atol=0)  # the same trees
    torch.testing.assert_close(best.probs, mean.tree_probs.amax(0), rtol=0, atol=0)
    assert bool((best.probs > mean.probs).all())  # the trees differ, so max and mean do too
    assert best.representative() == [int(i) for i in best.tree_probs.argmax(0)]
    with pytest.raises(ValueError, match="pooling"):
        pooled_forward(model, _fetchers(model, image), trees=2, pool="median")
    with pytest.raises(ValueError, match="pooling"):
        TreePolicy(pool="sum")

    csv_path = _slides_csv(tmp_path, "m", [(400, 360 + 40 * i) for i in range(2)], (0, 1), seed=20, split="val")
    policy = TreePolicy(source="softmax", uniform=0.3, pool="max")
    report = evaluate(model, csv_path, trees=3, tree_seed=2, tree_policy=policy, num_workers=0, device="cpu",
                      progress=False)
    assert report.sampling["pool"] == "max" and report.sampling["source"] == "softmax"
    for row in report.predictions:
        with torch.inference_mode():
            fetcher = SlideFetcher(magnet_zoo.open_slide(row["path"]), model.config.grey_threshold)
            ref = pooled_forward(model, [fetcher], trees=3, seed=2, **policy.kwargs())
        assert row["probability"] == pytest.approx(float(ref.tree_probs.max()), abs=1e-6)
    from magnet_zoo.train.data import read_slide_csv
    from magnet_zoo.train.distributed import DistInfo

    validator = SlideValidator(read_slide_csv(csv_path, model.config.labels), num_workers=0, trees=3, tree_seed=2,
                               tree_policy=policy)
    metrics = validator(model, device=DEVICE, dtype=None, info=DistInfo(device=DEVICE), progress=False)
    assert [r["probability"] for r in metrics["report"].predictions] == pytest.approx(
        [r["probability"] for r in report.predictions], abs=1e-6)


def test_a_tree_mil_checkpoint_is_scored_as_validated_with_as_trained_and_warns_otherwise(model, tmp_path, capsys):
    from magnet_zoo.cli import main
    from magnet_zoo.hub import load_pretrained
    from magnet_zoo.train.evaluate import evaluate
    from magnet_zoo.train.exploration import mil_inference, trained_inference
    from magnet_zoo.train.recipe import get_recipe

    recipe = get_recipe("learn_to_look", explore_trees=3, tree_mil=True, explore_uniform=0.2)
    plain_ckpt = _checkpoint(model, tmp_path / "plain")
    ckpt = _checkpoint(model, tmp_path / "mil")
    config = ckpt / "config.json"
    doc = json.loads(config.read_text())
    doc["recipe"] = recipe.to_dict()  # as the training loop writes it
    config.write_text(json.dumps(doc))
    assert trained_inference(load_pretrained(str(plain_ckpt))) is None  # no recipe recorded
    assert trained_inference(model) is None  # not loaded from a folder
    assert trained_inference(load_pretrained(str(ckpt))) == mil_inference(recipe)
    assert mil_inference(recipe)[0] == 3 and mil_inference(recipe)[1].pool == "max"

    csv_path = _slides_csv(tmp_path, "t", [(420, 380 + 30 * i) for i in range(2)], (0, 1), seed=40)
    argv = ["evaluate", "--model", str(ckpt), "--data", str(csv_path), "--workers", "0", "--device", "cpu",
            "--no-progress", "--tree-seed", "4"]
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "plain.json")]) == 0
    assert "trained with tree_mil" in capsys.readouterr().err  # the expected crop is not how it validated
    assert json.loads((tmp_path / "plain.json").read_text())["sampling"] is None
    assert main([*argv, "--as-trained", "--out", str(tmp_path / "as_trained.json")]) == 0
    assert "warning" not in capsys.readouterr().err
    written = json.loads((tmp_path / "as_trained.json").read_text())
    assert written["sampling"]["trees"] == 3 and written["sampling"]["pool"] == "max"
    assert written["sampling"]["uniform"] == pytest.approx(0.2) and written["sampling"]["source"] == "softmax"
    k, policy = mil_inference(recipe)
    reference = evaluate(model, csv_path, trees=k, tree_seed=4, tree_policy=policy, num_workers=0, device="cpu",
                         progress=False)
    assert [r["probability"] for r in written["predictions"]] == pytest.approx(
        [r["probability"] for r in reference.predictions], abs=1e-6)
    with pytest.raises(SystemExit, match="drop --trees"):
        main([*argv, "--as-trained", "--trees", "2"])
    plain_argv = [*argv, "--as-trained", "--out", str(tmp_path / "plain_as_trained.json")]
    plain_argv[2] = str(plain_ckpt)
    assert main(plain_argv) == 0 and "changes nothing" in capsys.readouterr().err
    assert json.loads((tmp_path / "plain_as_trained.json").read_text())["sampling"] is None
    predict_argv = ["predict", str(tmp_path / "t1.png"), "--model", str(ckpt), "--workers", "1", "--tree-seed", "4"]
    assert main([*predict_argv, "--out", str(tmp_path / "pred")]) == 0
    assert "trained with tree_mil" in capsys.readouterr().err  # the expected crop is not how it validated
    # predict and explain --as-trained: the checkpoint's 3 trees and policy, max-pooled, as evaluate scores them
    t1 = next(r["probability"] for r in reference.predictions if str(r["path"]).endswith("t1.png"))
    assert main([*predict_argv, "--as-trained", "--out", str(tmp_path / "pred_mil")]) == 0
    assert "warning" not in capsys.readouterr().err
    run = json.loads((tmp_path / "pred_mil" / "run.json").read_text())
    assert run["settings"]["tree_pool"] == "max" and run["settings"]["trees"] == 3
    assert run["run_key"] != json.loads((tmp_path / "pred" / "run.json").read_text())["run_key"]
    (slide_json,) = (tmp_path / "pred_mil" / "slides").glob("*.json")
    predicted = json.loads(slide_json.read_text())
    assert predicted["probability"] == pytest.approx(t1, abs=1e-6)
    assert predicted["probability"] == pytest.approx(max(predicted["sampling"]["tree_probabilities"]))
    assert predicted["sampling"]["pooling"] == "largest of the trees' probabilities"
    assert main(["explain", str(tmp_path / "t1.png"), "--model", str(ckpt), "--tree-seed", "4", "--as-trained",
                 "--out", str(tmp_path / "explain_mil")]) == 0
    explained = json.loads((tmp_path / "explain_mil" / "t1.magnet.json").read_text())
    assert explained["probability"] == pytest.approx(t1, abs=1e-6)
    chosen = explained["sampling"]["tree_index"]  # the picture shows the tree that gave the probability
    assert explained["sampling"]["tree_probabilities"][chosen] == pytest.approx(explained["probability"])
