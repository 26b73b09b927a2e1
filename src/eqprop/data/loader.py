"""`DeviceLoader`: the whole dataset lives on the training device; batches are augmented there.

No worker processes and no per-sample Python: each epoch draws one permutation (and, when
augmenting, one crop offset and flip bit per position) from a CPU ``torch.Generator`` seeded
from ``(seed, epoch)``, so a run is reproducible on any device and resumable at any epoch.

Sharding for DistributedDataParallel, training (``train=True``): ``batch_size`` is the *global*
batch ``B``. Every rank draws the same permutation and takes its contiguous slice of each global
batch: rank ``r`` gets positions ``[r*B/W, (r+1)*B/W)`` of every full batch (``B`` must be
divisible by the world size ``W``), so concatenating the ranks' batches in rank order gives
exactly the 1-rank batch, augmentation included. A final partial batch (``drop_last=False``) is
split into ``W`` nearly equal contiguous pieces (as ``torch.tensor_split``; a piece may be
empty); ``len()`` is the same on every rank.

Evaluation (``train=False``) takes any ``B`` and any ``W``: the examples (the first
``limit``, in dataset order; with ``drop_last`` only the full global batches) are split into ``W``
contiguous blocks whose sizes differ by at most one (as ``torch.tensor_split``), and each rank
reads its block in batches of at most ``ceil(B/W)``. Every example is evaluated by exactly one
rank, once; concatenating the ranks' batches in rank order gives the dataset order. No batch is
ever empty: a rank whose block is empty (fewer examples than ranks) yields nothing, so its sums
stay zero with a count of zero, and ``len()`` may differ between ranks by one batch (evaluation
must not run collectives per batch).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from .datasets import Dataset

__all__ = ["AUGMENTED", "STD_FACTORS", "DeviceLoader", "crop_flip", "default_std_factor"]

AUGMENTED = ("cifar10", "cifar100", "imagenet32")  # augmentation on by default for these, as published
STD_FACTORS = {"cifar10": 3.0, "cifar100": 3.0, "imagenet32": 1.5}


def default_std_factor(name: str) -> float:
    """The published normalisation: by 3x the std for CIFAR, 1.5x for ImageNet32; 1 otherwise."""
    return STD_FACTORS.get(name, 1.0)


def crop_flip(x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor | None,
              padding_mode: str = "edge") -> torch.Tensor:
    """Batched random crop (same size as the input) of the padded image, then horizontal flip.

    ``x``: (B, C, H, W) any dtype; ``shifts``: (B, 2) integer (dy, dx) in [-pad, pad]: output pixel
    (i, j) is input pixel (i + dy, j + dx) of the padded image; ``flips``: (B,) bool.
    ``padding_mode``: "edge" (replicate border pixels) or "zero".
    """
    if padding_mode not in ("edge", "zero"):
        raise ValueError(f"padding_mode must be 'edge' or 'zero', got {padding_mode!r}")
    b, c, h, w = x.shape
    rows = torch.arange(h, device=x.device)[None, :] + shifts[:, :1]
    cols = torch.arange(w, device=x.device)[None, :] + shifts[:, 1:]
    if flips is not None:
        cols = torch.where(flips[:, None], cols.flip(1), cols)
    flat = rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]  # (B, H, W) source pixel
    out = x.reshape(b, c, h * w).gather(2, flat.reshape(b, 1, h * w).expand(b, c, h * w)).reshape(b, c, h, w)
    if padding_mode == "zero":
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        out = out * inside[:, None].to(out.dtype)
    return out


class DeviceLoader:
    """Iterate over ``(inputs, labels)`` batches held on ``device``.

    Images: uint8 -> ``(x/255 - mean) / (std_factor*std)`` in ``dtype``; with ``augment`` a random
    crop with ``pad``-pixel padding (``padding_mode``) and, if ``flip``, a horizontal flip first.
    Sequences: ``(x - mean) / (std_factor*std)`` per feature, never augmented.
    ``train``: shuffle each epoch (call ``set_epoch`` as with DistributedSampler; the order does
    not change by itself). ``drop_last`` defaults to ``train``. ``limit``: use only the first
    ``limit`` examples of the dataset. ``augment`` defaults to ``train`` for CIFAR and ImageNet32.
    """

    def __init__(self, dataset: Dataset, batch_size: int, train: bool, device: str | torch.device = "cpu",
                 augment: bool | None = None, std_factor: float = 1.0, seed: int = 0,
                 drop_last: bool | None = None, rank: int = 0, world_size: int = 1,
                 dtype: torch.dtype = torch.float32, limit: int | None = None, *, pad: int = 4,
                 padding_mode: str = "edge", flip: bool = True,
                 memory_format: torch.memory_format | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if train and batch_size % world_size:
            raise ValueError(f"global training batch_size {batch_size} is not divisible by world_size {world_size}")
        if std_factor <= 0:
            raise ValueError(f"std_factor must be > 0, got {std_factor}")
        n = len(dataset)
        if limit is not None and not 1 <= limit <= n:
            raise ValueError(f"limit must be in 1..{n} for {dataset.name} {dataset.split}, got {limit}")
        n = n if limit is None else limit
        augment = (train and dataset.name in AUGMENTED) if augment is None else augment
        if augment and dataset.kind != "image":
            raise ValueError(f"augmentation is for images; {dataset.name} holds {dataset.kind}s")
        if padding_mode not in ("edge", "zero") or pad < 0:
            raise ValueError(f"need pad >= 0 and padding_mode 'edge' or 'zero', got {pad}, {padding_mode!r}")
        std = torch.tensor(dataset.std, dtype=torch.float64)
        if (std <= 0).any() or not torch.isfinite(std).all():
            bad = [i for i, s in enumerate(dataset.std) if not 0 < s < float("inf")]
            raise ValueError(f"{dataset.name}: std is zero or invalid for channel/feature {bad}; cannot normalise")
        if not all(abs(m) < float("inf") for m in dataset.mean):
            bad = [i for i, m in enumerate(dataset.mean) if not abs(m) < float("inf")]
            raise ValueError(f"{dataset.name}: mean is not finite for channel/feature {bad}; cannot normalise")
        if dataset.x.is_floating_point():
            finite = torch.isfinite(dataset.x[:n].reshape(n, -1)).all(1)
            if not finite.all():
                first = int((~finite).nonzero()[0])
                raise ValueError(f"{dataset.name} {dataset.split}: {int((~finite).sum())} example(s) hold NaN or "
                                 f"infinite values (the first: example {first}); impute them when loading "
                                 "(dataset option missing=mean or missing=zero)")
        self.device = torch.device(device)
        self.x = dataset.x[:n].to(self.device)
        self.y = dataset.y[:n].to(self.device)
        self.dataset, self.batch_size, self.train, self.augment = dataset, batch_size, train, augment
        self.seed, self.rank, self.world_size, self.dtype = seed, rank, world_size, dtype
        self.drop_last = train if drop_last is None else drop_last
        self.pad, self.padding_mode, self.flip, self.memory_format = pad, padding_mode, flip, memory_format
        self.num_examples = n
        self.epoch = 0
        # normalisation folded into one multiply-add in float32
        mean = torch.tensor(dataset.mean, dtype=torch.float64)
        denom = std_factor * std
        scale, shift = 1 / denom, -mean / denom
        if dataset.kind == "image":
            scale = scale / 255
        shape = (1, -1, 1, 1) if dataset.kind == "image" else (1, 1, -1)
        self.scale = scale.to(torch.float32).reshape(shape).to(self.device)
        self.shift = shift.to(torch.float32).reshape(shape).to(self.device)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation and augmentation the next iteration uses."""
        self.epoch = int(epoch)

    @property
    def shard(self) -> tuple[int, int]:
        """Evaluation: this rank's block ``[lo, hi)`` of positions; training: every position."""
        n = self.num_examples
        if self.train:
            return 0, n
        if self.drop_last:
            n -= n % self.batch_size
        size, extra = divmod(n, self.world_size)
        lo = self.rank * size + min(self.rank, extra)
        return lo, lo + size + (1 if self.rank < extra else 0)

    @property
    def local_batch_size(self) -> int:
        """The most examples one batch holds on this rank."""
        return -(-self.batch_size // self.world_size)

    def __len__(self) -> int:
        if not self.train:
            lo, hi = self.shard
            return -(-(hi - lo) // self.local_batch_size)
        full, rest = divmod(self.num_examples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def _draws(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        n = self.num_examples
        if not self.train:
            return torch.arange(n, device=self.device), None, None
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(n, generator=g)
        shifts = flips = None
        if self.augment:
            shifts = torch.randint(-self.pad, self.pad + 1, (n, 2), generator=g).to(self.device)
            if self.flip:
                flips = torch.randint(0, 2, (n,), generator=g).bool().to(self.device)
        return perm.to(self.device), shifts, flips

    def _ranges(self) -> Iterator[tuple[int, int]]:
        """The ``[lo, hi)`` positions of each of this rank's batches."""
        if not self.train:
            lo, hi = self.shard
            b = self.local_batch_size
            for start in range(lo, hi, b):
                yield start, min(start + b, hi)
            return
        bsz, ws, r = self.batch_size, self.world_size, self.rank
        for b in range(len(self)):
            start = b * bsz
            m = min(bsz, self.num_examples - start)
            size, extra = divmod(m, ws)  # tensor_split-style pieces; exact B/W for full batches
            lo = start + r * size + min(r, extra)
            yield lo, lo + size + (1 if r < extra else 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, shifts, flips = self._draws()
        for lo, hi in self._ranges():
            idx = order[lo:hi]
            x = self.x.index_select(0, idx)
            if shifts is not None:
                x = crop_flip(x, shifts[lo:hi], None if flips is None else flips[lo:hi], self.padding_mode)
            x = torch.addcmul(self.shift, x.to(torch.float32), self.scale).to(self.dtype)
            if self.memory_format is not None:
                x = x.contiguous(memory_format=self.memory_format)
            yield x, self.y.index_select(0, idx)
