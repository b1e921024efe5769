from __future__ import annotations

import json

import pytest

import magnet_zoo
from magnet_zoo.config import CONFIG_VERSION, ConfigError, MagNetConfig


def test_config_json_round_trip():
    cfg = MagNetConfig(patches=(3, 2, 3, 2), sampler="bilinear", aux_layers=(1, 3), labels=("neg", "pos"))
    text = cfg.to_json()
    assert json.loads(text)["patches"] == [3, 2, 3, 2]
    back = MagNetConfig.from_json(text)
    assert back == cfg
    assert isinstance(back.patches, tuple) and isinstance(back.mlp_hidden, tuple)


def test_config_rejects_unknown_fields_and_future_versions():
    with pytest.raises(ConfigError, match="unknown MagNet config fields: colour"):
        MagNetConfig.from_dict({"colour": "red"})
    with pytest.raises(ConfigError, match="not supported"):
        MagNetConfig.from_dict({"version": CONFIG_VERSION + 1})
    with pytest.raises(ConfigError, match="sampler"):
        MagNetConfig(sampler="nearest")
    with pytest.raises(ConfigError, match="patches"):
        MagNetConfig(patches=())
    with pytest.raises(ConfigError, match="not valid JSON"):
        MagNetConfig.from_json("{")


def test_attention_init_per_layer_builds_each_layer_as_asked_and_survives_json():
    cfg = MagNetConfig(patches=(2, 2), attention_init=["random", "uniform"])
    assert cfg.attention_init == ("random", "uniform")
    assert [cfg.layer_attention_init(k) for k in (1, 2)] == ["random", "uniform"]
    back = MagNetConfig.from_json(cfg.to_json())
    assert back == cfg and back.attention_init == ("random", "uniform")
    model = magnet_zoo.create_model("magnet2_tiny", attention_init=("random", "uniform"))
    first, second = (float(layer.stacks.head.weight.detach().abs().max()) for layer in model.layers)
    assert second < 0.01 < first  # layer 2 near zero (a flat map), layer 1 PyTorch's default init
    flipped = magnet_zoo.create_model("magnet2_tiny", attention_init=("uniform", "random"))
    assert float(flipped.layers[0].stacks.head.weight.detach().abs().max()) < 0.01
    for bad in (("random",) * 3, ("random", "flat"), ()):
        with pytest.raises(ConfigError, match="one entry per magnifying layer"):
            MagNetConfig(patches=(2, 2), attention_init=bad)
    # shorter than the network: the last entry repeats (a 2-layer recipe's setting on a 3-layer MagNet)
    deep = MagNetConfig(patches=(3, 2, 3), attention_init=("random", "uniform"))
    assert [deep.layer_attention_init(k) for k in (1, 2, 3)] == ["random", "uniform", "uniform"]
    three = magnet_zoo.create_model("magnet3_tiny", attention_init=("random", "uniform"))
    heads = [float(layer.stacks.head.weight.detach().abs().max()) for layer in three.layers]
    assert heads[1] < 0.01 and heads[2] < 0.01 < heads[0]


def test_config_derived_sizes_follow_the_paper():
    cfg = MagNetConfig(patches=(3, 2, 3))
    assert [cfg.output_size(k) for k in (1, 2, 3)] == [56, 56, 224]
    assert [cfg.iprime_size(k) for k in (1, 2, 3)] == [112, 112, 448]
    assert [cfg.nodes_entering(k) for k in (1, 2, 3, 4)] == [1, 3, 6, 18]
    assert cfg.is_frozen(2, 0) and not cfg.is_frozen(2, 1) and not cfg.is_frozen(1, 0)
    assert not MagNetConfig(frozen_patch=False).is_frozen(2, 0)


def test_list_models_and_patterns():
    names = magnet_zoo.list_models()
    assert "magnet3_inception_v3.in1k" in names and "magnet4_inception_v3.in1k" in names
    assert any(n.startswith("magnet2_tiny") for n in names)
    assert magnet_zoo.list_models("magnet4*") == ["magnet4_inception_v3.in1k"]
    assert "magnet3_inception_v3" in magnet_zoo.list_models(with_tags=False)


def test_unknown_model_suggests_close_names():
    with pytest.raises(magnet_zoo.UnknownModelError, match="Did you mean 'magnet3_inception_v3'"):
        magnet_zoo.get_config("magnet3_inceptionv3")
    with pytest.raises(magnet_zoo.UnknownModelError, match="has no tag 'camelyon'"):
        magnet_zoo.get_config("magnet3_inception_v3.camelyon")


def test_registered_configs_and_overrides():
    assert magnet_zoo.get_config("magnet3_inception_v3").patches == (3, 2, 3)
    assert magnet_zoo.get_config("magnet4_inception_v3.in1k").patches == (3, 2, 3, 2)
    cfg = magnet_zoo.get_config("magnet3_inception_v3", backbone_pretrained=False, sampler="bilinear")
    assert cfg.backbone_pretrained is False and cfg.sampler == "bilinear"
    with pytest.raises(ConfigError, match="unknown MagNet config fields: nope"):
        magnet_zoo.get_config("magnet3_inception_v3", nope=1)


