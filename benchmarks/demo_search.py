"""The search for a faster demo as a table: one row per kept run folder.

    python -m benchmarks.demo_search benchmarks/results/demo_search [--against fmnist_cpu]

Each folder holds a run's config.yaml, metrics.jsonl and run_info.json (what `eqprop train`
writes). A row gives the settings that differ from the reference config, the test accuracy,
the mean sweeps per phase, the training and evaluation seconds, the share of block 2's free
phases that met tol, the lowest EP-vs-ID cosines when the run monitored them
(`monitor_fidelity`), and the runs that overlapped it in time (timings are comparable only
within runs that shared the machine alike).
"""
from __future__ import annotations

import argparse
import json
from datetime import datetime, timedelta
from pathlib import Path

import yaml

from eqprop.training.config import DEFAULTS, NOT_SET, config_changes, load_config, merge
from eqprop.training.metrics import read_metrics
from eqprop.training.runinfo import read_run_info

IGNORED = {"name", "out_dir", "progress", "tensorboard", "threads", "device", "monitor_fidelity", "epochs"}


def read(folder: Path) -> dict:
    cfg = merge(DEFAULTS, yaml.safe_load((folder / "config.yaml").read_text()), allow_new=True)  # keys added since
    lines = read_metrics(folder / "metrics.jsonl")
    if not lines:
        raise SystemExit(f"{folder / 'metrics.jsonl'}: no epoch finished")
    session = read_run_info(folder)[0]
    m = lines[-1]
    start = datetime.fromisoformat(session["started"])
    fid = [p for p in m.get("trace", []) if "fidelity_flat_cos" in p]
    return {"name": folder.name, "cfg": cfg, "m": m, "session": session, "start": start,
            "end": start + timedelta(seconds=sum(x["epoch_time_s"] for x in lines)),
            "fid": (min(p["fidelity_flat_cos"] for p in fid), min(p["fidelity_worst_tensor_cos"] for p in fid))
            if fid else None}


def changes(cfg: dict, ref: dict) -> str:
    shown = [(k, new) for k, _, new in config_changes(ref, cfg) if k.split(".")[0] not in IGNORED]
    return ", ".join(f"{k}={json.dumps(None if v is NOT_SET else v, separators=(',', ':'))}"
                     for k, v in shown) or "(none)"


def sweeps(m: dict) -> str:
    """Mean sweeps per phase: free / nudged+ / nudged- (EP), or free / adjoint (ID)."""
    keys = [k for k in ("iters_free", "iters_nudged+", "iters_nudged-", "iters_adjoint") if k in m]
    return " / ".join(f"{m[k]:.1f}" + (" (adjoint)" if k == "iters_adjoint" else "") for k in keys)


def table(runs: list[dict], ref_name: str) -> str:
    ref = load_config(ref_name)
    rows = ["| run | settings that differ from `" + ref_name + "` | threads x processes | test top-1 | "
            "sweeps free / nudged+ / nudged- | train s | eval s | block 2 free at tol | "
            "min EP-vs-ID cos (flat, worst tensor) | ran beside |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        m, s = r["m"], r["session"]
        beside = [o["name"] for o in runs if o is not r and o["start"] < r["end"] and r["start"] < o["end"]]
        fid = f"{r['fid'][0]:.4f}, {r['fid'][1]:.4f}" if r["fid"] else "-"
        rows.append(f"| {r['name']} | {changes(r['cfg'], ref)} | {s['torch_threads']} x {s['world_size']} | "
                    f"{m['test_top1']:.2f} | {sweeps(m)} | {m['train_time_s']:.0f} | {m['eval_time_s']:.0f} | "
                    f"{100 * m.get('eq_block2_free_converged', float('nan')):.1f}% | {fid} | "
                    f"{', '.join(beside) or 'alone'} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="a folder of run folders")
    p.add_argument("--against", default="fmnist_cpu", help="the config the settings are compared with")
    a = p.parse_args(argv)
    runs = sorted((read(d) for d in a.folder.iterdir() if (d / "config.yaml").exists()), key=lambda r: r["start"])
    if not runs:
        raise SystemExit(f"{a.folder}: no run folders (config.yaml, metrics.jsonl, run_info.json)")
    print(table(runs, a.against))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
