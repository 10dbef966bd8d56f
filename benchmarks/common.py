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
