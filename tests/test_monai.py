"""MONAI integration: transforms in ``monai.data.Dataset``, ``SupervisedTrainer``/``Evaluator``, the bundle."""

from __future__ import annotations

import csv
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import ROCAUC, from_engine
from monai.transforms import Compose

from magnet_zoo import create_model, open_slide
from magnet_zoo.integrations.monai import (
    LoadSlided,
    MagNetInferer,
    MagNetLoss,
    MagNetPrepareBatch,
    RandSlideOrientd,
    SavePretrained,
    collate_slides,
    datalist_from_csv,
)
from magnet_zoo.nn.tree import root_square
from magnet_zoo.train import SlideRef
from magnet_zoo.wsi import OrientedSource, SlideFetcher

REPO = Path(__file__).resolve().parents[1]
TINY = {"classifier_backbone": "test_convnext", "aux_backbone": "test_convnext"}


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 SynthMets slides of 1024 px (normal and macro): 4 train, 2 val."""
    from magnet_zoo.synth import generate_dataset

    folder = tmp_path_factory.mktemp("monai_synth")
    labels = generate_dataset(folder, n=6, size=1024, seed=3, categories=("normal", "macro"), progress=False)
    rows = list(csv.DictReader(labels.open()))
    val = [next(i for i, r in enumerate(rows) if r["label"] == lab) for lab in ("0", "1")]
    for i, row in enumerate(rows):
        row["split"] = "val" if i in val else "train"
    out = folder / "split.csv"
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def test_transforms_give_lazy_oriented_slide_sources(data_csv: Path) -> None:
    items = datalist_from_csv(data_csv, split="train")
    assert len(items) == 4 and set(items[0]) == {"image", "label", "category"}
    orient = RandSlideOrientd("image", prob=1.0)
    orient.set_random_state(seed=5)
    ds = Dataset(items, Compose([LoadSlided("image"), orient]))
    item = ds[0]
    ref = item["image"]
    assert isinstance(ref, SlideRef)
    assert pickle.loads(pickle.dumps(ref)).orientation == ref.orientation  # travels to DataLoader workers
    expected = SlideFetcher(OrientedSource(open_slide(items[0]["image"]), ref.orientation))
    got = SlideFetcher(ref)
    root = root_square(*expected.slide_size)
    assert got.slide_size == expected.slide_size
    assert torch.equal(got.fetch([root], 56).images, expected.fetch([root], 56).images)
    loader = DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate_slides)
    batch = next(iter(loader))
    assert len(batch["image"]) == 2 and batch["label"].dtype == torch.float32


def _needs_ignite() -> None:
    pytest.importorskip("ignite", reason="MONAI engines need pytorch-ignite (pip install pytorch-ignite)")


@pytest.mark.slow
def test_supervised_trainer_and_evaluator_drive_a_magnet(data_csv: Path, tmp_path: Path) -> None:
    _needs_ignite()
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = create_model("magnet2_tiny", **TINY)
    train_ds = Dataset(datalist_from_csv(data_csv, "train"), Compose([LoadSlided("image"), RandSlideOrientd("image")]))
    val_ds = Dataset(datalist_from_csv(data_csv, "val"), LoadSlided("image"))
    prepare = MagNetPrepareBatch(model=model)
    evaluator = SupervisedEvaluator(
        device=device,
        val_data_loader=DataLoader(val_ds, batch_size=2, collate_fn=collate_slides),
        network=model,
        inferer=MagNetInferer(),
        prepare_batch=prepare,
        key_val_metric={"val_auroc": ROCAUC(output_transform=from_engine(["pred", "label"]))},
        val_handlers=[SavePretrained(tmp_path / "best", model, best_only=True)],
        decollate=False,
    )
    # Parameters only: BatchNorm running statistics (buffers) change on any training-mode forward pass,
    # optimizer step or not.
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    losses: list[float] = []
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=2,
        train_data_loader=DataLoader(train_ds, batch_size=2, shuffle=True, collate_fn=collate_slides),
        network=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        loss_function=MagNetLoss(model),
        prepare_batch=prepare,
        decollate=False,
    )
    from ignite.engine import Events

    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run(e.state.epoch))
    SavePretrained(tmp_path / "last", model).attach(trainer)
    trainer.run()
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    changed = {k for k, v in model.named_parameters() if not torch.equal(before[k], v.detach())}
    assert changed, "the optimizer did not change a single parameter"
    heads = [k for k in before if k.startswith(("classifier.", "aux_heads."))]
    assert heads and set(heads) <= changed  # the heads get a gradient on every step, so all of them moved
    auroc = evaluator.state.metrics["val_auroc"]
    assert 0.0 <= auroc <= 1.0
    for name in ("last", "best"):
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_magnet_loss_matches_the_models_own_loss(data_csv: Path) -> None:
    torch.manual_seed(1)
    model = create_model("magnet2_tiny", **TINY, loss_paradoxical=False, aux_reduction="sum")
    batch = collate_slides([LoadSlided("image")(d) for d in datalist_from_csv(data_csv)[:2]])
    fetchers, labels = MagNetPrepareBatch(model=model)(batch)
    torch.manual_seed(2)
    out = model(fetchers)
    assert torch.allclose(MagNetLoss(model)(out, labels), model.loss(out, labels).total)
    terms = model.loss(out, labels)  # the config's loss options reach MONAI's loss: L2 summed, no L1
    assert float(terms.paradoxical) == 0.0 and len(out.aux_logits) == 2
    mean_config = model.config.replace(aux_reduction="mean")
    expected = terms.total - terms.auxiliary / 2
    assert torch.allclose(MagNetLoss(mean_config)(out, labels), expected, atol=1e-6)
    with pytest.raises(TypeError, match="MagNetOutput"):
        MagNetLoss(model)(out.logits, labels)


def _bundle(config: str, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "2"
    bundle = REPO / "bundle"
    cmd = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", str(bundle / "configs" / config),
        "--meta_file", str(bundle / "configs" / "metadata.json"),
        "--bundle_root", str(bundle),
        *overrides,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_bundle_trains_then_infers(data_csv: Path, tmp_path: Path) -> None:
    _needs_ignite()
    pytest.importorskip("fire", reason="`python -m monai.bundle` needs fire (pip install fire)")
    models = tmp_path / "models"
    proc = _bundle(
        "train.json",
        "--data_csv", str(data_csv), "--output_dir", str(models), "--epochs", "1", "--batch_size", "2",
        "--num_workers", "0", "--learning_rate", "0.001", "--model_name", "magnet2_tiny",
        "--model_overrides", repr(TINY),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("last", "best"):
        assert (models / name / "model.safetensors").is_file(), proc.stderr[-2000:]
        import json

        assert json.loads((models / name / "config.json").read_text())["io"]["slide_mpp"] == 0.5
    evals = tmp_path / "eval"
    proc = _bundle(
        "evaluate.json",
        "--data_csv", str(data_csv), "--checkpoint", str(models / "best"), "--output_dir", str(evals),
        "--num_workers", "0",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((evals / "predictions.csv").open()))
    assert len(rows) == 6
    assert all(0.0 <= float(r["probability"]) <= 1.0 for r in rows)
    assert {r["category"] for r in rows} == {"normal", "macro"}


def test_datalist_for_inference_needs_no_labels(data_csv: Path, tmp_path: Path) -> None:
    from magnet_zoo.integrations.monai import datalist_from_slides

    folder = data_csv.parent
    items = datalist_from_slides(folder)
    assert len(items) == 6 and all(set(d) == {"image"} for d in items)
    listing = tmp_path / "list.csv"
    listing.write_text("path\n" + "".join(f"{d['image']}\n" for d in items[:2]))
    assert datalist_from_slides(listing) == items[:2]
    batch = collate_slides([LoadSlided("image")(d) for d in items[:2]])
    fetchers, labels = MagNetPrepareBatch(grey_threshold=15)(batch)
    assert labels is None and len(fetchers) == 2


def test_prepare_batch_uses_the_models_grey_threshold(data_csv: Path) -> None:
    """The grey filter is the model's, never a silent default of 15 that another config does not share."""
    from magnet_zoo.integrations.monai import prepare_magnet_batch

    model = create_model("magnet2_tiny", **TINY, grey_threshold=40)
    batch = collate_slides([LoadSlided("image")(d) for d in datalist_from_csv(data_csv)[:2]])
    for prepare in (MagNetPrepareBatch(model=model), MagNetPrepareBatch(model=model.config),
                    MagNetPrepareBatch(grey_threshold=40)):
        fetchers, _ = prepare(batch)
        assert [f.grey_threshold for f in fetchers] == [40, 40]
    fetchers, _ = prepare_magnet_batch(batch, model=model)
    assert [f.grey_threshold for f in fetchers] == [40, 40]
    with pytest.raises(TypeError, match="grey_threshold"):
        MagNetPrepareBatch()
    with pytest.raises(TypeError, match="grey_threshold"):
        prepare_magnet_batch(batch)
    with pytest.raises(ValueError, match="40"):
        MagNetPrepareBatch(grey_threshold=15, model=model)


