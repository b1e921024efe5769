from __future__ import annotations

import os
from pathlib import Path

# Idle OpenMP threads spin by default; on a small shared CPU that makes PyTorch 5-20x slower at random.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

WSI_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wsi"


@pytest.fixture(scope="session")
def wsi_dir() -> Path:
    if not WSI_DIR.is_dir():
        pytest.skip(f"real slides not found at {WSI_DIR} (they live beside the project in ../shared/data/wsi)")
    return WSI_DIR


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
    """``magnet2_micro`` (its test_resnet heads, (2, 2) patches, the learn-to-look attention settings) made
    smaller for fast tests: 32 px final patches, an 8-unit GRU and MLP; seeded, so every call is the same."""
    from magnet_zoo.factory import create_model

    torch.manual_seed(0)
    return create_model("magnet2_micro", **{"final_patch_size": 32, "gru_hidden": 8, "mlp_hidden": (8,), **overrides})
