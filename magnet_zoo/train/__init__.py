"""Training and evaluation of MagNets on slides listed in a CSV.

>>> from magnet_zoo.train import TrainConfig, train
>>> result = train(TrainConfig(data="labels.csv", model="magnet2_tiny", out="runs/tiny", epochs=5))
>>> result.best  # a checkpoint folder: magnet_zoo.load_pretrained(result.best)

Every optimizer step runs in the one loop, :func:`fit` (:mod:`magnet_zoo.train.loop`); how it learns is a
:class:`Recipe` (:func:`get_recipe`, :func:`list_recipes`; ``paper`` reproduces the paper's section 3.3,
``learn_to_look_mil``, the default, is the one for slide labels; ``learn_to_look_centred`` the one for tasks
where both classes carry an object). ``magnet-zoo train`` and ``magnet-zoo evaluate`` are the
command-line faces of :func:`train` and :func:`evaluate`; ``torchrun --nproc_per_node N -m magnet_zoo
train ...`` runs them with DDP.
"""

from magnet_zoo.atomic import atomic_write_bytes, atomic_write_text
from magnet_zoo.train.checkpointing import (
    ResumeError,
    atomic_directory,
    load_training_state,
    save_training_state,
)
from magnet_zoo.train.data import (
    DataError,
    PrefetchedFetcher,
    ResumableSampler,
    SlideBatch,
    SlideDataset,
    SlideRecord,
    SlideRef,
    SlideSample,
    collate_samples,
    make_loader,
    read_slide_csv,
)
from magnet_zoo.train.distributed import DistInfo, setup_distributed
from magnet_zoo.train.evaluate import EvalReport, evaluate
from magnet_zoo.train.loop import TrainLoop, fit
from magnet_zoo.train.metrics import accuracy, auroc, classification_metrics
from magnet_zoo.train.recipe import DEFAULT_RECIPE, RECIPES, Recipe, UnknownRecipeError, get_recipe, list_recipes
from magnet_zoo.train.settings import (
    TrainConfig,
    build_model,
    default_batch_size,
    parse_overrides,
    set_activation_checkpointing,
)
from magnet_zoo.train.sources import SlideData, SlideValidator, SourceData
from magnet_zoo.train.trainer import TrainResult, train

__all__ = [
    "DEFAULT_RECIPE",
    "RECIPES",
    "Recipe",
    "SlideData",
    "SlideValidator",
    "SourceData",
    "TrainLoop",
    "UnknownRecipeError",
    "fit",
    "get_recipe",
    "list_recipes",
    "DataError",
    "DistInfo",
    "EvalReport",
    "PrefetchedFetcher",
    "ResumableSampler",
    "ResumeError",
    "SlideBatch",
    "SlideDataset",
    "SlideRecord",
    "SlideRef",
    "SlideSample",
    "TrainConfig",
    "TrainResult",
    "accuracy",
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_text",
    "auroc",
    "build_model",
    "classification_metrics",
    "collate_samples",
    "default_batch_size",
    "evaluate",
    "load_training_state",
    "make_loader",
    "parse_overrides",
    "read_slide_csv",
    "save_training_state",
    "set_activation_checkpointing",
    "setup_distributed",
    "train",
]
