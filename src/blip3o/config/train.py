"""Configuration of the model-agnostic training engine (:mod:`blip3o.train`): optimiser and loop.

Two sections in the style of :mod:`blip3o.config.schema`: attribute docstrings per field and
``__post_init__`` validation raising :class:`ConfigError` that names the field. They know nothing about
models; which modules train, freeze or get their own FSDP unit is given by module paths
(``"dit"``, ``"connectors.gen"``) that :func:`blip3o.train.trainable.set_trainable` and
:func:`blip3o.train.distributed.shard_model` resolve exactly (no substring matching).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from blip3o.config.checks import ConfigError, check_float, check_instance, check_int

__all__ = ["OptimConfig", "TrainConfig"]


def _check_choice(key: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}", key=key)


def _check_paths(key: str, value: object) -> None:
    """A list of non-empty, whitespace-free dotted module paths (or class names)."""
    if not isinstance(value, list):
        raise ConfigError(f"must be a list of module paths, got {value!r} ({type(value).__name__})", key=key)
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item or item != item.strip() or " " in item:
            raise ConfigError(f"must be a non-empty dotted module path without spaces, got {item!r}", key=f"{key}[{i}]")


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW and its learning-rate schedule (linear warmup, then constant or cosine decay)."""

    lr: float = 1e-4
    """Peak learning rate, reached at the end of warmup (> 0)."""
    min_lr: float = 1e-5
    """Final learning rate of the cosine schedule, in [0, lr]; unused by ``constant``."""
    weight_decay: float = 0.0
    """Decoupled weight decay (>= 0), applied only to tensors with at least two dimensions."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW moment coefficients, each in [0, 1)."""
    eps: float = 1e-8
    """AdamW denominator epsilon (> 0)."""
    warmup_steps: int = 0
    """Steps of linear warmup from ``lr / warmup_steps`` to ``lr`` (>= 0, at most the run's steps)."""
    schedule: Literal["constant", "cosine"] = "cosine"
    """After warmup: keep ``lr`` (``constant``) or decay it to ``min_lr`` along a half cosine (``cosine``)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (> 0); 0 disables clipping (the norm is still logged)."""

    def __post_init__(self) -> None:
        check_float("lr", self.lr, gt=0.0)
        check_float("min_lr", self.min_lr, ge=0.0)
        if self.min_lr > self.lr:
            raise ConfigError(f"must be <= lr ({self.lr}), got {self.min_lr}", key="min_lr")
        check_float("weight_decay", self.weight_decay, ge=0.0)
        if not isinstance(self.betas, tuple | list) or len(self.betas) != 2:
            raise ConfigError(f"must be a pair of floats, got {self.betas!r}", key="betas")
        for i, beta in enumerate(self.betas):
            check_float(f"betas[{i}]", beta, ge=0.0, lt=1.0)
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        check_float("eps", self.eps, gt=0.0)
        check_int("warmup_steps", self.warmup_steps, ge=0)
        _check_choice("schedule", self.schedule, ("constant", "cosine"))
        check_float("grad_clip", self.grad_clip, ge=0.0)


@dataclass(kw_only=True)
class TrainConfig:
    """The training loop: length, batch, checkpoints, which modules train, sharding, precision, device.

    ``batch_size`` is the global batch per optimiser step; each rank's micro-batch holds
    ``batch_size // (world_size * grad_accum)`` samples, so ``batch_size`` must be divisible by
    ``grad_accum`` here and by ``world_size * grad_accum`` at launch (checked by the trainer).
    """

    steps: int = 1000
    """Optimiser steps of the whole run (>= 1); a resumed run continues up to this number."""
    batch_size: int = 32
    """Global batch size: samples per optimiser step over all ranks and micro-batches (>= 1)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimiser step on each rank (>= 1, divides ``batch_size``)."""
    seed: int = 0
    """Seed of the model initialisation (same on every rank) and of the per-rank RNGs (``seed + rank``)."""
    log_every: int = 10
    """Write a metrics line every this many steps (>= 1); the last step is always logged."""
    ckpt_every: int = 100
    """Save a checkpoint every this many steps (>= 0); 0 saves only at the end. The end is always saved."""
    keep_checkpoints: int = 1
    """Number of newest checkpoints kept in ``run_dir/checkpoints`` (>= 1)."""
    trainable: list[str] = field(default_factory=list)
    """Module (or parameter) paths to train, exact dotted names; empty trains everything not frozen."""
    frozen: list[str] = field(default_factory=list)
    """Module (or parameter) paths frozen after ``trainable`` is applied, exact dotted names."""
    fsdp_modules: list[str] = field(default_factory=list)
    """Module paths or class names (``"Qwen3DecoderLayer"``) sharded as their own FSDP unit before the root."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype: ``bfloat16`` runs forward and loss under autocast; weights and optimiser stay float32."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: ``auto`` picks CUDA when available, else CPU."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser and learning-rate schedule."""

    def __post_init__(self) -> None:
        check_int("steps", self.steps, ge=1)
        check_int("batch_size", self.batch_size, ge=1)
        check_int("grad_accum", self.grad_accum, ge=1)
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"must divide batch_size ({self.batch_size}), got {self.grad_accum}", key="grad_accum")
        check_int("seed", self.seed, ge=0)
        check_int("log_every", self.log_every, ge=1)
        check_int("ckpt_every", self.ckpt_every, ge=0)
        check_int("keep_checkpoints", self.keep_checkpoints, ge=1)
        _check_paths("trainable", self.trainable)
        _check_paths("frozen", self.frozen)
        _check_paths("fsdp_modules", self.fsdp_modules)
        _check_choice("dtype", self.dtype, ("float32", "bfloat16"))
        _check_choice("device", self.device, ("auto", "cpu", "cuda"))
        check_instance("optim", self.optim, OptimConfig)
        if self.optim.warmup_steps > self.steps:
            raise ConfigError(
                f"must be <= steps ({self.steps}), got {self.optim.warmup_steps}", key="optim.warmup_steps"
            )
