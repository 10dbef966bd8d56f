"""How well a run reads layouts: its grounded reading of held-out images against each scene's boxes.

For every held-out shape scene the run's layout (:meth:`blip3o.models.build.Encoders.layout`: the layout
reader when the run has one, else the mini-CLIP's linear grounding head) is compared cell by cell with the
cells the scene's boxes cover (:func:`blip3o.train.tasks.grounding_targets`, the reading's training target):
the share of object cells whose class, and whose colour, the reading names, and of background cells it
leaves empty. A run with a reader is also read by its linear head, for comparison.

Run: ``.venv/bin/python benchmarks/layout_reading.py RUN [--n 400]`` (a run with a layout target).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from blip3o.config import RunConfig
from blip3o.config.io import load_yaml
from blip3o.data.world_data import load_split
from blip3o.infer.pipeline import require
from blip3o.models.build import Encoders
from blip3o.models.heads import id_factors, layout_to_ids
from blip3o.train.recipe import encoders
from blip3o.train.tasks import encode_in_chunks, grounding_targets

from common import emit


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--n", type=int, default=400, help="held-out images to read")
    args = parser.parse_args()

    cfg = load_yaml(require(args.run / "config.yaml", "any"), RunConfig)
    enc = encoders(cfg, args.run)
    data = load_split(args.run / "world", "heldout")
    n, side = min(args.n, len(data)), cfg.model.layout_side
    classes, colours = (ids.view(-1, side, side) for ids in grounding_targets(data.meta[:n], side))
    readers = {"reader" if enc.reader is not None else "linear head": enc}
    if enc.reader is not None:
        readers["linear head"] = Encoders(enc.vision, enc.vae, enc.pool, enc.scales, enc.grounding)
    for name, reading in readers.items():
        obj, kind, colour = id_factors(layout_to_ids(encode_in_chunks(data.images[:n], reading.layout)))
        on = classes > 0
        emit("object_cell_class", (kind[on] == classes[on]).float().mean().item(), "fraction", reader=name, images=n)
        emit("object_cell_colour", (colour[on] + 1 == colours[on]).float().mean().item(), "fraction", reader=name)
        empty = classes == 0
        emit("background_cell_empty", (~obj[empty]).float().mean().item(), "fraction", reader=name)


if __name__ == "__main__":
    main()
