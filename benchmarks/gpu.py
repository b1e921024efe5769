"""GPU evidence in one command: what only a CUDA device can show, prepared to run first when one is lent.

One run, at most ~8 minutes on an H100/H200, no downloads (backbones ``backbone_pretrained=False``), its
own slides generated on the device's machine:

1. **Agreement**: one eval-mode forward of ``magnet3_inception_v3`` on the CPU and on CUDA, same weights
   and slides: the largest difference of the logits and of the attention's gradient (a training-mode
   backward of the classifier loss with respect to every attention stack's weights), and whether the
   ROI trees agree.
2. **Training steps through the product's one loop** (``magnet_zoo.train.fit``, recipe ``paper``) under
   AMP bf16: ``magnet3_inception_v3`` at batch 16 and ``magnet4_inception_v3`` at batch 8 (the paper's
   24 GB constraint), real 224 px InceptionV3 / ResNet-18, with and without activation checkpointing:
   seconds per step and ``torch.cuda.max_memory_allocated``.
3. **Inference throughput** on generated 100,000 x 100,000 SynthMets slides (pyramidal TIFF, read by
   OpenSlide; a layer's reads run concurrently): slides per second, the read and compute split.
4. **A short SynthMets training run** (``benchmarks/synthmets.py --methods magnet --device cuda``, the
   recommended recipe, about 4 minutes): test AUROC and optimiser steps per second.

Writes ``benchmarks/results/gpu.json`` with the device's name, torch and CUDA versions and every figure.
``--dry-run`` runs the same code, tiny, on the CPU (a CI test): ``magnet2_micro``, batch 2, small slides.

    python benchmarks/gpu.py             # on a CUDA machine
    python benchmarks/gpu.py --dry-run   # anywhere, ~1 minute
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _machine import machine_info  # noqa: E402
from gpu_step import TimedFetcher, agreement, synthetic_slide, train_steps  # noqa: E402

from magnet_zoo import create_model  # noqa: E402
from magnet_zoo.synth import generate_slide  # noqa: E402
from magnet_zoo.wsi import SlideFetcher, open_slide  # noqa: E402

RESULTS = HERE / "results"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attention_gradient_agreement(name: str, sources: list, device: torch.device, **overrides: Any) -> dict[str, Any]:
    """Training-mode classifier loss, backward: the attention stacks' gradients on the CPU and on ``device``
    (``overrides``: network settings for ``name``)."""
    torch.manual_seed(0)
    model = create_model(name, backbone_pretrained=False, attention_init="random", **overrides)
    labels = torch.tensor([float(i % 2) for i in range(len(sources))])
    grads = []
    for where in (torch.device("cpu"), device):
        model.to(where).train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        out = model([SlideFetcher(s) for s in sources])
        torch.nn.functional.binary_cross_entropy_with_logits(out.logits.float(), labels.to(where)).backward()
        grads.append({k: p.grad.detach().float().cpu().clone() for k, p in model.layers.named_parameters()
                      if p.grad is not None})
    cpu, dev = grads
    diff = max((cpu[k] - dev[k]).abs().max().item() for k in cpu)
    scale = max(cpu[k].abs().max().item() for k in cpu)
    return {"max_abs_attention_grad_diff": diff, "max_abs_attention_grad": scale,
            "relative": diff / scale if scale else 0.0}


def inference_throughput(name: str, paths: list[Path], device: torch.device, runs: int) -> dict[str, Any]:
    """Per-slide time of ``name`` on ``device`` (bf16 autocast on CUDA), reads timed separately."""
    torch.manual_seed(0)
    model = create_model(name, backbone_pretrained=False, attention_init="random").to(device).eval()
    amp = device.type == "cuda"
    times, reads = [], []
    for path in paths:
        with open_slide(path) as src:
            for i in range(runs + 1):
                clock = [0.0]
                _sync(device)
                start = time.perf_counter()
                with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    out = model([TimedFetcher(SlideFetcher(src), clock)])
                    float(out.probs[0])
                _sync(device)
                if i:  # the first pass per slide sets up kernels and caches
                    times.append(time.perf_counter() - start)
                    reads.append(clock[0])
    median = statistics.median(times)
    return {"model": name, "slides": len(paths), "runs_per_slide": runs, "seconds_per_slide_median": median,
            "slides_per_second": 1.0 / median, "read_seconds_median": statistics.median(reads),
            "compute_seconds_median": median - statistics.median(reads), "amp": "bf16" if amp else "off"}


def synthmets_run(device: str, dry: bool, out: Path) -> dict[str, Any]:
    """``benchmarks/synthmets.py`` for the MagNet alone on ``device``; returns its summary."""
    args = ["--size", "2048" if dry else "8192", "--n-train", "4" if dry else "60", "--n-val", "2" if dry else "20",
            "--n-test", "2" if dry else "40", "--n-large", "0", "--budget-min", "0.1" if dry else "4",
            "--magnet-model", "magnet2_micro", "--methods", "magnet", "--device", device, "--val-every", "5",
            "--data", str(out.parent / "synthmets_data"), "--out", str(out), "--no-progress"]
    started = time.perf_counter()
    subprocess.run([sys.executable, str(HERE / "synthmets.py"), *args], check=True, timeout=900)
    doc = json.loads(out.read_text())
    magnet = doc["methods"]["magnet"]
    training = magnet["training"]
    return {
        "command": "python benchmarks/synthmets.py " + " ".join(args),
        "test_auroc": magnet["summary"]["metrics"]["auroc"],
        "steps": training["steps"],
        "train_seconds": training["seconds"],
        "steps_per_second": training["steps"] / max(training["seconds"], 1e-9),
        "stopped_by": training["stopped_by"],
        "wall_seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="the same code, tiny, on the CPU")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/gpu.json)")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: agreement,train,infer,synthmets")
    args = ap.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu.py: CUDA is not available here; nothing measured (use --dry-run for the CPU smoke test)")
        return 0
    device = torch.device("cpu" if args.dry_run else "cuda")
    out = args.out or (RESULTS / ("gpu_dry_run.json" if args.dry_run else "gpu.json"))
    started = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "gpu",
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "machine": machine_info(),
    }
    big = "magnet2_micro" if args.dry_run else "magnet3_inception_v3"
    side = 1024 if args.dry_run else 8192
    if "agreement" not in skip:
        sources = [synthetic_slide(side, seed) for seed in range(2)]
        # The dry run's (2, 2) tree: magnet2_micro's own (1, 2) tree, randomly initialised and cropping from the
        # view, gets an all-zero attention gradient from the classifier loss on these two 1024 px slides
        # (measured; with crop_source="reread" or a flat init it gets one), which leaves nothing to compare.
        grad_overrides = {"patches": (2, 2)} if args.dry_run else {}
        result["agreement"] = {**agreement(big, sources, device),
                               **attention_gradient_agreement(big, sources, device, **grad_overrides)}
        print("agreement:", json.dumps(result["agreement"]))
    if "train" not in skip:
        plans = [("magnet2_micro", 2)] if args.dry_run else [("magnet3_inception_v3", 16), ("magnet4_inception_v3", 8)]
        warmup, steps = (1, 2) if args.dry_run else (2, 5)
        rows = []
        for name, batch in plans:
            sources = [synthetic_slide(side, seed) for seed in range(batch)]
            for checkpointing in (False, True):
                torch.manual_seed(0)
                model = create_model(name, backbone_pretrained=False)
                run = train_steps(model, sources, device, amp=torch.bfloat16 if device.type == "cuda" else None,
                                  warmup=warmup, steps=steps, checkpointing=checkpointing)
                rows.append({"model": name, "batch": batch, **run})
                mem = f", peak {run['peak_allocated_gib']:.2f} GiB" if "peak_allocated_gib" in run else ""
                print(f"train {name} batch {batch} checkpointing={checkpointing}: "
                      f"{run['step_seconds_median']:.3f} s/step{mem}")
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        result["train_steps"] = rows
    if "infer" not in skip:
        with tempfile.TemporaryDirectory() as tmp:
            size = 4096 if args.dry_run else 100_000
            paths = []
            for i, category in enumerate(("macro", "normal")):
                path = Path(tmp) / f"slide{i}.tif"
                generate_slide(path, size=size, category=category, seed=i, workers=None)
                paths.append(path)
            names = ["magnet2_micro"] if args.dry_run else ["magnet3_inception_v3", "magnet4_inception_v3"]
            result["inference"] = [inference_throughput(n, paths, device, 2 if args.dry_run else 5) for n in names]
            result["inference_slide_side"] = size
        for row in result["inference"]:
            print(f"infer {row['model']}: {row['slides_per_second']:.2f} slides/s "
                  f"(read {row['read_seconds_median']:.3f} s, compute {row['compute_seconds_median']:.3f} s)")
    if "synthmets" not in skip:
        with tempfile.TemporaryDirectory() as tmp:
            result["synthmets"] = synthmets_run(device.type, args.dry_run, Path(tmp) / "synthmets_gpu.json")
        print("synthmets:", json.dumps(result["synthmets"]))
    result["seconds_total"] = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} ({result['seconds_total']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
