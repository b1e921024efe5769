"""Checkpoints and the Hub: save/load round trips, strict loading, model cards, and downloads from a
local stand-in for the Hugging Face Hub (``tests/hub_server.py``) — no internet needed."""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import magnet_zoo
from magnet_zoo import registry
from magnet_zoo.config import CONFIG_VERSION
from magnet_zoo.hub import (
    CARD_TEMPLATE,
    CardData,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    HubError,
    InvalidRepoIdError,
    NoPretrainedWeightsError,
    UnsupportedCheckpointVersionError,
    load_pretrained,
    parse_repo_spec,
    push_to_hub,
    save_pretrained,
)
from magnet_zoo.hub.card import card_metadata, to_yaml
from tests.conftest import tissue_image
from tests.hub_server import FakeHub, hub_environment, point_huggingface_hub_at

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_CARDS = REPO_ROOT / "model_cards"
REPO = "org/name"
CARD = {
    "model_name": REPO,
    "datasets": ["synthmets"],
    "training_data": "SynthMets: 64 procedural slides, half with tumour-like regions.",
    "reproduce": "magnet-zoo train --data labels.csv --model magnet2_tiny --out DIR",
}
METRICS = {"roc_auc": 0.84, "accuracy": 0.77}
TRAINING = {"optimizer": "Adam", "lr": 3e-5, "epochs": 2}


# --------------------------------------------------------------------------- shared fixtures
@pytest.fixture(scope="module")
def slide() -> magnet_zoo.ArraySource:
    return magnet_zoo.ArraySource(tissue_image(400, 320, seed=3), name="synthetic")


@pytest.fixture(scope="module")
def model() -> magnet_zoo.MagNet:
    torch.manual_seed(0)
    return magnet_zoo.create_model("magnet2_tiny").eval()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> Path:
    return save_pretrained(
        model, tmp_path_factory.mktemp("ckpt") / "magnet", card_data=CARD, metrics=METRICS, training=TRAINING
    )


@pytest.fixture(scope="module")
def reference(model, slide) -> magnet_zoo.Prediction:
    return magnet_zoo.predict_slide(model, slide)


@pytest.fixture(scope="module")
def old_model(model) -> magnet_zoo.MagNet:
    """Other weights for the same network: the "older commit" of the Hub tests."""
    old = copy.deepcopy(model)
    with torch.no_grad():
        old.classifier.mlp[-1].bias.add_(2.0)
    return old


@pytest.fixture(scope="module")
def old_saved(old_model, tmp_path_factory) -> Path:
    return save_pretrained(old_model, tmp_path_factory.mktemp("ckpt_old") / "magnet", card_data=CARD)


@pytest.fixture
def no_unpickling(monkeypatch):
    """Fail the test if anything tries to unpickle while it runs."""

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint loader tried to unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def assert_same_prediction(a: magnet_zoo.Prediction, b: magnet_zoo.Prediction) -> None:
    assert a.probability == b.probability
    assert a.label == b.label
    assert a.aux_probabilities == b.aux_probabilities
    assert [n.box for n in a.tree] == [n.box for n in b.tree]
    assert torch.equal(a.final_patches, b.final_patches)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- local round trip
def test_round_trip_gives_identical_outputs(model, saved, slide, reference, no_unpickling):
    loaded = load_pretrained(saved)
    assert not loaded.training
    assert_same_weights(model, loaded)
    assert loaded.config == model.config.replace(backbone_pretrained=False)
    assert_same_prediction(reference, magnet_zoo.predict_slide(loaded, slide))
    assert_same_weights(model, load_pretrained(str(saved)))  # a str path works too