# --------------------------------------------------------------------------- offline ImageNet backbones
def test_create_model_offline_fails_fast_with_an_actionable_typed_error(monkeypatch):
    import time

    from magnet_zoo import factory

    monkeypatch.setattr(factory, "_cached", lambda repo: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(magnet_zoo.BackboneWeightsUnavailableError) as info:
        magnet_zoo.create_model("magnet3_inception_v3")
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    assert "create_model('magnet3_inception_v3', backbone_pretrained=False)" in message
    assert "inception_v3" in message and "HF_HUB_OFFLINE" in message

    # Online but the Hub cannot be reached: the same error, not the Hub client's retries.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(factory, "_offline", lambda: False)
    monkeypatch.setattr(factory, "_hub_reachable", lambda timeout=3.0: (False, "huggingface.co:443: no route"))
    with pytest.raises(magnet_zoo.BackboneWeightsUnavailableError, match="no route"):
        magnet_zoo.create_model("magnet3_inception_v3")
    # The same config without ImageNet weights: nothing is checked or fetched, and nothing fails. (On a
    # config that asks for them, so that a build which ignored backbone_pretrained=False would fail here.)
    import timm

    assert magnet_zoo.get_config("magnet3_inception_v3").backbone_pretrained is True
    asked = []
    real = timm.create_model

    def spy(*args, **kwargs):
        asked.append(bool(kwargs.get("pretrained")))
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    monkeypatch.setattr(factory, "_hub_reachable", lambda timeout=3.0: pytest.fail("the Hub was asked"))
    model = magnet_zoo.create_model("magnet3_inception_v3", backbone_pretrained=False)
    assert model.config.backbone_pretrained is False
    assert asked and not any(asked)  # every backbone built, none with pretrained=True


def test_hub_client_errors_while_building_become_the_typed_error(monkeypatch):
    import timm
    from huggingface_hub.utils import LocalEntryNotFoundError

    from magnet_zoo import factory

    monkeypatch.setattr(factory, "check_backbone_weights", lambda config, name=None: None)

    def offline_timm(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache")
        return real(*args, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline_timm)
    with pytest.raises(magnet_zoo.BackboneWeightsUnavailableError, match="backbone_pretrained=False") as info:
        magnet_zoo.create_model("magnet3_tiny", backbone_pretrained=True)
    assert isinstance(info.value.__cause__, LocalEntryNotFoundError)


def test_cli_reports_missing_backbone_weights_as_a_user_error():
    from magnet_zoo import factory
    from magnet_zoo.cli.errors import is_user_error

    assert is_user_error(factory.BackboneWeightsUnavailableError("x"))


def test_the_demo_architecture_is_the_one_the_default_recipe_was_measured_on():
    """``magnet2_micro`` as registered is the (1, 2) tree of the default recipe's measured runs and of the shipped
    weights: building it fresh and training it with the default recipe is what the README's numbers describe."""
    from magnet_zoo.registry import get_config
    from magnet_zoo.train.recipe import DEFAULT_RECIPE, get_recipe

    registered = get_config("magnet2_micro")
    assert registered.patches == (1, 2) == tuple(magnet_zoo.load_pretrained("magnet2_micro").config.patches)
    assert "patches" not in get_recipe(DEFAULT_RECIPE).model_overrides


def test_one_meaning_per_name_pretrained_loads_the_tag_weights(caplog):
    import logging

    import torch

    trained = magnet_zoo.create_model("magnet2_micro", pretrained=True)
    loaded = magnet_zoo.load_pretrained("magnet2_micro")
    for key, value in loaded.state_dict().items():
        assert torch.equal(trained.state_dict()[key], value)
    with pytest.raises(ValueError, match="overrides"):
        magnet_zoo.create_model("magnet2_micro", pretrained=True, gru_hidden=8)
    # A name whose tag has trained weights, built without them: said out loud (once per name).
    from magnet_zoo import factory

    factory._noted.clear()
    with caplog.at_level(logging.WARNING, logger="magnet_zoo.factory"):
        fresh = magnet_zoo.create_model("magnet2_micro.synthmets_demo")
        magnet_zoo.create_model("magnet2_micro")
    assert caplog.text.count("fresh (untrained) weights") == 1 and "pretrained=True" in caplog.text
    floats = [k for k, v in loaded.state_dict().items() if v.is_floating_point()]
    assert any(not torch.equal(fresh.state_dict()[k], loaded.state_dict()[k]) for k in floats)
    with pytest.raises(magnet_zoo.hub.NoPretrainedWeightsError):
        magnet_zoo.create_model("magnet2_tiny", pretrained=True)


def test_info_describes_the_weights_a_name_loads(caplog, capsys):
    import logging

    from magnet_zoo.cli import main
    from magnet_zoo.cli.models import describe

    with caplog.at_level(logging.WARNING):
        info = describe("magnet2_micro")
    shipped = magnet_zoo.load_pretrained("magnet2_micro").config.to_dict()
    assert info["config"] == shipped and info["config"]["aux_pooling"] == "max"  # not the registry's "per_patch"
    assert info["io"]["slide_mpp"] == 0.5 and "fresh" not in caplog.text
    assert describe("magnet2_tiny")["io"]["slide_mpp"] is None
    assert main(["info", "magnet2_micro"]) == 0
    assert "0.5 µm per pixel" in capsys.readouterr().out
