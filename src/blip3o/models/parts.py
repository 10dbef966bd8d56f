"""Builders for the `transformers`/`diffusers` parts of a unified model, from config or from a checkpoint.

Each builder returns the library's own class, so a tiny random part in a test and a full-size
pretrained part share every line of code. Nothing here downloads: a ``pretrained`` name is passed to
``from_pretrained``, which resolves a local path or the user's Hugging Face cache.
"""

from __future__ import annotations

import math

import torch
from diffusers import AutoencoderKL, LuminaNextDiT2DModel, SanaTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, SiglipConfig, SiglipModel

from blip3o.config.model import BackboneConfig, DiTConfig, VAEConfig, VisionConfig


def build_backbone(cfg: BackboneConfig, vocab_size: int) -> Qwen3ForCausalLM | Qwen2ForCausalLM:
    """A Qwen3 (or Qwen2) causal LM with SDPA attention."""
    model_cls, config_cls = (Qwen3ForCausalLM, Qwen3Config) if cfg.kind == "qwen3" else (Qwen2ForCausalLM, Qwen2Config)
    if cfg.pretrained:
        return model_cls.from_pretrained(cfg.pretrained)
    extra = {"head_dim": cfg.head_dim} if cfg.kind == "qwen3" else {}
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=0,
        **extra,
    )
    config._attn_implementation = "sdpa"
    return model_cls(config)


def build_clip(cfg: VisionConfig, vocab_size: int) -> SiglipModel:
    """A SigLIP model (vision + text towers): the mini-CLIP, trained contrastively on world captions.

    The vision tower alone serves understanding and defines the CLIP features that generation targets.
    """
    if cfg.pretrained:
        return SiglipModel.from_pretrained(cfg.pretrained)
    vision = {
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
    }
    text = {
        "vocab_size": vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.text_layers,
        "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    model = SiglipModel(SiglipConfig(vision_config=vision, text_config=text))
    with torch.no_grad():  # SigLIP's initialisation (Zhai et al. 2023); the library leaves both at 0
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    return model


def build_vae(cfg: VAEConfig) -> AutoencoderKL:
    """An AutoencoderKL with ``len(block_out_channels) - 1`` halvings."""
    if cfg.pretrained:
        return AutoencoderKL.from_pretrained(cfg.pretrained)
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_groups,
        sample_size=64,
    )


def build_lumina(cfg: DiTConfig, channels: int, side: int, cond_dim: int, patch: int = 1) -> LuminaNextDiT2DModel:
    """The BLIP3-o generation DiT: Lumina-Next with cross-attention over a (channels, side, side) map cut into
    ``patch``×``patch`` tokens (1 for CLIP maps, as officially)."""
    return LuminaNextDiT2DModel(
        sample_size=side,
        patch_size=patch,
        in_channels=channels,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_kv_heads=cfg.num_heads,
        multiple_of=cfg.multiple_of,
        ffn_dim_multiplier=cfg.ffn_multiplier,
        norm_eps=1e-5,
        learn_sigma=False,
        qk_norm=True,
        cross_attention_dim=cond_dim,
    )


def build_sana(
    cfg: DiTConfig, channels: int, side: int, caption_channels: int, out_channels: int | None = None
) -> SanaTransformer2DModel:
    """A SANA DiT over (channels, side, side) inputs with cross-attention to ``caption_channels``-wide tokens."""
    head_dim = cfg.hidden_size // cfg.num_heads
    return SanaTransformer2DModel(
        in_channels=channels,
        out_channels=out_channels or channels,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=head_dim,
        num_layers=cfg.num_layers,
        num_cross_attention_heads=cfg.num_heads,
        cross_attention_head_dim=head_dim,
        cross_attention_dim=cfg.hidden_size,
        caption_channels=caption_channels,
        mlp_ratio=cfg.mlp_ratio,
        sample_size=side,
        patch_size=1,
        # Absolute sin-cos positions: without them the latent tokens cannot tell which condition token is
        # theirs (SANA's Mix-FFN convolutions only give local context), and a small decoder draws blobs.
        interpolation_scale=1 if cfg.pos_embed else None,
    )


class Projector(nn.Module):
    """The understanding projector: vision width → backbone width (Linear → GELU → Linear), as in LLaVA.

    ``grid``: also add an embedding of each patch's place on the ``grid``×``grid`` patch grid to the
    projected tokens, learned from ViT's 2-D sin-cos table. The backbone's 1-D RoPE moves attention
    scores, not the values an answer reads, so without it a token that finds an object learns what it
    is but hardly where; Qwen2.5-VL gives its image tokens 2-D M-RoPE positions for the same reason.
    """

    def __init__(self, in_dim: int, out_dim: int, grid: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        self.positions = None
        if grid is not None:
            table = get_2d_sincos_pos_embed(out_dim, grid, output_type="pt").float()
            self.positions = nn.Parameter(table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P, in_dim) patch features → (B, P, out_dim) backbone tokens."""
        out = self.net(x)
        return out if self.positions is None else out + self.positions.to(out.dtype)
