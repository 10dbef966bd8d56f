"""How local a run's CLIP target map is, and how much the pixel decoder reads from its empty patches.

On 2,048 training scenes: the share of the standardised map's variance that the patches no object
touches hold (:func:`blip3o.train.tasks.empty_patches`), and their variance per channel around each
position's mean empty-patch feature. On held-out scenes: the fraction the pixel decoder renders
correctly (GenEval-rule scorer against each scene's prompt) from the real map, from the map with its
empty patches set to that mean, and with them taken from another scene. A local map loses nothing
when its empty patches are replaced; a map whose attention spread the scene into every patch does.

Run: ``.venv/bin/python benchmarks/map_locality.py RUN [--n 150]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from blip3o.data.processing import to_images
from blip3o.data.world_data import load_split
from blip3o.eval.geneval import GenEvalScorer
from blip3o.infer.pipeline import BLIP3oPipeline
from blip3o.train.tasks import empty_patches, encode_in_chunks

from common import emit


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--n", type=int, default=150, help="held-out scenes to decode")
    parser.add_argument("--train", type=int, default=2048, help="training scenes for the statistics")
    args = parser.parse_args()

    pipe = BLIP3oPipeline.from_run(args.run)
    train, heldout = load_split(args.run / "world", "train"), load_split(args.run / "world", "heldout")
    grid = pipe.cfg.vision.grid
    x = encode_in_chunks(train.images[: args.train], pipe.encoders.clip)  # (N, C, g, g) standardised
    empty = empty_patches(train.meta[: args.train], grid).view(-1, 1, grid, grid).float()
    mean_empty = (x * empty).sum(0) / empty.sum(0).clamp_min(1)
    share = ((x - x.mean(0)).pow(2) * empty).sum() / (x - x.mean(0)).pow(2).sum()
    spread = ((x - mean_empty).pow(2) * empty).sum() / empty.sum() / x.shape[1]
    emit("empty_patch_variance_share", share.item(), "fraction", empty_patches=empty.mean().item())
    emit("empty_patch_variance", spread.item(), "per channel (standardised map)")

    n = min(args.n, len(heldout.meta))
    real = encode_in_chunks(heldout.images[:n], pipe.encoders.clip)
    held_empty = empty_patches(heldout.meta[:n], grid).view(-1, 1, grid, grid).float()
    other = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]]
    maps = {
        "real": real,
        "empty_to_mean": real * (1 - held_empty) + mean_empty * held_empty,
        "empty_from_another_scene": real * (1 - held_empty) + other * held_empty,
    }
    records = [m["metadata"] for m in heldout.meta[:n]]
    scorer = GenEvalScorer()
    for name, m in maps.items():
        images = to_images(pipe.decode_features(m, list(range(n))))
        correct = sum(scorer.score(im, r)["correct"] for im, r in zip(images, records, strict=True)) / n
        emit("decoder_correct", correct, "fraction", map=name, scenes=n)


if __name__ == "__main__":
    main()
