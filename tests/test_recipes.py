"""Recipes: named, serialisable data; the paper's exactly; clear errors for what does not exist."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from magnet_zoo.config import ConfigError, MagNetConfig
from magnet_zoo.train import DEFAULT_RECIPE, RECIPES, Recipe, UnknownRecipeError, get_recipe, list_recipes
from magnet_zoo.train.recipe import parse_recipe_overrides
from magnet_zoo.train.settings import TrainConfig, default_batch_size


def test_registered_recipes_and_the_default():
    assert {"paper", "learn_to_look", "learn_to_look_mil"} <= set(list_recipes())
    assert DEFAULT_RECIPE == "learn_to_look_mil" == TrainConfig().recipe
    for name, recipe in RECIPES.items():
        assert recipe.name == name and recipe.summary


def test_paper_recipe_is_section_3_3():
    r = get_recipe("paper")
    assert (r.lr, r.attention_lr, r.schedule, r.min_lr, r.warmup, r.epochs, r.augment) == (
        3e-5, None, "cosine", 0.0, 0.0, 200, True)
    assert r.batch_size is None  # the paper's 16 up to three layers, 8 for four
    assert default_batch_size(MagNetConfig(patches=(3, 2, 3))) == 16
    assert default_batch_size(MagNetConfig(patches=(3, 2, 3, 2))) == 8
    m = r.model_overrides
    assert m["translation"] == "tanh" and m["loss_paradoxical"] and m["loss_auxiliary"] and m["loss_classifier"]
    # nothing beyond the paper: no anneals, jitter, revival, head warm-up, guidance or pre-training
    assert r.max_scale_start is None and r.temperature_start is None and not r.jitter and not r.revive_at
    assert r.head_warmup == 0 and r.guidance_weight == 0 and r.head_pretrain_windows == 0
    assert r.grad_clip is None


def test_recipes_round_trip_through_json_and_take_single_field_overrides():
    for name in list_recipes():
        recipe = get_recipe(name)
        again = Recipe.from_dict(json.loads(json.dumps(recipe.to_dict())))
        assert again == recipe
    r = get_recipe("learn_to_look", lr=1e-4, revive_at=[0.5], model_overrides={"sampler": "bilinear"})
    assert r.lr == 1e-4 and r.revive_at == (0.5,)
    assert r.model_overrides["sampler"] == "bilinear" and r.model_overrides["translation"] == "clamp"  # merged
    assert get_recipe("learn_to_look").lr == 1e-3  # the registered recipe is unchanged


def test_unknown_recipes_fields_and_bad_values_are_named():
    with pytest.raises(UnknownRecipeError, match="did you mean 'paper'"):
        get_recipe("papr")
    with pytest.raises(UnknownRecipeError, match="did you mean 'attention_lr'"):
        get_recipe("paper", attention_lrr=1e-3)
    with pytest.raises(ConfigError, match="lr must be > 0"):
        get_recipe("paper", lr=-1.0)
    with pytest.raises(ConfigError, match="schedule"):
        get_recipe("paper", schedule="step")
    with pytest.raises(ConfigError, match="unknown MagNetConfig fields"):
        get_recipe("paper", model_overrides={"translaton": "clamp"})
    assert parse_recipe_overrides(["lr=1e-3", "revive_at=[]", "grad_clip=null"]) == {
        "lr": 1e-3, "revive_at": [], "grad_clip": None}
    with pytest.raises(UnknownRecipeError, match="did you mean 'lr'"):
        parse_recipe_overrides(["lrr=1"])


def test_guidance_layers_and_grids_are_read_from_json_and_checked():
    recipe = Recipe.from_dict({"name": "g", "guidance_weight": 1.0, "guidance_layers": [1, 2],
                               "guidance_grid": [16, 8]})
    assert recipe.guidance_layers == (1, 2) and recipe.guidance_grid == (16, 8)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert get_recipe("learn_to_look").guidance_layers == ()  # default: every layer after the first
    assert not get_recipe("learn_to_look").guidance_standardise
    assert get_recipe("learn_to_look").guidance_evidence == "positive"
    assert Recipe.from_dict({"name": "g", "guidance_evidence": "label"}).guidance_evidence == "label"
    for bad in ({"guidance_layers": [0]}, {"guidance_layers": [2, 2]}, {"guidance_grid": []},
                {"guidance_grid": [1]}, {"guidance_evidence": "negative"}):
        with pytest.raises(ConfigError, match="guidance_"):
            get_recipe("learn_to_look", **bad)


def test_train_config_builds_the_network_with_the_recipes_settings_then_the_runs():
    cfg = TrainConfig(recipe="learn_to_look", model_overrides={"max_scale": 0.5})
    settings = cfg.model_settings()
    assert settings["translation"] == "clamp" and settings["max_scale"] == 0.5
    assert TrainConfig(recipe="paper").model_settings()["translation"] == "tanh"


def test_cli_lists_recipes_and_refuses_unknown_ones(capsys, tmp_path):
    from magnet_zoo.cli import build_parser, main

    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for name in list_recipes():
        assert name in help_text
    assert "--recipe paper" in help_text  # how to reproduce the paper
    assert main(["train", "--list-recipes"]) == 0
    listing = capsys.readouterr().out
    assert "paper:" in listing and "lr = 3e-05" in listing and "revive_at = [0.35, 0.5, 0.65]" in listing
    csv_path = tmp_path / "x.csv"
    csv_path.write_text("path,label\n")
    assert main(["train", "--data", str(csv_path), "--out", str(tmp_path / "o"), "--recipe", "nope"]) == 1
    assert "no recipe named 'nope'" in capsys.readouterr().err
    assert main(["train", "--data", str(csv_path), "--out", str(tmp_path / "o"), "--set", "warmupp=0.1"]) == 1
    assert "did you mean 'warmup'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before any work


def test_every_registered_model_uses_clamp_translation_and_the_paper_recipe_tanh():
    from magnet_zoo.registry import list_models, resolve

    names = list_models()
    assert names
    for name in names:
        assert resolve(name)[2].config.translation == "clamp", name
    assert MagNetConfig().translation == "tanh"  # the paper's equation stays the config's own default
    assert TrainConfig(recipe="paper", model="magnet3_inception_v3").model_settings()["translation"] == "tanh"


def test_learn_to_look_centred_is_what_the_recorded_findit_runs_trained_with():
    """The registered recipe claims the FindIt results of grid issue14-combine's jitter entry: its fields must be
    those rows' recipe (at their 200 steps) and its network settings those rows' config."""
    rows = [json.loads(line) for line in
            (Path(__file__).resolve().parents[1] / "benchmarks/results/learn_to_look_issue14.jsonl").read_text()
            .splitlines()]
    rows = [r for r in rows if r["name"] == "recipe + attention_init=(random, uniform) + replicate padding + "
            "recentre 1.0 + layer-2 jitter 0.2" and r["task"]["object_frac"] == 0.03]
    assert len(rows) >= 3
    centred = get_recipe("learn_to_look_centred", steps=200)
    mine = json.loads(json.dumps(centred.to_dict()))
    # a field the rows do not record was added after they ran: they ran with its default
    defaults = json.loads(json.dumps(Recipe(name="defaults").to_dict()))
    for row in rows:
        ran = row["recipe"]
        for key in set(mine) - {"name", "summary", "model_overrides", "recentre_on"}:
            assert mine[key] == ran.get(key, defaults[key]), key
        assert ran.get("recentre_on", "all") == mine["recentre_on"] == "all"
        for key, value in mine["model_overrides"].items():
            assert row["config"][key] == value, key
    assert centred.model_overrides["attention_init"] == ("random", "uniform")  # per layer: a flat second layer


def test_findit_recipe_is_what_the_recorded_findit_runs_trained_with():
    """``FINDIT_RECIPE`` claims the 300-step FindIt runs of grids issue14-box (1 %) and findit-recipe (3 %): its
    fields must be those rows' recipe, and the network it builds on ``magnet2_tiny`` the one they trained."""
    from magnet_zoo.factory import create_model
    from magnet_zoo.tasks.train import FINDIT_RECIPE, RECIPE_CONFIG

    results = Path(__file__).resolve().parents[1] / "benchmarks/results"
    rows = [r for r in json.loads((results / "learn_to_look_issue14_box.json").read_text())
            if r["name"] == "learn_to_look_centred + view_oversample 4, object 1%, 300 steps"]
    rows += json.loads((results / "learn_to_look_findit-recipe.json").read_text())
    assert len(rows) >= 9 and {r["task"]["object_frac"] for r in rows} == {0.01, 0.03}
    mine = json.loads(json.dumps(FINDIT_RECIPE.to_dict()))
    defaults = json.loads(json.dumps(Recipe(name="defaults").to_dict()))
    built = json.loads(json.dumps(create_model("magnet2_tiny", **RECIPE_CONFIG).config.to_dict()))
    for row in rows:
        assert row["steps_done"] == FINDIT_RECIPE.steps == 300
        for key in set(mine) - {"name", "summary", "model_overrides"}:
            assert mine[key] == row["recipe"].get(key, defaults[key]), key
        assert row["config"] == built
    assert FINDIT_RECIPE.name == "learn_to_look_centred" and RECIPE_CONFIG["view_oversample"] == 4


