"""Typed configuration tree: plain ``@dataclass(kw_only=True)`` sections with field docstrings.

Each section validates itself in ``__post_init__`` and raises :class:`ConfigError` naming the field and
what is allowed (the pattern of torchtitan ``config/configs.py``). Loading, dotted overrides, YAML and
diffs are generic over any dataclass tree and live in :mod:`blip3o.config.io`; named presets live in
:mod:`blip3o.config.presets`.

New sections (model, train, ...) follow the same recipe: a dataclass with an attribute docstring per
field, ``__post_init__`` calling the ``check_*`` helpers below, and a field on :class:`RunConfig` with a
``default_factory``. Nothing else needs to change: io and presets discover fields from the type hints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from blip3o.config.checks import ConfigError, check_float, check_instance, check_int
from blip3o.config.grpo import GRPOConfig
from blip3o.config.model import ModelConfig
from blip3o.config.next import NextConfig, layout_code_fields
from blip3o.config.recipe import NEXT_STAGES, RecipeConfig

__all__ = [
    "ConfigError",
    "EvalConfig",
    "RunConfig",
    "WorldConfig",
    "check_float",
    "check_instance",
    "check_int",
]


@dataclass(kw_only=True)
class WorldConfig:
    """The synthetic shapes world: image sizes, sample counts and the held-out prompt split."""

    size: int = 64
    """Side of rendered shape-scene images, in pixels (32..512)."""
    text_size: int = 64
    """Side of rendered text-scene images, in pixels (32..512)."""
    seed: int = 0
    """Seed of the world generator; the same seed gives the same samples and prompt split (>= 0)."""
    n_train: int = 2000
    """Number of training samples (>= 1)."""
    n_heldout: int = 200
    """Number of held-out samples, drawn from the held-out prompt pool (>= 0)."""
    n_prompts: int = 553
    """Size of the held-out GenEval-style prompt set (>= 6, so every tag gets at least one prompt)."""
    heldout_fraction: float = 0.25
    """Share of each tag's prompt pool held out from training, in (0, 1)."""
    text_fraction: float = 0.1
    """Share of samples that are text scenes rather than shape scenes, in [0, 1]."""
    shard_size: int = 1000
    """Samples per webdataset tar shard (>= 1)."""

    def __post_init__(self) -> None:
        check_int("size", self.size, ge=32, le=512)
        check_int("text_size", self.text_size, ge=32, le=512)
        check_int("seed", self.seed, ge=0)
        check_int("n_train", self.n_train, ge=1)
        check_int("n_heldout", self.n_heldout, ge=0)
        check_int("n_prompts", self.n_prompts, ge=6)
        check_float("heldout_fraction", self.heldout_fraction, gt=0.0, lt=1.0)
        check_float("text_fraction", self.text_fraction, ge=0.0, le=1.0)
        check_int("shard_size", self.shard_size, ge=1)


@dataclass(kw_only=True)
class EvalConfig:
    """Evaluation of generation on the held-out prompt set."""

    images_per_prompt: int = 4
    """Images generated per prompt (>= 1); GenEval uses 4."""
    seed: int = 42
    """Seed of the evaluation generators, independent of the training seed (>= 0)."""
    batch_size: int = 16
    """Prompts per generation batch (>= 1)."""
    n_prompts: int | None = None
    """Evaluate only the first this many prompts (>= 1); ``None`` evaluates the whole set."""

    def __post_init__(self) -> None:
        check_int("images_per_prompt", self.images_per_prompt, ge=1)
        check_int("seed", self.seed, ge=0)
        check_int("batch_size", self.batch_size, ge=1)
        if self.n_prompts is not None:
            check_int("n_prompts", self.n_prompts, ge=1)


@dataclass(kw_only=True)
class RunConfig:
    """The root of the tree: everything one run needs, dumped to ``run_dir/config.yaml``."""

    name: str = "run"
    """Run name, used for the run directory and logs (non-empty)."""
    world: WorldConfig = field(default_factory=WorldConfig)
    """The synthetic shapes world the run trains and evaluates on."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Generation evaluation settings."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The unified model's parts and generation path."""
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    """The staged training recipe."""
    next: NextConfig | None = None
    """A BLIP3o-NEXT model (image tokens → SANA); None for a BLIP3-o run. ``model`` still describes the
    shared parts (mini-CLIP, VAE, pixel decoder) the NEXT stages build on."""
    grpo: GRPOConfig | None = None
    """GRPO post-training of the NEXT model's image-token policy (``blip3o rl grpo``); None elsewhere."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"must be a non-empty str, got {self.name!r}", key="name")
        check_instance("world", self.world, WorldConfig)
        check_instance("eval", self.eval, EvalConfig)
        next_stages = [s for s in self.recipe.stages if s in NEXT_STAGES]
        if next_stages and self.next is None:
            raise ConfigError(f"stages {next_stages} need a BLIP3o-NEXT model (the next section)", key="recipe.stages")
        if "reader" in self.recipe.stages and not self.model.vision.reader_width:
            raise ConfigError(
                "the reader stage trains a layout reader of width model.vision.reader_width, which is 0; set it "
                "(e.g. 128) or drop the stage",
                key="recipe.stages",
            )
        if "next" in self.recipe.stages and self.next.sana != self.model.decoder.dit:
            raise ConfigError(
                f"is {asdict(self.next.sana)}, but the next stage starts SANA from the decoder stage's weights, "
                f"whose DiT model.decoder.dit is {asdict(self.model.decoder.dit)}: set both alike",
                key="next.sana",
            )
        if self.grpo is not None and self.next is None:
            raise ConfigError("GRPO tunes a BLIP3o-NEXT model; this config has no next section", key="grpo")
        if self.next is not None and self.next.image_codes == "layout":
            self._check_layout_codes()
        trainable = self.recipe.generation.trainable
        if self.model.generation.connector_layers and trainable and not {"connector", ""} & set(trainable):
            raise ConfigError(
                f"model.generation.connector_layers={self.model.generation.connector_layers} needs 'connector' in "
                f"the generation stage's trainable paths, got {trainable}",
                key="recipe.generation.trainable",
            )
        if self.eval.n_prompts is not None and self.eval.n_prompts > self.world.n_prompts:
            raise ConfigError(
                f"must be <= world.n_prompts ({self.world.n_prompts}) or None, got {self.eval.n_prompts}",
                key="eval.n_prompts",
            )

    def _check_layout_codes(self) -> None:
        """Layout image codes are the cells of the tower's grounded reading, and SANA is the pixel decoder
        trained on those readings: the NEXT config has to agree with the model's layout on both."""
        nxt, model = self.next, self.model
        if "image_tokenizer" in self.recipe.stages:
            raise ConfigError(
                "next.image_codes=layout has no image tokenizer to train; drop the image_tokenizer stage",
                key="recipe.stages",
            )
        if model.decoder_input != "layout":
            raise ConfigError(
                "next.image_codes=layout renders through a pixel decoder trained on layouts; set "
                "model.generation.target=layout",
                key="next.image_codes",
            )
        for name, value in layout_code_fields(model, nxt.layout_pool).items():
            if getattr(nxt, name) != value:
                raise ConfigError(
                    f"is {getattr(nxt, name)}, but layout codes of a {model.layout_side}×{model.layout_side} reading "
                    f"pooled by {nxt.layout_pool} need {value}",
                    key=f"next.{name}",
                )
