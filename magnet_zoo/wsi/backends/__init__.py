"""Slide backends, one module per library, each imported only when a file is opened with it."""