def test_checkpoint_folder_layout(model, saved):
    assert sorted(p.name for p in saved.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((saved / "config.json").read_text())
    assert config["config_version"] == CONFIG_VERSION
    assert config["magnet_zoo_version"] == magnet_zoo.__version__
    assert config["model"] == model.config.to_dict()
    io = config["io"]
    assert io["input_size"] == 56 and io["final_patch_size"] == 64 and io["grey_threshold"] == 15
    assert io["labels"] == ["normal", "tumour"]
    assert set(io["normalisation"]) == {"classifier.backbone", "aux_heads.1.backbone", "aux_heads.2.backbone"}
    assert io["normalisation"]["classifier.backbone"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    weights = load_file(str(saved / "model.safetensors"))
    assert weights.keys() == model.state_dict().keys()
    assert "recipe" not in config  # saved without one


def test_the_training_recipe_goes_into_config_json_and_back_to_inference(model, tmp_path):
    from magnet_zoo.train.exploration import trained_inference
    from magnet_zoo.train.recipe import get_recipe

    recipe = get_recipe("learn_to_look", explore_trees=3, explore_frac=1.0, tree_mil=True)
    folder = save_pretrained(model, tmp_path / "mil", card_data=CARD, recipe=recipe.to_dict())
    assert json.loads((folder / "config.json").read_text())["recipe"] == json.loads(json.dumps(recipe.to_dict()))
    trees, policy = trained_inference(load_pretrained(folder))
    assert trees == 3 and policy.pool == "max" and policy.uniform == recipe.explore_uniform
    assert trained_inference(load_pretrained(save_pretrained(model, tmp_path / "plain", card_data=CARD))) is None


def test_recorded_normalisation_is_used(saved, tmp_path):
    ckpt = copy_checkpoint(saved, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["io"]["normalisation"]["classifier.backbone"]["mean"] = [0.5, 0.5, 0.5]
    (ckpt / "config.json").write_text(json.dumps(config))
    loaded = load_pretrained(ckpt)
    assert loaded.classifier.backbone.mean.flatten().tolist() == [0.5, 0.5, 0.5]


def test_training_mode_and_device(saved):
    # "meta" is a device every machine has that is not where weights load by default (the CPU): a loader
    # that ignored ``device`` would leave them on the CPU. Every parameter and buffer must move.
    for device in ("meta", torch.device("meta")):
        loaded = load_pretrained(saved, device=device)
        tensors = list(loaded.parameters()) + list(loaded.buffers())
        assert tensors and {t.device.type for t in tensors} == {"meta"}, device
        assert not loaded.training
    loaded = load_pretrained(saved)
    assert {t.device.type for t in [*loaded.parameters(), *loaded.buffers()]} == {"cpu"}  # the default


# --------------------------------------------------------------------------- broken checkpoints
def _drop_key(weights: dict[str, torch.Tensor]) -> str:
    key = "classifier.mlp.0.weight"
    del weights[key]
    return key


def _extra_key(weights: dict[str, torch.Tensor]) -> str:
    key = "classifier.extra.weight"
    weights[key] = torch.zeros(3)
    return key


def _wrong_shape(weights: dict[str, torch.Tensor]) -> str:
    key = "classifier.mlp.0.weight"
    weights[key] = torch.zeros(7, 5)
    return key


@pytest.mark.parametrize(
    ("edit", "attribute"), [(_drop_key, "missing"), (_extra_key, "unexpected"), (_wrong_shape, "mismatched")]
)
def test_strict_loading_names_the_bad_tensor(saved, tmp_path, edit, attribute, no_unpickling):
    ckpt = copy_checkpoint(saved, tmp_path / "ckpt")
    weights = load_file(str(ckpt / "model.safetensors"))
    key = edit(weights)
    save_file(weights, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError) as info:
        load_pretrained(ckpt)
    message = str(info.value)
    assert key in message and "model.safetensors" in message
    found = getattr(info.value, attribute)
    assert [item[0] if isinstance(item, tuple) else item for item in found] == [key]
    if attribute == "mismatched":
        assert "[7, 5]" in message and "[64, 64]" in message


def test_truncated_weights_are_refused(saved, tmp_path, no_unpickling):
    ckpt = copy_checkpoint(saved, tmp_path / "ckpt")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_pretrained(ckpt)


@pytest.mark.parametrize("where", ["top", "model"])
def test_future_config_version_is_refused(saved, tmp_path, where):
    ckpt = copy_checkpoint(saved, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    if where == "top":
        config["config_version"] = CONFIG_VERSION + 1
        config["magnet_zoo_version"] = "9.0.0"
    else:
        config["model"]["version"] = CONFIG_VERSION + 1
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedCheckpointVersionError) as info:
        load_pretrained(ckpt)
    message = str(info.value)
    assert "config.json" in message and str(CONFIG_VERSION + 1) in message
    assert "pip install -U magnet-zoo" in message


def test_inconsistent_or_foreign_config_is_refused(saved, tmp_path):
    ckpt = copy_checkpoint(saved, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["io"]["input_size"] = 112
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"io\.input_size = 112 but model\.input_size = 56"):
        load_pretrained(ckpt)
    config["io"]["input_size"] = 56
    config["io"]["view_oversample"] = 4  # the view read differently from the network's config
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"io\.view_oversample = 4 but model\.view_oversample = 1"):
        load_pretrained(ckpt)
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(CheckpointError, match="not a magnet_zoo checkpoint"):
        load_pretrained(ckpt)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        load_pretrained(ckpt)


def test_pickled_weights_are_never_loaded(saved, tmp_path, no_unpickling):
    ckpt = copy_checkpoint(saved, tmp_path / "ckpt")
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointNotFoundError, match=r"no model\.safetensors.*pytorch_model\.bin.*never unpickles"):
        load_pretrained(ckpt)


def test_folder_without_config_or_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match=r"has no config\.json.*save_pretrained"):
        load_pretrained(tmp_path / "empty")
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint folder"):
        load_pretrained(str(tmp_path / "missing"))
    with pytest.raises(InvalidRepoIdError, match="revision"):
        load_pretrained(tmp_path / "empty", revision="main")


