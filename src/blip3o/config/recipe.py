"""The staged training recipe: which stages run, how generation is trained, and each stage's TrainConfig.

The BLIP3-o shapes recipe runs ``clip → vae → decoder → understanding → generation``; the BLIP3o-NEXT
one ``clip → vae → decoder → image_tokenizer → next → instruct``. Layout presets add ``reader`` (a layout
reader on the frozen mini-CLIP) before ``decoder``. ``training``
chooses the paper's **sequential** scheme (understanding first, then generation with the backbone
frozen) or **joint** training (backbone trainable, understanding batches mixed into generation steps
with weight ``joint_weight``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from blip3o.config.checks import ConfigError, check_float, check_int
from blip3o.config.train import OptimConfig, TrainConfig

STAGES: tuple[str, ...] = (
    "clip",
    "vae",
    "reader",
    "decoder",
    "understanding",
    "generation",
    "image_tokenizer",
    "next",
    "instruct",
)
"""Every stage in its required order: the BLIP3-o stages, then the BLIP3o-NEXT ones (which share the first three)."""
NEXT_STAGES: tuple[str, ...] = ("image_tokenizer", "next", "instruct")
BLIP3O_STAGES: tuple[str, ...] = ("clip", "vae", "decoder", "understanding", "generation")
SHARED_STAGES: tuple[str, ...] = ("clip", "vae", "reader", "decoder")
"""Stages a BLIP3o-NEXT run can take from a BLIP3-o run."""


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

    stages: list[str] = field(default_factory=lambda: list(BLIP3O_STAGES))
    """Stages to run, in the order of :data:`STAGES` (finished ones are skipped)."""
    training: Literal["sequential", "joint"] = "sequential"
    joint_weight: float = 1.0
    """Weight of the understanding loss mixed into joint generation training."""
    vocab_size: int = 1024
    """Size of the BPE tokenizer trained on the world's text."""
    clip: TrainConfig = field(default_factory=lambda: _stage(600, 32, 1e-3))
    vae: TrainConfig = field(default_factory=lambda: _stage(1000, 16, 2e-3))
    reader: TrainConfig = field(default_factory=lambda: _stage(3000, 128, 2e-3))
    """The layout reader (``model.vision.reader_width``), on the frozen mini-CLIP's maps."""
    decoder: TrainConfig = field(default_factory=lambda: _stage(1500, 32, 1e-3))
    understanding: TrainConfig = field(default_factory=lambda: _stage(1500, 32, 1e-3, ["backbone", "projector"]))
    generation: TrainConfig = field(default_factory=lambda: _stage(1500, 32, 1e-3, ["queries", "connector", "head"]))
    image_tokenizer: TrainConfig = field(default_factory=lambda: _stage(1000, 64, 1e-3))
    next: TrainConfig = field(default_factory=lambda: _stage(2000, 32, 1e-3))
    """BLIP3o-NEXT pre-training; with ``trainable`` empty it trains the backbone, connector and ``next.train_sana``."""
    instruct: TrainConfig = field(default_factory=lambda: _stage(400, 32, 3e-4))
    """Instruction tuning, from the next stage's weights; ``trainable`` as for ``next``."""
    generation_prompt_fraction: float = 1.0
    """BLIP3-o generation: share of rows asked for by the GenEval-style prompt instead of the caption
    (the paper pre-trains on detailed and short captions alike)."""
    next_prompt_fraction: float = 0.0
    """NEXT pre-training: share of text-to-image rows asked for by the GenEval-style prompt instead of the
    caption (0: captions only, as pre-training on descriptive captions)."""
    instruct_prompt_fraction: float = 0.5
    """Instruction tuning: share of rows asked for by the GenEval-style prompt (the rest by the caption)."""
    instruct_per_tag: int = 500
    """Instruction tuning: scenes per GenEval tag in the curated set."""
    clip_local_weight: float = 0.0
    """Mini-CLIP: weight of the locality loss (:class:`blip3o.train.tasks.ClipTask`), the share of the map's
    variance that sits in patches no object touches. 0 leaves the empty patches free to carry the scene."""
    clip_shift_weight: float = 0.0
    """Mini-CLIP: weight of the shift loss (:func:`blip3o.train.tasks.shift_loss`), the share of the map's
    variance that moving the scene by less than half a patch changes. 0 lets the map keep sub-patch detail."""
    qa_turns: int = 6
    """Understanding: question/answer turns per conversation about one image (LLaVA-style multi-turn
    rows; a world scene has up to 6 questions). 1 trains one question per row."""

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"unknown stages {unknown}; allowed: {', '.join(STAGES)}", key="recipe.stages")
        if self.stages != [s for s in STAGES if s in self.stages]:
            raise ConfigError(f"stages must keep the order {', '.join(STAGES)}", key="recipe.stages")
        check_float("recipe.joint_weight", self.joint_weight, ge=0)
        check_int("recipe.vocab_size", self.vocab_size, ge=300)
        check_float("recipe.generation_prompt_fraction", self.generation_prompt_fraction, ge=0, le=1)
        check_float("recipe.next_prompt_fraction", self.next_prompt_fraction, ge=0, le=1)
        check_float("recipe.instruct_prompt_fraction", self.instruct_prompt_fraction, ge=0, le=1)
        check_int("recipe.instruct_per_tag", self.instruct_per_tag, ge=1)
        check_int("recipe.qa_turns", self.qa_turns, ge=1)
        check_float("recipe.clip_local_weight", self.clip_local_weight, ge=0)
        check_float("recipe.clip_shift_weight", self.clip_shift_weight, ge=0)

    def stage(self, name: str) -> TrainConfig:
        return getattr(self, name)
