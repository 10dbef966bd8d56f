"""Building and loading models: weights from safetensors, the frozen encoders, the unified BLIP3o model."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from blip3o.config.model import ModelConfig, VisionConfig
from blip3o.data.processing import to_pixels
from blip3o.data.tokenizer import IMAGE_TOKEN
from blip3o.models.heads import (
    FlowHead,
    LayoutReader,
    MaskedHead,
    RegressionHead,
    cells_to_map,
    ids_to_layout,
    layout_to_ids,
    snap_layout,
    tokens_to_map,
)
from blip3o.models.parts import Projector, build_backbone, build_clip, build_vae
from blip3o.models.unified import BLIP3o
from blip3o.world.spec import NUM_CLASS_IDS, NUM_COLOUR_IDS

GROUNDING_PREFIX = "patches."
"""Where a clip stage's checkpoint keeps the mini-CLIP's per-patch grounding head (``TaggedSiglip.patches``)."""


def grounding_width(cells: int) -> int:
    """Outputs of the mini-CLIP's per-patch grounding head: class and colour logits for each of a patch's
    ``cells``×``cells`` cells."""
    return cells * cells * (NUM_CLASS_IDS + NUM_COLOUR_IDS)


def build_reader(cfg: VisionConfig) -> LayoutReader:
    """The layout reader of ``cfg`` (``reader_width`` > 0) over the mini-CLIP's map."""
    return LayoutReader(cfg.hidden_size, cfg.reader_width, cfg.grounding_cells)


def load_weights(module: nn.Module, path: str | Path, prefix: str = "", skip: tuple[str, ...] = ()) -> nn.Module:
    """Load a safetensors file strictly into ``module``: only keys under ``prefix`` (stripped), and
    neither loading nor requiring keys that start with one of ``skip``."""
    state = load_file(str(path))
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if skip:
        state = {k: v for k, v in state.items() if not k.startswith(skip)}
    missing, unexpected = module.load_state_dict(state, strict=False)
    stray = [k for k in missing if not k.startswith(skip)] if skip else missing
    if unexpected or stray:
        raise ValueError(f"{path} does not match the model: unexpected keys {unexpected[:5]}, missing {stray[:5]}")
    return module


def clip_map(vision: nn.Module, pixels: torch.Tensor, pool: int) -> torch.Tensor:
    """The pooled CLIP feature map (B, D, g, g) of images (B, 3, H, W) in [-1, 1]."""
    grid = tokens_to_map(vision(pixel_values=pixels).last_hidden_state)  # (B, D, g, g)
    return F.avg_pool2d(grid, pool) if pool > 1 else grid


def measure_scales(clip_vision: nn.Module, vae: nn.Module, images: torch.Tensor, pool: int) -> dict[str, torch.Tensor]:
    """Statistics that standardise generation targets, like a VAE's scaling factor but per element.

    CLIP maps: mean and std per (channel, position) over images, since positional embeddings give
    every position a large constant part that carries no information about the image. VAE latents:
    mean and std per channel.
    """
    with torch.no_grad():
        pixels = to_pixels(images[:512])
        feats = clip_map(clip_vision, pixels, pool)  # (N, D, g, g)
        latents = vae.encode(pixels).latent_dist.mean  # (N, C, h, w)
    return {
        "feature_mean": feats.mean(0),
        "feature_std": feats.std(0).clamp_min(1e-3),
        "latent_mean": latents.mean((0, 2, 3))[:, None, None],
        "latent_std": latents.std((0, 2, 3))[:, None, None].clamp_min(1e-3),
    }


def update_digest(h: hashlib._Hash, tensor: torch.Tensor, name: str = "") -> None:
    """Feed a tensor's name, dtype, shape and bytes to the hash ``h``."""
    h.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
    h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


