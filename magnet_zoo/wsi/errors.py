"""Typed slide errors. Every message names the file and says what to do next."""

from __future__ import annotations


class SlideError(Exception):
    """Base class of every slide-reading error magnet_zoo raises."""


class SlideNotFoundError(SlideError, FileNotFoundError):
    """The path does not exist (or is a directory where a slide file was expected)."""


class UnsupportedFormatError(SlideError):
    """No available backend can open this file."""


class CorruptSlideError(SlideError):
    """The file looks like a slide but its contents cannot be decoded (truncated, damaged)."""


class UnreadableRegionError(SlideError):
    """A region could not be read from an otherwise open slide."""


class BackendUnavailableError(SlideError, ImportError):
    """The requested backend's library is not installed."""


class ImplausibleSlideError(CorruptSlideError):
    """The file claims a size (or a whole level to decode) beyond any plausible slide or memory budget."""


NO_MPP_WARNING = (
    "no microns-per-pixel metadata. The MagNet does not need it (it picks levels by downsample), but its "
    "resolution cannot be checked against the model's training slides, node sizes are reported in pixels "
    "only and figures get no scale bar"
)
"""What a backend logs for a slide without mpp: the honest consequences, not a hint that mpp is used."""
