"""Fixed-frame geometry (``geometry="frame"``, DESIGN.md section 6 item 2): the same forward pass as the
paper's re-read geometry, and a derivative with respect to an ancestor's crop that agrees with finite
differences of the real forward, re-reads included."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import micro_magnet

from magnet_zoo import ArraySource
from magnet_zoo.config import ConfigError, MagNetConfig
from magnet_zoo.nn.attention import Affine
from magnet_zoo.nn.frames import Frames
from magnet_zoo.wsi.fetch import as_fetcher


def smooth_slide(side: int, seed: int) -> np.ndarray:
    """Coloured plane waves of 80-400 px wavelength: smooth at the scale of one read pixel, never grey."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    channels = []
    for lo, hi in ((150, 230), (40, 110), (90, 180)):
        f = np.zeros((side, side), np.float32)
        for _ in range(4):
            wl, ang, ph = rng.uniform(80, 400), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
            f += np.sin((xx * np.cos(ang) + yy * np.sin(ang)) * 2 * np.pi / wl + ph)
        f = (f - f.min()) / (f.max() - f.min())
        channels.append(lo + (hi - lo) * f)
    return np.stack(channels, -1).astype(np.uint8)


def fixed_crops(model, seed: int, delta: torch.Tensor) -> None:
    """Replace both layers' attention with fixed random crops; layer 1's translations are ``t + delta``.
    With layer 2 fixed, a final-patch loss depends on layer 1 only through the geometry."""
    rng = np.random.default_rng(seed)
    s1 = torch.tensor(rng.uniform(0.15, 0.35, (1, 1, 2)), dtype=torch.float32)
    t1 = torch.tensor(rng.uniform(-0.5, 0.5, (1, 1, 2, 2)), dtype=torch.float32)
    s2 = torch.tensor(rng.uniform(0.2, 0.5, (1, 2, 2)), dtype=torch.float32)
    t2 = torch.tensor(rng.uniform(-0.4, 0.4, (1, 2, 2, 2)), dtype=torch.float32)
    s2[:, :, 0], t2[:, :, 0] = 1.0, 0.0  # the frozen patch
    l1, l2 = model.layers

    def layer1(images, explore=None):
        t = t1 + delta
        return Affine(s1, t[..., 0], t[..., 1], torch.zeros(1, 1, 2, *images.shape[-2:]))

    def layer2(images, explore=None):
        return Affine(s2, t2[..., 0], t2[..., 1], torch.zeros(1, 2, 2, *images.shape[-2:]))

    l1.forward, l2.forward = layer1, layer2


