"""Smoke tests of the benchmark scripts' ``--quick`` modes and of ``magnet-zoo demo``.

Each benchmark runs as a subprocess, as a user would run it, with its JSON written to a temporary folder;
the tests check that the JSON exists and holds what the script promises. The numbers of ``--quick`` runs
are not benchmark results (tiny slides, a few steps), so nothing here asserts on them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def run_script(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def read_json(path: Path) -> dict:
    assert path.is_file(), f"{path} was not written"
    return json.loads(path.read_text())


def is_probability(value: object) -> bool:
    return isinstance(value, float | int) and 0.0 <= value <= 1.0


def check_machine(result: dict) -> None:
    machine = result["machine"]
    assert {"torch", "python", "platform", "date"} <= set(machine)


@pytest.mark.slow
def test_synthmets_quick(tmp_path):
    run_script("synthmets.py", "--quick", "--no-progress", "--data", str(tmp_path / "data"),
               "--out", str(tmp_path / "synthmets.json"))
    result = read_json(tmp_path / "synthmets_quick.json")
    assert result["benchmark"] == "synthmets" and result["quick"] is True
    check_machine(result)
    splits = result["data"]["splits"]
    assert {"train", "val", "test"} <= set(splits)
    n_test = sum(v["n"] for k, v in splits.items() if k.startswith("test"))
    assert set(result["methods"]) == {"magnet", "mean_rgb", "thumbnail_cnn", "dense_mil"}
    for name, method in result["methods"].items():
        preds = method["predictions"]
        assert len(preds) == n_test, name
        for p in preds:
            assert is_probability(p["probability"]), (name, p)
            assert p["values_fed"] > 0 and p["pixels_read"] > 0 and p["seconds"] > 0, (name, p)
        summary = method["summary"]
        assert {"auroc", "accuracy", "per_category"} <= set(summary["metrics"])
        # The summary is of these predictions: its accuracy is theirs (p >= 0.5 is the positive class).
        right = [(p["probability"] >= 0.5) == (p["label"] == 1) for p in preds]
        assert summary["metrics"]["accuracy"] == pytest.approx(sum(right) / len(right)), name
        assert {"values_fed_mean", "pixels_read_mean", "seconds_mean"} <= set(summary["cost"])
        assert "seconds" in method["training"]
    magnet = result["methods"]["magnet"]
    counts = magnet["settings"]["counts"]
    assert magnet["predictions"][0]["values_fed"] == counts["values_fed"]
    n_final = math.prod(magnet["settings"]["config"]["patches"])
    assert all(len(p["extra"]["final_boxes"]) == n_final for p in magnet["predictions"])
    loc = result["localisation"]
    per_slide = result["localisation_per_slide"]
    assert loc["all"]["n"] == len(per_slide) >= 1
    # A slide's hit is the share of its final patches on tumour (a multiple of 1 / n_final); the pooled
    # hit and random hit are the means over the slides.
    for row in per_slide:
        assert row["hit"] * n_final == pytest.approx(round(row["hit"] * n_final)), row
        assert 0.0 <= row["random_hit"] <= 1.0, row
    assert loc["all"]["hit"] == pytest.approx(sum(r["hit"] for r in per_slide) / len(per_slide))
    assert loc["all"]["random_hit"] == pytest.approx(sum(r["random_hit"] for r in per_slide) / len(per_slide))
    # the ceiling of the ratio is that of patches all on tumour (hit 1): no ratio exceeds it
    for group in [loc["all"], *loc["by_category"].values()]:
        if group.get("random_hit", 0) > 0:
            assert group["ratio_ceiling"] == pytest.approx(1 / group["random_hit"])
            assert group["ratio"] <= group["ratio_ceiling"] + 1e-9
    assert result["targets"] and all("value" in row for row in result["targets"].values())
    ceiling_row = result["targets"]["localisation micro: ceiling of that ratio, every final patch on tumour (reported)"]
    micro = loc["by_category"].get("micro")
    if micro and micro.get("random_hit", 0) > 0:
        assert ceiling_row["value"] == pytest.approx(1 / micro["random_hit"])
    markdown = (tmp_path / "synthmets_quick.md").read_text()
    assert "python benchmarks/synthmets.py --quick" in markdown
    assert "ceiling (all on tumour)" in markdown

    # layer by layer from the same JSON: every pair's first box is a first-layer crop; the second layer is
    # scored under the parents on tumour, one learned child each
    layers_out = tmp_path / "layers.json"
    run_script("synthmets_layers.py", "--runs", str(tmp_path / "synthmets_quick.json"), "--data",
               str(tmp_path / "data"), "--out", str(layers_out))
    layers = read_json(layers_out)["runs"][0]
    one, two = layers["all"]["layer1"], layers["all"]["layer2_on_tumour"]
    tumour_preds = [p for p in magnet["predictions"] if p["label"] == 1]
    assert one["n"] == sum(len(p["extra"]["final_boxes"]) // 2 for p in tumour_preds)
    assert two.get("n", 0) == round(one["hit"] * one["n"])
    if one["random_hit"] > 0:
        assert one["ratio"] == pytest.approx(one["hit"] / one["random_hit"])
    assert "| synthmets_quick.json |" in layers_out.with_suffix(".md").read_text()
    assert "| magnet |" in markdown and "| dense_mil |" in markdown


@pytest.mark.slow
def test_speed_quick(tmp_path):
    slide = tmp_path / "slide_8192.tiff"  # not the script's default in /tmp, which would outlive the run
    run_script("speed.py", "--quick", "--slide", str(slide), "--out", str(tmp_path / "speed.json"))
    result = read_json(tmp_path / "speed_quick.json")
    check_machine(result)
    assert result["slide"] == str(slide) and slide.is_file()
    assert [m["model"] for m in result["magnet"]] == ["magnet3_inception_v3", "magnet4_inception_v3"]
    for m in result["magnet"]:
        assert m["seconds_per_slide"] > 0 and m["values_fed"] > 0 and m["pixels_read"] > 0
    assert result["dense"]["tissue_tiles"] > 0 and result["dense"]["seconds_per_slide_estimated"] > 0


@pytest.mark.slow
def test_read_speed_quick(tmp_path):
    slide = tmp_path / "slide_8192.tiff"
    run_script("read_speed.py", "--quick", "--slide", str(slide), "--out", str(tmp_path / "read_speed.json"))
    result = read_json(tmp_path / "read_speed_quick.json")
    check_machine(result)
    assert result["slide"] == str(slide) and slide.is_file()
    assert result["reads_per_slide"] > 0
    assert result["serial_seconds_median"] > 0 and result["concurrent_seconds_median"] > 0


@pytest.mark.slow
@pytest.mark.slow
def test_demo_command(tmp_path, capsys):
    """``magnet-zoo demo`` with the shipped checkpoint on its two generated slides, at the size it makes by
    default and the model was trained on (on 4x smaller slides, out of its training range, it misses)."""
    from magnet_zoo.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--thumb-size", "256"]) == 0
    printed = capsys.readouterr().out
    assert "p(tumour)" in printed and "demo_tumour_16384" in printed and "demo_normal_16384" in printed
    for stem in ("demo_tumour_16384", "demo_normal_16384"):
        record = json.loads((out / f"{stem}.magnet.json").read_text())
        assert is_probability(record["probability"]) and record["tree"]
        labels = ("normal", "tumour")
        assert record["label"] == labels[record["probability"] >= record.get("threshold", 0.5)], record["label"]
        assert record["truth"]["label"] in ("tumour", "normal")
        geo = json.loads((out / f"{stem}.magnet.geojson").read_text())
        assert geo["type"] == "FeatureCollection" and geo["features"]
        assert (out / f"{stem}.magnet.png").stat().st_size > 1000
    tumour = json.loads((out / "demo_tumour_16384.magnet.json").read_text())
    finals = [n for n in tumour["tree"] if n["layer"] == max(m["layer"] for m in tumour["tree"])]
    assert isinstance(tumour["final_patches_on_tumour"], int)
    from magnet_zoo.demo import load_demo_model

    assert 0 <= tumour["final_patches_on_tumour"] <= len(finals) == load_demo_model().config.num_final_patches
    # The shipped model finds the tumour of its own demo slide (what the demo prints as "k / 2").
    assert tumour["final_patches_on_tumour"] >= 1


@pytest.mark.slow
def test_gpu_script_dry_run(tmp_path):
    """``benchmarks/gpu.py --dry-run``: every part of the prepared GPU script runs, tiny, on the CPU."""
    out = tmp_path / "gpu.json"
    run_script("gpu.py", "--dry-run", "--out", str(out), timeout=900)
    result = read_json(out)
    check_machine(result)
    assert result["dry_run"] is True and result["device"].startswith("cpu")
    agree = result["agreement"]
    assert agree["max_abs_prob_diff_fp32"] == 0.0 and agree["max_abs_attention_grad_diff"] == 0.0  # CPU vs CPU
    assert agree["max_abs_attention_grad"] > 0  # the attention did get a gradient to compare
    assert {(r["model"], r["activation_checkpointing"]) for r in result["train_steps"]} == {
        ("magnet2_micro", False), ("magnet2_micro", True)}
    assert all(r["loss_finite"] and r["step_seconds_median"] > 0 for r in result["train_steps"])
    (infer,) = result["inference"]
    assert infer["slides_per_second"] == pytest.approx(1.0 / infer["seconds_per_slide_median"])
    assert 0 < infer["read_seconds_median"] <= infer["seconds_per_slide_median"]  # reads are part of the time
    assert result["synthmets"]["steps"] >= 1 and "--device cpu" in result["synthmets"]["command"]


def test_findit_visibility_counts_the_object_pixels_the_first_view_keeps(tmp_path):
    out = tmp_path / "vis.json"
    run_script("findit_visibility.py", "--n", "3", "--views", "56", "168", "--oversample", "1", "4",
               "--out", str(out))
    result = read_json(out)
    check_machine(result)
    rows = {(r["object_frac"], r["view"], r["oversample"]): r for r in result["rows"]}
    assert set(rows) == {(f, v, k) for f in (0.03, 0.01) for v in (56, 168) for k in (1, 4)}
    # the 3 % object leaves a few pixels in the 56 px view; the 1 % object none (averaged into the grey
    # background, then grey-filtered), until the view is three times larger
    assert rows[(0.03, 56, 1)]["visible_min"] > 0 and rows[(0.01, 56, 1)]["images_with_none"] == 3
    assert rows[(0.01, 56, 1)]["brightest_median"] is None
    assert rows[(0.01, 168, 1)]["visible_min"] > 0
    assert rows[(0.03, 168, 1)]["visible_median"] > rows[(0.03, 56, 1)]["visible_median"]
    # or the view is read 4x larger and grey-filtered before the averaging: a dim trace, a few pixels
    one = rows[(0.01, 56, 4)]
    assert one["images_with_none"] == 0 and one["visible_max"] <= 4
    assert 0 < one["brightest_median"] < rows[(0.01, 168, 1)]["brightest_median"]


def test_findit_heads_patches_hold_the_object_where_the_diagnostic_says(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import numpy as np
        from findit_heads import final_patches

        from magnet_zoo.tasks.findit import FindItSpec
    finally:
        sys.path.remove(str(BENCHMARKS))
    spec = FindItSpec(object_frac=0.03)
    rng = np.random.default_rng(0)
    for seed in range(4):
        patches, label = final_patches(spec, seed, 0.1, "uniform", rng)
        assert patches.shape == (4, 3, 56, 56) and label in (0, 1)
        for frozen in (patches[0], patches[2]):  # the object's colour (blue > red > green), inside every box
            purple = (frozen[2] > frozen[0] + 0.1) & (frozen[0] > frozen[1])
            assert purple.sum() >= 10
        centred, _ = final_patches(spec, seed, 0.1, "centre", rng)
        purple = (centred[0][2] > centred[0][0] + 0.1) & (centred[0][0] > centred[0][1])
        ys, xs = purple.nonzero(as_tuple=True)
        assert abs(xs.float().mean() - 27.5) < 3 and abs(ys.float().mean() - 27.5) < 3

    out = tmp_path / "heads.json"
    result = run_script("findit_heads.py", "--settings", "0.03:0.1", "--seeds", "0", "--steps", "3", "--pool", "4",
                        "--n-eval", "4", "--out", str(out))
    doc = read_json(out)
    check_machine(doc)
    (row,) = doc["rows"]
    assert row["steps"] == 3 and row["pool"] == 4 and row["object_px_in_frozen_patch"] == pytest.approx(16.8)
    assert is_probability(row["accuracy"]) and len(row["loss_every_20_steps"]) == 1
    assert "| 3% | 0.1 | uniform | 16.8 | 0 |" in result.stdout


@pytest.mark.slow
def test_findit_tiny_seeds_reports_each_seed_of_the_learn_test_setting(tmp_path):
    out = tmp_path / "tiny.json"
    result = run_script("findit_tiny_seeds.py", "--seeds", "3", "4", "--steps", "2", "--n-eval", "4",
                        "--model-override", "max_scale=0.6", "--out", str(out))
    doc = read_json(out)
    assert [r["seed"] for r in doc["runs"]] == [3, 4] and doc["steps"] == 2 and doc["n_eval"] == 4
    assert doc["model_overrides"] == {"max_scale": 0.6} and doc["machine"]["torch_threads"] >= 1
    for run in doc["runs"]:
        assert set(run["hit_after"]) == {"1", "2"} and 0 <= run["hit_layer2_flat"] <= 1
        assert run["scale_mean"]["2"] == pytest.approx(0.6)  # the override reached the model (else 0.35)
    # seed 3's row as it came, then in the final table ("| 3 |" anywhere could also be a run time in seconds)
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 3 |")]
    assert len(rows) == 2


def test_synthmets_magnet_seeds_on_the_same_data_make_one_table(tmp_path):
    data = str(tmp_path / "data")
    common = ("--quick", "--no-progress", "--data", data, "--methods", "magnet")
    run_script("synthmets.py", *common, "--out", str(tmp_path / "a" / "x.json"))
    run_script("synthmets.py", *common, "--magnet-seed", "1", "--recipe", "learn_to_look_centred",
               "--recipe-field", "recentre_on=positive", "--also-running", "this test's other run",
               "--save-checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "b" / "x.json"))
    first = read_json(tmp_path / "a" / "synthmets_quick.json")
    second = read_json(tmp_path / "b" / "synthmets_quick.json")
    settings = second["methods"]["magnet"]["settings"]
    # the options reach the MagNet: another seed and recipe on the same data (the data seed stays --seed's)
    assert settings["trainer"]["seed"] == 1 and settings["recipe"]["name"] == "learn_to_look_centred"
    assert settings["recipe"]["recentre_on"] == "positive" and settings["config"]["attention_padding"] == "replicate"
    assert first["methods"]["magnet"]["settings"]["trainer"]["seed"] == 0
    def split_seeds(run: dict) -> dict:
        return {k: (v["n"], v["size"], v["seed"]) for k, v in run["data"]["splits"].items()}

    assert split_seeds(second) == split_seeds(first)
    assert second["also_running"] == "this test's other run"

    out = tmp_path / "seeds.json"
    run_script("synthmets_seeds.py", "--runs", str(tmp_path / "a" / "synthmets_quick.json"),
               str(tmp_path / "b" / "synthmets_quick.json"), "--out", str(out))
    seeds = read_json(out)
    assert [(r["recipe"], r["seed"]) for r in seeds["runs"]] == [("learn_to_look", 0), ("learn_to_look_centred", 1)]
    for row, run in zip(seeds["runs"], (first, second), strict=True):
        assert row["auroc"] == run["methods"]["magnet"]["summary"]["metrics"]["auroc"]
        micro = run["localisation"]["by_category"].get("micro", {})
        if micro.get("random_hit"):  # the ceiling comes from random_hit, so older JSONs get it too
            assert row["loc_micro_ceiling"] == pytest.approx(1 / micro["random_hit"])
        else:
            assert row["loc_micro_ceiling"] is None
    assert seeds["recipes"]["learn_to_look_centred (recentre_on=positive)"]["seeds"] == [1]
    assert seeds["runs"][1]["recipe_fields"] == ["recentre_on=positive"] and seeds["runs"][0]["recipe_fields"] == []
    assert "| learn_to_look_centred (recentre_on=positive) | 1 |" in out.with_suffix(".md").read_text()

    # a run on another CPU is another setting: the same wall-time budget bought another number of steps
    elsewhere = json.loads((tmp_path / "b" / "synthmets_quick.json").read_text())
    elsewhere["machine"]["cpu_model"] = "Another CPU"
    (tmp_path / "elsewhere.json").write_text(json.dumps(elsewhere))
    run_script("synthmets_seeds.py", "--runs", str(tmp_path / "b" / "synthmets_quick.json"),
               str(tmp_path / "elsewhere.json"), "--out", str(tmp_path / "split.json"))
    split = read_json(tmp_path / "split.json")["recipes"]
    assert list(split) == ["learn_to_look_centred (recentre_on=positive)",
                           "learn_to_look_centred (recentre_on=positive) [Another CPU]"]
    assert [rec["n"] for rec in split.values()] == [1, 1]

    # runs on other data are refused, with the file named
    other = json.loads((tmp_path / "b" / "synthmets_quick.json").read_text())
    other["data"]["splits"]["test"]["seed"] += 1
    (tmp_path / "other.json").write_text(json.dumps(other))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    refused = subprocess.run([sys.executable, str(BENCHMARKS / "synthmets_seeds.py"), "--runs",
                              str(tmp_path / "a" / "synthmets_quick.json"), str(tmp_path / "other.json"),
                              "--out", str(tmp_path / "refused.json")], env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "other.json was made on other data" in refused.stderr
    assert not (tmp_path / "refused.json").exists()

    # the saved checkpoint scored again by synthmets_trees.py: one tree reproduces the run's own test
    # predictions (same slides, same order); K trees feed K times the values
    trees_out = tmp_path / "trees.json"
    run_script("synthmets_trees.py", "--models", str(tmp_path / "ckpt"), "--data", data, "--trees", "1", "2",
               "--threads", "1", "--out", str(trees_out))
    scored = read_json(trees_out)["rows"][0]["results"]
    assert [r["trees"] for r in scored] == [1, 2]
    assert scored[0]["probabilities"] == pytest.approx(
        [p["probability"] for p in second["methods"]["magnet"]["predictions"]], abs=1e-5)
    assert scored[1]["values_fed_per_slide"] == 2 * scored[0]["values_fed_per_slide"]
    assert second["checkpoint"] == str(tmp_path / "ckpt")
    assert "learn_to_look_centred" in (tmp_path / "ckpt" / "README.md").read_text()  # the card names its recipe


@pytest.mark.slow
def test_the_mil_recipe_runs_and_ship_demo_ships_the_best_validation_run_with_its_card(tmp_path):
    from safetensors.torch import load_file

    run_script("synthmets.py", "--quick", "--no-progress", "--data", str(tmp_path / "data"), "--methods", "magnet",
               "--recipe", "learn_to_look_mil", "--recipe-field", "attention_pretrain_steps=2",
               "--save-checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "a" / "x.json"))
    ran = read_json(tmp_path / "a" / "synthmets_quick.json")
    magnet = ran["methods"]["magnet"]
    assert magnet["settings"]["recipe"]["name"] == "learn_to_look_mil"
    assert magnet["settings"]["config"]["attention_tissue_only"] is True
    assert magnet["training"]["attention_pretrain"]["steps"] == 2
    # a second "run" that validated better, whose checkpoint is another network: it is picked, then refused
    better = json.loads(json.dumps(ran))
    better["methods"]["magnet"]["training"]["best_val_auroc"] = magnet["training"]["best_val_auroc"] + 0.01
    better["methods"]["magnet"]["settings"]["config"]["gru_hidden"] += 1
    (tmp_path / "better.json").write_text(json.dumps(better))
    out = tmp_path / "shipped"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    refused = subprocess.run([sys.executable, str(BENCHMARKS / "ship_demo.py"), str(tmp_path / "a" /
                              "synthmets_quick.json"), str(tmp_path / "better.json"), "--out", str(out)],
                             env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "holds a network other than" in refused.stderr and not out.exists()
    worse = json.loads(json.dumps(ran))
    worse["methods"]["magnet"]["training"]["best_val_auroc"] = magnet["training"]["best_val_auroc"] - 0.01
    worse["checkpoint"] = str(tmp_path / "nowhere")
    (tmp_path / "worse.json").write_text(json.dumps(worse))
    printed = run_script("ship_demo.py", str(tmp_path / "worse.json"), str(tmp_path / "a" / "synthmets_quick.json"),
                         "--note", "A note for the card.", "--out", str(out)).stdout
    assert "-> synthmets_quick.json" in printed
    shipped, trained = load_file(out / "model.safetensors"), load_file(tmp_path / "ckpt" / "model.safetensors")
    assert shipped.keys() == trained.keys() and all((shipped[k] == trained[k]).all() for k in shipped)
    card = (out / "README.md").read_text()
    assert "A note for the card." in card and "learn_to_look_mil" in card
    assert "| attention MIL (first map from slide labels) | 2 pre-training steps" in card
    assert "top 1.0 of the tissue pooled, narrowed to 0.1 over the phase's first half; tissue edge: below" in card


@pytest.mark.slow
def test_synthmets_tree_mil_run_validates_and_tests_with_its_max_pooled_trees(tmp_path):
    run_script("synthmets.py", "--quick", "--no-progress", "--data", str(tmp_path / "data"), "--methods", "magnet",
               "--recipe-field", "explore_trees=2", "--recipe-field", "explore_frac=1.0",
               "--recipe-field", "tree_mil=true", "--save-checkpoint", str(tmp_path / "ckpt"),
               "--out", str(tmp_path / "x.json"))
    magnet = read_json(tmp_path / "synthmets_quick.json")["methods"]["magnet"]
    inference = magnet["settings"]["inference"]
    assert inference["trees"] == 2 and inference["pool"] == "max" and inference["source"] == "softmax"
    one_tree = magnet["settings"]["counts"]["values_fed"]
    finals = magnet["settings"]["config"]["patches"][0] * magnet["settings"]["config"]["patches"][1]
    for row in magnet["predictions"]:
        assert row["values_fed"] == 2 * one_tree  # both trees are paid for
        assert len(row["extra"]["final_boxes"]) == 2 * finals  # and both trees' final patches localise

    # synthmets_trees.py --as-trained scores the checkpoint as the run tested it (its 2 trees, max-pooled), and
    # --uniform-centres adds the placement control: the same trees and pooling, centres drawn uniformly (this
    # smoke model's attention is still nearly flat, so its two rows may agree: only the policy is checked)
    out = tmp_path / "trees.json"
    run_script("synthmets_trees.py", "--models", str(tmp_path / "ckpt"), "--data", str(tmp_path / "data"),
               "--as-trained", "--uniform-centres", "--threads", "1", "--out", str(out))
    scored = read_json(out)["rows"][0]["results"]
    assert [(r["trees"], r["centres"], r["policy"]["pool"]) for r in scored] == [(2, "attention", "max"),
                                                                                   (2, "uniform", "max")]
    assert scored[0]["policy"]["uniform"] < 1.0 and scored[1]["policy"]["uniform"] == 1.0
    assert scored[0]["probabilities"] == pytest.approx([p["probability"] for p in magnet["predictions"]], abs=1e-5)
    assert "| 2 | uniform | max |" in out.with_suffix(".md").read_text()
