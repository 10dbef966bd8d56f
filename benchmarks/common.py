"""Shared helpers for benchmark scripts: each prints JSON lines {name, value, unit, machine, date}."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from collections.abc import Callable


def machine() -> str:
    """A short description of this machine: CPU model, core count, torch device if any."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def emit(name: str, value: float, unit: str, **extra: object) -> None:
    print(
        json.dumps(
            {
                "name": name,
                "value": round(value, 3),
                "unit": unit,
                "machine": machine(),
                "date": datetime.date.today().isoformat(),
                **extra,
            }
        ),
        flush=True,
    )


def rate(fn: Callable[[], int], min_seconds: float = 2.0) -> float:
    """Items per second of ``fn`` (which returns how many items it processed), run for at least min_seconds."""
    fn()  # warm-up
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds:
        n += fn()
    return n / elapsed


def shortened(cfg, steps: int):
    """``cfg`` (a RunConfig) with every stage ``steps`` long, no warm-up and no checkpoints before the end:
    for timing stages, whose speed does not depend on how far they trained."""
    from dataclasses import replace

    from blip3o.config.recipe import STAGES

    stages = {
        s: replace(
            cfg.recipe.stage(s),
            steps=steps,
            ckpt_every=0,
            log_every=steps,
            optim=replace(cfg.recipe.stage(s).optim, warmup_steps=0),
        )
        for s in STAGES
    }
    return replace(cfg, recipe=replace(cfg.recipe, **stages))


def fit(module, step_loss: Callable[[int], object], steps: int, lr: float = 1e-3) -> float:
    """Train ``module`` with the shapes stages' recipe: AdamW (no weight decay), 50 linear warm-up steps, a
    cosine to a tenth of ``lr``, gradients clipped to norm 1. ``step_loss(step)`` draws step ``step``'s batch
    and returns its loss; returns the mean loss of the last 100 steps."""
    import math

    import torch

    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps)))
    )
    tail = []
    for step in range(steps):
        loss = step_loss(step)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        sched.step()
        if step >= steps - 100:
            tail.append(loss.detach())
    return torch.stack(tail).mean().item()