def test_learn_to_look_mil_is_what_the_recorded_synthmets_runs_trained_with():
    """The registered MIL recipe claims the 30-minute SynthMets runs with the wide-start, edge-below first map (spelled
    as learn_to_look_mil + --recipe-field before those fields became the recipe's): its fields must be those runs'
    recipe, and its network settings theirs (beyond the benchmark's architecture: backbones, patches). The runs of
    the recipe before that change differ from it in exactly the fields the change made."""
    results = Path(__file__).resolve().parents[1] / "benchmarks/results"
    runs = sorted(results.glob("synthmets_30min_mil_widebelow_s*.json"))
    assert len(runs) >= 4
    mil = json.loads(json.dumps(get_recipe("learn_to_look_mil").to_dict()))
    defaults = json.loads(json.dumps(Recipe(name="defaults").to_dict()))
    architecture = {"patches", "classifier_backbone", "aux_backbone"}
    # a further phase only starts when the first ends on its plateau: runs whose phase ended below it trained
    # exactly as the recipe does now (tests/test_attention_mil.py), whatever they recorded of the restart fields
    restart = {"attention_pretrain_restarts", "attention_pretrain_restart_from", "attention_pretrain_plateau"}
    for run in runs:
        magnet = json.loads(run.read_text())["methods"]["magnet"]
        ran = magnet["settings"]["recipe"]
        assert magnet["training"]["attention_pretrain"]["loss_last_50"] < mil["attention_pretrain_plateau"], run.name
        for key in set(mil) - {"name", "summary", "model_overrides"} - restart:
            assert mil[key] == ran.get(key, defaults[key]), (run.name, key)
        assert {k: v for k, v in ran["model_overrides"].items() if k not in architecture} == mil["model_overrides"]
    former = sorted(results.glob("synthmets_30min_onemap_edges_s*.json")) + sorted(
        results.glob("synthmets_30min_mil_onemap_s*.json"))
    assert len(former) >= 6
    for run in former:
        ran = json.loads(run.read_text())["methods"]["magnet"]["settings"]["recipe"]
        differ = {k for k in set(mil) - {"name", "summary", "model_overrides"} - restart
                  if mil[k] != ran.get(k, defaults[k])}
        assert differ == {"attention_mil_edges", "attention_pretrain_top_start"}, run.name
    assert mil["attention_pretrain_restarts"] == 1 and mil["attention_pretrain_restart_from"] == "continue"
    recipe = get_recipe("learn_to_look_mil")
    assert recipe.attention_mil_edges == "below" and recipe.attention_pretrain_top_start == 1.0
    assert recipe.attention_mil_only and recipe.attention_pretrain_steps
    assert TrainConfig(recipe="learn_to_look_mil", model="magnet2_micro").model_settings()["attention_tissue_only"]


def test_every_recipe_builds_every_registered_network():
    """A recipe's network settings must fit every registered model (no ConfigError at `magnet-zoo train`)."""
    from magnet_zoo.registry import get_config, list_models
    from magnet_zoo.train.recentre import check_recentre_model

    names = list_models(with_tags=False)
    assert {"magnet2_tiny", "magnet3_inception_v3"} <= set(names)
    for recipe in list_recipes():
        for name in names:
            config = get_config(name, **TrainConfig(recipe=recipe, model=name).model_settings())
            if get_recipe(recipe).recentre_weight:
                check_recentre_model(config)
            assert config.num_layers == get_config(name).num_layers
