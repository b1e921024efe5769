"""What only a GPU can show: CUDA correctness, GPU inference throughput, and the sampler's cost there.

1. CPU vs CUDA agreement of the forward pass (same weights, same slide): logits and the ROI tree.
2. Per-slide inference time of ``magnet3_inception_v3`` and ``magnet4_inception_v3`` on CUDA (fp32 and
   bf16 autocast), batch of 8 in-memory slides, reads included.
3. Linearized multi-sampling vs bilinear, forward + backward, at 56 (from 112) and 224 (from 448).

Runs only where CUDA is present (prints that it skipped elsewhere). In-memory slides only: no files.
The training step (AMP, peak memory) is ``benchmarks/gpu_step.py``.

    python benchmarks/gpu_check.py [--quick] [--out benchmarks/results/gpu_check.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info  # noqa: E402

import magnet_zoo  # noqa: E402
from magnet_zoo.nn.sampler import sample  # noqa: E402
from magnet_zoo.wsi import ArraySource, SlideFetcher  # noqa: E402


def tissue_slide(side: int, seed: int) -> ArraySource:
    """A textured pink/purple blob on white glass, ``side`` pixels square, with a pyramid."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (side // 16, side // 16, 3), dtype=np.uint8)
    img = np.kron(small, np.ones((16, 16, 1), np.uint8))
    yy, xx = np.mgrid[0:side, 0:side]
    blob = ((yy - side * 0.5) / (side * 0.4)) ** 2 + ((xx - side * 0.45) / (side * 0.3)) ** 2 < 1
    img[~blob] = 245
    img[blob] = (img[blob] // 3 + np.array([150, 60, 110], np.uint8)).astype(np.uint8)
    return ArraySource(img, name=f"tissue-{seed}")


def sync() -> None:
    torch.cuda.synchronize()


def check_agreement(sources) -> dict:
    torch.manual_seed(0)
    model = magnet_zoo.create_model("magnet3_inception_v3", backbone_pretrained=False, attention_init="random").eval()
    with torch.inference_mode():
        cpu = model([SlideFetcher(s) for s in sources[:2]])
        model.cuda()
        gpu = model([SlideFetcher(s) for s in sources[:2]])
    logit_diff = float((cpu.logits - gpu.logits.cpu()).abs().max())
    box_diff = max(
        abs(a - b) / max(nb.box[2], 1.0)
        for ta, tb in zip(cpu.trees, gpu.trees, strict=True)
        for na, nb in zip(ta, tb, strict=True)
        for a, b in zip(na.box, nb.box, strict=True)
    )
    same_levels = all(
        na.level == nb.level for ta, tb in zip(cpu.trees, gpu.trees, strict=True) for na, nb in zip(ta, tb, strict=True)
    )
    return {
        "max_abs_logit_diff": logit_diff,
        "max_box_diff_relative": box_diff,
        "same_levels": same_levels,
        "ok": logit_diff < 1e-3 and box_diff < 1e-3 and same_levels,
    }


def bench_inference(name: str, sources, runs: int) -> dict:
    torch.manual_seed(0)
    model = magnet_zoo.create_model(name, backbone_pretrained=False, attention_init="random").cuda().eval()
    out = {"model": name, "batch": len(sources)}
    for mode in ("fp32", "bf16"):
        times = []
        for i in range(runs + 1):
            sync()
            t = time.perf_counter()
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "bf16"):
                model([SlideFetcher(s) for s in sources])
            sync()
            if i:
                times.append(time.perf_counter() - t)
        out[f"{mode}_seconds_per_slide"] = statistics.median(times) / len(sources)
    return out


def bench_sampler(repeats: int) -> list[dict]:
    rows = []
    for name, batch, src, size in (("56 from 112", 64 * 8, 112, 56), ("224 from 448", 18 * 8, 448, 224)):
        image = torch.rand(batch, 3, src, src, device="cuda")
        theta = torch.tensor([[0.4, 0.0, 0.1], [0.0, 0.4, -0.2]], device="cuda").repeat(batch, 1, 1)
        row = {"name": name, "batch": batch}
        for mode in ("bilinear", "linearized"):
            times = []
            for i in range(repeats + 2):
                th = theta.clone().requires_grad_(True)
                sync()
                t = time.perf_counter()
                sample(image, th, size, mode=mode).square().mean().backward()
                sync()
                if i >= 2:
                    times.append(time.perf_counter() - t)
            row[f"{mode}_ms"] = statistics.median(times) * 1000
        row["ratio"] = row["linearized_ms"] / row["bilinear_ms"]
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu_check.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; skipped")
        return 0
    side = 4096 if args.quick else 16384
    sources = [tissue_slide(side, seed) for seed in range(8)]
    result = {"benchmark": "gpu_check", "device": torch.cuda.get_device_name(0), "slide_side": side}
    result["agreement"] = check_agreement(sources)
    print("CPU vs CUDA:", result["agreement"])
    runs = 2 if args.quick else 5
    result["inference"] = [bench_inference(n, sources, runs) for n in ("magnet3_inception_v3", "magnet4_inception_v3")]
    for row in result["inference"]:
        print(f"{row['model']:<24} fp32 {row['fp32_seconds_per_slide'] * 1000:7.1f} ms/slide   "
              f"bf16 {row['bf16_seconds_per_slide'] * 1000:7.1f} ms/slide   (batch {row['batch']}, reads included)")
    result["sampler"] = bench_sampler(5 if args.quick else 20)
    for row in result["sampler"]:
        print(f"sampler {row['name']:<14} bilinear {row['bilinear_ms']:6.2f} ms  "
              f"linearized {row['linearized_ms']:6.2f} ms  ratio {row['ratio']:.2f} (batch {row['batch']}, fwd+bwd)")
    result["machine"] = machine_info()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0 if result["agreement"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
