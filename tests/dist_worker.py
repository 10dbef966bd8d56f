"""A toy regression task for the trainer tests, and the torchrun worker that trains it on several ranks.

``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py OUT`` runs, in
one process group: an uninterrupted run ``OUT/full``, a run ``OUT/crash`` that dies at step
``CRASH_AT``, and its resume. The test compares the metrics with single-process runs.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip3o.config.train import OptimConfig, TrainConfig
from blip3o.train import cleanup, init_distributed, micro_batch_slice, train

CRASH_AT = 6


class Crash(RuntimeError):
    """Raised by the toy task to simulate a pre-emption."""


class ToyMLP(nn.Module):
    """``body`` (Sequential), ``body2`` (a prefix-sharing sibling, to catch substring matching) and ``head``."""

    def __init__(self, dim: int = 6, hidden: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.body2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, dim) -> (B, 1)
        return self.head(torch.tanh(self.body2(self.body(x))))


class ToyTask:
    """Fixed random data set (``y = tanh(x·w) + noise``); batch ``step`` is a seeded permutation prefix.

    ``noise`` > 0 adds fresh target noise from the global torch RNG in every loss call.
    """

    def __init__(
        self, cfg: TrainConfig, *, n: int = 256, dim: int = 6, crash_at: int | None = None, noise: float = 0.0
    ) -> None:
        self.batch_size, self.grad_accum, self.n, self.dim = cfg.batch_size, cfg.grad_accum, n, dim
        self.crash_at, self.noise = crash_at, noise
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, dim, generator=g)
        w = torch.randn(dim, 1, generator=g)
        self.y = torch.tanh(self.x @ w) + 0.05 * torch.randn(n, 1, generator=g)

    def build_model(self) -> nn.Module:
        return ToyMLP(self.dim)

    def batch(self, step: int, micro: int, rank: int, world_size: int) -> dict[str, Any]:
        if step == self.crash_at:
            raise Crash(f"simulated crash at step {step}")
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(step))[: self.batch_size]
        idx = order[micro_batch_slice(self.batch_size, self.grad_accum, micro, rank, world_size)]
        return {"x": self.x[idx], "y": self.y[idx]}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        pred, y = model(batch["x"]).float(), batch["y"]
        if self.noise:  # target noise from the global (per-rank) RNG: resume must restore its state
            y = y + self.noise * torch.randn_like(y)
        return {"loss": F.mse_loss(pred, y), "mae": (pred - y).abs().mean()}


def resume_config(**overrides: Any) -> TrainConfig:
    """The config of the resume and multi-rank tests: 10 steps, checkpoints every 4, grad_accum 2."""
    kwargs: dict[str, Any] = {
        "steps": 10,
        "batch_size": 16,
        "grad_accum": 2,
        "log_every": 1,
        "ckpt_every": 4,
        "keep_checkpoints": 2,
        "frozen": ["body.0", "body2"],  # frozen inside a trained FSDP unit, and a wholly frozen unit
        "fsdp_modules": ["body", "body2", "head"],
        "device": "cpu",
        "optim": OptimConfig(lr=1e-2, min_lr=1e-3, weight_decay=0.1, warmup_steps=2, grad_clip=0.5),
    }
    return TrainConfig(**{**kwargs, **overrides})


def main(out: Path) -> None:
    init_distributed("cpu")  # train() reuses this group and leaves it to us
    try:
        cfg = resume_config()
        train(ToyTask(cfg), cfg, out / "full", progress=False)
        with contextlib.suppress(Crash):
            train(ToyTask(cfg, crash_at=CRASH_AT), cfg, out / "crash", progress=False)
        train(ToyTask(cfg), cfg, out / "crash", resume=True, progress=False)
    finally:
        cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
