"""What the pixel decoder reads from a CLIP map, and whether a generation head given the layout writes it.

Two probes on a BLIP3-o run (CLIP + flow matching), scored by rendering held-out scenes through the
run's pixel decoder and checking each image against the scene's own prompt:

1. **Truncated real maps.** Each held-out scene's real (standardised) map keeps only its top K
   per-token principal components (fitted on training maps) before the decoder renders it. Where the
   fraction correct falls, the decoder needs components the truncation removed.
2. **A layout oracle.** A fresh generation DiT of the run's own config (``--hidden``/``--layers``
   override it) is trained with the stage's budget to generate the maps of training scenes given their
   exact per-patch labels (the class and colour of the object covering each patch centre, as one-hot
   input channels, dropped with p = 0.1 for guidance): the text-to-layout part of generation removed.
   It then samples the held-out scenes from their labels. A linear per-patch class probe fitted on real
   maps says whether the samples have the right class at the right patches; the decoder says whether
   they render. If the oracle renders far below the real maps, the head cannot write maps the decoder
   draws even when told the layout, and the prompt is not where generation fails.

Run: ``.venv/bin/python benchmarks/map_rendering.py RUN [--pca 8 16 32] [--steps 1500] [--hidden 128 --layers 4]``.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

from blip3o.data.processing import to_images, to_pixels
from blip3o.data.world_data import load_split
from blip3o.diffusion.flow import flow_loss, interpolate, sample_sigmas, velocity_target
from blip3o.diffusion.sampler import euler_sample
from blip3o.eval.geneval import GenEvalScorer
from blip3o.infer.pipeline import BLIP3oPipeline
from blip3o.models.heads import condition_projection, head_dit
from blip3o.train.tasks import encode_in_chunks, grounding_targets
from blip3o.world.spec import NUM_CLASS_IDS, NUM_COLOUR_IDS

from common import emit, fit


def label_maps(metas: list[dict], grid: int) -> torch.Tensor:
    """(B, classes + colours, g, g) one-hot per-patch labels (background is class 0 and colour 0)."""
    classes, colours = grounding_targets(metas, grid)
    onehot = torch.cat(
        [F.one_hot(classes.clamp(min=0), NUM_CLASS_IDS), F.one_hot(colours.clamp(min=0), NUM_COLOUR_IDS)], -1
    )
    return onehot.float().transpose(1, 2).reshape(len(metas), -1, grid, grid)


class LayoutOracle(torch.nn.Module):
    """The generation DiT with the label map as extra input channels and the bag of labels as its condition."""

    def __init__(self, cfg, channels: int, grid: int) -> None:
        super().__init__()
        labels = NUM_CLASS_IDS + NUM_COLOUR_IDS
        self.channels = channels
        self.dit = head_dit(cfg, channels + labels, grid)
        self.proj = condition_projection(labels, cfg.hidden_size)
        rope = get_2d_rotary_pos_embed_lumina(cfg.hidden_size // cfg.num_heads, grid, grid)
        self.register_buffer("rope", torch.view_as_real(rope), persistent=False)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        bag = self.proj(labels.flatten(2).mean(-1, keepdim=True).transpose(1, 2))
        mask = torch.ones(x.shape[0], 1, dtype=torch.bool)
        rope = torch.view_as_complex(self.rope.float().contiguous())
        out = self.dit(torch.cat([x, labels], 1), 1000.0 * sigma, bag, mask, rope, cross_attention_kwargs={})
        return out.sample[:, : self.channels]


def train_oracle(oracle: LayoutOracle, maps: torch.Tensor, labels: torch.Tensor, steps: int, batch: int) -> float:
    """The generation stage's recipe (AdamW 1e-3, 50 warm-up steps, cosine to 1e-4, clip 1, uniform σ,
    condition dropout 0.1); returns the mean flow loss of the last 100 steps."""
    g = torch.Generator().manual_seed(0)

    def step_loss(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(maps), (batch,), generator=g)
        x0, keep = maps[idx], (torch.rand(batch, generator=g) >= 0.1).float().view(-1, 1, 1, 1)
        sigma = sample_sigmas(batch, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        return flow_loss(oracle(interpolate(x0, noise, sigma), sigma, labels[idx] * keep), velocity_target(x0, noise))

    return fit(oracle, step_loss, steps)


def class_probe(maps: torch.Tensor, labels: torch.Tensor) -> torch.nn.Linear:
    """A linear per-patch class classifier on real maps."""
    torch.manual_seed(0)
    feats = maps.flatten(2).transpose(1, 2).reshape(-1, maps.shape[1])
    target = labels[:, :NUM_CLASS_IDS].argmax(1).flatten()
    probe = torch.nn.Linear(feats.shape[1], NUM_CLASS_IDS)
    opt = torch.optim.Adam(probe.parameters(), 1e-2)
    for _ in range(400):
        idx = torch.randint(0, len(feats), (4096,))
        loss = F.cross_entropy(probe(feats[idx]), target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return probe


@torch.no_grad()
def probe_accuracy(probe: torch.nn.Linear, maps: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """The probe's accuracy on object patches and on background patches."""
    pred = probe(maps.flatten(2).transpose(1, 2)).argmax(-1).flatten()
    truth = labels[:, :NUM_CLASS_IDS].argmax(1).flatten()
    obj = truth > 0
    return (pred[obj] == truth[obj]).float().mean().item(), (pred[~obj] == 0).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--n", type=int, default=120, help="held-out scenes")
    parser.add_argument("--n-train", type=int, default=8000, help="training scenes for the PCA and the oracle")
    parser.add_argument("--pca", type=int, nargs="*", default=[8, 16, 32], help="per-token components kept")
    parser.add_argument("--steps", type=int, default=1500, help="oracle training steps (0: skip the oracle)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, help="oracle DiT width (default: the run's generation DiT)")
    parser.add_argument("--layers", type=int, help="oracle DiT depth (default: the run's generation DiT)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--tau", type=float, nargs="+", default=[1.0, 0.7], help="scales of the starting noise")
    args = parser.parse_args()

    pipe = BLIP3oPipeline.from_run(args.run)
    gen = pipe.cfg.generation
    if gen.target != "clip" or gen.objective != "flow":
        raise SystemExit(f"{args.run} generates {gen.target} with {gen.objective}; this probe needs clip + flow")
    train, heldout = load_split(args.run / "world", "train"), load_split(args.run / "world", "heldout")
    n_train = min(args.n_train, len(train.meta))
    scenes = list(range(min(args.n, len(heldout.meta))))
    with torch.no_grad():
        maps = encode_in_chunks(train.images[:n_train], pipe.encoders.clip)
        real = pipe.encoders.clip(to_pixels(heldout.images[scenes]))
    grid = maps.shape[-1]
    scorer = GenEvalScorer()
    records = [heldout.meta[i]["metadata"] for i in scenes]

    @torch.no_grad()
    def correct(x: torch.Tensor) -> float:
        images = to_images(pipe.decode_features(x, scenes))
        return sum(scorer.score(im, r)["correct"] for im, r in zip(images, records, strict=True)) / len(scenes)

    emit("map_rendering_real", correct(real), "fraction correct", scenes=len(scenes))
    tokens = maps.flatten(2).transpose(1, 2).reshape(-1, maps.shape[1])
    mean = tokens.mean(0)
    _, s, v = torch.linalg.svd(tokens - mean, full_matrices=False)
    explained = (s**2).cumsum(0) / (s**2).sum()
    for k in args.pca:
        t = real.flatten(2).transpose(1, 2)
        kept = ((t - mean) @ v[:k].T @ v[:k] + mean).transpose(1, 2).reshape(real.shape)
        emit(
            "map_rendering_pca",
            correct(kept),
            "fraction correct",
            components=k,
            variance_kept=explained[k - 1].item(),
            mse_to_real=(kept - real).pow(2).mean().item(),
        )
    if args.steps == 0:
        return

    cfg = replace(gen.dit, **{k: v for k, v in (("hidden_size", args.hidden), ("num_layers", args.layers)) if v})
    labels, held_labels = label_maps(train.meta[:n_train], grid), label_maps([heldout.meta[i] for i in scenes], grid)
    torch.manual_seed(0)
    oracle = LayoutOracle(cfg, maps.shape[1], grid)
    loss = train_oracle(oracle, maps, labels, args.steps, args.batch)
    probe = class_probe(maps, labels)
    obj, bg = probe_accuracy(probe, real, held_labels)
    emit("map_rendering_probe_real", obj, "object-patch class accuracy", background=bg)
    oracle.eval()
    for scale in args.guidance:
        for tau in args.tau:
            noise = tau * torch.randn(real.shape, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                x = euler_sample(
                    oracle, noise, held_labels, uncond=torch.zeros_like(held_labels), num_steps=gen.steps,
                    guidance_scale=scale,
                )  # fmt: skip
            obj, bg = probe_accuracy(probe, x, held_labels)
            emit(
                "map_rendering_oracle",
                correct(x),
                "fraction correct",
                guidance=scale,
                tau=tau,
                hidden=cfg.hidden_size,
                layers=cfg.num_layers,
                steps=args.steps,
                final_flow_loss=loss,
                probe_objects=obj,
                probe_background=bg,
                mse_to_real=(x - real).pow(2).mean().item(),
                std=x.std().item(),
            )


if __name__ == "__main__":
    main()
