"""Where the BLIP3-o generation head loses a scene: denoise real CLIP maps from a noise level σ₀.

Each held-out scene's real (standardised) CLIP map is noised to σ₀, x = (1 − σ₀)·x₀ + σ₀·ε, and
integrated back to σ = 0 by the trained head conditioned on the scene's own prompt (the sampler's
SDEdit start, the run's steps and guidance); the pixel decoder then renders it and the scorer checks
it against the prompt. σ₀ = 0 scores the decoder alone (the bound of everything the head makes);
σ₀ = 1 is plain sampling from noise. Where the fraction correct falls between two σ₀, the head fails
to restore what that much noise hides.

Run: ``.venv/bin/python benchmarks/head_denoise.py RUN [--n 120] [--sigmas 0 0.3 0.5 0.7 1] [--guidance-scale G]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from blip3o.data.processing import generation_inputs, to_images, to_pixels
from blip3o.data.world_data import load_split
from blip3o.diffusion.sampler import euler_sample
from blip3o.eval.geneval import GenEvalScorer
from blip3o.infer.pipeline import BLIP3oPipeline

from common import emit


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--n", type=int, default=120, help="held-out scenes")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance-scale", type=float, help="the head's CFG scale (default: the run's config)")
    args = parser.parse_args()

    pipe = BLIP3oPipeline.from_run(args.run)
    gen = pipe.cfg.generation
    if gen.target != "clip" or gen.objective != "flow":
        raise SystemExit(f"{args.run} generates {gen.target} with {gen.objective}; this probe needs clip + flow")
    split = load_split(args.run / "world", "heldout")
    scenes = list(range(min(args.n, len(split.meta))))  # a split's meta is its scenes
    records = [split.meta[i]["metadata"] for i in scenes]
    x0 = pipe.encoders.clip(to_pixels(split.images[scenes]))
    cond = pipe.model.condition(*generation_inputs(pipe.tokenizer, [split.meta[i]["prompt"] for i in scenes]))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed))
    scorer = GenEvalScorer()
    seeds = list(range(len(scenes)))
    for s in args.sigmas:
        x = x0
        if s > 0:
            start = (1 - s) * x0 + s * noise
            x = euler_sample(
                pipe.model.velocity,
                start,
                cond,
                uncond=torch.zeros_like(cond),
                num_steps=gen.steps,
                guidance_scale=gen.guidance_scale if args.guidance_scale is None else args.guidance_scale,
                shift=gen.shift,
                start=s,
            )
        images = to_images(pipe.decode_features(x, seeds))
        correct = sum(scorer.score(im, r)["correct"] for im, r in zip(images, records, strict=True)) / len(scenes)
        emit("head_denoise_correct", correct, "fraction", sigma0=s, mse_to_real_map=(x - x0).pow(2).mean().item())


if __name__ == "__main__":
    main()
