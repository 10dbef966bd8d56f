"""What a discrete (masked) layout head takes from its prompt, and how its samples' objects compare with real ones.

For a run trained with ``model.generation.objective=discrete``:

- the head's cross-entropy on the masked cells of held-out scenes' layouts (the tower's reading), at a few
  mask levels σ, given the scene's own prompt, another scene's prompt, and none: the gap between the first
  and the other two is what the prompt tells the head;
- its calibration where specks come from: the mean predicted probability that a masked cell holds an object,
  over masked background cells at least three cells from any object;
- the objects of sampled layouts for the world's held-out single-object and colour prompts (two seeds each),
  as 4-connected components of object cells: how many per image, and the share under four cells (specks),
  against the tower's reading of held-out scenes.

Run: ``.venv/bin/python benchmarks/discrete_head.py RUN [--scenes 128] [--prompts 24]``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from blip3o.data.processing import generation_inputs, to_pixels
from blip3o.data.world_data import load_split
from blip3o.diffusion.masked import mask_cells, masked_ce
from blip3o.infer.pipeline import BLIP3oPipeline, expand_requests
from blip3o.models.heads import LAYOUT_VOCAB, MaskedHead, layout_to_ids
from blip3o.train.tasks import asked_text

from common import emit


def components(objects: torch.Tensor) -> torch.Tensor:
    """(B, h, w) bool → each object cell's component label (the largest flat index in its 4-connected
    component), −1 for background."""
    h, w = objects.shape[1:]
    labels = torch.where(objects, torch.arange(h * w).view(1, h, w), -1)
    while True:
        p = F.pad(labels, (1, 1, 1, 1), value=-1)
        grown = torch.stack([labels, p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]]).amax(0)
        grown = torch.where(objects, grown, -1)
        if torch.equal(grown, labels):
            return labels
        labels = grown


def object_stats(ids: torch.Tensor) -> tuple[float, float]:
    """(components per image, share of components under 4 cells) of layout id maps (B, h, w)."""
    sizes = []
    for labels in components(ids > 0):
        sizes += torch.unique(labels[labels >= 0], return_counts=True)[1].tolist()
    return len(sizes) / len(ids), sum(s < 4 for s in sizes) / max(len(sizes), 1)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--scenes", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[1.0, 0.9, 0.5, 0.2])
    args = parser.parse_args()
    run = Path(args.run)
    pipe = BLIP3oPipeline.from_run(run)
    head = pipe.model.head
    if not isinstance(head, MaskedHead):
        sys.exit(f"{run} has a {type(head).__name__}; this probe reads discrete heads (generation.objective=discrete)")
    held = load_split(run / "world", "heldout")
    n = min(args.scenes, len(held.meta))
    ids = layout_to_ids(pipe.encoders.layout(to_pixels(held.images[:n])))
    rng = random.Random(0)
    cond = pipe.model.condition(*generation_inputs(pipe.tokenizer, [asked_text(m, 1.0, rng) for m in held.meta[:n]]))
    far = F.max_pool2d((ids > 0).float()[:, None], 7, 1, 3)[:, 0] == 0  # no object within three cells
    for s in args.sigmas:
        sigma = torch.full((n,), s)
        x, masked = mask_cells(ids, sigma, LAYOUT_VOCAB, torch.Generator().manual_seed(0))
        own = head(x, sigma, cond)
        for name, logp in (
            ("own prompt", own),
            ("another prompt", head(x, sigma, cond.roll(1, 0))),
            ("no prompt", head(x, sigma, 0 * cond)),
        ):
            emit(f"masked-cell CE at sigma {s}, {name}", masked_ce(logp, ids, masked).item(), "nats")
        p_object = (1 - own[:, 0].exp())[masked & far].mean().item()
        emit(f"p(object) at masked background cells far from objects, sigma {s}", p_object, "p")

    records = [json.loads(line) for line in (run / "world" / "prompts.jsonl").read_text().splitlines()]
    records = [r for r in records if r["tag"] in ("single_object", "colors")][: args.prompts]
    prompts, seeds = expand_requests([r["prompt"] for r in records], list(range(len(records))), 2)
    cells = pipe.sample_cells(pipe.model.condition(*generation_inputs(pipe.tokenizer, prompts)), seeds)
    for name, sample in (("sampled, one-object prompts", cells), ("tower's reading of held-out scenes", ids)):
        count, specks = object_stats(sample)
        emit(f"objects per image, {name}", count, "components")
        emit(f"share of objects under 4 cells, {name}", specks, "share")
    emit("objects per held-out scene (boxes)", sum(len(m["objects"]) for m in held.meta[:n]) / n, "objects")


if __name__ == "__main__":
    main()