def test_bundle_has_the_model_zoo_layout() -> None:
    import json

    bundle = REPO / "bundle"
    for rel in ("LICENSE", "models/README.md", "docs/README.md", "docs/data_license.txt", "configs/metadata.json",
                "configs/inference.json", "configs/evaluate.json", "configs/train.json"):
        assert (bundle / rel).is_file(), rel
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    required = ("version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                "required_packages_version", "task", "description", "authors", "copyright",
                "network_data_format", "data_source", "intended_use")
    assert all(k in meta for k in required), [k for k in required if k not in meta]
    assert meta["version"] in meta["changelog"]
    # The inference config has no metric and no label: it is a predictor, not an evaluator.
    inference = (bundle / "configs" / "inference.json").read_text()
    assert "label" not in inference and "ROCAUC" not in inference
    assert "ROCAUC" in (bundle / "configs" / "evaluate.json").read_text()


@pytest.mark.slow
def test_bundle_inference_runs_on_slides_without_labels(wsi_dir: Path, tmp_path: Path) -> None:
    """The documented command, on the real slides, with the weights a fresh clone has (the demo model)."""
    _needs_ignite()
    pytest.importorskip("fire", reason="`python -m monai.bundle` needs fire (pip install fire)")
    evals = tmp_path / "eval"
    proc = _bundle("inference.json", "--dataset_dir", str(wsi_dir), "--output_dir", str(evals))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((evals / "predictions.csv").open()))
    assert sorted(Path(r["path"]).name for r in rows) == ["CMU-1-Small-Region.svs", "CMU-1-Small-Region_pyramid.tiff"]
    assert all(r["label"] == "" and 0.0 <= float(r["probability"]) <= 1.0 for r in rows)


def test_training_mpp_from_the_csv_or_the_slides(data_csv: Path, wsi_dir: Path, tmp_path: Path) -> None:
    from magnet_zoo.integrations.monai import training_mpp

    assert training_mpp(data_csv) == 0.5  # SynthMets CSVs have an mpp column
    listing = tmp_path / "real.csv"
    listing.write_text("path,label\n" + "".join(f"{p},0\n" for p in sorted(wsi_dir.glob("CMU*"))))
    assert training_mpp(listing) == pytest.approx(0.499)
