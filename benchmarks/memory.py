"""Part `memory`: peak memory of one training step, ep vs bptt (and id) at several T2.

On a CPU each case runs in a fresh process (`python -m benchmarks.memory CASE_JSON`) with glibc's
malloc told to serve every allocation above 64 KiB by mmap (MALLOC_MMAP_THRESHOLD_), so freed
tensors leave the resident set at once; after a warm-up step at T1 = T2 = 1 (Adam state,
kernel caches) the kernel's peak-RSS counter is reset (/proc/self/clear_refs) and the step's
peak is VmHWM minus the resident set before the step. On a GPU:
torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from .common import MODELS, batch, build, train_step, use_estimator, wall

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def memory_case(spec: dict) -> dict:
    """One memory measurement (run it in a fresh process: see the module doc)."""
    device = spec["device"]
    model = build(spec["model"], spec["div"], device, spec["estimator"], spec["T2"])
    x, y = batch(spec["batch"], device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    # Warm-up at T1 = T2 = 1: Adam state and kernel caches exist before the measured step.
    model.configure_blocks(T1=1)
    use_estimator(model, spec["estimator"], 1)
    train_step(model, opt, x, y)
    model.configure_blocks(T1=MODELS[spec["model"]]["T1"])
    use_estimator(model, spec["estimator"], spec["T2"])
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = wall(train_step, model, opt, x, y, device=device)
        peak = torch.cuda.max_memory_allocated()
        return {"peak_mib": (peak - base) / 2 ** 20, "total_peak_mib": peak / 2 ** 20, "seconds": t,
                "method": "torch.cuda.max_memory_allocated"}
    base = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    t = wall(train_step, model, opt, x, y, device=device)
    hwm = status_kib("VmHWM")
    return {"peak_mib": (hwm - base) / 1024, "total_peak_mib": hwm / 1024, "seconds": t,
            "method": "VmHWM - VmRSS around the step (fresh process, MALLOC_MMAP_THRESHOLD_=65536)"}


def status_kib(key: str) -> int:
    """A size (KiB) from /proc/self/status, e.g. VmRSS or VmHWM."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def run_case(spec: dict) -> dict:
    """`memory_case(spec)` in a fresh process with the malloc settings of the module doc."""
    path = os.pathsep.join([ROOT, os.path.join(ROOT, "src")] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", PYTHONPATH=path)
    cmd = [sys.executable, "-m", "benchmarks.memory", json.dumps(spec)]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"memory case {spec} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def part_memory(models, batches, div, device, t2s, estimators) -> list[dict]:
    """Per model, batch, estimator and T2 (id: one case, it has no T2) the step's peak memory."""
    rows = []
    for name in models:
        for n in batches:
            for e in estimators:
                for T2 in (t2s if e != "id" else [None]):
                    spec = {"model": name, "batch": n, "estimator": e, "T2": T2 or MODELS[name]["T2"],
                            "div": div, "device": device, "threads": torch.get_num_threads()}
                    out = run_case(spec)
                    rows.append({**spec, **out, "T2": T2})
                    print(f"memory {name} b={n} {e} T2={T2}: {out['peak_mib']:.1f} MiB", flush=True)
    return rows


if __name__ == "__main__":
    case = json.loads(sys.argv[1])
    torch.set_num_threads(case["threads"])
    print(json.dumps(memory_case(case)))
