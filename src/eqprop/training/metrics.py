"""Per-epoch metrics: top-k counts, a JSON-lines log, TensorBoard, and the learning-curve PNG.

An epoch record may hold a `trace`: the per-step points of the trainer's monitoring (config
keys log_every and monitor_fidelity), each {'step', 'epoch_progress', 'eq_<block>_free_*',
'fidelity_*'}; TensorBoard gets them at their global step (`MetricsLogger.log_step`) and the
curves' third panel draws them, so a one-epoch run shows a curve."""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ..optional import require
from .checkpoint import kill_point, write_text_atomic

__all__ = ["EpochTotals", "MetricsLogger", "plot_curves", "read_metrics", "topk_correct"]


def topk_correct(logits: Tensor, y: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[Tensor]:
    """Number of samples whose label is among the k highest logits, for each k (0-dim tensors;
    k is capped at the number of classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == y[:, None]
    return [hit[:, : min(k, kmax)].any(1).sum() for k in ks]


class EpochTotals:
    """Running sums on the training device (no host sync until `.values()`)."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss*n, top1, top5, n

    def add(self, loss: Tensor, logits: Tensor, y: Tensor) -> None:
        n = y.shape[0]
        c1, c5 = topk_correct(logits.detach(), y)
        self.sums += torch.stack([loss.detach().double() * n, c1.double(), c5.double(),
                                  torch.tensor(float(n), dtype=torch.float64, device=self.sums.device)])

    def values(self) -> dict[str, float]:
        loss, c1, c5, n = self.sums.tolist()
        n = max(n, 1.0)
        return {"loss": loss / n, "top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "count": int(n)}


class MetricsLogger:
    """Appends one JSON object per epoch to `metrics.jsonl`; mirrors scalars to TensorBoard.

    fresh: start an empty file (replacing any earlier one in one step). Otherwise (a resumed
    run) keep the records of the epochs up to `keep_through` and drop later ones, which the
    resumed run will train again (after a fall-back to the previous checkpoint), and a last
    line torn by a kill."""

    def __init__(self, out_dir: Path, tensorboard: bool = True, fresh: bool = True, keep_through: int | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh:
            write_text_atomic(self.path, "")
        elif self.path.exists():
            records = read_metrics(self.path)
            kept = [r for r in records if keep_through is None or r.get("epoch", 0) <= keep_through]
            text = "".join(json.dumps(r) + "\n" for r in kept)
            if text != self.path.read_text():
                write_text_atomic(self.path, text)
        self.writer = None
        if tensorboard:  # on by default, so a missing extra is a warning, not an error
            try:
                require("tensorboard", "tensorboard", "TensorBoard logs")
            except ImportError as e:
                warnings.warn(f"{e}; metrics go to metrics.jsonl only", stacklevel=2)
            else:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(out_dir) / "tb"))

    def log(self, record: dict) -> None:
        """Append one line in one write, flushed to disk."""
        kill_point("log")
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.writer is not None:
            step = record["epoch"]
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key.replace("_", "/", 1), value, step)
            self.writer.flush()

    def log_step(self, point: dict, step: int) -> None:
        """One per-step point to TensorBoard (tags 'step/<key>') at global step `step`; the
        point itself goes into the epoch's record."""
        if self.writer is None:
            return
        for key, value in point.items():
            if key not in ("step", "epoch_progress") and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"step/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a last line cut off by a kill is skipped, a damaged
    line elsewhere is an error naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not a JSON record ({e})") from None
    return out


def plot_curves(metrics_path: Path, png_path: Path, title: str = "") -> Path | None:
    """Loss and top-1 accuracy per epoch, train and test, as a PNG; None if nothing logged.
    When the records hold equilibrium health, a third panel: the free phase's iterations per
    block (per step from the records' traces, per-epoch means as markers) and, on a second
    axis, the fidelity cosines of monitor_fidelity.

    Needs matplotlib (the ``plot`` extra): ImportError naming the extra otherwise."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    require("matplotlib", "plot", "learning-curve plots").use("Agg")
    plt = require("matplotlib.pyplot", "plot", "learning-curve plots")

    health = any(k.startswith("eq_") and k.endswith("_free_iters") for r in records for k in r) or \
        any(r.get("trace") for r in records)
    fig, axes = plt.subplots(1, 3 if health else 2, figsize=(15 if health else 10, 4))
    for ax, metric, label in ((axes[0], "loss", "cross-entropy"), (axes[1], "top1", "top-1 accuracy (%)")):
        for split, style in (("train", "o-"), ("test", "s-")):
            pts = [(r["epoch"], r[f"{split}_{metric}"]) for r in records if f"{split}_{metric}" in r]
            if pts:
                ax.plot(*zip(*pts), style, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if health:
        _health_panel(axes[2], records)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def _health_panel(ax, records: list[dict]) -> None:
    """Free-phase iterations per block (trace lines, epoch-mean markers at the epoch's end)
    and the fidelity cosines on a twin axis."""
    points = [p for r in records for p in (r.get("trace") or [])]
    keys = sorted({k for r in records for k in r if k.startswith("eq_") and k.endswith("_free_iters")} |
                  {k for p in points for k in p if k.startswith("eq_") and k.endswith("_free_iters")})
    for i, key in enumerate(keys):
        label = key[3:-len("_free_iters")]
        pts = [(p["epoch_progress"], p[key]) for p in points if key in p]
        if pts:
            ax.plot(*zip(*pts), "-", color=f"C{i}", lw=1, label=f"{label} (per step)")
        means = [(r["epoch"], r[key]) for r in records if key in r]
        if means:
            ax.plot(*zip(*means), "o", color=f"C{i}", label=f"{label} (epoch mean)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("free-phase iterations")
    ax.grid(alpha=0.3)
    lines, labels = ax.get_legend_handles_labels()
    fid = [(k, [(p["epoch_progress"], p[k]) for p in points if k in p])
           for k in ("fidelity_flat_cos", "fidelity_worst_tensor_cos")]
    fid = [(k, pts) for k, pts in fid if pts]
    if fid:
        twin = ax.twinx()
        for (key, pts), style in zip(fid, ("k.-", "k.--")):
            twin.plot(*zip(*pts), style, lw=1, label=key.replace("fidelity_", "EP vs ID: ").replace("_", " "))
        twin.set_ylabel("cosine with ID")
        more, more_labels = twin.get_legend_handles_labels()
        lines, labels = lines + more, labels + more_labels
    if lines:
        ax.legend(lines, labels, fontsize=7)
    ax.set_title("equilibrium health", fontsize=10)
