"""Which exceptions are the user's to fix (printed as one line) rather than bugs (traceback)."""

from __future__ import annotations


def is_user_error(exc: BaseException) -> bool:
    from magnet_zoo.config import ConfigError
    from magnet_zoo.infer.batch import InputError
    from magnet_zoo.registry import UnknownModelError
    from magnet_zoo.wsi.errors import SlideError

    user = (ConfigError, InputError, UnknownModelError, SlideError, FileNotFoundError)
    try:
        from magnet_zoo.hub import CheckpointError, NoPretrainedWeightsError

        user = (*user, CheckpointError, NoPretrainedWeightsError)
    except ImportError:  # pragma: no cover - hub is part of the package
        pass
    return isinstance(exc, user)
