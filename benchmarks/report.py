"""The suite's markdown report (the JSON results are written as they are)."""
from __future__ import annotations


def markdown(res: dict) -> str:
    """The results of every part that ran, as markdown tables."""
    m = res["meta"]
    lines = [f"# eqprop benchmarks: {m['device_name']}", "",
             f"{m['date']}; torch {m['torch']}; {m['threads']} threads; width divisor {m['width_div']}; "
             f"load average {m['load_before']} before, {m['load_after']} after; `{m['command']}`", ""]
    if res.get("peak"):
        lines += ["## Achievable dense FLOP/s (reference peak)", "", "| kernel | GFLOP/s (wall) | GFLOP per CPU-s |",
                  "|---|---|---|"]
        lines += [f"| {k} | {v['gflops']:.1f} | {v['gflop_per_cpu_s']:.1f} |" for k, v in res["peak"].items()]
        ref, refc = res["peak_ref_gflops"], res["peak_ref_gflop_per_cpu_s"]
        lines += ["", f"Reference peak, the best kernel above: {ref['float32']:.1f} GFLOP/s float32, "
                      f"{ref['bfloat16']:.1f} GFLOP/s bfloat16 (per CPU-second: {refc['float32']:.1f} and "
                      f"{refc['bfloat16']:.1f}).", ""]
    if res.get("step"):
        lines += ["## Training step (free phase + gradient + Adam step)", "",
                  "| model | batch | estimator | T1 | T2 | wall min (s) | wall median (s) | CPU min (s) | "
                  "wall vs bptt | CPU vs bptt |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["step"]:
            ref = next(q for q in res["step"] if q["model"] == r["model"] and q["batch"] == r["batch"]
                       and q["estimator"] == "bptt")
            lines.append(f"| {r['model']} | {r['batch']} | {r['estimator']} | {r['T1']} | {r['T2']} | "
                         f"{r['min_s']:.3f} | {r['median_s']:.3f} | {r['cpu_min_s']:.3f} | "
                         f"{r['min_s'] / ref['min_s']:.2f} | {r['cpu_min_s'] / ref['cpu_min_s']:.2f} |")
        lines.append("")
    if res.get("memory"):
        lines += ["## Peak memory of one training step", "", "| model | batch | estimator | T2 | step peak (MiB) | "
                  "process peak (MiB) | step time (s) |", "|---|---|---|---|---|---|---|"]
        for r in res["memory"]:
            lines.append(f"| {r['model']} | {r['batch']} | {r['estimator']} | {r['T2'] if r['T2'] else '-'} | "
                         f"{r['peak_mib']:.1f} | {r['total_peak_mib']:.1f} | {r['seconds']:.2f} |")
        lines += ["", f"Method: {res['memory'][0]['method']}.", ""]
    if res.get("relax"):
        lines += ["## Relaxation throughput (free phase of every block, a fixed number of sweeps)", "",
                  "| model | batch | update | dtype | layout | mode | sweeps/s | GFLOP/s | % of peak | "
                  "GFLOP per CPU-s | % of peak per CPU-s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["relax"]:
            peak = res.get("peak_ref_gflops", {}).get(r["dtype"])
            peakc = res.get("peak_ref_gflop_per_cpu_s", {}).get(r["dtype"])
            pct = f"{100 * r['gflops'] / peak:.1f}" if peak else "n/a"
            pctc = f"{100 * r['gflop_per_cpu_s'] / peakc:.1f}" if peakc else "n/a"
            lines.append(f"| {r['model']} | {r['batch']} | {r['update']} | {r['dtype']} | {r['layout']} | "
                         f"{r['mode']} | {r['sweeps_per_s']:.2f} | {r['gflops']:.1f} | {pct} | "
                         f"{r['gflop_per_cpu_s']:.1f} | {pctc} |")
        lines.append("")
    if res.get("data"):
        lines += ["## Data pipeline share of a step (DeviceLoader, augmentation on)", "",
                  "| model | batch | batch time (ms) | ep step (s) | share |", "|---|---|---|---|---|"]
        for r in res["data"]:
            lines.append(f"| {r['model']} | {r['batch']} | {1e3 * r['batch_s']:.3f} | {r['step_s']:.3f} | "
                         f"{100 * r['share']:.3f}% |")
        lines.append("")
    return "\n".join(lines)
