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
