"""The shapes-world training stages of BLIP3-o as tasks for :func:`blip3o.train.trainer.train`.

Each task builds its trainable model, serves deterministic random-access batches, and computes its
losses; frozen encoders (the mini-CLIP vision tower when it is a target, the VAE) are held by the
task and run under ``no_grad`` outside the trained model.

Stages (in order): ``clip`` (SigLIP contrastive on captions), ``vae`` (AutoencoderKL reconstruction),
``decoder`` (SANA over VAE latents from CLIP features), ``understanding`` (projector + backbone on
captions and questions), ``generation`` (queries + generation head, backbone frozen: the paper's
sequential recipe; or everything trainable with understanding batches mixed in: joint).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from blip3o.config.model import ModelConfig
from blip3o.data.processing import generation_inputs, to_pixels, understanding_inputs
from blip3o.data.tokenizer import IMAGE_TOKEN, load_tokenizer
from blip3o.data.world_data import WorldSplit, batch_indices, load_split
from blip3o.diffusion.flow import flow_loss, interpolate, sample_sigmas, velocity_target
from blip3o.models.heads import FlowHead, PixelDecoder, RegressionHead
from blip3o.models.parts import Projector, build_backbone, build_clip, build_vae
from blip3o.models.unified import BLIP3o


def load_weights(module: nn.Module, path: str | Path, prefix: str = "") -> nn.Module:
    """Load a safetensors file (optionally only keys under ``prefix``) strictly into ``module``."""
    state = load_file(str(path))
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    module.load_state_dict(state, strict=True)
    return module


def clip_map(vision: nn.Module, pixels: torch.Tensor, pool: int) -> torch.Tensor:
    """The pooled CLIP feature map (B, D, g, g) of images (B, 3, H, W) in [-1, 1]."""
    tokens = vision(pixel_values=pixels).last_hidden_state  # (B, P, D)
    b, p, d = tokens.shape
    side = int(p**0.5)
    grid = tokens.transpose(1, 2).reshape(b, d, side, side)
    return F.avg_pool2d(grid, pool) if pool > 1 else grid


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, D, g, g) → (B, g·g, D), row-major."""
    return x.flatten(2).transpose(1, 2)


class Stats:
    """Scalars a stage measures for later stages (feature and latent scales), kept in ``stats.json``."""

    @staticmethod
    def read(run_dir: str | Path) -> dict[str, float]:
        return json.loads((Path(run_dir) / "stats.json").read_text())

    @staticmethod
    def write(run_dir: str | Path, **values: float) -> None:
        path = Path(run_dir) / "stats.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values, indent=1))


class StageTask:
    """Shared plumbing: world data, tokenizer, batch size, seeds."""

    def __init__(
        self,
        cfg: ModelConfig,
        world: str | Path,
        tokenizer: str | Path,
        batch_size: int,
        seed: int,
    ) -> None:
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed
        self.data: WorldSplit = load_split(world, "train")
        self.tokenizer = load_tokenizer(tokenizer)

    def indices(self, step: int, micro: int, rank: int, world_size: int) -> list[int]:
        return batch_indices(len(self.data), self.batch_size, step, self.seed, rank, world_size)

    def generator(self, step: int, micro: int, rank: int) -> int:
        """A seed for this micro-batch's noise, so that a resumed run draws the same noise."""
        return (self.seed * 1_000_003 + step * 1_009 + micro * 101 + rank) % (2**31)


class ClipTask(StageTask):
    """Mini-CLIP: SigLIP vision + text towers trained with the sigmoid contrastive loss on world prompts."""

    def build_model(self) -> nn.Module:
        return build_clip(self.cfg.vision, len(self.tokenizer))

    def batch(self, step: int, micro: int, rank: int, world_size: int) -> dict[str, Any]:
        idx = self.indices(step, micro, rank, world_size)
        rng = random.Random(f"{self.seed}-{step}-{rank}")
        texts = [self.data.meta[i]["prompt"] if rng.random() < 0.5 else self.data.meta[i]["caption"] for i in idx]
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
        return {"pixels": to_pixels(self.data.images[idx]), "input_ids": enc["input_ids"]}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = model(input_ids=batch["input_ids"], pixel_values=batch["pixels"], return_loss=True)
        return {"loss": out.loss}


class VAETask(StageTask):
    """AutoencoderKL: L1 + MSE reconstruction and a small KL term."""

    kl_weight = 1e-6

    def build_model(self) -> nn.Module:
        return build_vae(self.cfg.vae)

    def batch(self, step: int, micro: int, rank: int, world_size: int) -> dict[str, Any]:
        idx = self.indices(step, micro, rank, world_size)
        return {"pixels": to_pixels(self.data.images[idx]), "seed": self.generator(step, micro, rank)}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x = batch["pixels"]
        posterior = model.encode(x).latent_dist
        g = torch.Generator().manual_seed(batch["seed"])
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = model.decode(z).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl = posterior.kl().mean()
        return {"loss": rec + self.kl_weight * kl, "recon": rec.detach(), "kl": kl.detach()}


