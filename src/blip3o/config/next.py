"""BLIP3o-NEXT model configuration: discrete image tokens from the backbone, a connector, SANA over VAE latents.

BLIP3o-NEXT (arXiv 2510.15857; reference spec §5–6) is the ``image_tokens / latent / flow`` path of
DESIGN.md: the backbone writes an image as ``<im_start> <S{scale}> <I…>×N <im_end>`` and is trained on
those ids with cross-entropy; the last hidden states of the scale token and the N image tokens go
through a small connector into a SANA DiT, trained with flow matching on VAE latents.

Every count the official code wrote twice (730 vs 729, 2304, 32) is one field or one property here:
:attr:`NextConfig.condition_tokens` is the length of the SANA condition, :attr:`NextConfig.vocab_size`
the extended vocabulary, :attr:`NextConfig.latent_shape` the diffusion target.

Presets: :func:`next_3b` (official BLIP3o-NEXT-3B shapes, for meta-device checks and weight loading)
and :func:`shapes_next` (tiny, CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from blip3o.config.checks import ConfigError, check_float, check_instance, check_int
from blip3o.config.model import LAYOUT_VOCAB, BackboneConfig, DiTConfig, ModelConfig

__all__ = ["SANA_TOP_MODULES", "ImageTokenizerConfig", "NextConfig", "layout_code_fields", "next_3b", "shapes_next"]

SANA_TOP_MODULES: tuple[str, ...] = (
    "patch_embed",
    "time_embed",
    "caption_projection",
    "caption_norm",
    "transformer_blocks",
    "norm_out",
    "proj_out",
    "scale_shift_table",
)
"""Top-level children (and the one top-level parameter) of diffusers' ``SanaTransformer2DModel``;
``caption_projection`` (PixArt-α text projection, caption width → DiT width) and ``caption_norm``
(RMSNorm after it) are the two the official recipe keeps trainable (§5.5)."""


@dataclass(kw_only=True)
class ImageTokenizerConfig:
    """The discrete image tokenizer (TA-Tok style); the feature width and grid come from the vision encoder."""

    codebook_size: int = 1024
    """K, the number of codes (TA-Tok: 65536)."""
    code_dim: int = 32
    """d, the width of a code: the bottleneck between ``in_proj`` and the decoder."""
    pool_factors: tuple[int, ...] = (1,)
    """Average-pool factor of each scale, in scale-index order; each must divide the feature grid side."""
    commit_weight: float = 0.25
    """β, the weight of the commitment loss in the quantiser loss."""
    decoder_mlp_ratio: int = 4
    """Hidden width of the decoder's residual MLP, as a multiple of the feature width D."""

    def __post_init__(self) -> None:
        check_int("image_tokenizer.codebook_size", self.codebook_size, ge=1)
        check_int("image_tokenizer.code_dim", self.code_dim, ge=1)
        check_int("image_tokenizer.decoder_mlp_ratio", self.decoder_mlp_ratio, ge=1)
        check_float("image_tokenizer.commit_weight", self.commit_weight, ge=0.0)
        if not isinstance(self.pool_factors, tuple | list) or not self.pool_factors:
            raise ConfigError(
                f"must be a non-empty tuple of positive ints, got {self.pool_factors!r}",
                key="image_tokenizer.pool_factors",
            )
        for factor in self.pool_factors:
            if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
                raise ConfigError(
                    f"every factor must be a positive int, got {factor!r} in {self.pool_factors!r}",
                    key="image_tokenizer.pool_factors",
                )
        if len(set(self.pool_factors)) != len(self.pool_factors):
            raise ConfigError(
                f"factors must be distinct, got {self.pool_factors!r}", key="image_tokenizer.pool_factors"
            )
        self.pool_factors = tuple(self.pool_factors)


