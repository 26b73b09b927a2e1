#!/usr/bin/env python
"""eqprop benchmark suite: one command, JSON + markdown.

Parts (select with --parts; one module each in benchmarks/):
  peak     the device's achievable dense FLOP/s: a large matmul and a 3x3 convolution
           (float32 and bfloat16); the reference for the relaxation's efficiency
  step     time of one training step (free phase + gradient + Adam step) for ep, id, bptt
  memory   peak memory of one training step, ep vs bptt (and id) at several T2
  relax    relaxation throughput: sweeps/s and achieved FLOP/s of the free phase, sync vs
           async, float32 vs bfloat16, NCHW vs channels_last (+ torch.compile with
           --compile, + CUDA graphs on a GPU)
  data     the data pipeline's share of a training step (eqprop.data.DeviceLoader)

Models (benchmarks/common.py): L6, the 2-block split of the L = 6 DHN, and L12, the 6-block
L = 12 scaling chain. Results go to benchmarks/results/<tag>.json and <tag>.md.

    .venv/bin/python benchmarks/run.py                      # everything, default sizes
    .venv/bin/python benchmarks/run.py --parts step,memory  # the core library's benchmark
    .venv/bin/python benchmarks/run.py --quick              # tiny sizes, a smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
if __package__ in (None, ""):  # run as a script: import the suite as the package `benchmarks`
    sys.path[:1] = [os.path.dirname(HERE)]

import torch  # noqa: E402

from benchmarks.common import MODELS  # noqa: E402
from benchmarks.data import part_data  # noqa: E402
from benchmarks.memory import part_memory  # noqa: E402
from benchmarks.peak import part_peak, reference_peaks  # noqa: E402
from benchmarks.relax import part_relax  # noqa: E402
from benchmarks.report import markdown  # noqa: E402
from benchmarks.step import part_step  # noqa: E402
from eqprop.training.runinfo import cpu_model  # noqa: E402

PARTS = ("peak", "step", "memory", "relax", "data")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts among {', '.join(PARTS)}")
    p.add_argument("--models", default="L6,L12")
    p.add_argument("--batch", default=None, help="comma-separated batch sizes (default 16 on CPU, 128,256 on GPU)")
    p.add_argument("--width-div", type=int, default=1, help="divide every width by this (1: the published widths)")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats per case (the minimum is reported)")
    p.add_argument("--memory-T2", default="5,20,40", help="T2 values of the memory part")
    p.add_argument("--memory-models", default="L6", help="models of the memory part")
    p.add_argument("--compile", action="store_true", help="add torch.compile variants to the relax part")
    p.add_argument("--relax-sweeps", type=int, default=10,
                   help="sweeps per timed relaxation in the relax part (0: the model's T1)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes: width /16, batch 4, 1 repeat, small peak kernels (a smoke test)")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="output folder")
    p.add_argument("--tag", default=None, help="file stem (default: cpu or the GPU's name)")
    args = p.parse_args(argv)
    for m in args.models.split(",") + args.memory_models.split(","):
        if m not in MODELS:
            raise SystemExit(f"benchmarks: unknown model {m!r}, expected one of {sorted(MODELS)}")
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        raise SystemExit(f"benchmarks: unknown part(s) {sorted(unknown)}, expected some of {list(PARTS)}")
    return args


def run_parts(args: argparse.Namespace, device: str, div: int, repeats: int, batches: list[int]) -> dict:
    """The results of the selected parts, by part name (plus the reference peaks after `peak`)."""
    parts, models = args.parts.split(","), args.models.split(",")
    res: dict = {}
    if "peak" in parts:
        res["peak"] = part_peak(device, repeats, args.quick)
        res["peak_ref_gflops"], res["peak_ref_gflop_per_cpu_s"] = reference_peaks(res["peak"])
    if "step" in parts:
        res["step"] = part_step(models, batches, div, device, repeats)
    if "memory" in parts:
        t2s = [int(v) for v in args.memory_T2.split(",")]
        res["memory"] = part_memory(args.memory_models.split(","), batches[:1], div, device, t2s, ("ep", "bptt", "id"))
    if "relax" in parts:
        res["relax"] = part_relax(models, batches, div, device, repeats, args.compile, args.relax_sweeps)
    if "data" in parts:
        res["data"] = part_data(models[:1], batches, div, device, repeats)
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(device).type == "cuda"
    div, repeats = (16, 1) if args.quick else (args.width_div, args.repeats)
    batches = [int(b) for b in (args.batch or ("4" if args.quick else "128,256" if cuda else "16")).split(",")]
    name = torch.cuda.get_device_name() if cuda else (cpu_name() or platform.processor() or "cpu")
    meta = {"device": device, "device_name": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "width_div": div, "batches": batches, "repeats": repeats, "python": platform.python_version(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "load_before": load(),
            "command": " ".join(["benchmarks/run.py"] + (sys.argv[1:] if argv is None else list(argv)))}
    t0 = time.time()
    res = {"meta": meta, **run_parts(args, device, div, repeats, batches)}
    meta["load_after"] = load()
    meta["wall_s"] = time.time() - t0
    tag = args.tag or ("cpu" if not cuda else name.replace(" ", "_"))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{tag}.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(args.out, f"{tag}.md"), "w") as f:
        f.write(markdown(res) + "\n")
    print(markdown(res))
    print(f"wrote {os.path.join(args.out, tag)}.json/.md in {meta['wall_s']:.0f}s")
    return 0


def cpu_name() -> str | None:
    """The CPU's model name and core count (None where /proc/cpuinfo has no model name)."""
    name = cpu_model()
    return f"{name} ({os.cpu_count()} cores)" if name else None


def load() -> str:
    """The system's load averages (1, 5, 15 minutes)."""
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    sys.exit(main())
