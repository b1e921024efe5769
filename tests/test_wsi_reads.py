"""Reads that must not go wrong quietly: the shared tile cache after a file changed, and reads that are
supposed to run at the same time (the slides of a batch, the squares of one fetch) really doing so."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import tifffile
import torch

from magnet_zoo.nn.fetcher import Square
from magnet_zoo.wsi import SlideFetcher, open_slide
from magnet_zoo.wsi.array_source import ArraySource
from tests.conftest import micro_magnet, tissue_image


# --------------------------------------------------------------------------- the tile cache
def _write_tiled(path, image: np.ndarray) -> None:
    tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb", compression="zlib",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")


def test_a_rewritten_file_is_never_served_the_old_files_tiles(tmp_path):
    """Open, read (tiles go to the shared cache), close, rewrite the file with other pixels, reopen, read.

    Many rounds: the cache used to key tiles on ``(path, id(handle))``, and CPython hands a new handle the
    id of the freed one, so the reopened file got the previous file's tiles.
    """
    path = tmp_path / "rewritten.tif"
    rng = np.random.default_rng(0)
    for round_ in range(30):
        image = rng.integers(0, 256, (192, 160, 3), dtype=np.uint8)
        _write_tiled(path, image)
        src = open_slide(path, "tifffile")
        got = src.read_region((0, 0), 0, (160, 192))
        assert np.array_equal(got, image), f"round {round_}: stale tiles from an earlier version of the file"
        assert np.array_equal(src.read_region((0, 0), 0, (160, 192)), image)  # a cache hit: the same pixels
        src.close()
        del src  # freed here: the next handle is likely to get its id


def test_two_open_handles_of_different_files_at_one_path_do_not_share_tiles(tmp_path):
    path = tmp_path / "s.tif"
    first, second = np.full((128, 128, 3), 40, np.uint8), np.full((128, 128, 3), 200, np.uint8)
    _write_tiled(path, first)
    a = open_slide(path, "tifffile")
    assert np.array_equal(a.read_region((0, 0), 0, (128, 128)), first)
    _write_tiled(tmp_path / "other.tif", second)
    (tmp_path / "other.tif").replace(path)  # the old handle keeps the old (unlinked) file
    b = open_slide(path, "tifffile")
    assert np.array_equal(b.read_region((0, 0), 0, (128, 128)), second)
    assert np.array_equal(a.read_region((0, 0), 0, (128, 128)), first)
    a.close()
    b.close()


# --------------------------------------------------------------------------- concurrent reads
TIMEOUT = 20.0
"""Seconds a read waits at the barrier for the others; serial reads never get there and time out."""


class BarrierSource(ArraySource):
    """An in-memory slide whose reads wait at a barrier: a read only returns once ``parties`` reads are
    in progress at the same time (else :class:`threading.BrokenBarrierError`)."""

    def __init__(self, image: np.ndarray, barrier: threading.Barrier) -> None:
        super().__init__(image)
        self.barrier = barrier

    def read_region(self, location, level, size):
        self.barrier.wait()
        return super().read_region(location, level, size)


def test_the_squares_of_one_fetch_are_read_concurrently():
    image = tissue_image(400, 400)
    squares = [Square(0, 0, 200), Square(200, 200, 200)]
    fetched = SlideFetcher(BarrierSource(image, threading.Barrier(2, timeout=TIMEOUT))).fetch(squares, 32)
    serial = SlideFetcher(ArraySource(image), serial=True).fetch(squares, 32)
    assert torch.equal(fetched.images, serial.images)


def test_the_barrier_catches_serial_reads():
    """The control: read one by one, the first read waits alone and the barrier breaks."""
    fetcher = SlideFetcher(BarrierSource(tissue_image(400, 400), threading.Barrier(2, timeout=0.5)), serial=True)
    with pytest.raises(threading.BrokenBarrierError):
        fetcher.fetch([Square(0, 0, 200), Square(200, 200, 200)], 32)


class BarrierFetcher:
    """A slide's fetcher whose every fetch waits until the other slide of the batch is fetching too."""

    def __init__(self, inner: SlideFetcher, barrier: threading.Barrier) -> None:
        self.inner = inner
        self.barrier = barrier
        self.calls = 0

    @property
    def slide_size(self):
        return self.inner.slide_size

    def fetch(self, squares, size):
        self.barrier.wait()
        self.calls += 1
        return self.inner.fetch(squares, size)


def test_the_slides_of_a_batch_are_read_at_the_same_time():
    model = micro_magnet().eval()
    barrier = threading.Barrier(2, timeout=TIMEOUT)
    images = [tissue_image(600, 500, seed=1), tissue_image(500, 600, seed=2)]
    fetchers = [BarrierFetcher(SlideFetcher(ArraySource(img), serial=True), barrier) for img in images]
    with torch.inference_mode():
        out = model(fetchers)
        plain = model([SlideFetcher(ArraySource(img), serial=True) for img in images])
    assert all(f.calls >= model.config.num_layers for f in fetchers)  # every layer's reads met at the barrier
    assert torch.equal(out.probs, plain.probs)
