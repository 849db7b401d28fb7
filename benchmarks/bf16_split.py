"""Can bfloat16 convolutions be made as accurate as float32 ones and still be faster, on this CPU?

One 3D convolution of a U-Net's first stage (32 -> 32 channels, 3 x 3 x 3, a 64 x 96 x 96 input of post-activation
values), channels-last, in each way below; for each: seconds (median of --repeats after one warm-up), and the
largest and root-mean-square error against the same convolution in float64.

  fp32            float32 (oneDNN's float32 kernels: what both voxseg's default and nnU-Net run)
  bf16            bfloat16 input and weights (AMX); the output is bfloat16 too (PyTorch's rule)
  bf16-split2     input split into bfloat16 high and low parts, one convolution over both (2x the work)
  bf16-split3     input and weights split: x_hi*w_hi + x_lo*w_hi + x_hi*w_lo in one convolution (3x the work)
  fpmath-bf16     float32 tensors, oneDNN told to compute in bfloat16 (torch.backends.mkldnn.conv.fp32_precision);
                  the output stays float32
  fpmath-split3   the three-part split with float32 output (fpmath bf16)
  fp16            float16 input and weights (AVX512-FP16 where the CPU has it)

Run: python benchmarks/bf16_split.py [--threads 2] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

CL = torch.channels_last_3d


def _time(run: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        out = run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    high = t.bfloat16()
    return high, (t - high.float()).bfloat16()


def variants(x: torch.Tensor, w: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    xc, wc = x.contiguous(memory_format=CL), w.contiguous(memory_format=CL)
    x_hi, x_lo = _split(xc)
    w_hi, w_lo = _split(w)
    two_x = torch.cat([x_hi, x_lo], 1).contiguous(memory_format=CL)
    two_w = torch.cat([w_hi, w_hi], 1).contiguous(memory_format=CL)
    three_x = torch.cat([x_hi, x_lo, x_hi], 1).contiguous(memory_format=CL)
    three_w = torch.cat([w_hi, w_hi, w_lo], 1).contiguous(memory_format=CL)
    three_x32, three_w32 = three_x.float().contiguous(memory_format=CL), three_w.float().contiguous(memory_format=CL)
    x16, w16 = xc.half(), wc.half()
    return {
        "fp32": lambda: F.conv3d(xc, wc, padding=1),
        "bf16": lambda: F.conv3d(x_hi, w_hi.contiguous(memory_format=CL), padding=1),
        "bf16-split2": lambda: F.conv3d(two_x, two_w, padding=1),
        "bf16-split3": lambda: F.conv3d(three_x, three_w, padding=1),
        "fpmath-bf16": lambda: F.conv3d(xc, wc, padding=1),
        "fpmath-split3": lambda: F.conv3d(three_x32, three_w32, padding=1),
        "fp16": lambda: F.conv3d(x16, w16, padding=1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(1, 32, 64, 96, 96).clamp_min(0)  # after a ReLU-like activation
    w = torch.randn(32, 32, 3, 3, 3) * (2.0 / (27 * 32)) ** 0.5
    reference = F.conv3d(x.double(), w.double(), padding=1)
    scale = reference.pow(2).mean().sqrt().item()
    print(f"conv3d 32->32, 3x3x3, input 64x96x96, channels-last, {args.threads} threads; output rms {scale:.3g}")
    base = None
    for name, run in variants(x, w).items():
        fpmath = name.startswith("fpmath")
        torch.backends.mkldnn.conv.fp32_precision = "bf16" if fpmath else "none"
        try:
            seconds, out = _time(run, args.repeats)
        finally:
            torch.backends.mkldnn.conv.fp32_precision = "none"
        error = (out.double() - reference).abs()
        base = base or seconds
        print(f"{name:14s} {seconds:7.3f} s  x{seconds / base:5.2f}  max err {error.max().item():.2e}  "
              f"rms err {error.pow(2).mean().sqrt().item() / scale:.2e} of the output's rms", flush=True)


if __name__ == "__main__":
    main()
