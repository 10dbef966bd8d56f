"""BLIP3-o at shapes scale: training samples/s per stage and generation images/s at batch 1 and 16 (CFG on).

Trains every stage of the ``shapes-blip3o`` preset for a few steps in a temporary directory (weights do
not change the speed), then times the pipeline: 30 Euler steps of the generation DiT with CFG plus the
pixel decoder's steps with CFG, then the VAE decode. Config overrides on the command line time another
generation path, e.g. the discrete layout head: ``.venv/bin/python benchmarks/blip3o_shapes.py
model.generation.target=layout model.vision.grounding_cells=2 model.generation.objective=discrete``.
"""

from __future__ import annotations

import sys
import tempfile
import time

from blip3o.config import resolve
from blip3o.infer.pipeline import BLIP3oPipeline
from blip3o.train.recipe import run_recipe

from common import emit, shortened

STEPS = 20


def main() -> None:
    cfg = resolve("shapes-blip3o", ["world.n_train=512", "world.n_heldout=64", *sys.argv[1:]])
    cfg = shortened(cfg, STEPS)
    with tempfile.TemporaryDirectory() as tmp:
        summaries = run_recipe(cfg, tmp, progress=False)
        for stage, summary in summaries.items():
            emit(
                f"blip3o.train.{stage}",
                summary["samples_per_s"],
                "samples/s",
                batch_size=cfg.recipe.stage(stage).batch_size,
            )
        pipe = BLIP3oPipeline.from_run(tmp)
        prompt = "a photo of a red circle left of a blue star"
        for batch in (1, 16):
            pipe([prompt] * batch, seed=list(range(batch)))  # warm-up
            start = time.perf_counter()
            pipe([prompt] * batch, seed=list(range(batch)))
            elapsed = time.perf_counter() - start
            emit(
                f"blip3o.generate.batch{batch}",
                batch / elapsed,
                "images/s",
                steps=cfg.model.generation.steps,
                decoder_steps=cfg.model.decoder.steps,
                cfg=True,
                objective=cfg.model.generation.objective,
                target=cfg.model.generation.target,
            )


if __name__ == "__main__":
    main()
