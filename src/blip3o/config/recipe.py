"""The staged training recipe: which stages run, how generation is trained, and each stage's TrainConfig.

The BLIP3-o shapes recipe runs ``clip → vae → decoder → understanding → generation``. ``training``
chooses the paper's **sequential** scheme (understanding first, then generation with the backbone
frozen) or **joint** training (backbone trainable, understanding batches mixed into generation steps
with weight ``joint_weight``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from blip3o.config.checks import ConfigError, check_float, check_int
from blip3o.config.train import OptimConfig, TrainConfig

STAGES: tuple[str, ...] = ("clip", "vae", "decoder", "understanding", "generation")


def _stage(steps: int, batch_size: int, lr: float, trainable: list[str] | None = None) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        batch_size=batch_size,
        log_every=10,
        ckpt_every=100,
        trainable=trainable or [],
        optim=OptimConfig(lr=lr, min_lr=lr / 10, warmup_steps=min(50, steps // 10)),
    )


@dataclass(kw_only=True)
class RecipeConfig:
    """Stages to run and their training settings."""

    stages: list[str] = field(default_factory=lambda: list(STAGES))
    """Stages to run, a subsequence of clip, vae, decoder, understanding, generation (finished ones are skipped)."""
    training: Literal["sequential", "joint"] = "sequential"
    joint_weight: float = 1.0
    """Weight of the understanding loss mixed into joint generation training."""
    vocab_size: int = 1024
    """Size of the BPE tokenizer trained on the world's text."""
    clip: TrainConfig = field(default_factory=lambda: _stage(600, 32, 1e-3))
    vae: TrainConfig = field(default_factory=lambda: _stage(1000, 16, 2e-3))
    decoder: TrainConfig = field(default_factory=lambda: _stage(1500, 32, 1e-3))
    understanding: TrainConfig = field(default_factory=lambda: _stage(1500, 32, 1e-3, ["backbone", "projector"]))
    generation: TrainConfig = field(default_factory=lambda: _stage(1500, 32, 1e-3, ["queries", "head"]))

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"unknown stages {unknown}; allowed: {', '.join(STAGES)}", key="recipe.stages")
        if self.stages != [s for s in STAGES if s in self.stages]:
            raise ConfigError(f"stages must keep the order {', '.join(STAGES)}", key="recipe.stages")
        check_float("recipe.joint_weight", self.joint_weight, ge=0)
        check_int("recipe.vocab_size", self.vocab_size, ge=300)

    def stage(self, name: str) -> TrainConfig:
        return getattr(self, name)
