"""Where a layout-code BLIP3o-NEXT run reads its prompt: the first cell of each object.

In raster order an object's first cell (an object cell whose left and upper neighbours are background,
:func:`blip3o.train.next_tasks.start_cells`) is where the prompt alone decides the object's class and colour;
later cells can copy them from their neighbours. Two readings:

- teacher-forced on held-out scenes asked for by their captions (which name every object's colour): the
  share of all object cells, and of first cells, whose class and colour the model's most probable object id
  names, and the probability it gives an object at first cells;
- sampled one-object layouts for every colour-shape pair ("a photo of a red star", one seed each) with the
  run's sampling settings: the share whose written cells' majority class and colour are the asked ones
  (an empty layout counts as wrong).

Run: ``.venv/bin/python benchmarks/first_cells.py RUN [--n 96] [--stage instruct]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from blip3o.data.next_inputs import image_prompts, image_rows
from blip3o.data.processing import to_pixels
from blip3o.data.world_data import load_split
from blip3o.infer.next_pipeline import NextPipeline
from blip3o.models.heads import id_factors
from blip3o.train.next_tasks import start_cells
from blip3o.world.spec import COLORS, NUM_COLOUR_IDS, SHAPES, article

from common import emit


@torch.no_grad()
def teacher_forced(pipe: NextPipeline, run: Path, n: int) -> None:
    data = load_split(run / "world", "heldout")
    n = min(n, len(data))
    vocab, side = pipe.model.vocab, pipe.image_tokenizer.side
    captions = [m["caption"] for m in data.meta[:n]]
    rows = image_rows(pipe.tokenizer, vocab, captions, pipe.codes(to_pixels(data.images[:n])))
    logits = pipe.model.backbone(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
    labels = rows["labels"]
    written = vocab.is_code(labels[:, 1:])
    cell_logits = logits[:, :-1][written][:, slice(*vocab.code_range)]
    obj, kind, colour = id_factors(labels[:, 1:][written] - vocab.first_code_id)
    objects = cell_logits[:, 1:].softmax(-1).view(-1, len(SHAPES), NUM_COLOUR_IDS - 1)  # class-major object ids
    said_kind, said_colour = objects.sum(2).argmax(1) + 1, objects.sum(1).argmax(1)
    first = start_cells(labels, vocab, side)[written]
    for name, cells in (("object_cells", obj), ("first_cells", first)):
        extra = {"cells": int(cells.sum()), "images": n}
        emit(f"{name}_class", (said_kind[cells] == kind[cells]).float().mean().item(), "fraction", **extra)
        emit(f"{name}_colour", (said_colour[cells] == colour[cells]).float().mean().item(), "fraction")
        p_object = cell_logits[cells].softmax(-1)[:, 1:].sum(-1).mean().item()
        emit(f"{name}_p_object", p_object, "probability")


@torch.no_grad()
def sampled(pipe: NextPipeline) -> None:
    colours = list(COLORS)
    pairs = [(c, s) for c in colours for s in SHAPES]
    prompts = [f"a photo of {article(c)} {c} {s}" for c, s in pairs]
    ids, mask = image_prompts(pipe.tokenizer, pipe.model.vocab, prompts)
    tokens = pipe.sample_tokens(ids, mask, list(range(len(prompts))), pipe.next).tokens
    obj, kind, colour = id_factors(pipe.model.vocab.ids_to_codes(tokens))
    some = obj.any(1)
    major_kind = (F.one_hot(kind, len(SHAPES) + 1) * obj[..., None]).sum(1).argmax(1)
    major_colour = (F.one_hot(colour, len(colours)) * obj[..., None]).sum(1).argmax(1)
    want_kind = torch.tensor([SHAPES.index(s) + 1 for _, s in pairs])
    want_colour = torch.tensor([colours.index(c) for c, _ in pairs])
    emit("one_object_class", (some & (major_kind == want_kind)).float().mean().item(), "fraction", prompts=len(pairs))
    emit("one_object_colour", (some & (major_colour == want_colour)).float().mean().item(), "fraction")
    emit("one_object_cells_per_image", obj.sum(1).float().mean().item(), "cells")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--n", type=int, default=96, help="held-out scenes to teacher-force")
    parser.add_argument("--stage", default=None, help="weights of this NEXT stage (default: the last trained)")
    args = parser.parse_args()
    pipe = NextPipeline.from_run(args.run, args.stage)
    if pipe.next.image_codes != "layout":
        raise SystemExit(f"{args.run} writes {pipe.next.image_codes!r} codes; this benchmark reads layout codes")
    teacher_forced(pipe, args.run, args.n)
    sampled(pipe)


if __name__ == "__main__":
    main()
