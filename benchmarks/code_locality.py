"""How local a BLIP3o-NEXT run's image codes are: the share of the codes an edit leaves unchanged.

For every held-out edit triplet, the reference image and the edited target are tokenised by the run's
image tokenizer (mini-CLIP map → SimVQ codes), and the fraction of positions whose code is the same
in both is averaged, overall and per edit kind. An edit touches one or two objects; with local codes
most positions keep their code, and the backbone can copy them from the reference in its context.

Run: ``.venv/bin/python benchmarks/code_locality.py RUN`` (a run with an ``image_tokenizer`` stage).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch

from blip3o.config import RunConfig
from blip3o.config.io import load_yaml
from blip3o.data.processing import to_pixels
from blip3o.data.world_data import load_split
from blip3o.infer.pipeline import MODEL_FILE, require
from blip3o.models.build import load_weights
from blip3o.train.next_tasks import build_image_tokenizer, image_codes
from blip3o.train.recipe import encoders

from common import emit


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    args = parser.parse_args()

    cfg = load_yaml(require(args.run / "config.yaml", "any"), RunConfig)
    if cfg.next is None:
        raise SystemExit(f"{args.run} is not a BLIP3o-NEXT run (its config has no `next` section)")
    enc = encoders(cfg, args.run)
    tokenizer = build_image_tokenizer(cfg.next, cfg.model)
    load_weights(tokenizer, require(args.run / "image_tokenizer" / MODEL_FILE, "image_tokenizer"))
    data = load_split(args.run / "world", "heldout")
    sources = image_codes(enc, tokenizer.eval(), to_pixels(data.images[list(data.edited)]))
    targets = image_codes(enc, tokenizer, to_pixels(data.edit_images[: len(data.edited)]))
    same = (sources == targets).float().mean(1)
    by_kind = defaultdict(list)
    for scene, s in zip(data.edited, same.tolist(), strict=True):
        by_kind[data.meta[scene]["edit"]["type"]].append(s)
    emit("codes_unchanged_by_edit", same.mean().item(), "fraction", triplets=len(same))
    for kind, values in sorted(by_kind.items()):
        emit("codes_unchanged_by_edit", sum(values) / len(values), "fraction", kind=kind, triplets=len(values))


if __name__ == "__main__":
    main()
