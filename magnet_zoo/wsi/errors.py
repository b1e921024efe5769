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