def measure_scales(clip_vision: nn.Module, vae: nn.Module, images: torch.Tensor, pool: int) -> dict[str, float]:
    """Scalars that bring CLIP maps and VAE latents to unit variance (like a VAE's scaling factor)."""
    with torch.no_grad():
        pixels = to_pixels(images[:256])
        feats = clip_map(clip_vision, pixels, pool)
        latents = vae.encode(pixels).latent_dist.mean
    return {
        "feature_scale": float(1.0 / feats.std()),
        "latent_shift": float(latents.mean()),
        "latent_scale": float(1.0 / latents.std()),
    }


class Encoders:
    """The frozen encoders of the later stages: the mini-CLIP vision tower and the VAE, with their scales."""

    def __init__(self, vision: nn.Module, vae: nn.Module, pool: int, scales: dict[str, float]) -> None:
        self.vision, self.vae = vision.eval(), vae.eval()
        for p in [*self.vision.parameters(), *self.vae.parameters()]:
            p.requires_grad_(False)
        self.pool, self.scales = pool, scales

    @classmethod
    def from_weights(
        cls,
        cfg: ModelConfig,
        vocab_size: int,
        clip_weights: str | Path,
        vae_weights: str | Path,
        scales: dict[str, float],
    ) -> Encoders:
        vision = load_weights(build_clip(cfg.vision, vocab_size), clip_weights).vision_model
        return cls(vision, load_weights(build_vae(cfg.vae), vae_weights), cfg.vision.pool, scales)

    @torch.no_grad()
    def clip(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled CLIP map (B, D, g, g)."""
        return clip_map(self.vision, pixels, self.pool) * self.scales["feature_scale"]

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled VAE latents (B, C, h, w)."""
        z = self.vae.encode(pixels).latent_dist.mean
        return (z - self.scales["latent_shift"]) * self.scales["latent_scale"]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scales["latent_scale"] + self.scales["latent_shift"]
        return self.vae.decode(z).sample


def flow_step(
    cfg_dropout: float,
    shift: float,
    mode: str,
    x0: torch.Tensor,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise level, noised input, velocity target and condition keep-mask for one flow-matching batch."""
    g = torch.Generator().manual_seed(seed)
    sigma = sample_sigmas(x0.shape[0], generator=g, mode=mode, shift=shift)
    noise = torch.randn(x0.shape, generator=g)
    keep = (torch.rand(x0.shape[0], generator=g) >= cfg_dropout).float()
    return sigma, interpolate(x0, noise, sigma), velocity_target(x0, noise), keep


class DecoderTask(StageTask):
    """Pixel decoder: SANA flow matching over VAE latents, conditioned on CLIP maps (dropped with p)."""

    def __init__(
        self, cfg: ModelConfig, world: str | Path, tokenizer: str | Path, batch_size: int, seed: int, encoders: Encoders
    ) -> None:
        super().__init__(cfg, world, tokenizer, batch_size, seed)
        self.enc = encoders

    def build_model(self) -> nn.Module:
        c, side, _ = self.cfg.latent_shape
        return PixelDecoder(self.cfg.decoder.dit, c, side, self.cfg.vision.hidden_size)

    def batch(self, step: int, micro: int, rank: int, world_size: int) -> dict[str, Any]:
        pixels = to_pixels(self.data.images[self.indices(step, micro, rank, world_size)])
        return {
            "latents": self.enc.latents(pixels),
            "clip": map_to_tokens(self.enc.clip(pixels)),
            "seed": self.generator(step, micro, rank),
        }

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        sigma, x_t, target, keep = flow_step(
            self.cfg.decoder.cond_dropout, 1.0, "uniform", batch["latents"], batch["seed"]
        )
        v = model(x_t, sigma, batch["clip"] * keep[:, None, None])
        return {"loss": flow_loss(v, target)}


def build_blip3o(cfg: ModelConfig, tokenizer, vision: nn.Module) -> BLIP3o:
    """A BLIP3o model from config around a (trained) vision tower."""
    backbone = build_backbone(cfg.backbone, len(tokenizer))
    width = backbone.config.hidden_size
    channels, side, _ = cfg.target_shape
    if cfg.generation.objective == "mse":
        head: nn.Module = RegressionHead(width, channels, side)
    else:
        head = FlowHead(cfg.generation.dit, channels, side, width)
    projector = Projector(cfg.vision.hidden_size, width)
    return BLIP3o(
        backbone, vision, projector, head, cfg.generation.num_queries, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    )


DESCRIBE = "Describe the image."


class UnderstandingTask(StageTask):
    """Image → text: captions ("Describe the image.") and question/answer pairs, CE on the answers."""

    def __init__(
        self, cfg: ModelConfig, world: str | Path, tokenizer: str | Path, batch_size: int, seed: int, encoders: Encoders
    ) -> None:
        super().__init__(cfg, world, tokenizer, batch_size, seed)
        self.enc = encoders

    def build_model(self) -> nn.Module:
        return build_blip3o(self.cfg, self.tokenizer, self.enc.vision)

    def batch(self, step: int, micro: int, rank: int, world_size: int) -> dict[str, Any]:
        idx = self.indices(step, micro, rank, world_size)
        return understanding_batch(
            self.data, self.tokenizer, idx, f"{self.seed}-und-{step}-{rank}", self.cfg.vision.grid**2
        )

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"loss": understanding_loss(model, batch)}


def understanding_batch(
    data: WorldSplit,
    tokenizer,
    idx: list[int],
    seed: str,
    n_image_tokens: int,
) -> dict[str, Any]:
    """Question/answer pairs (3 in 4) or captions ("Describe the image.") for the given samples."""
    rng = random.Random(seed)
    questions, answers = [], []
    for i in idx:
        qa = data.meta[i]["qa"]
        if qa and rng.random() < 0.75:
            pair = rng.choice(qa)
            questions.append(pair["question"])
            answers.append(pair["answer"])
        else:
            questions.append(DESCRIBE)
            answers.append(data.meta[i]["caption"])
    inputs = understanding_inputs(tokenizer, questions, answers, n_image_tokens)
    return {**inputs, "pixels": to_pixels(data.images[idx])}


def understanding_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    logits = model(
        "logits", input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixels=batch["pixels"]
    )
    return causal_lm_loss(logits, batch["labels"])


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token CE in float32, averaged over the labelled tokens."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


class GenerationTask(StageTask):
    """Text → image: query-conditioned flow matching (or MSE) on CLIP maps or VAE latents.

    ``joint_weight`` > 0 mixes an understanding batch into every step (joint training); with the
    backbone frozen (sequential training) it must be 0.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        world: str | Path,
        tokenizer: str | Path,
        batch_size: int,
        seed: int,
        encoders: Encoders,
        init: str | Path,
        joint_weight: float = 0.0,
    ) -> None:
        super().__init__(cfg, world, tokenizer, batch_size, seed)
        self.enc, self.init, self.joint_weight = encoders, init, joint_weight

    def build_model(self) -> nn.Module:
        model = build_blip3o(self.cfg, self.tokenizer, self.enc.vision)
        # The understanding stage's weights, without its (untrained) generation head, which may differ in kind.
        state = {k: v for k, v in load_file(str(self.init)).items() if not k.startswith(("head.", "queries"))}
        missing, unexpected = model.load_state_dict(state, strict=False)
        stray = [k for k in missing if not k.startswith(("head.", "queries"))]
        if unexpected or stray:
            raise ValueError(f"{self.init} does not match the model: unexpected {unexpected[:5]}, missing {stray[:5]}")
        return model

    def target(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.enc.clip(pixels) if self.cfg.generation.target == "clip" else self.enc.latents(pixels)

    def batch(self, step: int, micro: int, rank: int, world_size: int) -> dict[str, Any]:
        idx = self.indices(step, micro, rank, world_size)
        ids, mask = generation_inputs(self.tokenizer, [self.data.meta[i]["prompt"] for i in idx])
        out = {
            "input_ids": ids,
            "attention_mask": mask,
            "x0": self.target(to_pixels(self.data.images[idx])),
            "seed": self.generator(step, micro, rank),
        }
        if self.joint_weight > 0:
            out["und"] = understanding_batch(
                self.data, self.tokenizer, idx, f"{self.seed}-und-{step}-{rank}", self.cfg.vision.grid**2
            )
        return out

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        gen = self.cfg.generation
        x0 = batch["x0"]
        sigma, x_t, target, keep = flow_step(gen.cond_dropout, gen.shift, gen.timestep_sampling, x0, batch["seed"])
        pred = model(
            "generate",
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            x=x_t,
            sigma=sigma,
            keep=keep,
        )
        gen_loss = flow_loss(pred, target) if gen.objective == "flow" else flow_loss(pred, x0)
        out = {"gen": gen_loss.detach()}
        total = gen_loss
        if self.joint_weight > 0:
            und = understanding_loss(model, batch["und"])
            total = total + self.joint_weight * und
            out["und"] = und.detach()
        out["loss"] = total
        return out