def test_registered_name_without_weights_says_how_to_train():
    with pytest.raises(NoPretrainedWeightsError) as info:
        load_pretrained("magnet2_tiny")
    message = str(info.value)
    assert "No pretrained weights" in message
    assert "magnet-zoo train --data labels.csv --model magnet2_tiny.scratch --out DIR" in message
    assert "load_pretrained('DIR')" in message and "org/name" in message


def test_unknown_name_suggests_close_names():
    with pytest.raises(CheckpointNotFoundError, match="Did you mean 'magnet2_tiny'"):
        load_pretrained("magnet2_tiyn")
    with pytest.raises(InvalidRepoIdError):
        load_pretrained("not a/valid--repo")


@pytest.mark.parametrize(
    ("spec", "revision", "expected"),
    [
        ("org/name", None, ("org/name", None)),
        ("hf-hub:org/name", None, ("org/name", None)),
        ("hf-hub:org/name@v1", None, ("org/name", "v1")),
        ("org/my.model_v-2@" + "a" * 40, None, ("org/my.model_v-2", "a" * 40)),
        ("org/name", "dev", ("org/name", "dev")),
    ],
)
def test_parse_repo_spec(spec, revision, expected):
    assert parse_repo_spec(spec, revision) == expected


@pytest.mark.parametrize("spec", ["name", "a/b/c", "org/na--me", "org/..", "org/", "-org/name", "org/name.git", ""])
def test_parse_repo_spec_refuses_bad_ids(spec):
    with pytest.raises(InvalidRepoIdError):
        parse_repo_spec(spec)


def test_parse_repo_spec_refuses_conflicting_revisions():
    with pytest.raises(InvalidRepoIdError, match="also given"):
        parse_repo_spec("org/name@v1", "v2")


# --------------------------------------------------------------------------- the Hub, served locally
@pytest.fixture
def hub(saved, old_saved, tmp_path, monkeypatch):
    """A local Hub with ``org/name``: an older commit, then ``main``; huggingface_hub points at it."""
    server = FakeHub()
    old_sha = server.add_commit(REPO, old_saved, message="first weights")
    new_sha = server.add_commit(REPO, saved, message="better weights")
    server.add_commit("org/pickled", {"config.json": (saved / "config.json").read_bytes(), "pytorch_model.bin": b"x"})
    endpoint = server.start()
    point_huggingface_hub_at(monkeypatch, endpoint, tmp_path / "hf_home")
    server.old_sha, server.new_sha = old_sha, new_sha
    yield server
    server.stop()


def test_hub_load_gives_identical_outputs(hub, model, slide, reference, no_unpickling):
    loaded = load_pretrained(REPO)
    assert_same_weights(model, loaded)
    assert_same_prediction(reference, magnet_zoo.predict_slide(loaded, slide))
    assert ("GET", f"/api/models/{REPO}/revision/main") in hub.requests
    assert any(path.startswith("/cdn/") for _, path in hub.requests)  # the LFS redirect was followed
    # "hf-hub:" names the same repo; its files now come from the cache (no second weights download).
    downloads = sum(path.startswith("/cdn/") for _, path in hub.requests)
    assert_same_weights(model, load_pretrained(f"hf-hub:{REPO}"))
    assert sum(path.startswith("/cdn/") for _, path in hub.requests) == downloads


