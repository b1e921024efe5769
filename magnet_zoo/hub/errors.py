"""Typed errors of the checkpoint / Hub layer; each message names the file or repo and says what to do."""

from __future__ import annotations


class CheckpointError(Exception):
    """A checkpoint cannot be found, read or trusted."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint where one was asked for (missing folder, missing ``config.json`` or weights)."""


class CheckpointMismatchError(CheckpointError):
    """The weights do not fit the network that ``config.json`` describes (missing, unexpected or
    wrongly shaped tensors). The offending keys are kept on the exception for programs."""

    def __init__(
        self,
        message: str,
        *,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] | None = None,
    ) -> None:
        super().__init__(message)
        self.missing = missing or []
        self.unexpected = unexpected or []
        self.mismatched = mismatched or []
        """``(key, shape in the file, shape the network expects)``."""


class UnsupportedCheckpointVersionError(CheckpointError):
    """The checkpoint was written with a newer config version than this magnet_zoo reads."""


class NoPretrainedWeightsError(CheckpointError, LookupError):
    """A registered model name has no published weights."""


class InvalidRepoIdError(CheckpointError, ValueError):
    """A Hub repo id or revision is malformed."""


class HubError(CheckpointError):
    """The Hub (or its local cache) could not provide a checkpoint, or a push failed."""