@dataclass(kw_only=True)
class NextConfig:
    """A BLIP3o-NEXT model: backbone + image vocabulary + connector + SANA DiT, and its two loss weights."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    """The autoregressive backbone (Qwen3); its input embedding is extended by :attr:`added_tokens` rows."""
    text_vocab_size: int = 1024
    """Length of the text tokenizer before the image vocabulary is added (Qwen3: 151,669; the world BPE:
    ≤ 1024). The model's vocabulary is read from the tokenizer when one is at hand; this field gives the
    same layout without one (meta-device builds, :attr:`vocab_size`)."""
    image_codes: Literal["vq", "layout"] = "vq"
    """What an image token is. ``vq``: a code of the SimVQ image tokenizer over the vision features (TA-Tok,
    the official path; trained by the ``image_tokenizer`` stage). ``layout``: one cell of the mini-CLIP's
    grounded reading (which class in which colour the tower's per-patch grounding head sees there, one id of
    :data:`blip3o.config.model.LAYOUT_VOCAB`), a fixed quantiser of the frozen features whose codebook is the
    one-hot layouts, with nothing to train. Layout codes are local (an edit changes only the cells of what it
    touches) and the shapes world's scorer reads exactly what they hold."""
    codebook_size: int = 1024
    """K, codes of the image tokenizer, one ``<I{k}>`` token each (TA-Tok: 65,536)."""
    num_scales: int = 1
    """Scale tokens ``<S0>`` … ``<S{n-1}>``, one per pool factor of the image tokenizer (official: 3)."""
    image_tokens: int = 16
    """N, image tokens per image at the scale used (official: 27×27 = 729 at 384 px, pool 1)."""
    connector_dim: int = 96
    """Output width of the connector = SANA's ``caption_channels`` (official: 2304, a Gemma-2-2B width)."""
    sana: DiTConfig = field(default_factory=DiTConfig)
    """The SANA DiT (width, depth, heads, MLP ratio, whether to add sin-cos positions)."""
    latent_channels: int = 4
    """Channels of the VAE latents SANA denoises (DC-AE f32c32: 32)."""
    latent_side: int = 16
    """Side of the latent grid (DC-AE f32 at 1024 px: 32)."""
    cond_dropout: float = 0.1
    """Probability of zeroing a sample's whole condition block (before the connector) in training, for CFG."""
    train_sana: list[str] = field(default_factory=lambda: ["caption_projection", "caption_norm"])
    """Module paths inside SANA left trainable; the rest of SANA is frozen (official §5.5)."""
    ce_weight: float = 1.0
    """Weight of the cross-entropy loss on the image tokens (and the prompt, see ``train_prompt_text``)."""
    flow_weight: float = 1.0
    """Weight of the flow-matching loss on the latents."""
    flow_fraction: float = 1.0
    """Share of a batch's text-to-image rows, and of its edit rows, that also take the flow-matching loss
    (at least one of each kind present; the first of the batch's shuffled rows); every row takes
    cross-entropy, and the flow loss is the mean over the rows that take it. SANA over 16×16 latents costs
    most of a shapes step's forward and backward, where the backbone writes 64 codes. 1 is the official
    recipe."""
    start_cell_weight: float = 1.0
    """Layout codes: weight of the cross-entropy at a written object cell whose left and upper neighbours are
    background (or the image's edge), the cell where an object starts in raster order. There the prompt
    alone decides the object's class and colour; every later cell of it can copy both from its neighbours.
    1 weighs every code alike. At 10 the first cells take the asked colour more often (0.79 against 0.59,
    teacher-forced on captions) but objects start too readily: GenEval-shapes 0.349 against 0.436 at 1
    (docs/next.md "Colours are learnt late")."""
    layout_pool: int = 1
    """Layout codes: cells a side of the block of the reading one code stands for (the most frequent object of
    the block when half of it is objects, else background; TA-Tok's scale pooling, on ids). 2 writes a 16×16
    reading as 64 codes: a quarter of the tokens, and objects of 2–3 codes a side; SANA upsamples the condition
    to its latent grid."""
    name_init: bool = False
    """Layout codes: start each image-token embedding from the text embeddings of its class and colour
    names (:func:`blip3o.models.next.word_rows` as the projection of the one-hot cells) instead of a random
    projection, so that the words of a prompt or edit instruction and the codes that draw them share
    directions from the first step."""
    code_dim: int = 32
    """Width of a code of the image tokenizer's SimVQ quantiser (the bottleneck of its feature decoder)."""
    pool_factors: tuple[int, ...] = (1,)
    """The image tokenizer's pool factor per scale token, in scale-index order (one per ``<S{i}>``)."""
    spatial: bool = False
    """Also feed the image-token part of the condition, as a map upsampled to the latent grid, to SANA as
    input channels (the shapes pixel decoder's layout, :class:`blip3o.config.model.DecoderConfig`);
    needs N to be a square and ``connector_dim`` the decoder's feature width."""
    reference_latents: bool = True
    """Editing: SANA also takes the reference image's VAE latents as extra input channels, whose input
    weights start at zero (so an untrained model ignores them, and text-to-image rows pass zeros)."""
    edit_fraction: float = 0.3
    """Share of training rows that are edit triplets (reference tokens + instruction → target image)."""
    edit_corruption: float = 0.0
    """Edit rows: share of the target's input codes replaced by random codes (labels keep the true codes),
    so that SANA learns to take from the reference latents what the codes get wrong (codes of CLIP
    features change almost everywhere when one object changes). Off by default: on the shapes world
    0.3 moved editing within noise (accuracy 0.31 against 0.275, consistency 0.285 against 0.26) and
    GenEval down (0.094 against 0.162), docs/next.md."""
    understanding_fraction: float = 0.2
    """Share of training rows that are image → text (captions and questions about image tokens)."""
    text_fraction: float = 0.0
    """Share of the text-to-image rows that draw one of the world's text scenes (a quoted word drawn large)
    instead of a shape scene: text rendering, the target of OCR rewards."""
    temperature: float = 1.0
    """AR sampling temperature (0: greedy)."""
    top_k: int | None = 1200
    """AR sampling top-k (official 1200); ``None`` keeps all codes."""
    top_p: float = 0.95
    """AR sampling nucleus mass (official 0.95)."""
    ar_guidance_scale: float = 1.0
    """CFG on the image-token logits against an empty prompt (1: off, as officially)."""
    steps: int = 30
    """SANA Euler steps (official 30)."""
    guidance_scale: float = 2.0
    """SANA CFG scale (official 2.0 for NEXT)."""
    edit_strength: float = 1.0
    """Editing: the noise level SANA starts from, the reference's latents noised to it (SDEdit, the
    "noise-space injection" of the official editing branch); 1 starts from pure noise."""
    edit_blend: bool = False
    """Editing: keep the reference wherever the written codes equal the reference's codes (one code of
    margin around every changed code): there the latents follow the reference's noise path at every SANA
    step, so the redrawn part sees its context (blended latent diffusion, Avrahami et al. 2023), and the
    decoded image takes the reference's own pixels, so kept objects do not pass through the VAE. Needs
    local codes (layout codes, or ``recipe.clip_local_weight``), where an edit changes only the codes of
    what it touches."""
    edit_blend_margin: int = 1
    """``edit_blend``: codes around each changed code that SANA redraws too, so that an object whose edge
    reaches a neighbouring patch is not cut at the code boundary."""
    copy_bias: float = 0.0
    """Editing: added to the logit of the reference's own code at each position while the codes are sampled
    (after token guidance), so a cell the instruction does not name keeps its code unless the model is sure
    it changes. Needs local codes (layout codes, or ``recipe.clip_local_weight``), where an unchanged object
    keeps its codes at the same positions. 0 is off."""
    upsample_codes: bool = False
    """Pooled layout codes (``layout_pool`` > 1) only: a small convolutional net
    (:class:`blip3o.models.heads.CodeUpsampler`, trained in the ``next`` stage on the world's readings by
    cross-entropy) puts back the reading's cells that the blocks drop, and SANA's spatial input is that
    reading (one-hot at ±1, as the pixel decoder it starts from was trained on) instead of the connector's
    block map. The condition tokens (cross-attention) stay the connector's. SANA trains on the true reading;
    at sampling it draws from the reading upsampled from the written codes."""
    upsampler_width: int = 64
    upsampler_batch: int = 256
    """Readings per step the upsampler trains on (drawn from all training scenes, beside the step's rows)."""
    train_prompt_text: bool = False
    """Also take cross-entropy on the prompt text (system and user turns). Off by default: the prompt is
    always given at inference, so predicting it only spends capacity and gradient on text modelling that
    the generation stage does not need, and it dilutes the image-token CE when the two are averaged over
    tokens. The official recipe takes CE on the whole sequence (§6.1); :func:`next_3b` turns it on to
    match."""

    def __post_init__(self) -> None:
        check_instance("next.backbone", self.backbone, BackboneConfig)
        check_instance("next.sana", self.sana, DiTConfig)
        check_int("next.text_vocab_size", self.text_vocab_size, ge=1)
        check_int("next.codebook_size", self.codebook_size, ge=2)
        check_int("next.num_scales", self.num_scales, ge=1)
        check_int("next.image_tokens", self.image_tokens, ge=1)
        check_int("next.connector_dim", self.connector_dim, ge=1)
        check_int("next.latent_channels", self.latent_channels, ge=1)
        check_int("next.latent_side", self.latent_side, ge=1)
        check_float("next.cond_dropout", self.cond_dropout, ge=0, le=1)
        check_float("next.ce_weight", self.ce_weight, ge=0)
        check_float("next.flow_weight", self.flow_weight, ge=0)
        check_float("next.flow_fraction", self.flow_fraction, gt=0, le=1)
        check_float("next.start_cell_weight", self.start_cell_weight, ge=1)
        if self.start_cell_weight != 1 and self.image_codes != "layout":
            raise ConfigError(
                f"weighs layout cells, so it needs image_codes='layout' (got {self.image_codes!r}); leave it at 1",
                key="next.start_cell_weight",
            )
        if self.ce_weight == 0 and self.flow_weight == 0:
            raise ConfigError("ce_weight and flow_weight cannot both be 0 (nothing would train)", key="next")
        for name in ("edit_fraction", "edit_corruption", "understanding_fraction", "text_fraction", "top_p"):
            check_float(f"next.{name}", getattr(self, name), ge=0, le=1)
        if self.edit_fraction + self.understanding_fraction > 1:
            raise ConfigError("edit_fraction + understanding_fraction must be <= 1", key="next")
        check_float("next.temperature", self.temperature, ge=0)
        if self.top_k is not None:
            check_int("next.top_k", self.top_k, ge=1)
        check_float("next.ar_guidance_scale", self.ar_guidance_scale, ge=0)
        check_int("next.steps", self.steps, ge=1)
        check_float("next.guidance_scale", self.guidance_scale, ge=0)
        check_float("next.edit_strength", self.edit_strength, gt=0, le=1)
        check_int("next.edit_blend_margin", self.edit_blend_margin, ge=0)
        check_float("next.copy_bias", self.copy_bias, ge=0)
        check_int("next.code_dim", self.code_dim, ge=1)
        check_int("next.layout_pool", self.layout_pool, ge=1)
        if self.layout_pool != 1 and self.image_codes != "layout":
            raise ConfigError(
                f"pools layout cells, so it needs image_codes='layout' (got {self.image_codes!r}); leave it at 1",
                key="next.layout_pool",
            )
        check_int("next.upsampler_width", self.upsampler_width, ge=1)
        check_int("next.upsampler_batch", self.upsampler_batch, ge=1)
        if self.upsample_codes and (self.layout_pool == 1 or not self.spatial):
            raise ConfigError(
                "upsamples pooled layout codes into SANA's spatial input, so it needs image_codes='layout' with "
                f"layout_pool > 1 and spatial=true (got layout_pool={self.layout_pool}, spatial={self.spatial})",
                key="next.upsample_codes",
            )
        if self.name_init and self.image_codes != "layout":
            raise ConfigError(
                f"starts layout codes from their class and colour names, so it needs image_codes='layout' "
                f"(got {self.image_codes!r}); leave it false",
                key="next.name_init",
            )
        if self.image_codes not in ("vq", "layout"):
            raise ConfigError(f"must be 'vq' or 'layout', got {self.image_codes!r}", key="next.image_codes")
        self.pool_factors = tuple(self.pool_factors)
        if len(self.pool_factors) != self.num_scales:
            raise ConfigError(
                f"needs one pool factor per scale token ({self.num_scales}), got {self.pool_factors}",
                key="next.pool_factors",
            )
        if self.spatial and math.isqrt(self.image_tokens) ** 2 != self.image_tokens:
            raise ConfigError(
                f"spatial conditioning needs a square number of image tokens, got {self.image_tokens}",
                key="next.spatial",
            )
        if self.spatial and self.latent_side % math.isqrt(self.image_tokens):
            raise ConfigError(
                f"spatial conditioning upsamples the {math.isqrt(self.image_tokens)}² image tokens to the latent grid, "
                f"so their side must divide latent_side {self.latent_side}",
                key="next.spatial",
            )
        if not isinstance(self.train_prompt_text, bool):
            raise ConfigError(f"must be a bool, got {self.train_prompt_text!r}", key="next.train_prompt_text")
        self._check_train_sana()

    def _check_train_sana(self) -> None:
        key = "next.train_sana"
        if isinstance(self.train_sana, str) or not isinstance(self.train_sana, list | tuple):
            raise ConfigError(f"must be a list of module paths inside SANA, got {self.train_sana!r}", key=key)
        for path in self.train_sana:
            if not isinstance(path, str) or not path or path.split(".")[0] not in SANA_TOP_MODULES:
                raise ConfigError(
                    f"every path must start with one of {', '.join(SANA_TOP_MODULES)}; got {path!r}", key=key
                )
        if len(set(self.train_sana)) != len(self.train_sana):
            raise ConfigError(f"paths must be distinct, got {self.train_sana!r}", key=key)
        self.train_sana = list(self.train_sana)

    def tokenizer_config(self) -> ImageTokenizerConfig:
        """The image tokenizer this model's codes come from."""
        return ImageTokenizerConfig(
            codebook_size=self.codebook_size, code_dim=self.code_dim, pool_factors=self.pool_factors
        )

    @property
    def sana_in_channels(self) -> int:
        """SANA's input channels: noisy latents, the condition map when spatial, reference latents for editing."""
        return self.latent_channels * (2 if self.reference_latents else 1) + (self.connector_dim if self.spatial else 0)

    @property
    def added_tokens(self) -> int:
        """Tokens the image vocabulary adds: ``<im_start>``, ``<im_end>``, the scale tokens and the K codes."""
        return 2 + self.num_scales + self.codebook_size

    @property
    def vocab_size(self) -> int:
        """The extended vocabulary when the image tokens are appended to the text tokenizer (official: 217,210)."""
        return self.text_vocab_size + self.added_tokens

    @property
    def condition_tokens(self) -> int:
        """Length of the SANA condition: the scale token and the N image tokens (official: 730)."""
        return 1 + self.image_tokens

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, side, side) of the VAE latents SANA denoises."""
        return self.latent_channels, self.latent_side, self.latent_side


def layout_code_fields(model: ModelConfig, pool: int = 1) -> dict[str, int]:
    """The :class:`NextConfig` counts that layout codes (``image_codes="layout"``) of ``model``'s grounded reading
    fix: one code per cell id, one scale, one token per ``pool``×``pool`` block of cells, and a connector as wide
    as the pixel decoder's cell condition."""
    if model.layout_side % pool:
        raise ConfigError(f"must divide the reading's side {model.layout_side}, got {pool}", key="next.layout_pool")
    return {
        "codebook_size": LAYOUT_VOCAB,
        "num_scales": 1,
        "image_tokens": (model.layout_side // pool) ** 2,
        "connector_dim": model.decoder_channels,
    }


def next_3b() -> NextConfig:
    """Official BLIP3o-NEXT-3B shapes (full-size-configs.md; "to verify" against the checkpoint's config).

    - backbone: Qwen3-1.7B widths (2048 wide, 28 layers, 16 heads / 8 KV heads of 128, MLP 6144, tied
      embeddings, rope θ 1e6) over the Qwen3 tokenizer's 151,669 tokens;
    - image vocabulary: TA-Tok's 65,536 codes, 3 scale tokens (pool 1, 2, 3: 27×27, 13×13, 9×9 grids; the
      tokenizer here needs a factor that divides the grid, so pool 2 is for the layout only), 729 tokens per
      384 px image at pool 1, so
      the vocabulary is 217,210 and the condition 730 tokens long;
    - connector: backbone width → 2304 (SANA's caption channels);
    - SANA-1.5 1.6B: 20 blocks, 70 heads × 32 = 2240 wide, MLP ratio 2.5, no absolute positions, over
      DC-AE f32c32 latents of 1024 px images: 32 channels on a 32×32 grid;
    - CE on the whole sequence, as the official recipe (§6.1);
    - text-to-image only (no reference-latent channels), as the released checkpoint.
    """
    backbone = BackboneConfig(
        kind="qwen3",
        tie_embeddings=True,
        hidden_size=2048,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=6144,
        max_positions=40960,
        rope_theta=1e6,
    )
    return NextConfig(
        backbone=backbone,
        text_vocab_size=151669,
        codebook_size=65536,
        num_scales=3,
        pool_factors=(1, 2, 3),
        image_tokens=729,
        connector_dim=2304,
        sana=DiTConfig(hidden_size=2240, num_layers=20, num_heads=70, mlp_ratio=2.5, pos_embed=False),
        latent_channels=32,
        latent_side=32,
        reference_latents=False,
        train_prompt_text=True,
    )


def shapes_next() -> NextConfig:
    """A tiny BLIP3o-NEXT for the shapes world and CPU tests.

    A 64-wide, 2-layer Qwen3 over the world BPE (≤ 1024 tokens); 1024 codes, one scale, 16 image tokens
    per image (a 4×4 grid); connector width 96 (distinct from both 64-wide ends, so a swapped width
    fails loudly); a 64-wide, 2-layer SANA over 4-channel 16×16 VAE latents.
    """
    return NextConfig(
        backbone=BackboneConfig(hidden_size=64, num_layers=2),
        text_vocab_size=1024,
        codebook_size=1024,
        num_scales=1,
        image_tokens=16,
        connector_dim=96,
        sana=DiTConfig(hidden_size=64, num_layers=2, num_heads=4),
        latent_channels=4,
        latent_side=16,
    )