def test_pinned_revision_loads_older_weights(hub, model, old_model, monkeypatch):
    assert_same_weights(old_model, load_pretrained(REPO, revision=hub.old_sha))
    assert_same_weights(old_model, load_pretrained(f"{REPO}@{hub.old_sha}"))
    assert ("GET", f"/api/models/{REPO}/revision/{hub.old_sha}") in hub.requests

    # A registry name pins the revision the same way.
    tag = registry.ModelTag("demo weights", hub_repo=REPO, hub_revision=hub.old_sha)
    arch = registry.ModelArch(model.config, "test entry", {"demo": tag}, "demo")
    monkeypatch.setitem(registry._REGISTRY, "magnet_hubtest", arch)
    assert_same_weights(old_model, load_pretrained("magnet_hubtest"))
    assert_same_weights(model, load_pretrained("magnet_hubtest.demo", revision="main"))


def test_offline_cache_hit_with_server_stopped(hub, model, old_model, tmp_path, monkeypatch, no_unpickling):
    load_pretrained(REPO)
    load_pretrained(REPO, revision=hub.old_sha)
    # Offline while the server still runs (and records): a load that asked it anything would show here.
    requests = len(hub.requests)
    point_huggingface_hub_at(monkeypatch, hub.endpoint, tmp_path / "hf_home", offline=True)
    assert_same_weights(model, load_pretrained(REPO))
    assert_same_weights(old_model, load_pretrained(REPO, revision=hub.old_sha))
    assert hub.requests[requests:] == []
    # And with no server at all.
    hub.stop()
    point_huggingface_hub_at(monkeypatch, None, tmp_path / "hf_home", offline=True)
    assert_same_weights(model, load_pretrained(REPO))
    assert_same_weights(old_model, load_pretrained(REPO, revision=hub.old_sha))
    with pytest.raises(HubError, match=r"not in the Hugging Face cache.*hf download org/name --revision v9"):
        load_pretrained(REPO, revision="v9")


@pytest.mark.slow
def test_pinning_to_a_tag_a_branch_and_a_short_sha(hub, model, old_model, tmp_path, monkeypatch, no_unpickling):
    hub.set_ref(REPO, "v1.0", hub.old_sha)  # a release tag on the older weights
    hub.set_ref(REPO, "dev", hub.old_sha)  # a branch, for now at the same commit
    short = hub.old_sha[:7]  # as in the README: load_pretrained("org/magnet-model", revision="a1b2c3d")
    assert not hub.new_sha.startswith(short)

    tagged = load_pretrained(REPO, revision="v1.0")
    assert_same_weights(old_model, tagged)
    assert tagged.pretrained_source["revision"] == hub.old_sha  # the tag resolved to its commit
    assert ("GET", f"/api/models/{REPO}/revision/v1.0") in hub.requests
    assert_same_weights(old_model, load_pretrained(f"hf-hub:{REPO}@v1.0"))

    pinned = load_pretrained(REPO, revision=short)
    assert_same_weights(old_model, pinned)
    assert pinned.pretrained_source["revision"] == hub.old_sha
    assert ("GET", f"/api/models/{REPO}/revision/{short}") in hub.requests
    assert_same_weights(old_model, load_pretrained(f"{REPO}@{short}"))

    assert_same_weights(old_model, load_pretrained(REPO, revision="dev"))
    hub.set_ref(REPO, "dev", hub.new_sha)  # the branch moves on; the tag and the sha stay pinned
    moved = load_pretrained(REPO, revision="dev")
    assert_same_weights(model, moved)
    assert moved.pretrained_source["revision"] == hub.new_sha
    assert_same_weights(old_model, load_pretrained(REPO, revision="v1.0"))
    assert_same_weights(old_model, load_pretrained(REPO, revision=short))

    # Pinned revisions load offline from the cache, the short sha included (the README's promise).
    requests = len(hub.requests)
    point_huggingface_hub_at(monkeypatch, hub.endpoint, tmp_path / "hf_home", offline=True)
    assert_same_weights(old_model, load_pretrained(REPO, revision=short))
    assert_same_weights(old_model, load_pretrained(REPO, revision="v1.0"))
    assert_same_weights(model, load_pretrained(REPO, revision="dev"))  # where the branch was last seen
    assert hub.requests[requests:] == []


