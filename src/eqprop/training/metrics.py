"""Per-epoch metrics: top-k counts, a JSON-lines log, TensorBoard, and the learning-curve PNG."""
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

    Needs matplotlib (the ``plot`` extra): ImportError naming the extra otherwise."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    require("matplotlib", "plot", "learning-curve plots").use("Agg")
    plt = require("matplotlib.pyplot", "plot", "learning-curve plots")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in ((axes[0], "loss", "cross-entropy"), (axes[1], "top1", "top-1 accuracy (%)")):
        for split, style in (("train", "o-"), ("test", "s-")):
            pts = [(r["epoch"], r[f"{split}_{metric}"]) for r in records if f"{split}_{metric}" in r]
            if pts:
                ax.plot(*zip(*pts), style, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
