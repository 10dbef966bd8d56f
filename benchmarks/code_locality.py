"""How local a BLIP3o-NEXT run's image codes are: the share of the codes an edit leaves unchanged.

For every held-out edit triplet, the reference image and the edited target are tokenised by the run's
image tokenizer (mini-CLIP map → SimVQ codes), and the fraction of positions whose code is the same
in both is averaged, overall and per edit kind. An edit touches one or two objects; with local codes
most positions keep their code, and the backbone can copy them from the reference in its context.

``--written``: also let the run's trained model write each edit's codes greedily and report how often it
copies the reference where the edit keeps the code (``copy``) and writes the target's code where the edit
changes it (``change``).

Run: ``.venv/bin/python benchmarks/code_locality.py RUN [--written]`` (a run with an ``image_tokenizer``
stage; ``--written`` also needs a ``next`` or ``instruct`` stage).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

from blip3o.config import RunConfig
from blip3o.config.io import load_yaml
from blip3o.data.next_inputs import image_prompts
from blip3o.data.processing import to_pixels
from blip3o.data.world_data import load_split
from blip3o.infer.next_pipeline import NextPipeline
from blip3o.infer.pipeline import require
from blip3o.train.next_tasks import image_codes, image_tokenizer_weights, load_image_tokenizer
from blip3o.train.recipe import encoders

from common import emit


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--written", action="store_true", help="also score the trained model's greedy codes")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    cfg = load_yaml(require(args.run / "config.yaml", "any"), RunConfig)
    if cfg.next is None:
        raise SystemExit(f"{args.run} is not a BLIP3o-NEXT run (its config has no `next` section)")
    pipe = NextPipeline.from_run(args.run) if args.written else None
    if pipe is not None:  # the pipeline's own encoders and image tokenizer, loaded once
        enc, tokenizer = pipe.encoders, pipe.image_tokenizer
    else:
        enc = encoders(cfg, args.run)
        tokenizer = load_image_tokenizer(cfg.next, cfg.model, image_tokenizer_weights(cfg.next, args.run))
    data = load_split(args.run / "world", "heldout")
    sources = image_codes(enc, tokenizer, to_pixels(data.images[list(data.edited)]))
    targets = image_codes(enc, tokenizer, to_pixels(data.edit_images[: len(data.edited)]))
    same = (sources == targets).float().mean(1)
    by_kind = defaultdict(list)
    for scene, s in zip(data.edited, same.tolist(), strict=True):
        by_kind[data.meta[scene]["edit"]["type"]].append(s)
    emit("codes_unchanged_by_edit", same.mean().item(), "fraction", triplets=len(same))
    for kind, values in sorted(by_kind.items()):
        emit("codes_unchanged_by_edit", sum(values) / len(values), "fraction", kind=kind, triplets=len(values))
    if pipe is not None:
        greedy = replace(pipe.next, temperature=0.0)
        instructions = [data.meta[scene]["edit"]["instruction"] for scene in data.edited]
        written = []
        for at in range(0, len(instructions), args.batch):
            refs = sources[at : at + args.batch].tolist()
            ids, mask = image_prompts(pipe.tokenizer, pipe.model.vocab, instructions[at : at + args.batch], refs)
            sample = pipe.sample_tokens(ids, mask, list(range(len(refs))), greedy, refs)
            written.append(pipe.model.vocab.ids_to_codes(sample.tokens))
        written = torch.cat(written)
        kept = sources == targets
        copy = ((written == sources) & kept).sum() / kept.sum()
        change = ((written == targets) & ~kept).sum() / (~kept).sum().clamp_min(1)
        emit("written_codes_copy", copy.item(), "fraction of kept positions", triplets=len(written))
        emit("written_codes_change", change.item(), "fraction of changed positions", triplets=len(written))


if __name__ == "__main__":
    main()
