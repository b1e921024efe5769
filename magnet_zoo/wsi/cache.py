"""A thread-safe, byte-budgeted LRU cache for decoded tiles, shared by every open slide."""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Hashable

import numpy as np

DEFAULT_TILE_CACHE_BYTES = 256 * 1024 * 1024
"""256 MiB: about 1,300 decoded 256x256 RGB tiles, enough for every read of a 4-layer MagNet on a
few slides at once, small next to a training process."""


class TileCache:
    def __init__(self, capacity_bytes: int = DEFAULT_TILE_CACHE_BYTES) -> None:
        self.capacity = int(capacity_bytes)
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> np.ndarray | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: np.ndarray) -> None:
        if value.nbytes > self.capacity:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._items[key] = value
            self._bytes += value.nbytes
            while self._bytes > self.capacity:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes


_SHARED = TileCache()
_TOKENS = itertools.count()


def handle_token() -> int:
    """A number no other handle of this process ever gets: the part of a tile's key that names the open
    file. (Not ``id(handle)``: CPython reuses the ids of freed objects, so a file reopened after it was
    rewritten could be served the old file's tiles.)"""
    return next(_TOKENS)


def shared_tile_cache() -> TileCache:
    return _SHARED
