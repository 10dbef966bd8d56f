"""Model configuration: the parts of a unified model and how generation is wired.

Two switches and an objective describe a generation path (DESIGN.md): ``condition`` = queries |
image_tokens, ``target`` = clip | latent, ``objective`` = flow | mse. BLIP3-o is
queries/clip/flow; its ablations are queries/clip/mse and queries/latent/flow.

Widths are chosen here and nowhere else; derived sizes (feature grid, latent grid, token counts) are
properties, so no count is ever written twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from blip3o.config.checks import ConfigError, check_float, check_int
from blip3o.world.spec import NUM_CLASS_IDS, NUM_COLOUR_IDS

LAYOUT_VOCAB = 1 + (NUM_CLASS_IDS - 1) * (NUM_COLOUR_IDS - 1)
"""Ids of a layout cell: 0 is background, 1 + (class − 1)·colours + (colour − 1) an object's class in its colour."""


def _check_heads(key: str, width: int, heads: int, multiple: int = 1) -> None:
    if width % heads or (width // heads) % multiple:
        raise ConfigError(f"width {width} must split into {heads} heads of a size divisible by {multiple}", key=key)


@dataclass(kw_only=True)
class BackboneConfig:
    """The autoregressive backbone (a `transformers` Qwen3 decoder)."""

    pretrained: str | None = None
    """A hub name or local path to load (then the widths below are ignored); None builds from this config."""
    kind: Literal["qwen3", "qwen2"] = "qwen3"
    """Decoder family: Qwen3, or Qwen2 (the text decoder of Qwen2.5-VL, BLIP3-o's official backbone)."""
    tie_embeddings: bool = True
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 192
    max_positions: int = 256
    rope_theta: float = 10000.0
    image_positions: bool = False
    """Add an embedding of each patch's place to the projected image tokens
    (:class:`blip3o.models.parts.Projector`): where an object is, for captions and position questions."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size"):
            check_int(f"backbone.{name}", getattr(self, name), ge=1)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads", key="backbone")


@dataclass(kw_only=True)
class VisionConfig:
    """The vision encoder (a `transformers` SigLIP vision tower), used for understanding and as the CLIP target."""

    pretrained: str | None = None
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 192
    text_layers: int = 2
    """Layers of the SigLIP text tower used only to train the mini-CLIP contrastively."""
    pool: int = 2
    """Average-pool factor from the patch grid to the generation target grid (BLIP3-o: 32 → 8, pool 4)."""
    grounding_cells: int = 1
    """Cells per side of each map patch that the mini-CLIP's per-patch grounding head labels (shapes scale):
    2 reads every 8-px patch as 2×2 cells of 4 px, so a layout target (``generation.target=layout``) is
    a 16×16 grid on the 8×8 map."""
    reader_width: int = 0
    """0: layouts are read by the mini-CLIP's own linear grounding head. Above 0: by a convolutional layout
    reader of this width (:class:`blip3o.models.heads.LayoutReader`) that the ``reader`` stage trains on the
    frozen tower's map; it sees each patch's neighbours and names objects' classes far more often."""

    def __post_init__(self) -> None:
        check_int("vision.image_size", self.image_size, ge=16, le=1024)
        check_int("vision.grounding_cells", self.grounding_cells, ge=1, le=8)
        check_int("vision.reader_width", self.reader_width, ge=0)
        check_int("vision.patch_size", self.patch_size, ge=1)
        if self.image_size % self.patch_size:
            raise ConfigError(f"must divide image_size {self.image_size}", key="vision.patch_size")
        if self.grid % self.pool:
            raise ConfigError(f"must divide the patch grid {self.grid}", key="vision.pool")
        _check_heads("vision.num_heads", self.hidden_size, self.num_heads)

    @property
    def grid(self) -> int:
        """Patch tokens per side."""
        return self.image_size // self.patch_size

    @property
    def target_grid(self) -> int:
        """Side of the pooled feature map that generation targets."""
        return self.grid // self.pool


@dataclass(kw_only=True)
class VAEConfig:
    """The latent autoencoder (a `diffusers` AutoencoderKL)."""

    pretrained: str | None = None
    block_out_channels: tuple[int, ...] = (16, 32, 32)
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_groups: int = 8

    def __post_init__(self) -> None:
        check_int("vae.latent_channels", self.latent_channels, ge=1)
        for c in self.block_out_channels:
            if c % self.norm_groups:
                raise ConfigError(f"channels {self.block_out_channels} must divide by norm_groups", key="vae")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(kw_only=True)
class DiTConfig:
    """A diffusion transformer (Lumina-Next for generation, SANA for the pixel decoder)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: float = 2.5
    """SANA's MLP ratio."""
    multiple_of: int = 16
    """Lumina-Next FFN width rounding; its FFN is ``ffn_multiplier · 8/3 · hidden`` rounded up to this."""
    ffn_multiplier: float | None = None
    """1.5 gives BLIP3-o's 4 × hidden FFN (7168 at width 1792)."""
    pos_embed: bool = True
    """SANA only: add absolute sin-cos positions to the latent tokens (Lumina-Next always uses 2-D RoPE)."""

    def __post_init__(self) -> None:
        check_int("dit.num_layers", self.num_layers, ge=1)
        _check_heads("dit.num_heads", self.hidden_size, self.num_heads, multiple=4)
        check_float("dit.mlp_ratio", self.mlp_ratio, gt=0)


@dataclass(kw_only=True)
class GenerationConfig:
    """How the backbone conditions image generation, what is generated, and with which objective."""

    condition: Literal["queries", "image_tokens"] = "queries"
    target: Literal["clip", "latent", "layout"] = "clip"
    """What the head generates: the standardised CLIP feature map (the paper's choice), VAE latents, or
    ``layout``: the mini-CLIP's grounded reading of its map, which class and which colour cover each
    patch, or each of its ``vision.grounding_cells``² cells (its per-patch grounding head, one-hot at ±1),
    snapped back to one-hot after sampling so the pixel decoder, trained on the same reading, only ever sees
    the kind of input it was trained on."""
    objective: Literal["flow", "mse", "discrete"] = "flow"
    """``flow``: flow matching (the paper's); ``mse``: regression of the CLIP map (its ablation);
    ``discrete``: discrete flow matching with a masked source over a layout's cells, each cell one class in
    one colour (:mod:`blip3o.diffusion.masked`, :class:`blip3o.models.heads.MaskedHead`)."""
    num_queries: int = 16
    connector_layers: int = 0
    """Trainable transformer layers (the backbone's decoder layer, at its width) between the backbone's last
    hidden states of the prompt and queries and the head, as MetaQuery's connector: they learn how the
    queries read the prompt while the backbone stays frozen (:class:`blip3o.models.unified.Connector`).
    0 feeds the query states to the head directly (official BLIP3-o)."""
    dit: DiTConfig = field(default_factory=DiTConfig)
    cond_dropout: float = 0.1
    """Probability of zeroing a sample's whole condition in training (classifier-free guidance)."""
    condition_norm: bool = False
    """Standardise the query states over the data before the head (:class:`blip3o.models.unified.BLIP3o`)."""
    prediction: Literal["velocity", "sample"] = "velocity"
    """What the flow head's DiT outputs: the velocity itself (official BLIP3-o), or the clean map x̂0,
    from which the head returns the velocity (x_σ − x̂0)/σ, so that the loss and the sampler are unchanged
    (x-prediction, Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise")."""
    prior: bool = False
    """Give the flow head a regressed conditional mean E[map | prompt] as extra input channels (and, with
    x-prediction, as the base of its x̂0), trained by its own MSE (:class:`blip3o.models.heads.FlowHead`);
    give the discrete head per-cell prior logits log p(cell | prompt), trained by their own cross-entropy
    (:class:`blip3o.models.heads.MaskedHead`)."""
    self_condition: bool = False
    """Self-conditioning (Analog Bits, Chen et al. 2022): the DiT also reads an earlier estimate of the clean
    map, its own no-grad one for half of the training rows and the previous step's when sampling
    (:class:`blip3o.models.heads.FlowHead`)."""
    prior_weight: float = 1.0
    """Weight of the prior's MSE beside the flow loss."""
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"
    shift: float = 1.0
    steps: int = 30
    guidance_scale: float = 3.0
    temperature: float = 1.0
    """Sampling temperature of a ``discrete`` head's cells (below 1 sharpens them)."""
    reveal_order: Literal["random", "confidence"] = "random"
    """Which cells a ``discrete`` head reveals at each step: each at its own random time, or the most confident
    ones first (MaskGIT; :func:`blip3o.diffusion.masked.unmask_sample`)."""
    confidence_noise: float = 1.0
    """Scale of the Gumbel perturbation of the confidence order (times σ); 0 reveals strictly by confidence."""
    refine_steps: int = 0
    """Corrector rounds of a ``discrete`` head after its last step: cells whose id the head, reading the whole
    map, finds less probable than ``refine_threshold`` are masked again and redrawn."""
    refine_threshold: float = 0.1
    corruption: float = 0.0
    """Training a ``discrete`` head: share of the revealed cells replaced by random ids, whose true ids are
    learnt too (:func:`blip3o.diffusion.masked.corrupt_cells`), so that the head learns to doubt wrong cells."""
    eta: float = 0.0
    """Sampling stochasticity of the head (:func:`blip3o.diffusion.sampler.euler_sample`): 0 is the Euler
    ODE sampler (official), 1 the ancestral one, each image's fresh noise drawn from its own seed."""

    def __post_init__(self) -> None:
        check_int("generation.num_queries", self.num_queries, ge=1)
        check_int("generation.connector_layers", self.connector_layers, ge=0)
        check_float("generation.eta", self.eta, ge=0, le=1)
        check_float("generation.cond_dropout", self.cond_dropout, ge=0, le=1)
        check_float("generation.shift", self.shift, gt=0)
        check_int("generation.steps", self.steps, ge=1)
        check_float("generation.prior_weight", self.prior_weight, ge=0)
        check_float("generation.temperature", self.temperature, gt=0)
        check_float("generation.confidence_noise", self.confidence_noise, ge=0)
        check_int("generation.refine_steps", self.refine_steps, ge=0)
        check_float("generation.refine_threshold", self.refine_threshold, gt=0, lt=1)
        check_float("generation.corruption", self.corruption, ge=0, lt=1)
        if self.corruption and self.objective != "discrete":
            raise ConfigError("corruption is an option of the discrete head", key="generation.corruption")
        if self.objective == "discrete" and self.target != "layout":
            raise ConfigError(
                "the discrete objective samples a layout's cells; use target=layout", key="generation.objective"
            )
        if self.objective != "flow" and (self.self_condition or self.prediction != "velocity"):
            raise ConfigError(
                "self_condition and prediction=sample are options of the flow head", key="generation.objective"
            )
        if self.prior and self.objective == "mse":
            raise ConfigError(
                "a prior is an input of the flow and discrete heads; the MSE head is one already",
                key="generation.prior",
            )
        if self.objective == "mse" and self.target != "clip":
            raise ConfigError("the MSE objective regresses CLIP features; use target=clip", key="generation.objective")
        if self.condition != "queries":
            raise ConfigError("only 'queries' is available for BLIP3-o models", key="generation.condition")


@dataclass(kw_only=True)
class DecoderConfig:
    """The pixel decoder: a SANA DiT over VAE latents conditioned on CLIP features."""

    dit: DiTConfig = field(default_factory=DiTConfig)
    spatial: bool = True
    """Also feed the CLIP map, upsampled to the latent grid, as extra input channels (besides the
    cross-attention), so that each latent token sees the feature of its own place."""
    cond_dropout: float = 0.1
    noise_augment: float = 0.0
    """Conditioning augmentation (Imagen, cascaded diffusion): each training map gets Gaussian noise of a
    std drawn uniformly from [0, noise_augment], so that the decoder learns to render maps that are near,
    not on, the encoder's (what a generation head samples). 0 trains on the encoder's maps only."""
    layout_pools: list[int] = field(default_factory=lambda: [1])
    """Block sides the decoder learns to draw layouts from (layout-target models only): each training layout
    is pooled by one of them, drawn per sample (:func:`blip3o.models.heads.pool_layout`: each p×p block
    becomes the object it holds most, as BLIP3o-NEXT's ``next.layout_pool`` codes see the image). ``[1]``
    trains on the reading as it is; ``[1, 2]`` serves a BLIP3-o layout model and NEXT over 2×2 codes."""
    steps: int = 20
    guidance_scale: float = 1.5

    def __post_init__(self) -> None:
        check_float("decoder.noise_augment", self.noise_augment, ge=0)
        if not self.layout_pools:
            raise ConfigError(
                "needs at least one block side; [1] trains on the reading as it is", key="decoder.layout_pools"
            )
        for p in self.layout_pools:
            check_int("decoder.layout_pools", p, ge=1)


@dataclass(kw_only=True)
class ModelConfig:
    """A unified BLIP3-o model: backbone, vision encoder, VAE, generation head and pixel decoder."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    tokenizer: str | None = None
    """Path of the text tokenizer (a world-trained BPE at shapes scale, the backbone's own at real scale)."""
    vocab_size: int = 1024

    def __post_init__(self) -> None:
        gen, (_, h, w) = self.generation, self.target_shape
        if gen.objective == "mse" and gen.num_queries != h * w:
            raise ConfigError(
                f"the MSE head needs one query per target token: num_queries must be {h * w} "
                f"({h}×{w}), got {gen.num_queries}",
                key="generation.num_queries",
            )
        pools = self.decoder.layout_pools
        if pools != [1] and self.decoder_input != "layout":
            raise ConfigError(
                f"pools layouts, and this decoder reads CLIP maps (generation.target={self.generation.target}); "
                "leave it [1] or set generation.target=layout",
                key="decoder.layout_pools",
            )
        if any(self.layout_side % p for p in pools):
            raise ConfigError(
                f"{pools} must all divide the {self.layout_side}×{self.layout_side} reading",
                key="decoder.layout_pools",
            )

    @property
    def target_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of what the generation head produces."""
        g = self.vision.target_grid
        if self.generation.target == "clip":
            return self.vision.hidden_size, g, g
        if self.generation.target == "layout":
            side = g * self.vision.grounding_cells
            return NUM_CLASS_IDS + NUM_COLOUR_IDS, side, side
        side = self.vision.image_size // self.vae.downsample
        return self.vae.latent_channels, side, side

    @property
    def target_patch(self) -> int:
        """The generation DiT's patch size: a layout's cells of one map patch make one token, so the DiT sees
        the map's token grid whatever the layout's resolution; 1 for the other targets."""
        return self.vision.grounding_cells if self.generation.target == "layout" else 1

    @property
    def layout_side(self) -> int:
        """Cells a side of the mini-CLIP's grounded reading: its map's grid times ``vision.grounding_cells``."""
        return self.vision.target_grid * self.vision.grounding_cells

    @property
    def decoder_input(self) -> Literal["clip", "layout"]:
        """What the pixel decoder reads: the layout for a layout-target model, else the CLIP map."""
        return "layout" if self.generation.target == "layout" else "clip"

    @property
    def decoder_channels(self) -> int:
        """Width of the pixel decoder's condition tokens."""
        return NUM_CLASS_IDS + NUM_COLOUR_IDS if self.decoder_input == "layout" else self.vision.hidden_size

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.vision.image_size // self.vae.downsample
        return self.vae.latent_channels, side, side
