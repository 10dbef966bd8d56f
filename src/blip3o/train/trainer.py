"""The model-agnostic training loop: FSDP2, gradient accumulation, AMP, clipping, logging, exact resume.

Everything model-specific comes from a :class:`TrainTask`: which model, which batches, which loss.
The engine owns what is the same for every stage: the run directory, seeding, freezing by module
path, sharding, AdamW with a warmup + cosine schedule, checkpoints and metrics (nanoGPT's ``train.py``
and torchtitan's ``train.py`` are the models of the loop).

Exact resume without iterator state: :meth:`TrainTask.batch` is *random access*. The batch of step
``s`` depends only on ``(s, micro, rank, world_size)``, so the data position is the step number, and
a resumed run asks for the same batches the uninterrupted run would have. Together with the restored
model, optimizer and RNG states and a learning rate that is a pure function of the step, the losses
after a resume equal those of an uninterrupted run bit for bit (same world size and device).

Run directory ``RUN/``::

    config.yaml        the resolved config (``config_to_save``, else the TrainConfig), fresh runs only
    metrics.jsonl      one JSON line per logged step (rank 0): step, loss terms, lr, grad_norm, ...
    curves.png         loss curves (updated at every checkpoint and at the end)
    checkpoints/       resumable DCP checkpoints (:mod:`blip3o.train.checkpoint`)
    model.safetensors  the final full weights
    summary.json       the returned summary; its presence with ``steps`` reached means finished
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from blip3o.config.io import dump_yaml, to_dict
from blip3o.config.train import OptimConfig, TrainConfig
from blip3o.train.checkpoint import (
    export_model,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    write_json,
)
from blip3o.train.distributed import DistInfo, cleanup, init_distributed, make_mesh, shard_model
from blip3o.train.plots import NON_LOSS_KEYS, plot_curves
from blip3o.train.trainable import set_trainable

__all__ = [
    "TrainTask",
    "build_optimizer",
    "iter_metrics",
    "lr_at",
    "micro_batch_size",
    "micro_batch_slice",
    "train",
    "truncate_metrics",
]

logger = logging.getLogger(__name__)


class TrainTask(Protocol):
    """What the engine needs from a training stage; the engine knows nothing else about the model."""

    def build_model(self) -> nn.Module:
        """Build the model on CPU. Called after ``torch.manual_seed(cfg.seed)`` on every rank, so a
        deterministic build gives identical initial weights everywhere."""
        ...

    def batch(self, step: int, micro: int, rank: int, world_size: int) -> dict[str, Any]:
        """This rank's share of micro-batch ``micro`` of global batch ``step`` (0-based), as tensors.

        Must be deterministic and random access: a function of its arguments only (draw any
        randomness from a ``torch.Generator`` seeded from them), never of how many batches were
        drawn before. :func:`micro_batch_slice` gives the positions of the share within the global
        batch. Tensors may stay on CPU; the trainer moves them to the device.
        """
        ...

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Scalar tensors: ``"loss"`` (mean over this micro-batch, the one that is optimised) and any
        extra terms to log. Runs under bf16 autocast when ``cfg.dtype == "bfloat16"``."""
        ...


def micro_batch_size(batch_size: int, grad_accum: int, world_size: int) -> int:
    """Samples per rank and micro-batch; ``ValueError`` unless ``world_size * grad_accum`` divides the batch."""
    if batch_size % (world_size * grad_accum):
        raise ValueError(
            f"batch_size ({batch_size}) must be divisible by world_size * grad_accum "
            f"({world_size} * {grad_accum}) so every rank and micro-batch holds the same number of samples"
        )
    return batch_size // (world_size * grad_accum)


def micro_batch_slice(batch_size: int, grad_accum: int, micro: int, rank: int, world_size: int) -> slice:
    """Positions in global batch order (``0 .. batch_size-1``) of ``rank``'s share of micro-batch ``micro``.

    The shares of all ranks and micro-batches partition the global batch, so any world size and
    ``grad_accum`` with the same ``batch_size`` see the same samples per step.
    """
    size = micro_batch_size(batch_size, grad_accum, world_size)
    start = (micro * world_size + rank) * size
    return slice(start, start + size)


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Learning rate of 0-based ``step``: linear warmup to ``lr``, then constant or cosine to ``min_lr``.

    Warmup step ``s`` uses ``lr * (s + 1) / warmup_steps``; the cosine starts at ``lr`` on the first
    step after warmup and reaches ``min_lr`` on the last step.
    """
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps - 1))
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay only on tensors with >= 2 dimensions."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": group, "weight_decay": wd} for group, wd in ((decay, optim.weight_decay), (no_decay, 0.0)) if group
    ]
    if not groups:
        raise ValueError("no trainable parameters: check TrainConfig.trainable and TrainConfig.frozen")
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {key: _to_device(value, device) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_device(value, device) for value in obj)
    return obj


def _local(tensor: Tensor) -> Tensor:
    """A replicated DTensor (the gradient norm) as a plain tensor, without communication."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines written after ``last_step`` by a run that crashed past its checkpoint."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= last_step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def _last_metrics(path: Path) -> dict[str, float]:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.is_file() else []
    return json.loads(lines[-1]) if lines else {}