class Encoders:
    """The frozen encoders of the later stages: the mini-CLIP vision tower and the VAE, with the statistics
    (:func:`measure_scales`) that standardise their outputs as generation targets."""

    def __init__(
        self,
        vision: nn.Module,
        vae: nn.Module,
        pool: int,
        scales: dict[str, torch.Tensor],
        grounding: nn.Module | None = None,
        reader: nn.Module | None = None,
        needs_reader: bool = False,
    ) -> None:
        """``grounding``: the mini-CLIP's per-patch head (feature → class and colour logits) that
        :meth:`layout` reads the map with; None for a tower trained without one. ``reader``: a
        :class:`~blip3o.models.heads.LayoutReader` that reads layouts instead; ``needs_reader``: the config
        asks for one, so that reading a layout without it is an error rather than the linear head's reading."""
        self.vision, self.vae = vision.eval(), vae.eval()
        self.grounding = grounding.eval() if grounding is not None else None
        self.reader = reader.eval() if reader is not None else None
        self.needs_reader = needs_reader
        parts = [self.vision, self.vae, grounding or nn.Module(), reader or nn.Module()]
        for p in (p for part in parts for p in part.parameters()):
            p.requires_grad_(False)
        self.pool, self.scales = pool, scales
        self.cache: Path | None = None

    @classmethod
    def from_weights(
        cls,
        cfg: ModelConfig,
        vocab_size: int,
        clip_weights: str | Path,
        vae_weights: str | Path,
        scales: dict[str, torch.Tensor],
        reader_weights: str | Path | None = None,
    ) -> Encoders:
        """The encoders of a run's weights; ``reader_weights``: a reader stage's (``vision.reader_width`` > 0),
        None before that stage has trained."""
        vision = load_weights(build_clip(cfg.vision, vocab_size), clip_weights, prefix="clip.").vision_model
        vae = load_weights(build_vae(cfg.vae), vae_weights, prefix="vae.")
        grounding = None
        with safe_open(str(clip_weights), "pt") as f:
            head, keys = GROUNDING_PREFIX + "weight", set(f.keys())
            stored = f.get_slice(head).get_shape()[0] if head in keys else None
        if stored is not None:
            width, cells = grounding_width(cfg.vision.grounding_cells), cfg.vision.grounding_cells
            if stored != width:
                raise ValueError(
                    f"{clip_weights}: the grounding head has {stored} outputs, and vision.grounding_cells={cells} "
                    f"needs {width} ({cells}×{cells} cells × {NUM_CLASS_IDS + NUM_COLOUR_IDS} labels); set "
                    "vision.grounding_cells to what the clip stage was trained with"
                )
            grounding = nn.Linear(cfg.vision.hidden_size, width)
            load_weights(grounding, clip_weights, prefix=GROUNDING_PREFIX)
        reader = None
        if reader_weights is not None:
            reader = load_weights(build_reader(cfg.vision), reader_weights)
        return cls(vision, vae, cfg.vision.pool, scales, grounding, reader, needs_reader=cfg.vision.reader_width > 0)

    @torch.no_grad()
    def clip(self, pixels: torch.Tensor) -> torch.Tensor:
        """Standardised CLIP map (B, D, g, g)."""
        return (clip_map(self.vision, pixels, self.pool) - self.scales["feature_mean"]) / self.scales["feature_std"]

    @torch.no_grad()
    def layout(self, pixels: torch.Tensor) -> torch.Tensor:
        """The grounded reading of the CLIP map (B, classes + colours, g·c, g·c): which class and which colour
        the tower's grounding head sees on each patch, or on each of its c×c cells, one-hot at ±1
        (:func:`snap_layout`). A layout reader, when the run has one, reads the map instead of the linear head."""
        if self.reader is not None:
            return snap_layout(self.reader(clip_map(self.vision, pixels, self.pool)), NUM_CLASS_IDS)
        if self.needs_reader:
            raise ValueError(
                "vision.reader_width > 0 reads layouts with the reader stage's layout reader, and this run has "
                "none yet: train the reader stage first"
            )
        if self.grounding is None:
            raise ValueError(
                "a layout target needs the mini-CLIP's per-patch grounding head, and these clip weights have none"
                f" (no '{GROUNDING_PREFIX}*' keys): train the clip stage of a shapes preset, or use target=clip"
            )
        raw = clip_map(self.vision, pixels, self.pool)
        logits = self.grounding(raw.flatten(2).transpose(1, 2))  # (B, g·g, c·c·(classes + colours))
        cells = math.isqrt(logits.shape[-1] // (NUM_CLASS_IDS + NUM_COLOUR_IDS))
        return snap_layout(cells_to_map(logits, cells), NUM_CLASS_IDS)

    def encoder(self, target: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The encoding of images as a generation target or a decoder input: ``clip``, ``latent`` or ``layout``."""
        return {"clip": self.clip, "latent": self.latents, "layout": self.layout}[target]

    def fingerprint(self, target: str) -> str:
        """A digest of everything that encodes images as ``target`` (``clip``, ``latent`` or ``cells``): the
        weights, the scales and the pooling, so that a stored encoding is read back only by identical encoders."""
        modules = {"clip": [self.vision], "latent": [self.vae], "cells": [self.vision, self.grounding, self.reader]}
        scales = {"clip": ["feature_mean", "feature_std"], "latent": ["latent_mean", "latent_std"], "cells": []}
        if target not in modules:
            raise ValueError(f"unknown encoding {target!r}; allowed: {', '.join(modules)}")
        h = hashlib.sha256(f"{target} pool={self.pool}".encode())
        for module in modules[target]:
            for name, t in (module.state_dict() if module is not None else {"none": torch.zeros(0)}).items():
                update_digest(h, t, name)
        for name in scales[target]:
            update_digest(h, self.scales[name], name)
        return h.hexdigest()

    @torch.no_grad()
    def encode_all(self, images: torch.Tensor, target: str, chunk: int = 256) -> torch.Tensor:
        """Every one of uint8 images (N, 3, H, W) encoded as ``target``, ``chunk`` images at a time: ``clip``
        (:meth:`clip`), ``latent`` (:meth:`latents`), ``cells`` (the cell ids of :meth:`layout`, uint8) or
        ``layout`` (:meth:`layout`, from those cells by :func:`~blip3o.models.heads.ids_to_layout`, exactly).

        With ``cache`` set (a directory; the trainer sets the run's ``cache/``), the result is stored there
        under a digest of the images and of the encoder (:meth:`fingerprint`), and read back by any later stage
        that asks for the same encoding of the same images, instead of encoding them again.
        """
        if target == "layout":  # kept as cell ids: 61 times fewer bytes
            return ids_to_layout(self.encode_all(images, "cells", chunk).long())
        encode = {
            "clip": self.clip,
            "latent": self.latents,
            "cells": lambda pixels: layout_to_ids(self.layout(pixels)).to(torch.uint8),
        }
        if target not in encode:
            raise ValueError(f"unknown encoding {target!r}; allowed: {', '.join(encode)}, layout")
        path = None
        if self.cache is not None:
            h = hashlib.sha256(self.fingerprint(target).encode())
            update_digest(h, images, "images")
            path = Path(self.cache) / f"{target}-{h.hexdigest()[:24]}.safetensors"
            if path.is_file():
                return load_file(str(path))[target]
        out = torch.cat([encode[target](to_pixels(images[i : i + chunk])) for i in range(0, len(images), chunk)])
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # ranks may write the same file at once
            save_file({target: out.contiguous()}, str(tmp))
            os.replace(tmp, path)
        return out

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Standardised VAE latents (B, C, h, w)."""
        z = self.vae.encode(pixels).latent_dist.mean
        return (z - self.scales["latent_mean"]) / self.scales["latent_std"]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Standardised latents → pixels in [-1, 1]."""
        return self.vae.decode(latents * self.scales["latent_std"] + self.scales["latent_mean"]).sample


def unit_scales(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Identity statistics (for tests and for measuring the real ones)."""
    d, g, c = cfg.vision.hidden_size, cfg.vision.target_grid, cfg.vae.latent_channels
    return {
        "feature_mean": torch.zeros(d, g, g),
        "feature_std": torch.ones(d, g, g),
        "latent_mean": torch.zeros(c, 1, 1),
        "latent_std": torch.ones(c, 1, 1),
    }


def build_blip3o(cfg: ModelConfig, tokenizer, vision: nn.Module) -> BLIP3o:
    """A BLIP3o model from config around a (trained) vision tower."""
    backbone = build_backbone(cfg.backbone, len(tokenizer))
    width = backbone.config.hidden_size
    channels, side, _ = cfg.target_shape
    gen = cfg.generation
    prior = gen.num_queries if gen.prior else None
    if gen.objective == "mse":
        head: nn.Module = RegressionHead(width, channels, side)
    elif gen.objective == "discrete":
        head = MaskedHead(gen.dit, side, width, cfg.target_patch, prior_tokens=prior)
    else:
        head = FlowHead(
            gen.dit,
            channels,
            side,
            width,
            prediction=gen.prediction,
            prior_tokens=prior,
            patch=cfg.target_patch,
            self_condition=gen.self_condition,
        )
    projector = Projector(cfg.vision.hidden_size, width, cfg.vision.grid if cfg.backbone.image_positions else None)
    return BLIP3o(
        backbone,
        vision,
        projector,
        head,
        cfg.generation.num_queries,
        tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        condition_norm=cfg.generation.condition_norm,
        connector_layers=cfg.generation.connector_layers,
    )
