"""GenEval-shapes of the layouts a layout-code BLIP3o-NEXT run writes, read without rendering them.

`blip3o eval geneval RUN` scores pixels: the AR model's layout and SANA's drawing of it together. This
script samples the same prompts with the same seeds (so the same token draws), and scores the written
layouts themselves: each 4-connected group of at least ``--min-cells`` cells of one class and colour is an
object, its box the cells' extent in pixels, and the GenEval-shapes scorer (:class:`LayoutDetector` in place
of the pixel detector, every object at confidence 1, the largest first) judges them against the prompt.
The gap between the two scores is what the renderer loses; the layout score is what a perfect renderer
of these layouts would get. ``--oracle`` scores the layouts the run's reader reads from the world's own
renders of each prompt instead (the scorer's ceiling).

Run: ``.venv/bin/python benchmarks/layout_geneval.py RUN [--stage instruct] [--min-cells N] [--oracle] [key=value …]``
(``key=value``: sampling overrides such as ``next.ar_guidance_scale=2``).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from blip3o.config import RunConfig, load_yaml
from blip3o.config.io import apply_overrides
from blip3o.data.next_inputs import image_prompts
from blip3o.eval.detector import Detection
from blip3o.eval.geneval import GenEvalScorer, oracle_generator, summarise
from blip3o.eval.model_eval import load_prompts
from blip3o.infer.next_pipeline import NextPipeline
from blip3o.models.heads import id_factors
from blip3o.world.spec import COLOR_NAMES, SHAPES

from common import emit


@dataclass
class LayoutDetector:
    """A :class:`~blip3o.eval.detector.Detector` over (s, s) cell ids instead of pixels: each 4-connected group
    of at least ``min_cells`` cells of one class and colour, boxed in pixels of ``cell`` per cell, largest
    first, at confidence 1."""

    cell: float
    min_cells: int
    classes: tuple[str, ...] = SHAPES

    def detect(self, codes: np.ndarray) -> list[Detection]:
        _, kind, colour = (t.numpy() for t in id_factors(torch.from_numpy(codes)))
        found = []
        for k, c in {(int(k), int(c)) for k, c in zip(kind[kind > 0], colour[kind > 0], strict=True)}:
            mask = ((kind == k) & (colour == c)).astype(np.uint8)
            n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
            for x, y, w, h, area in stats[1:n]:
                if area >= self.min_cells:
                    box = (x * self.cell, y * self.cell, (x + w) * self.cell, (y + h) * self.cell)
                    found.append((int(area), Detection(SHAPES[k - 1], 1.0, box, COLOR_NAMES[c])))
        return [d for _, d in sorted(found, key=lambda o: -o[0])]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("overrides", nargs="*", help="sampling overrides, e.g. next.ar_guidance_scale=2")
    parser.add_argument("--stage", default=None, help="weights of this NEXT stage (default: the last trained)")
    parser.add_argument(
        "--min-cells", type=int, default=None, help="smallest group of codes that is an object (default: 3 cells' area)"
    )
    parser.add_argument("--oracle", action="store_true", help="read the world's renders of the prompts instead")
    args = parser.parse_args()
    pipe = NextPipeline.from_run(args.run, args.stage)
    if pipe.next.image_codes != "layout":
        raise SystemExit(f"{args.run} writes {pipe.next.image_codes!r} codes; this benchmark reads layout codes")
    cfg = apply_overrides(load_yaml(args.run / "config.yaml", RunConfig), args.overrides)
    pipe.apply_sampling(cfg)
    records = load_prompts(args.run / "world", cfg.eval.n_prompts)
    k, side = cfg.eval.images_per_prompt, pipe.image_tokenizer.side
    cell = cfg.model.vision.image_size / side
    oracle = oracle_generator(cfg.model.vision.image_size, cfg.eval.seed) if args.oracle else None
    min_cells = args.min_cells or math.ceil(3 / pipe.image_tokenizer.pool**2)  # pooled codes: 3 reading cells
    scorer = GenEvalScorer(LayoutDetector(cell, min_cells))
    results = []
    for start in range(0, len(records), cfg.eval.batch_size):
        chunk = records[start : start + cfg.eval.batch_size]
        prompts = [r["prompt"] for r in chunk for _ in range(k)]
        seeds = [cfg.eval.seed + j for _ in chunk for j in range(k)]
        if oracle is not None:
            codes = pipe.codes([image for r in chunk for image in oracle(r, k)])
        else:
            ids, mask = image_prompts(pipe.tokenizer, pipe.model.vocab, prompts)
            codes = pipe.model.vocab.ids_to_codes(pipe.sample_tokens(ids, mask, seeds, pipe.next).tokens)
        for i, layout in enumerate(codes.view(-1, side, side).numpy()):
            record = chunk[i // k]
            correct = scorer.score(layout, record)["correct"]
            results.append({"tag": record["tag"], "index": record["index"], "correct": correct})
    summary = summarise(results)
    extra = {"images": len(results), "overrides": args.overrides, "oracle": args.oracle}
    emit("layout_geneval_overall", summary["overall"], "fraction", **extra)
    for tag, value in summary["tags"].items():
        emit(f"layout_geneval_{tag}", value, "fraction")


if __name__ == "__main__":
    main()
