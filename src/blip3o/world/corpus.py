"""The text of a world (prompts, captions, questions, answers, edit instructions), for tokenizer training."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from blip3o.world.shards import read_shards, shard_paths


def world_texts(world: str | Path) -> Iterator[str]:
    """Every training string of a world directory, in a fixed order: prompt records, then shard samples."""
    world = Path(world)
    for line in (world / "train_prompts.jsonl").read_text().splitlines():
        yield json.loads(line)["prompt"]
    for sample in read_shards(shard_paths(world, "train")):
        meta = sample["meta"]
        yield meta["prompt"]
        yield meta["caption"]
        for qa in meta.get("qa", ()):  # as chat turns, so the role names become tokens too
            yield f"user\n{qa['question']}"
            yield f"assistant\n{qa['answer']}"
        if "edit" in meta:
            yield meta["edit"]["instruction"]