def gradient_and_fd(geometry: str, seed: int, step: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """d loss / d (layer-1 tx, ty) by autograd and by central differences of the real forward."""
    model = micro_magnet(geometry=geometry, sampler="bilinear").eval()
    delta = torch.zeros(1, 1, 2, 2, requires_grad=True)
    fixed_crops(model, seed, delta)
    fetcher = as_fetcher(ArraySource(smooth_slide(2000, seed)))
    weights = torch.randn(1, 4, 3, 1, 1, generator=torch.Generator().manual_seed(seed))

    def loss() -> torch.Tensor:
        return (model([fetcher]).final_patches * weights).mean()

    value = loss()
    grad = torch.autograd.grad(value, delta)[0] if value.requires_grad else torch.zeros_like(delta)
    fd = torch.zeros_like(delta)
    with torch.no_grad():
        for idx in itertools.product(range(2), range(2)):
            at = (0, 0, *idx)
            delta[at] += step
            plus = loss()
            delta[at] -= 2 * step
            minus = loss()
            delta[at] += step
            fd[at] = (plus - minus) / (2 * step)
    return grad.flatten().numpy(), fd.flatten().numpy()


@pytest.mark.slow
def test_frame_gradient_matches_finite_differences_of_the_real_forward():
    pairs = [gradient_and_fd("frame", seed) for seed in range(4)]
    grad = np.concatenate([g for g, _ in pairs])
    fd = np.concatenate([f for _, f in pairs])
    assert np.abs(fd).max() > 1e-3, "the loss does not depend on layer 1's crop: the test is vacuous"
    assert np.corrcoef(grad, fd)[0, 1] > 0.9
    assert np.abs(grad - fd).sum() / np.abs(fd).sum() < 0.4
    # The paper's geometry gives the final patches no gradient to layer 1 at all (the re-read is a constant).
    grad_reread, fd_reread = gradient_and_fd("reread", 0)
    assert np.all(grad_reread == 0) and np.abs(fd_reread).max() > 1e-3


@pytest.mark.parametrize("crop_source", ["iprime", "reread"])
def test_frame_forward_equals_the_reread_forward(crop_source):
    slide = as_fetcher(ArraySource(smooth_slide(1500, 3)))
    outs = {}
    for geometry in ("reread", "frame"):
        model = micro_magnet(geometry=geometry, crop_source=crop_source).eval()
        with torch.no_grad():
            outs[geometry] = model([slide])
    a, b = outs["reread"], outs["frame"]
    for na, nb in zip(a.trees[0], b.trees[0], strict=True):
        assert na.name == nb.name and na.level == nb.level
        assert np.allclose(na.box, nb.box)
    diff = (a.final_patches - b.final_patches).abs()
    assert diff.mean() < 2e-3 and diff.max() < 0.03  # the margin's resampling only
    if crop_source == "reread":  # the inner views come from each frame's core, not its margin
        assert torch.allclose(a.crops[1], b.crops[1], atol=1e-6)
    assert torch.allclose(a.logits, b.logits, atol=1e-3)
    # The frames cost their margin in pixels read, and nothing else.
    assert b.accounting[0]["pixels_read"] > a.accounting[0]["pixels_read"]
    assert b.accounting[0]["values_fed"] == a.accounting[0]["values_fed"]


def test_root_frame_theta_is_the_affine_theta_and_children_compose():
    g = torch.Generator().manual_seed(0)
    affine = Affine(scale=torch.rand(2, 1, 3, generator=g) * 0.5 + 0.1, tx=torch.rand(2, 1, 3, generator=g) - 0.5,
                    ty=torch.rand(2, 1, 3, generator=g) - 0.5, probs=torch.zeros(2, 1, 3, 4, 4))
    root = Frames.root(2, torch.device("cpu"))
    assert torch.equal(root.theta(affine), affine.theta())
    kids = root.children(affine, grow=1.25)
    # A child's frame is its box grown by 1.25: its identity crop is the central 1/1.25 of the frame.
    ident = Affine(scale=torch.ones(2, 3, 1), tx=torch.zeros(2, 3, 1), ty=torch.zeros(2, 3, 1),
                   probs=torch.zeros(2, 3, 1, 4, 4))
    theta = kids.theta(ident)
    assert torch.allclose(theta[..., 0, 0], torch.full((2, 3, 1), 0.8))
    assert torch.allclose(theta[..., :, 2], torch.zeros(2, 3, 1, 2), atol=1e-6)
    # ... and the gradient of a grandchild's position reaches the parent's translation.
    tx = affine.tx.clone().requires_grad_(True)
    moved = Affine(affine.scale, tx, affine.ty, affine.probs)
    root.children(moved, 1.25).theta(ident)[..., 0, 2].sum().backward()
    # The child's centre moves with tx, in units of its frame's half-side (its scale times 1.25).
    assert torch.allclose(tx.grad, 1 / (affine.scale * 1.25))


def test_view_gradient_off_cuts_the_attention_input_path():
    slide = as_fetcher(ArraySource(smooth_slide(800, 1)))
    grads = {}
    for through in (True, False):
        model = micro_magnet(view_gradient=through, loss_auxiliary=False).train()
        out = model([slide, slide])
        out.logits.sum().backward()
        grads[through] = sum(p.grad.abs().sum().item() for p in model.layers[0].parameters() if p.grad is not None)
    assert grads[True] > 0
    assert grads[False] == 0  # reread geometry, no aux head: layer 1 is reached only through layer 2's view


@pytest.mark.parametrize("field,value", [("geometry", "warp"), ("frame_margin", -0.1), ("frame_margin", 1.5)])
def test_geometry_fields_are_validated(field, value):
    with pytest.raises(ConfigError, match=field):
        MagNetConfig(**{field: value})


def test_frame_margin_in_pixels():
    cfg = MagNetConfig(patches=(2, 2, 2), geometry="frame", frame_margin=0.125)
    assert cfg.frame_pixels(1) == 0
    assert cfg.frame_pixels(2) == round(0.125 * cfg.iprime_size(2))
    assert MagNetConfig(patches=(2, 2)).frame_pixels(2) == 0  # reread geometry reads no margin
