from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Idle OpenMP threads spin by default; on a small shared CPU that makes PyTorch 5-20x slower at random.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

WSI_DIR = Path(
    os.environ.get("MAGNET_ZOO_WSI_DIR") or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wsi"
)
"""The real slides (beside the project in ../shared/data/wsi); ``MAGNET_ZOO_WSI_DIR`` points elsewhere."""
REQUIRE_SHARED = os.environ.get("CI_REQUIRE_SHARED") == "1"
"""``CI_REQUIRE_SHARED=1`` (CI): a test that needs the real slides fails instead of skipping."""
REAL_PYRAMID = "CMU-1-Small-Region_pyramid.tiff"


def _missing_real_slides(what: str) -> None:
    message = f"{what} not found at {WSI_DIR} (the real slides live beside the project in ../shared/data/wsi)"
    if REQUIRE_SHARED:
        pytest.fail(f"{message}; CI_REQUIRE_SHARED=1 requires them", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def wsi_dir() -> Path:
    """The real slides, for tests that need a real vendor format (.svs); skips without them, or fails
    under ``CI_REQUIRE_SHARED=1``. Tests that only need *a* pyramidal TIFF use :func:`pyramid`."""
    if not WSI_DIR.is_dir():
        _missing_real_slides("real slides")
    return WSI_DIR


@dataclass(frozen=True)
class Pyramid:
    """A pyramidal TIFF every backend reads, and what its geometry must be."""

    path: Path
    level_dimensions: tuple[tuple[int, int], ...]
    mpp: float
    real: bool

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]


def write_jpeg_pyramid(path: Path, image: np.ndarray, levels: int, *, mpp: float = 0.5, tile: int = 64) -> Path:
    """A small tiled JPEG pyramid: each level its own top-level page (reduced-resolution from level 1), as
    OpenSlide's generic-TIFF reader wants; levels by 2 x 2 area averaging, sides rounded up."""
    import tifffile

    pages = [image]
    for _ in range(levels - 1):
        prev = pages[-1].astype(np.float32)
        h, w = prev.shape[:2]
        padded = np.pad(prev, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        pages.append(padded.reshape((h + 1) // 2, 2, (w + 1) // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8))
    with tifffile.TiffWriter(path) as tw:
        for level, page in enumerate(pages):
            level_mpp = mpp * image.shape[1] / page.shape[1]
            tw.write(page, tile=(tile, tile), compression="jpeg", photometric="rgb", subfiletype=int(level > 0),
                     resolution=(1e4 / level_mpp, 1e4 / level_mpp), resolutionunit="CENTIMETER", metadata=None)
    return path


@pytest.fixture(scope="session")
def pyramid(tmp_path_factory) -> Pyramid:
    """The real JPEG pyramid of ../shared when it is there; otherwise a generated one of the same kind
    (tiled JPEG, 4 levels, non-integer downsamples), so these tests run everywhere. Under
    ``CI_REQUIRE_SHARED=1`` a missing real slide is a failure."""
    real = WSI_DIR / REAL_PYRAMID
    if real.is_file():
        dims = ((2220, 2967), (1110, 1483), (555, 741), (277, 370))
        return Pyramid(real, dims, 0.499, True)
    if REQUIRE_SHARED:
        _missing_real_slides(REAL_PYRAMID)
    path = write_jpeg_pyramid(tmp_path_factory.mktemp("pyramid") / "generated_pyramid.tiff",
                              tissue_image(1483, 1111, seed=7), 4)
    return Pyramid(path, ((1111, 1483), (556, 742), (278, 371), (139, 186)), 0.5, False)


def tissue_image(h: int = 1200, w: int = 900, seed: int = 0) -> np.ndarray:
    """A pinkish textured 'tissue' blob on a white background: survives the grey filter."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 245, dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    blob = ((yy - h * 0.55) / (h * 0.35)) ** 2 + ((xx - w * 0.45) / (w * 0.35)) ** 2 < 1
    noise = rng.integers(0, 60, size=(h, w, 1))
    tissue = np.concatenate([200 - noise, 120 - noise // 2, 170 - noise // 3], axis=-1).clip(0, 255)
    img[blob] = tissue[blob].astype(np.uint8)
    return img


def micro_magnet(**overrides):
    """``magnet2_micro`` (its test_resnet heads, the learn-to-look attention settings) as a (2, 2) tree, made
    smaller for fast tests: 32 px final patches, an 8-unit GRU and MLP; seeded, so every call is the same. Two
    first-layer patches (the registered tree has one) so that the tests see several maps per layer."""
    from magnet_zoo.factory import create_model

    torch.manual_seed(0)
    settings = {"patches": (2, 2), "final_patch_size": 32, "gru_hidden": 8, "mlp_hidden": (8,)}
    return create_model("magnet2_micro", **{**settings, **overrides})
