"""Part `peak`: the device's achievable dense FLOP/s, the reference for the relaxation's
efficiency: a large matmul and a 3x3 convolution coupling (float32 and bfloat16)."""
from __future__ import annotations

import torch

from eqprop.couplings import ConvCoupling

from .common import timed


def best(repeats: int, device, fn, *args) -> tuple[float, float]:
    """(wall, CPU) seconds of fn(*args), each the minimum over repeats + 2 calls after one warm-up."""
    fn(*args)
    ts = [timed(fn, *args, device=device) for _ in range(repeats + 2)]
    return min(w for w, _ in ts), min(c for _, c in ts)


def part_peak(device, repeats: int, quick: bool = False) -> dict:
    """Achievable dense FLOP/s: matmul 8192^2 (2048^2 on CPU) and a 3x3 conv 128->256 at 16x16
    on a batch of 256 (64 on CPU); `quick`: matmul 256^2 and a batch of 4 (a smoke test)."""
    out = {}
    cpu = torch.device(device).type == "cpu"
    n = 256 if quick else 2048 if cpu else 8192
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype)[6:]
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        t, c = best(repeats, device, torch.matmul, a, b)
        out[f"matmul_{name}"] = {"size": n, "seconds": t, "gflops": 2 * n ** 3 / t / 1e9,
                                 "gflop_per_cpu_s": 2 * n ** 3 / c / 1e9}
        nb = 4 if quick else 64 if cpu else 256
        x = torch.randn(nb, 128, 16, 16, device=device, dtype=dtype)
        conv = ConvCoupling(128, 256, bias=False).to(device=device, dtype=dtype)
        flops = 2 * nb * conv.macs((128, 16, 16))
        for layout in ("nchw", "channels_last"):
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
                conv = conv.to(memory_format=torch.channels_last)
            with torch.no_grad():
                t, c = best(repeats, device, conv.linear_map, x)
            out[f"conv_{name}_{layout}"] = {"batch": nb, "seconds": t, "gflops": flops / t / 1e9,
                                            "gflop_per_cpu_s": flops / c / 1e9}
    return out


def reference_peaks(peak: dict) -> tuple[dict, dict]:
    """(best GFLOP/s, best GFLOP per CPU-second) per dtype over the kernels of `part_peak`."""
    dtypes = ("float32", "bfloat16")
    return ({d: max(v["gflops"] for k, v in peak.items() if d in k) for d in dtypes},
            {d: max(v["gflop_per_cpu_s"] for k, v in peak.items() if d in k) for d in dtypes})
