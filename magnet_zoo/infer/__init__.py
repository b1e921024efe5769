"""Inference on slides: ``predict_slide`` and the :class:`Prediction` it returns."""

from magnet_zoo.infer.predict import Prediction, predict_slide

__all__ = ["Prediction", "predict_slide"]
