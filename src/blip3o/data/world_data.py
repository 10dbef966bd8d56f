"""A world split held in memory as tensors, with random-access batches (the data position is the step).

The shapes world is small (thousands of 64 px images), so each split is decoded once into a uint8
tensor; batch ``step`` is a deterministic function of (seed, step), which makes resuming a run exact
without saving any iterator state.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blip3o.world.shards import ReadStats, read_shards, shard_paths


@dataclass
class WorldSplit:
    """Scene samples of one split: images (N, 3, S, S) uint8 and their metadata; text scenes kept apart."""

    images: torch.Tensor
    meta: list[dict[str, Any]]
    text_images: torch.Tensor
    text_meta: list[dict[str, Any]]
    stats: ReadStats
    edit_images: torch.Tensor
    """(M, 3, S, S) uint8: the edited image of every scene that has an edit triplet."""
    edited: list[int]
    """Scene index of each edit image (``meta[edited[j]]["edit"]`` describes ``edit_images[j]``)."""

    def __len__(self) -> int:
        return len(self.meta)

    @property
    def prompts(self) -> list[str]:
        return [m["prompt"] for m in self.meta]


def _stack(images: list) -> torch.Tensor:
    if not images:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()


def load_split(world: str | Path, split: str) -> WorldSplit:
    """Decode every sample of a split (bad samples are skipped and counted in ``stats``)."""
    stats = ReadStats()
    scenes, scene_meta, texts, text_meta, edits, edited = [], [], [], [], [], []
    for sample in read_shards(shard_paths(world, split), stats):
        if sample["meta"]["kind"] == "scene":
            if sample.get("edit_image") is not None and "edit" in sample["meta"]:
                edits.append(sample["edit_image"])
                edited.append(len(scenes))
            scenes.append(sample["image"])
            scene_meta.append(sample["meta"])
        else:
            texts.append(sample["image"])
            text_meta.append(sample["meta"])
    return WorldSplit(_stack(scenes), scene_meta, _stack(texts), text_meta, stats, _stack(edits), edited)


def batch_indices(n: int, batch_size: int, step: int, seed: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Indices of global batch ``step`` (sampled without replacement within an epoch), this rank's share."""
    per_epoch = max(n // batch_size, 1)
    epoch, offset = divmod(step, per_epoch)
    order = list(range(n))
    random.Random(f"{seed}-epoch-{epoch}").shuffle(order)
    start = offset * batch_size
    idx = [order[(start + i) % n] for i in range(batch_size)]
    if batch_size % world_size:
        raise ValueError(f"batch size {batch_size} must divide by the number of ranks {world_size}")
    share = batch_size // world_size
    return idx[rank * share : (rank + 1) * share]
