"""TIAToolbox integration: the ``ModelABC`` MagNet predicts slides opened with TIAToolbox's ``WSIReader``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tiatoolbox", reason="TIAToolbox not installed (pip install 'magnet-zoo[tiatoolbox]')")

from tiatoolbox.wsicore.wsireader import OpenSlideWSIReader, VirtualWSIReader, WSIReader  # noqa: E402

from magnet_zoo import ArraySource, create_model, open_slide, predict_slide  # noqa: E402
from magnet_zoo.integrations.tiatoolbox import MagNetTIAModel  # noqa: E402

SLIDE = "CMU-1-Small-Region_pyramid.tiff"


@pytest.fixture(scope="module")
def model() -> MagNetTIAModel:
    torch.manual_seed(0)
    return MagNetTIAModel(create_model("magnet2_tiny").eval())


def test_predicts_a_wsireader_slide_like_predict_slide(model: MagNetTIAModel, wsi_dir: Path) -> None:
    path = wsi_dir / SLIDE
    reference = predict_slide(model.magnet, open_slide(path))
    # TIAToolbox's OpenSlide reader sees the file's pyramid: the very same pixels, the very same prediction.
    same = MagNetTIAModel.infer_batch(model, [OpenSlideWSIReader(path)], device="cpu")
    assert same["probabilities"][0] == pytest.approx(reference.probability, abs=1e-6)
    boxes = np.array([n["box"] for n in same["trees"][0]])
    assert np.allclose(boxes, np.array([n.box for n in reference.tree]), atol=1e-3)
    # WSIReader.open gives a VirtualWSIReader of level 0 only for this generic TIFF: the coarse views are
    # then computed from level 0 instead of read from the file's (JPEG) pyramid, so only nearly equal.
    reader = WSIReader.open(path)
    out = MagNetTIAModel.infer_batch(model, [reader], device="cpu")
    assert out["probabilities"].shape == (1,)
    assert out["probabilities"][0] == pytest.approx(reference.probability, abs=2e-3)
    assert out["trees"][0][0]["box"] == list(reference.tree[0].box)
    assert model.postproc_func(out["probabilities"]).tolist() == [int(reference.probability >= 0.5)]


def test_virtual_reader_over_an_array_matches_array_source(model: MagNetTIAModel) -> None:
    rng = np.random.default_rng(0)
    image = np.full((400, 480, 3), 240, dtype=np.uint8)
    image[100:300, 120:400] = rng.integers(60, 200, size=(200, 280, 3), dtype=np.uint8)
    out = MagNetTIAModel.infer_batch(model, [VirtualWSIReader(image), image], device="cpu")
    expected = predict_slide(model.magnet, ArraySource(image)).probability
    assert out["probabilities"] == pytest.approx([expected, expected], abs=1e-6)


@pytest.mark.slow
def test_model_contract_and_safe_weight_loading(model: MagNetTIAModel, tmp_path: Path) -> None:
    from magnet_zoo.hub import save_pretrained

    assert model.class_dict == {0: "normal", 1: "tumour"}
    assert model.postproc_func(np.array([0.2, 0.7])).tolist() == [0, 1]
    assert model.preproc_func is not None and callable(model.preproc_func)
    save_pretrained(model.magnet, tmp_path / "ckpt")
    torch.manual_seed(1)
    fresh = MagNetTIAModel(create_model("magnet2_tiny"))
    fresh.load_weights_from_file(tmp_path / "ckpt")
    for key, value in model.magnet.state_dict().items():
        assert torch.equal(fresh.magnet.state_dict()[key], value)
    torch.save({}, tmp_path / "weights.pth")
    with pytest.raises(ValueError, match="safetensors"):
        fresh.load_weights_from_file(tmp_path / "weights.pth")
    loaded = MagNetTIAModel.from_pretrained(tmp_path / "ckpt")
    assert isinstance(loaded.magnet, type(model.magnet))
    with pytest.raises(TypeError, match="slide"):
        MagNetTIAModel.infer_batch(model, [42], device="cpu")


def test_postproc_func_uses_the_models_threshold(model: MagNetTIAModel) -> None:
    strict = MagNetTIAModel(model.magnet, threshold=0.8)
    probs = np.array([0.2, 0.7, 0.9])
    assert strict.postproc_func(probs).tolist() == [0, 0, 1]
    strict.threshold = 0.1  # read when called
    assert strict.postproc_func(probs).tolist() == [1, 1, 1]
    strict.postproc_func = None  # TIAToolbox's reset goes back to the threshold, not to 0.5
    assert strict.postproc_func(probs).tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="threshold"):
        MagNetTIAModel(model.magnet, threshold=1.5)


def test_results_go_into_a_tiatoolbox_annotation_store(model: MagNetTIAModel, wsi_dir: Path, tmp_path: Path) -> None:
    from tiatoolbox.annotation.storage import DictionaryStore

    from magnet_zoo.integrations.tiatoolbox import to_annotation_store

    image = np.full((400, 480, 3), 240, dtype=np.uint8)
    image[100:300, 120:400] = np.random.default_rng(0).integers(60, 200, size=(200, 280, 3), dtype=np.uint8)
    out = MagNetTIAModel.infer_batch(model, [OpenSlideWSIReader(wsi_dir / SLIDE), image], device="cpu")
    path = tmp_path / "magnet.ndjson"
    store = to_annotation_store(out, path, labels=model.class_dict, threshold=0.5, slides=["cmu", "array"])
    store.commit()
    store.close()
    reopened = DictionaryStore(path)
    assert len(to_annotation_store(out)) == len(reopened)  # in memory by default
    for i, slide in enumerate(["cmu", "array"]):
        tree = out["trees"][i]
        mine = [a for a in reopened.values() if a.properties["slide"] == slide]
        drawn = [n for n in tree if n["layer"] > 0 and not n["frozen"]]
        assert len(mine) == len(drawn) + 1
        result = next(a for a in mine if a.properties["type"] == "magnet_slide")
        assert result.properties["probability"] == pytest.approx(float(out["probabilities"][i]))
        assert result.properties["label"] == model.class_dict[int(out["probabilities"][i] >= 0.5)]
        rois = {a.properties["name"]: a for a in mine if a.properties["type"] == "magnet_roi"}
        for node in drawn:
            x, y, w, h = node["box"]
            assert rois[node["name"]].geometry.bounds == pytest.approx((x, y, x + w, y + h))
            assert rois[node["name"]].properties["level"] == node["level"]


def test_example_thumbnail_without_objective_power_is_small_not_upsampled(wsi_dir: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("tia_example", Path(__file__).parents[1] / "examples" /
                                                  "tiatoolbox_example.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    image = np.full((3000, 4000, 3), 230, dtype=np.uint8)
    reader = VirtualWSIReader(image)  # no objective power
    assert not reader.info.objective_power
    thumb = example.thumbnail(reader, max_side=1024)
    assert max(thumb.shape[:2]) <= 1024 and min(thumb.shape[:2]) >= 700
    assert thumb.shape[1] / thumb.shape[0] == pytest.approx(4000 / 3000, rel=0.01)


def test_trees_option_pools_sampled_trees_like_predict_slide(model: MagNetTIAModel) -> None:
    image = np.full((400, 480, 3), 240, dtype=np.uint8)
    image[100:300, 120:400] = np.random.default_rng(0).integers(60, 200, size=(200, 280, 3), dtype=np.uint8)
    sampled = MagNetTIAModel(model.magnet, trees=2, tree_seed=1)
    out = MagNetTIAModel.infer_batch(sampled, [VirtualWSIReader(image), image], device="cpu")
    expected = predict_slide(model.magnet, ArraySource(image), trees=2, seed=1)
    assert out["probabilities"] == pytest.approx([expected.probability] * 2, abs=1e-6)
    assert out["tree_probabilities"].shape == (2, 2)
    assert out["tree_probabilities"][1] == pytest.approx(expected.tree_probabilities, abs=1e-6)
    assert out["tree_index"] == [expected.tree_index] * 2
    sampled_boxes = [[n["box"] for n in t] for t in out["sampled_trees"][1]]
    assert sampled_boxes == [[list(n.box) for n in t] for t in expected.trees]
    assert [n["box"] for n in out["trees"][1]] == [list(n.box) for n in expected.tree]
    plain = MagNetTIAModel.infer_batch(model, [image], device="cpu")
    assert "sampled_trees" not in plain and [n["box"] for n in plain["trees"][0]] != [n["box"] for n in out["trees"][1]]
    assert MagNetTIAModel(model.magnet, trees=1).trees is None  # one tree: the expected crop
    from magnet_zoo.integrations.tiatoolbox import to_annotation_store

    assert len(to_annotation_store(out)) == 2 * len([n for n in expected.tree if not n.frozen])
