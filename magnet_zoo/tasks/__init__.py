"""Tasks with known answers for measuring whether a MagNet learns where to look (issue 7)."""

from magnet_zoo.tasks.findit import FindItSpec, evaluate, make_batch, make_image
from magnet_zoo.tasks.train import FINDIT_RECIPE, FindItData, FindItValidator, train, train_and_evaluate

__all__ = ["FINDIT_RECIPE", "FindItData", "FindItSpec", "FindItValidator", "evaluate", "make_batch", "make_image",
           "train", "train_and_evaluate"]
