"""How much the mini-CLIP's patch map knows about what covers each place: linear probes on frozen features.

For every object of a world's scenes, the input is the feature of the patch under the object's centre
(from the unpooled patch map), or the mean of the 3×3 patches around it; a linear probe trained on
training-split objects predicts the object's class and colour on held-out-split objects. Chance for
the class is 1/6. The pixel decoder and the image tokenizer only see these features, so a class the
map does not hold cannot be drawn.

Run: ``.venv/bin/python benchmarks/clip_probe.py RUN [RUN …]`` (runs with a trained ``clip`` stage).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from blip3o.config import RunConfig, load_yaml
from blip3o.data.processing import to_pixels
from blip3o.data.tokenizer import load_tokenizer
from blip3o.data.world_data import load_split
from blip3o.models.build import load_weights
from blip3o.models.heads import tokens_to_map
from blip3o.models.parts import build_clip
from blip3o.world.spec import COLOR_NAMES, SHAPES

from common import emit


@torch.no_grad()
def object_features(vision, split, limit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features (M, D) at object centres, their 3×3-patch means (M, D), class ids (M,), colour ids (M,) for
    the first ``limit`` scenes."""
    feats, near, classes, colours = [], [], [], []
    for start in range(0, min(limit, len(split)), 256):
        stop = min(start + 256, limit, len(split))
        grid = tokens_to_map(vision(pixel_values=to_pixels(split.images[start:stop])).last_hidden_state)
        g = grid.shape[-1]
        around = F.avg_pool2d(grid, 3, stride=1, padding=1, count_include_pad=False)
        for i, meta in enumerate(split.meta[start:stop]):
            for obj in meta["objects"]:
                cx, cy = obj["cx"], obj["cy"]
                row, col = min(int(cy * g), g - 1), min(int(cx * g), g - 1)
                feats.append(grid[i, :, row, col])
                near.append(around[i, :, row, col])
                classes.append(SHAPES.index(obj["class"]))
                colours.append(COLOR_NAMES.index(obj["color"]))
    return torch.stack(feats), torch.stack(near), torch.tensor(classes), torch.tensor(colours)


def probe(x: torch.Tensor, y: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor, classes: int) -> float:
    """Held-out accuracy of a linear softmax probe (standardised inputs, 300 full-batch Adam steps)."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x, xt = (x - mean) / std, (xt - mean) / std
    head = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(head(x), y).backward()
        opt.step()
    return float((head(xt).argmax(-1) == yt).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--train-scenes", type=int, default=3000)
    args = p.parse_args()
    for run in args.runs:
        cfg = load_yaml(run / "config.yaml", RunConfig)
        vision = build_clip(cfg.model.vision, len(load_tokenizer(run / "tokenizer")))
        vision = load_weights(vision, run / "clip" / "model.safetensors", prefix="clip.").vision_model.eval()
        train = object_features(vision, load_split(run / "world", "train"), args.train_scenes)
        held = object_features(vision, load_split(run / "world", "heldout"), 10**9)
        for name, k in (("centre", 0), ("near_centre", 1)):
            acc = probe(train[k], train[2], held[k], held[2], len(SHAPES))
            emit(f"clip_probe.class_{name}", acc, "accuracy", run=str(run))
        acc = probe(train[0], train[3], held[0], held[3], len(COLOR_NAMES))
        emit("clip_probe.colour_centre", acc, "accuracy", run=str(run))


if __name__ == "__main__":
    main()
