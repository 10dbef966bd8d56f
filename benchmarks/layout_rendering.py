"""How well a pixel decoder renders scenes from their per-patch layout alone.

A fresh pixel decoder of the run's own config is trained with the decoder stage's budget, conditioned
on each training scene's per-patch layout (the class and colour on each patch, one-hot at ±1) instead
of its CLIP map. It then renders held-out scenes from their layouts, and the scorer checks each image
against the scene's prompt. ``--source truth`` takes the layout from the scene's boxes (the object
covering each patch centre, as the layout oracle of ``map_rendering.py`` reads it); ``--source tower``
from the mini-CLIP's grounding head (``Encoders.layout``, what ``model.generation.target=layout``
generates). Beside the run's decoder on real CLIP maps, this says how much of a correct scene a layout
at patch resolution carries: if it renders about as well, a generation target of that size suffices.

Run: ``.venv/bin/python benchmarks/layout_rendering.py RUN [--source truth tower] [--grid G] [--steps 1500] [--n 120]``;
``--grid`` sets the grid of the boxes' layout (``--source truth`` only).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from blip3o.config import RunConfig, load_yaml
from blip3o.data.processing import to_images, to_pixels
from blip3o.data.tokenizer import load_tokenizer
from blip3o.data.world_data import load_split
from blip3o.diffusion.flow import flow_loss, interpolate, sample_sigmas, velocity_target
from blip3o.diffusion.sampler import euler_sample
from blip3o.eval.geneval import GenEvalScorer
from blip3o.infer.pipeline import load_encoders, seeded_noise
from blip3o.models.heads import PixelDecoder, map_to_tokens
from blip3o.train.tasks import encode_in_chunks
from map_rendering import label_maps

from common import emit, fit


def train_decoder(decoder: PixelDecoder, latents: torch.Tensor, cond: torch.Tensor, steps: int, batch: int) -> float:
    """The decoder stage's recipe (AdamW 1e-3, 50 warm-up steps, cosine to 1e-4, clip 1, uniform σ,
    condition dropout 0.1); returns the mean flow loss of the last 100 steps."""
    g = torch.Generator().manual_seed(0)

    def step_loss(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        x0, keep = latents[idx], (torch.rand(batch, generator=g) >= 0.1).float().view(-1, 1, 1)
        sigma = sample_sigmas(batch, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        return flow_loss(decoder(interpolate(x0, noise, sigma), sigma, cond[idx] * keep), velocity_target(x0, noise))

    return fit(decoder, step_loss, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--n", type=int, default=120, help="held-out scenes")
    parser.add_argument("--n-train", type=int, default=20000, help="training scenes")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--source", nargs="+", choices=["truth", "tower"], default=["truth", "tower"])
    parser.add_argument("--grid", type=int, help="layout grid for --source truth (default: the map's grid)")
    args = parser.parse_args()

    cfg = load_yaml(args.run / "config.yaml", RunConfig).model
    enc = load_encoders(args.run, cfg, len(load_tokenizer(args.run / "tokenizer")))
    train, heldout = load_split(args.run / "world", "train"), load_split(args.run / "world", "heldout")
    n_train = min(args.n_train, len(train.meta))
    scenes = list(range(min(args.n, len(heldout.meta))))
    grid = args.grid or cfg.vision.target_grid
    if "tower" in args.source and grid != cfg.vision.target_grid:
        parser.error("--grid sets the boxes' layout (--source truth); the tower's layout has the run's own grid")
    latents = encode_in_chunks(train.images[:n_train], enc.latents)
    scorer = GenEvalScorer()
    records = [heldout.meta[i]["metadata"] for i in scenes]
    truth = label_maps(train.meta[:n_train], grid) * 2 - 1, label_maps([heldout.meta[i] for i in scenes], grid) * 2 - 1
    for source in args.source:
        if source == "truth":
            train_maps, held_maps = truth
        else:
            train_maps = encode_in_chunks(train.images[:n_train], enc.layout)
            held_maps = enc.layout(to_pixels(heldout.images[scenes]))
            agree = (held_maps.argmax(1) == truth[1].argmax(1)).float().mean().item()
            emit("layout_rendering_tower_agreement", agree, "patches whose class matches the boxes")
        cond, held = map_to_tokens(train_maps), map_to_tokens(held_maps)
        c, side, _ = cfg.latent_shape
        torch.manual_seed(0)
        decoder = PixelDecoder(cfg.decoder, c, side, cond.shape[-1])
        loss = train_decoder(decoder, latents, cond, args.steps, args.batch)
        decoder.eval()
        for scale in args.guidance:
            noise = seeded_noise(cfg.latent_shape, scenes)
            with torch.no_grad():
                x = euler_sample(
                    decoder, noise, held, uncond=torch.zeros_like(held), num_steps=cfg.decoder.steps,
                    guidance_scale=scale,
                )  # fmt: skip
                images = to_images(enc.decode(x))
            right = sum(scorer.score(im, r)["correct"] for im, r in zip(images, records, strict=True)) / len(scenes)
            emit(
                "layout_rendering", right, "fraction correct", source=source, grid=grid, guidance=scale,
                steps=args.steps, final_flow_loss=loss,
            )  # fmt: skip


if __name__ == "__main__":
    main()
