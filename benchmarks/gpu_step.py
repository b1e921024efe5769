"""One training step of ``magnet4_inception_v3`` (batch 8) on a GPU: step time and peak memory under AMP.

The paper trained the 4-layer MagNet with batch 8 on a 24 GB card. This script measures, on whatever
CUDA device is present:

1. **Training step** through the product's one training loop (``magnet_zoo.train.fit``, recipe
   ``paper``: forward with the auxiliary heads, the paper's loss, backward, Adam step) of a
   batch of ``--batch`` in-memory slides under AMP (bf16 by default): median step time, the share of
   it spent reading regions (the fetchers are timed), and peak GPU memory (allocated and reserved).
   Measured twice: plain, and with activation checkpointing of the timm backbones
   (:func:`magnet_zoo.train.set_activation_checkpointing`), to show what checkpointing buys.
2. **CPU vs CUDA agreement** of the forward pass (eval mode, fp32, same weights, same slides): the
   largest difference of the probabilities and logits, and whether the ROI trees agree; also bf16
   autocast against fp32 on the GPU.

Slides are generated in memory (:class:`~magnet_zoo.ArraySource`): no files, no downloads (backbones
are built without ImageNet weights). Results go to ``benchmarks/results/gpu_step.json`` with the
device's name. Without CUDA it prints that it skipped (``--device cpu`` runs it anyway, for a smoke
test of the script with a small ``--model``).

    python benchmarks/gpu_step.py --quick      # < 3 minutes on an H100
    python benchmarks/gpu_step.py              # more steps, larger slides
    python benchmarks/gpu_step.py --device cpu --model magnet2_tiny --quick --batch 2   # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info  # noqa: E402

from magnet_zoo import create_model  # noqa: E402
from magnet_zoo.nn.fetcher import Fetched, Square  # noqa: E402
from magnet_zoo.train import set_activation_checkpointing  # noqa: E402
from magnet_zoo.wsi import ArraySource, SlideFetcher  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- in-memory slides
def synthetic_slide(side: int, seed: int) -> ArraySource:
    """An H&E-coloured slide: two tissue ellipses with nucleus-like dark dots on light glass."""
    rng = np.random.default_rng(seed)
    coarse = side // 8
    yy, xx = np.mgrid[0:coarse, 0:coarse].astype(np.float32) / coarse
    mask = np.zeros((coarse, coarse), bool)
    for _ in range(2):
        cy, cx = rng.uniform(0.3, 0.7, 2)
        ry, rx = rng.uniform(0.15, 0.3, 2)
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    stroma = np.array([225, 150, 190], np.float32)
    nuclei = np.array([95, 60, 140], np.float32)
    density = rng.random((coarse, coarse)) < 0.08
    colour = np.where(density[..., None], nuclei, stroma) + rng.normal(0, 12, (coarse, coarse, 3))
    small = np.where(mask[..., None], colour, np.array([243, 242, 245], np.float32))
    image = np.repeat(np.repeat(np.clip(small, 0, 255).astype(np.uint8), 8, axis=0), 8, axis=1)
    return ArraySource(image, name=f"synthetic-{seed}")


class TimedFetcher:
    """A fetcher that adds the seconds its reads take to a shared counter."""

    def __init__(self, inner: SlideFetcher, clock: list[float]) -> None:
        self.inner = inner
        self.clock = clock

    @property
    def slide_size(self) -> tuple[int, int]:
        return self.inner.slide_size

    def fetch(self, squares: Sequence[Square], size: int) -> Fetched:
        start = time.perf_counter()
        out = self.inner.fetch(squares, size)
        self.clock[0] += time.perf_counter() - start
        return out


# --------------------------------------------------------------------------- measurements
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(
    model: torch.nn.Module,
    sources: Sequence[ArraySource],
    device: torch.device,
    *,
    amp: torch.dtype | None,
    warmup: int,
    steps: int,
    checkpointing: bool,
) -> dict[str, Any]:
    """Time ``steps`` training steps after ``warmup`` ones, through the product's training loop
    (:func:`magnet_zoo.train.fit`, recipe ``paper``: Adam 3e-5, the three losses, batch = the slides);
    peak memory over the measured steps. A step's time runs from the end of the previous step to its own
    end (reads, forward, backward, optimiser step)."""
    from magnet_zoo.train import SourceData, TrainConfig, fit, get_recipe

    set_activation_checkpointing(model, checkpointing)
    clock = [0.0]
    data = SourceData(sources, [i % 2 for i in range(len(sources))], wrap=lambda f: TimedFetcher(f, clock))
    times: list[float] = []
    reads: list[float] = []
    losses: list[float] = []
    last = [time.perf_counter()]

    def on_step(loop: Any, record: dict[str, Any]) -> None:
        _sync(device)
        now = time.perf_counter()
        if record["step"] > warmup:
            times.append(now - last[0])
            reads.append(clock[0])
        losses.append(record["loss"])
        if record["step"] == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        clock[0] = 0.0
        last[0] = time.perf_counter()

    amp_name = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "off"}[amp]
    config = TrainConfig(model="gpu_step", steps=warmup + steps, device=str(device), amp=amp_name, baseline_eval=False,
                         save_every=0, log_every=0, progress=False, tensorboard=False)
    recipe = get_recipe("paper", batch_size=len(sources), augment=False)
    fit(model, data, config, recipe, callbacks=[on_step])
    result: dict[str, Any] = {
        "activation_checkpointing": checkpointing,
        "step_seconds_median": statistics.median(times),
        "step_seconds": times,
        "read_seconds_median": statistics.median(reads),
        "loss_finite": all(math.isfinite(v) for v in losses),
        "loop": "magnet_zoo.train.fit",
    }
    if device.type == "cuda":
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return result


def agreement(name: str, sources: Sequence[ArraySource], device: torch.device) -> dict[str, Any]:
    """Eval-mode forward on the CPU and on ``device`` (fp32, then bf16 autocast) with the same weights."""
    torch.manual_seed(0)
    model = create_model(name, backbone_pretrained=False, attention_init="random").eval()
    with torch.inference_mode():
        cpu = model([SlideFetcher(s) for s in sources])
        model.to(device)
        gpu = model([SlideFetcher(s) for s in sources])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            half = model([SlideFetcher(s) for s in sources])
    same_levels = all(
        [n.level for n in a] == [n.level for n in b] for a, b in zip(cpu.trees, gpu.trees, strict=True)
    )
    box_diff = max(
        abs(x - y) / max(nb.box[2], 1.0)
        for ta, tb in zip(cpu.trees, gpu.trees, strict=True)
        for na, nb in zip(ta, tb, strict=True)
        for x, y in zip(na.box, nb.box, strict=True)
    )
    return {
        "slides": len(sources),
        "max_abs_prob_diff_fp32": float((cpu.probs - gpu.probs.cpu()).abs().max()),
        "max_abs_logit_diff_fp32": float((cpu.logits - gpu.logits.float().cpu()).abs().max()),
        "max_rel_box_diff_fp32": float(box_diff),
        "same_levels_fp32": same_levels,
        "max_abs_prob_diff_bf16_vs_fp32": float((half.probs.float() - gpu.probs).abs().max()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 warm-up + 3 measured steps, 4096-px slides")
    parser.add_argument("--model", default="magnet4_inception_v3")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "off"))
    parser.add_argument("--side", type=int, default=None, help="slide side in pixels (default 8192, quick 4096)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke test")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="CPU vs CUDA probability tolerance")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu_step[_quick].json)")
    args = parser.parse_args(argv)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_step: CUDA is not available on this machine; skipped (nothing written).")
        return 0
    device = torch.device(args.device)
    side = args.side or (4096 if args.quick else 8192)
    warmup, steps = (1, 3) if args.quick else (2, 8)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[args.amp] if device.type == "cuda" else None
    started = time.perf_counter()
    sources = [synthetic_slide(side, seed) for seed in range(args.batch)]
    print(f"{args.batch} in-memory slides of {side}x{side} px made in {time.perf_counter() - started:.1f} s")

    torch.manual_seed(0)
    model = create_model(args.model, backbone_pretrained=False).to(device)
    runs = []
    for checkpointing in (False, True):
        run = train_steps(model, sources, device, amp=amp, warmup=warmup, steps=steps, checkpointing=checkpointing)
        runs.append(run)
        mem = f", peak {run['peak_allocated_gib']:.2f} GiB allocated" if "peak_allocated_gib" in run else ""
        print(
            f"train step ({'checkpointing' if checkpointing else 'plain'}): {run['step_seconds_median']:.3f} s "
            f"(reads {run['read_seconds_median']:.3f} s){mem}"
        )
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    agree = agreement(args.model, sources[:2], device)
    agree["tolerance"] = args.tolerance
    agree["within_tolerance"] = agree["max_abs_prob_diff_fp32"] <= args.tolerance
    print(
        f"CPU vs {device.type}: |dp| {agree['max_abs_prob_diff_fp32']:.2e} (tolerance {args.tolerance:g}, "
        f"{'ok' if agree['within_tolerance'] else 'EXCEEDED'}), |dlogit| {agree['max_abs_logit_diff_fp32']:.2e}, "
        f"boxes {agree['max_rel_box_diff_fp32']:.2e}, levels equal {agree['same_levels_fp32']}; "
        f"bf16 vs fp32 |dp| {agree['max_abs_prob_diff_bf16_vs_fp32']:.2e}"
    )
    plain, ckpt = runs
    verdict = None
    if "peak_allocated_gib" in plain:
        saved = plain["peak_allocated_gib"] - ckpt["peak_allocated_gib"]
        slower = ckpt["step_seconds_median"] / plain["step_seconds_median"] - 1
        verdict = f"activation checkpointing saves {saved:.2f} GiB peak for {100 * slower:+.0f}% step time"
        print(verdict)
    result = {
        "benchmark": "gpu_step",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "machine": machine_info(),
        "settings": {
            "model": args.model,
            "batch": args.batch,
            "amp": str(amp) if amp is not None else "off",
            "slide_side": side,
            "warmup_steps": warmup,
            "measured_steps": steps,
            "quick": args.quick,
        },
        "train_step": runs,
        "checkpointing_verdict": verdict,
        "agreement": agree,
        "seconds_total": time.perf_counter() - started,
    }
    out = Path(args.out) if args.out else RESULTS / f"gpu_step{'_quick' if args.quick else ''}.json"
    if device.type != "cuda" and not args.out:
        out = RESULTS / "gpu_step_cpu_smoke.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} ({result['seconds_total']:.0f} s in all)")
    return 0 if agree["within_tolerance"] and all(r["loss_finite"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