def test_an_unknown_short_sha_is_a_missing_revision(hub):
    unknown = next(c * 7 for c in "0123456789abcdef" if not hub.old_sha.startswith(c * 7)
                   and not hub.new_sha.startswith(c * 7))
    with pytest.raises(HubError, match=f"no revision '{unknown}'"):
        load_pretrained(REPO, revision=unknown)


def test_hub_errors_name_the_repo(hub):
    with pytest.raises(HubError, match="org/missing was not found"):
        load_pretrained("org/missing")
    with pytest.raises(HubError, match="no revision 'nope'"):
        load_pretrained(REPO, revision="nope")
    with pytest.raises(HubError, match=r"org/pickled@main has no model\.safetensors.*never unpickles"):
        load_pretrained("org/pickled")


def _hf_executable() -> Path:
    bindir = Path(sys.executable).parent
    for name in ("hf", "hf.exe"):
        if (bindir / name).is_file():
            return bindir / name
    pytest.skip(f"the `hf` command line of huggingface_hub is not installed next to {sys.executable}")


def test_hf_download_cli_then_load_folder(hub, model, old_model, tmp_path, no_unpickling):
    env = {**os.environ, **hub_environment(hub.endpoint, tmp_path / "cli_home")}
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        env.pop(key, None)
    hf = _hf_executable()
    out = tmp_path / "downloaded"
    result = subprocess.run(
        [str(hf), "download", REPO, "--local-dir", str(out)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert ("GET", f"/api/models/{REPO}/revision/main") in hub.requests  # the CLI talked to the local Hub
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    assert_same_weights(model, load_pretrained(out))

    pinned = tmp_path / "pinned"
    result = subprocess.run(
        [str(hf), "download", REPO, "--revision", hub.old_sha, "--local-dir", str(pinned)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert_same_weights(old_model, load_pretrained(pinned))


@pytest.mark.slow
def test_offline_process_loads_what_hf_download_cached(hub, model, tmp_path):
    """Environment variables alone (read when huggingface_hub is imported) make a fresh process load
    from the cache that `hf download` filled, without a single request."""
    env = {**os.environ, **hub_environment(hub.endpoint, tmp_path / "cli_home")}
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        env.pop(key, None)
    result = subprocess.run(
        [str(_hf_executable()), "download", REPO], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    requests = len(hub.requests)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    code = (
        "from magnet_zoo import load_pretrained; m = load_pretrained('org/name'); "
        "print(repr(float(m.classifier.mlp[-1].bias.detach().sum())), m.training)"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [repr(float(model.classifier.mlp[-1].bias.detach().sum())), "False"]
    assert len(hub.requests) == requests


# --------------------------------------------------------------------------- push (no real Hub here)
def _bind(method: str, args: tuple, kwargs: dict) -> dict:
    """The arguments of a call as the real ``huggingface_hub.HfApi.<method>`` would receive them: a name it
    does not take, a keyword-only argument passed by position or a missing required one is a TypeError
    here, as it would be against the Hub."""
    import inspect

    from huggingface_hub.hf_api import HfApi  # the real class (the fixture replaces huggingface_hub.HfApi)

    assert HfApi is not RecordingHfApi
    bound = inspect.signature(getattr(HfApi, method)).bind(None, *args, **kwargs)
    arguments = dict(bound.arguments)
    del arguments["self"]
    return arguments


class RecordingHfApi:
    """Stands in for ``huggingface_hub.HfApi``: checks every call against the real method's signature,
    records the bound arguments, and keeps a copy of the files ``upload_folder`` would upload."""

    calls: list[tuple[str, dict]] = []
    uploads: list[Path] = []
    keep_dir: Path
    fail_with: Exception | None = None

    def __init__(self, *args, **kwargs):
        self.calls.append(("__init__", _bind("__init__", args, kwargs)))

    def create_repo(self, *args, **kwargs):
        self.calls.append(("create_repo", _bind("create_repo", args, kwargs)))
        if self.fail_with is not None:
            raise self.fail_with
        return f"https://hub.example/{kwargs.get('repo_id', args[0] if args else None)}"

    def create_branch(self, *args, **kwargs):
        self.calls.append(("create_branch", _bind("create_branch", args, kwargs)))

    def upload_folder(self, *args, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        call = _bind("upload_folder", args, kwargs)
        self.calls.append(("upload_folder", call))
        folder = Path(call["folder_path"])
        present = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        # The files the Hub client would upload: huggingface_hub's own pattern filter.
        chosen = list(filter_repo_objects(present, allow_patterns=call.get("allow_patterns"),
                                          ignore_patterns=call.get("ignore_patterns")))
        kept = self.keep_dir / f"upload{len(self.uploads)}"
        kept.mkdir()
        for name in chosen:
            (kept / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / name, kept / name)
        self.uploads.append(kept)
        return "commit-info"


@pytest.fixture
def fake_api(monkeypatch, tmp_path):
    import huggingface_hub

    RecordingHfApi.calls, RecordingHfApi.uploads = [], []
    RecordingHfApi.keep_dir, RecordingHfApi.fail_with = tmp_path, None
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    return RecordingHfApi


def test_the_fake_hf_api_refuses_calls_the_real_one_refuses(fake_api, tmp_path):
    api = fake_api(token="tok")
    with pytest.raises(TypeError):
        api.create_repo(REPO, privat=True)  # misspelt
    with pytest.raises(TypeError):
        api.create_branch(REPO, "dev")  # branch is keyword-only
    with pytest.raises(TypeError):
        api.upload_folder(REPO, folder_path=tmp_path)  # repo_id is keyword-only
    with pytest.raises(TypeError):
        api.upload_folder(repo_id=REPO)  # folder_path is required


def test_push_to_hub_creates_repo_branch_and_uploads_a_loadable_folder(fake_api, model):
    result = push_to_hub(model, "hf-hub:org/name", revision="dev", private=True, metrics=METRICS, token="tok")
    assert result == "commit-info"
    names = [name for name, _ in fake_api.calls]
    assert names == ["__init__", "create_repo", "create_branch", "upload_folder"]
    calls = dict(fake_api.calls)
    assert calls["__init__"] == {"token": "tok"}
    assert calls["create_repo"] == {"repo_id": REPO, "private": True, "repo_type": "model", "exist_ok": True}
    assert calls["create_branch"] == {"repo_id": REPO, "branch": "dev", "repo_type": "model", "exist_ok": True}
    upload = calls["upload_folder"]
    assert upload["repo_id"] == REPO and upload["revision"] == "dev" and upload["repo_type"] == "model"
    assert upload.get("path_in_repo") is None and not upload.get("create_pr") and not upload.get("delete_patterns")
    assert "magnet_zoo" in upload["commit_message"]
    uploaded = fake_api.uploads[0]
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert_same_weights(model, load_pretrained(uploaded))
    from huggingface_hub import ModelCard

    card = ModelCard.load(uploaded / "README.md")
    assert card.data.metrics == list(METRICS) and f"# {REPO}" in card.text


def test_push_to_main_creates_no_branch(fake_api, model):
    push_to_hub(model, REPO, commit_message="weights v1", create_pr=True)
    names = [name for name, _ in fake_api.calls]
    assert names == ["__init__", "create_repo", "upload_folder"]
    calls = dict(fake_api.calls)
    assert calls["__init__"] == {"token": None}
    assert calls["create_repo"] == {"repo_id": REPO, "private": None, "repo_type": "model", "exist_ok": True}
    upload = calls["upload_folder"]
    assert upload["commit_message"] == "weights v1" and upload["create_pr"] is True
    assert upload["repo_id"] == REPO and upload.get("revision") in (None, "main")
    assert sorted(p.name for p in fake_api.uploads[0].iterdir()) == ["README.md", "config.json", "model.safetensors"]


@pytest.mark.parametrize(
    ("repo_id", "revision"), [("bad repo", None), ("org/na--me", None), ("a/b/c", None), (REPO, "a" * 40)]
)
def test_push_to_hub_refuses_bad_ids_before_any_call(fake_api, model, repo_id, revision):
    with pytest.raises(InvalidRepoIdError):
        push_to_hub(model, repo_id, revision=revision)
    assert fake_api.calls == []


def test_push_to_hub_wraps_hub_errors(fake_api, model):
    import httpx
    from huggingface_hub.utils import HfHubHTTPError

    response = httpx.Response(403, request=httpx.Request("POST", "https://hub.example/api/repos/create"))
    fake_api.fail_with = HfHubHTTPError("403 Forbidden", response=response)
    with pytest.raises(HubError, match=r"pushing to org/name@main .* failed.*hf auth login"):
        push_to_hub(model, REPO)


# --------------------------------------------------------------------------- model cards
def _check_card(card, *, where: str) -> None:
    data = card.data
    assert data.library_name == "magnet-zoo", where
    assert data.license, where
    assert "magnet-zoo" in (data.tags or []), where
    assert "not for clinical use" in card.text.lower(), where
    assert "## I/O contract" in card.text and "## Training data" in card.text, where


def test_the_io_table_says_how_an_oversampled_view_is_read():
    from magnet_zoo.factory import create_model
    from magnet_zoo.hub.card import io_table
    from magnet_zoo.hub.checkpoint import io_contract

    plain = io_contract(create_model("magnet2_micro", pretrained=False))
    over = io_contract(create_model("magnet2_micro", pretrained=False, view_oversample=4))
    assert plain["view_oversample"] == 1 and over["view_oversample"] == 4
    assert "read at" not in io_table(plain)
    assert "read at 224x224, grey-filtered, then averaged over 4x4 blocks" in io_table(over)


def test_saved_card_is_a_valid_hub_card(saved):
    from huggingface_hub import ModelCard

    card = ModelCard.load(saved / "README.md")
    _check_card(card, where=str(saved))
    assert card.data.datasets == ["synthmets"]
    assert card.data.metrics == ["roc_auc", "accuracy"]
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == METRICS
    text = card.text
    assert CARD["reproduce"] in text and CARD["training_data"] in text
    assert "| lr | `3e-05` |" in text and "| grey filter |" in text


def test_minimal_card_is_valid(model, tmp_path):
    from huggingface_hub import ModelCard

    folder = save_pretrained(model, tmp_path / "plain")
    card = ModelCard.load(folder / "README.md")
    _check_card(card, where="minimal")
    assert card.data.metrics is None and card.data.eval_results is None


def test_every_card_in_model_cards_parses():
    from huggingface_hub import ModelCard

    cards = sorted(p for p in MODEL_CARDS.glob("*.md") if p.name not in {"README.md", "TEMPLATE.md"})
    for path in cards:
        _check_card(ModelCard.load(path), where=str(path))
    # every registered model with weights has its card; a packaged checkpoint carries the same card
    with_weights = [name for name in registry.list_models() if registry.resolve(name)[3].has_weights]
    assert with_weights, "the demo model ships with weights"
    for name in with_weights:
        assert (MODEL_CARDS / f"{name}.md").is_file(), f"{name} has weights but no model card"
        tag = registry.resolve(name)[3]
        if tag.packaged:
            from magnet_zoo.hub.pretrained import packaged_checkpoint

            shipped = (packaged_checkpoint(tag.packaged) / "README.md").read_text(encoding="utf-8")
            assert shipped == (MODEL_CARDS / f"{name}.md").read_text(encoding="utf-8"), name


def test_model_cards_template_is_the_packaged_one():
    assert (MODEL_CARDS / "TEMPLATE.md").read_text(encoding="utf-8") == CARD_TEMPLATE, (
        "model_cards/TEMPLATE.md differs from magnet_zoo.hub.card.CARD_TEMPLATE; see model_cards/README.md"
    )


def test_card_metadata_yaml_round_trips():
    import yaml

    card = CardData(
        model_name='org/odd "name": ü',
        datasets=("camelyon16", "camelyon17"),
        tags=("breast", "lymph-node"),
        metrics={"roc_auc": 0.84},
        metrics_dataset="camelyon16-test",
    )
    meta = card_metadata(card, card.model_name)
    assert yaml.safe_load(to_yaml(meta)) == meta
    assert meta["model-index"][0]["results"][0]["dataset"]["name"] == "camelyon16-test"


def test_card_data_refuses_unknown_fields(model, tmp_path):
    with pytest.raises(ValueError, match="unknown card_data fields: colour"):
        save_pretrained(model, tmp_path / "x", card_data={"colour": "red"})


def test_save_refuses_non_magnet(tmp_path):
    with pytest.raises(TypeError, match="MagNet"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "x")


# --------------------------------------------------------------------------- packaging
def test_top_level_exports():
    assert magnet_zoo.load_pretrained is load_pretrained
    assert magnet_zoo.save_pretrained is save_pretrained
    assert magnet_zoo.push_to_hub is push_to_hub


def test_importing_hub_errors_is_light():
    code = (
        "import sys; from magnet_zoo.hub import CheckpointError, NoPretrainedWeightsError, CardData; "
        "heavy = [m for m in ('torch', 'huggingface_hub', 'timm') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- resolution contract, cards that survive
def test_checkpoint_records_the_training_resolution(model, tmp_path):
    folder = save_pretrained(model, tmp_path / "mpp", slide_mpp=0.5)
    raw = json.loads((folder / "config.json").read_text())
    assert raw["io"]["slide_mpp"] == 0.5 and raw["io"]["mpp_tolerance"] == 0.25
    loaded = load_pretrained(folder)
    assert loaded.trained_mpp == 0.5
    assert "| resolution | trained on slides of 0.5 µm per pixel at level 0" in (folder / "README.md").read_text()
    # A re-save keeps it; a checkpoint without it says so instead of pretending.
    again = save_pretrained(loaded, tmp_path / "again")
    assert json.loads((again / "config.json").read_text())["io"]["slide_mpp"] == 0.5
    plain = save_pretrained(model, tmp_path / "plain")
    assert load_pretrained(plain).trained_mpp is None
    assert "µm per pixel not recorded" in (plain / "README.md").read_text()
    raw["io"]["slide_mpp"] = -1
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="slide_mpp"):
        load_pretrained(folder)


def test_the_demo_model_knows_its_training_resolution():
    assert load_pretrained("magnet2_micro").trained_mpp == 0.5


def test_save_pretrained_of_a_loaded_model_keeps_its_card(saved, tmp_path):
    original = (saved / "README.md").read_text()
    resaved = save_pretrained(load_pretrained(saved), tmp_path / "resaved")
    assert (resaved / "README.md").read_text() == original
    # A checkpoint written before config.json kept the card's data: its README is read back instead.
    old = tmp_path / "old"
    shutil.copytree(saved, old)
    raw = json.loads((old / "config.json").read_text())
    del raw["card"]
    (old / "config.json").write_text(json.dumps(raw))
    again = save_pretrained(load_pretrained(old), tmp_path / "again")
    assert (again / "README.md").read_text() == original
    # Explicit card data still wins.
    other = save_pretrained(load_pretrained(saved), tmp_path / "other", card_data={"training_data": "elsewhere"})
    assert "elsewhere" in (other / "README.md").read_text()


def test_the_demo_card_survives_a_resave(tmp_path):
    from magnet_zoo.hub.pretrained import packaged_checkpoint

    shipped = packaged_checkpoint("magnet_zoo.demo:checkpoint")
    folder = save_pretrained(load_pretrained("magnet2_micro"), tmp_path / "demo")
    assert (folder / "README.md").read_text() == (shipped / "README.md").read_text()
    assert "## Training data\n\nSynthMets (1.0.0)" in (folder / "README.md").read_text()


def test_hub_loads_record_the_commit_they_came_from(hub, model, monkeypatch):
    from magnet_zoo.infer.provenance import model_identity, weights_sha256

    main = load_pretrained(REPO)  # the branch name resolves to its commit
    assert main.pretrained_source["source"] == "hub" and main.pretrained_source["name"] == REPO
    assert main.pretrained_source["revision"] == hub.new_sha
    assert load_pretrained(REPO, revision=hub.old_sha).pretrained_source["revision"] == hub.old_sha
    tag = registry.ModelTag("demo weights", hub_repo=REPO, hub_revision=hub.old_sha)
    arch = registry.ModelArch(model.config, "t", {"demo": tag}, "demo")
    monkeypatch.setitem(registry._REGISTRY, "magnet_hubtest", arch)
    named = load_pretrained("magnet_hubtest")
    assert named.pretrained_source["name"] == "magnet_hubtest.demo"
    assert named.pretrained_source["revision"] == hub.old_sha
    # The weights hash names the weights, wherever they were loaded from.
    assert model_identity(main)["weights_sha256"] == weights_sha256(model)
    assert model_identity(named)["weights_sha256"] != weights_sha256(model)


def test_push_to_hub_of_a_loaded_model_keeps_its_card(fake_api, saved):
    push_to_hub(load_pretrained(saved), "org/other")
    uploaded = (fake_api.uploads[0] / "README.md").read_text()
    original = (saved / "README.md").read_text()
    assert CARD["training_data"] in uploaded and CARD["reproduce"] in uploaded
    assert uploaded == original  # same card: its model name was given, so the repo id does not replace it