def _finished_summary(run_dir: Path, cfg: TrainConfig) -> dict[str, Any] | None:
    """The saved summary if the run already reached ``cfg.steps``; errors if it went beyond."""
    found = list_checkpoints(run_dir)
    last = found[-1][0] if found else 0
    if last > cfg.steps:
        raise ValueError(f"{run_dir} has a checkpoint at step {last}, beyond TrainConfig.steps={cfg.steps}")
    summary = _read_json(run_dir / "summary.json")
    if summary is not None and summary.get("steps") == cfg.steps and last == cfg.steps:
        return summary
    return None


def train(
    task: TrainTask,
    cfg: TrainConfig,
    run_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    config_to_save: Any | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``task``'s model for ``cfg.steps`` steps in ``run_dir`` and return the run summary.

    Call it on every rank (under ``torchrun``) or in a plain process. ``resume=True`` continues from
    the newest checkpoint in ``run_dir`` (a fresh start if there is none) and returns the saved
    summary at once if the run already finished; ``resume=False`` refuses a ``run_dir`` that holds
    checkpoints. ``config_to_save`` (e.g. the whole RunConfig) is written to ``config.yaml`` and into
    every checkpoint; the TrainConfig is used when it is ``None``.

    Summary keys: ``steps``, ``final`` (last logged metrics), ``wall_time_s`` (over all sessions),
    ``samples_per_s`` (this session), ``world_size``, ``resumed_from`` (step or ``None``),
    ``trainable_params``, ``frozen_params``.
    """
    run_dir = Path(run_dir)
    if resume:
        summary = _finished_summary(run_dir, cfg)
        if summary is not None:
            logger.info("%s already finished %d steps; returning its summary", run_dir, cfg.steps)
            return summary
    elif list_checkpoints(run_dir):
        raise ValueError(f"{run_dir} already holds checkpoints: pass resume=True to continue it, or use a new run_dir")
    owns_group = not dist.is_initialized()
    info = init_distributed(cfg.device)
    try:
        return _train(
            task,
            cfg,
            run_dir,
            info,
            resume=resume,
            config=cfg if config_to_save is None else config_to_save,
            progress=progress,
        )
    finally:
        if owns_group:
            cleanup()


def _train(
    task: TrainTask, cfg: TrainConfig, run_dir: Path, info: DistInfo, *, resume: bool, config: Any, progress: bool
) -> dict[str, Any]:
    micro_batch_size(cfg.batch_size, cfg.grad_accum, info.world_size)  # fail before building anything
    if info.device.type == "cpu":
        # As a model trains, its backward meets more floats below 1.2e-38, which x86 cores compute on a slow path:
        # a shapes NEXT step's backward slowed from 0.35 to 0.45 s in 200 steps, and the step twice over by 400.
        # Flushing them to zero (process-wide, as the flag is) keeps the step as fast as the first.
        torch.set_flush_denormal(True)
    _seed_all(cfg.seed)  # the same on every rank: identical initial weights
    model = task.build_model()
    counts = set_trainable(model, cfg.trainable, cfg.frozen)
    shard_model(model, cfg.fsdp_modules, make_mesh(info))
    optimizer = build_optimizer(model, cfg.optim)
    params = [p for p in model.parameters() if p.requires_grad]
    _seed_all(cfg.seed + info.rank)  # per-rank streams for dropout, noise, timesteps ...

    metrics_path = run_dir / "metrics.jsonl"
    start, elapsed_before = 0, 0.0
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer)
        start, elapsed_before = int(state["step"]), float(state.get("elapsed_s", 0.0))
        if state.get("world_size") != info.world_size:
            logger.warning(
                "resuming a %s-rank checkpoint on %d ranks: not bit-exact", state.get("world_size"), info.world_size
            )
        if info.is_main:
            truncate_metrics(metrics_path, start)
        logger.info("resumed %s from step %d", run_dir, start)
    elif info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(config, run_dir / "config.yaml")
        metrics_path.write_text("", encoding="utf-8")
    logger.info(
        "training %s: %d trainable / %d frozen parameters on %d rank(s), %s",
        type(model).__name__,
        counts["trainable"],
        counts["frozen"],
        info.world_size,
        info.device,
    )

    amp = cfg.dtype == "bfloat16"
    t0 = time.perf_counter()
    window_t, window_steps = t0, 0
    last: dict[str, float] = {}
    model.train()
    with tqdm(total=cfg.steps, initial=start, disable=not (progress and info.is_main), desc="train") as bar:
        for step in range(start, cfg.steps):
            lr = lr_at(step, cfg.optim, cfg.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            terms = _forward_backward(task, model, cfg, info, step, amp)
            # The norm is a replicated DTensor over all shards; no host sync here.
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, cfg.optim.grad_clip, grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            window_steps += 1
            bar.update(1)
            if done % cfg.log_every == 0 or done == cfg.steps:
                now = time.perf_counter()
                last = _gather_metrics(terms, _local(grad_norm), info)
                last = {
                    "step": done,
                    **last,
                    "lr": lr,
                    "samples_per_s": window_steps * cfg.batch_size / max(now - window_t, 1e-9),
                    "elapsed_s": elapsed_before + now - t0,
                }
                window_t, window_steps = now, 0
                if not math.isfinite(last["loss"]):
                    raise FloatingPointError(f"non-finite loss at step {done}: {last}")
                if info.is_main:
                    with metrics_path.open("a", encoding="utf-8") as handle:
                        handle.write(json.dumps(last) + "\n")
                    bar.set_postfix(loss=f"{last['loss']:.4g}", lr=f"{lr:.3g}", refresh=False)
                    if bar.disable:
                        logger.info("step %d: %s", done, last)
            if (cfg.ckpt_every and done % cfg.ckpt_every == 0) or done == cfg.steps:
                trainer_state = {
                    "world_size": info.world_size,
                    "elapsed_s": elapsed_before + time.perf_counter() - t0,
                    "train": to_dict(cfg),
                }
                save_checkpoint(
                    run_dir,
                    done,
                    model,
                    optimizer,
                    trainer_state=trainer_state,
                    config=config,
                    keep=cfg.keep_checkpoints,
                )
                if info.is_main:
                    plot_curves(metrics_path, run_dir / "curves.png")

    session_s = time.perf_counter() - t0
    export_model(model, run_dir / "model.safetensors")
    final = last or _last_metrics(metrics_path)
    summary = {
        "steps": cfg.steps,
        "final": {key: value for key, value in final.items() if key != "step"},
        "wall_time_s": elapsed_before + session_s,
        "samples_per_s": (cfg.steps - start) * cfg.batch_size / max(session_s, 1e-9),
        "world_size": info.world_size,
        "resumed_from": start if ckpt is not None else None,
        "trainable_params": counts["trainable"],
        "frozen_params": counts["frozen"],
    }
    if info.is_main:
        write_json(run_dir / "summary.json", summary)
    return summary


def _forward_backward(
    task: TrainTask, model: nn.Module, cfg: TrainConfig, info: DistInfo, step: int, amp: bool
) -> dict[str, Tensor]:
    """Accumulate the gradients of one global batch; return this rank's mean of each loss term.

    Each micro-batch loss is a mean over equally many samples, so dividing by ``grad_accum`` here and
    FSDP's average over ranks in the reduce-scatter give exactly the mean over the global batch.
    """
    terms: dict[str, Tensor] = {}
    for micro in range(cfg.grad_accum):
        batch = _to_device(task.batch(step, micro, info.rank, info.world_size), info.device)
        autocast = torch.autocast(info.device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with autocast:
            out = task.loss(model, batch)
        if "loss" not in out:
            raise ValueError(f"TrainTask.loss must return a 'loss' entry, got keys {sorted(out)}")
        clash = NON_LOSS_KEYS & set(out)
        if clash:
            raise ValueError(f"TrainTask.loss returned reserved metric names {sorted(clash)}; rename them")
        (out["loss"].float() / cfg.grad_accum).backward()
        for key, value in out.items():
            value = value.detach().float() / cfg.grad_accum
            terms[key] = terms[key] + value if key in terms else value
    return terms


def _gather_metrics(terms: dict[str, Tensor], grad_norm: Tensor, info: DistInfo) -> dict[str, float]:
    """Average the loss terms over ranks (one all-reduce) and bring them to the host (one sync)."""
    keys = list(terms)
    values = torch.stack([terms[key].reshape(()) for key in keys])
    if info.world_size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)  # gloo has no AVG
        values = values / info.world_size
    host = torch.cat([values, grad_norm.detach().float().reshape(1).to(values.device)]).tolist()
    return {**dict(zip(keys, host[:-1], strict=True)), "grad_norm": host[-1]}


def iter_metrics(run_dir: str | os.PathLike[str]) -> Iterator[dict[str, float]]:
    """The records of ``RUN/metrics.jsonl`` in order."""
    path = Path(run_dir) / "metrics.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            yield json.loads(line)
