"""Which exceptions are the user's to fix (printed as one line) rather than bugs (traceback)."""

from __future__ import annotations


def is_user_error(exc: BaseException) -> bool:
    from magnet_zoo.config import ConfigError
    from magnet_zoo.factory import BackboneWeightsUnavailableError
    from magnet_zoo.infer.batch import InputError
    from magnet_zoo.registry import UnknownModelError
    from magnet_zoo.wsi.errors import SlideError

    user = (ConfigError, InputError, UnknownModelError, SlideError, FileNotFoundError, BackboneWeightsUnavailableError)
    from magnet_zoo.hub import CheckpointError, NoPretrainedWeightsError
    from magnet_zoo.train.checkpointing import ResumeError
    from magnet_zoo.train.data import DataError

    user = (*user, CheckpointError, NoPretrainedWeightsError, ResumeError, DataError)
    return isinstance(exc, user)
