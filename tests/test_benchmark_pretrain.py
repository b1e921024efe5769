"""Head pre-training on windows read once (``magnet_zoo.train.head_pretrain``, a phase of the training loop)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
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


@pytest.mark.slow
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
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    paths, labels = [s.path for s in slides], [s.label for s in slides]
    kwargs = {"steps": 3, "side": (0.025, 0.1), "lr": 1e-3, "seed": 0}
    record = pretrain_heads(model, paths, labels, windows=4, **kwargs)
    assert record["steps"] == 3 and record["windows_per_slide"] == 4 and record["classifier_backbone_copied"]
    # Parameters only: BatchNorm's running statistics (buffers) change on any training-mode forward, even
    # without an optimizer step, so they say nothing about whether the head was trained.
    after = dict(model.named_parameters())
    head = {k: v for k, v in after.items() if k.startswith("aux_heads.2.")}
    moved = [k for k, v in head.items() if not torch.equal(before[k], v)]
    # Adam moves every parameter whose gradient is nonzero; timm zero-initialises the last BatchNorm of each
    # residual block, so the convolutions in front of it get no gradient in the first steps. Everything
    # else of the head must have moved, its output layer and its last block's BatchNorm included.
    frozen_by_init = [k for k in head if k not in moved]
    assert all(".backbone." in k and "bn2" not in k for k in frozen_by_init), frozen_by_init
    assert len(moved) >= len(head) // 2, (len(moved), len(head))
    outputs = [k for k in head if ".backbone." not in k]
    assert outputs and all(k in moved for k in outputs), outputs
    # the other heads (and the classifier's backbone) are copies of it; nothing else changed
    for k, v in model.aux_heads["1"].named_parameters():
        assert torch.equal(v, after[f"aux_heads.2.{k}"]), k
    for k, v in model.aux_heads["1"].state_dict().items():
        assert torch.equal(v, model.aux_heads["2"].state_dict()[k]), k  # running statistics too
    for k, v in model.classifier.backbone.state_dict().items():
        assert torch.equal(v, model.aux_heads["2"].backbone.state_dict()[k])
    untouched = [k for k in after if not k.startswith(("aux_heads.", "classifier.backbone."))]
    assert untouched and all(torch.equal(before[k], after[k]) for k in untouched)
    assert all(p.grad is None for p in model.parameters())  # no stale gradient for the loop's first step
    assert pretrain_heads(model, paths, labels, windows=0, **kwargs) == {"seconds": 0.0, "steps": 0}


def test_synthmets_recipe_fields_reach_the_magnet_recipe():
    import synthmets

    args = synthmets.parse_args(["--recipe-field", "clip_per_group=true", "--recipe-field", "explore_trees=2",
                                 "--recipe-field", "lr=0.5", "--lr", "0.01",
                                 "--magnet-override", "paradoxical_reference=constant"])
    recipe = synthmets.magnet_options(args, budget_s=60.0).resolved_recipe()
    assert recipe.clip_per_group is True and recipe.explore_trees == 2
    assert recipe.lr == 0.01  # the named option wins over a --recipe-field of the same field
    assert recipe.model_overrides["paradoxical_reference"] == "constant"
    with pytest.raises(SystemExit, match="--recipe-field expects KEY=VALUE"):
        synthmets.magnet_options(synthmets.parse_args(["--recipe-field", "clip_per_group"]), budget_s=None)


def test_the_seeds_table_names_each_runs_recipe_changes_flags_included():
    import synthmets
    from synthmets_seeds import RECIPE_FLAGS, recipe_fields

    command = ("python benchmarks/synthmets.py --guidance 1 --guidance-temperature 0.5 --recipe-field "
               "'guidance_layers=[1,2]' --head-pretrain 32 --magnet-seed 1")
    assert recipe_fields(command) == ["guidance_temperature=0.5", "guidance_layers=[1,2]", "head_pretrain_windows=32"]
    assert recipe_fields("python benchmarks/synthmets.py --guidance 1 --magnet-seed 1") == []
    # network settings beyond the reference runs' are a change of setting too; the reference ones are not
    overrides = ("python benchmarks/synthmets.py --magnet-override crop_source=reread --magnet-override "
                 "'patches=[1,2]' --magnet-override aux_pooling=max --recipe-field attention_mil_top=0.1")
    assert recipe_fields(overrides) == ["patches=[1,2]", "attention_mil_top=0.1"]
    # each flag the table names sets the recipe field it is named after
    for flag, field in RECIPE_FLAGS.items():
        recipe = synthmets.magnet_options(synthmets.parse_args([flag, "7"]), budget_s=60.0).resolved_recipe()
        assert getattr(recipe, field) == 7


def test_the_seeds_table_names_a_run_by_the_registered_recipe_it_trained():
    """Runs that spelled the registered MIL recipe as another recipe plus --recipe-field are one setting with those
    that named it; runs of the recipe as it was before a change are named by it and the fields it had then, never
    as the recipe it is now. One field off and it is a setting of its own."""
    from synthmets_seeds import FORMER_FIELDS, RESULTS, magnet_row, registered_as, tree_changes

    from magnet_zoo.train.recipe import get_recipe

    mil = get_recipe("learn_to_look_mil").to_dict()
    one_patch = {**mil, "model_overrides": {**mil["model_overrides"], "patches": [1, 2]}}
    assert registered_as(one_patch) == "learn_to_look_mil"
    assert registered_as({**mil, "attention_mil_top": 0.2}) is None
    assert registered_as({**mil, "model_overrides": {**mil["model_overrides"], "max_scale": 0.25}}) is None
    assert registered_as(get_recipe("learn_to_look").to_dict()) == "learn_to_look"

    def row(name: str) -> dict:
        return magnet_row(json.loads((RESULTS / name).read_text()), name)

    # today's recipe on today's magnet2_micro, spelled as the former one + its new fields + the tree it now is
    now = row("synthmets_30min_mil_widebelow_s0.json")
    assert now["setting"] == "learn_to_look_mil"
    assert "attention_mil_edges=below" in now["spelled_as"] and "patches=[1,2]" in now["spelled_as"]
    # the tree is named from the network it trained, not from the command line: magnet2_micro was (2, 2)
    assert tree_changes({"model": "magnet2_micro", "config": {"patches": [2, 2]}}) == ["patches=[2,2]"]
    assert tree_changes({"model": "magnet2_micro", "config": {"patches": [1, 2]}}) == []
    assert tree_changes({"model": "no_such_model", "config": {"patches": [2, 2]}}) == []
    assert tree_changes({"model": "magnet2_tiny", "config": {"patches": [2, 2], "classifier_backbone": "x"}}) == []
    two_maps = row("synthmets_30min_mil_twomaps_widebelow_s1.json")
    assert "patches" not in two_maps["spelled_as"] and two_maps["setting"] == "learn_to_look_mil (patches=[2,2])"
    stuck = row("synthmets_30min_mil_twomaps_widebelow_s0.json")  # its phase ended at 0.686: on the plateau
    assert stuck["setting"] == "learn_to_look_mil (patches=[2,2], attention_pretrain_restarts=0)"
    # the former recipe, spelled as learn_to_look + fields (seed 0) and named learn_to_look_mil (seed 4)
    spelled, named = row("synthmets_30min_onemap_edges_s0.json"), row("synthmets_30min_mil_onemap_s4.json")
    former = "learn_to_look_mil (attention_mil_edges=negative, attention_pretrain_top_start=null)"
    assert set(FORMER_FIELDS["learn_to_look_mil"]) == {"attention_mil_edges", "attention_pretrain_top_start",
                                                       "attention_pretrain_restarts"}
    assert spelled["setting"] == former  # its phase left the plateau; seed 4's did not (no second phase then)
    assert named["setting"] == former[:-1] + ", attention_pretrain_restarts=0)"
    assert spelled["spelled_as"].startswith("learn_to_look (patches=[1,2], ")
    assert named["spelled_as"] == "learn_to_look_mil (patches=[1,2])"
    # a change of the former recipe also names the field the registry changed since, which it did not spell
    # restart fields name a run only where they changed what it trained: seed 8's phase left the plateau at its
    # first start (as the recipe's does now, whatever it would do on the plateau); seed 6's former default run ended
    # on the plateau and had no second phase; the restart run of seed 6 started again from fresh maps
    assert row("synthmets_30min_mil_restart_s8.json")["setting"] == "learn_to_look_mil"
    assert "attention_pretrain_restarts=1" in row("synthmets_30min_mil_restart_s8.json")["spelled_as"]
    assert row("synthmets_30min_mil_default_s6.json")["setting"] == "learn_to_look_mil (attention_pretrain_restarts=0)"
    assert row("synthmets_30min_mil_default_s7.json")["setting"] == "learn_to_look_mil"
    assert row("synthmets_30min_mil_restart_s6.json")["setting"] == (
        "learn_to_look_mil (attention_pretrain_restart_from=fresh)")
    wide = row("synthmets_30min_mil_widestart_s4.json")
    assert wide["setting"].startswith("learn_to_look_mil (attention_pretrain_top_start=1.0, ")
    assert wide["setting"].endswith(", attention_mil_edges=negative)")
