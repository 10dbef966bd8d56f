"""BLIP3o-NEXT at shapes scale: training samples/s per stage, AR tokens/s and images/s at batch 1 and 16.

Trains every stage of the ``shapes-next`` preset for a few steps in a temporary directory on a small
world (weights do not change the speed), then times, at batch 1 and 16:

- the AR stage alone: our KV-cached sampler (:func:`blip3o.infer.ar_sampling.sample_image_tokens`,
  which also returns the conditioning hidden states) against ``transformers`` ``generate`` plus the
  masked re-forward that collects them (the official route, ``next_ar.generate_then_reforward``), on
  the same backbone, as image tokens/s and their ratio;
- the whole pipeline (AR sampling, connector, SANA with CFG in one batch, VAE decode) as images/s.

Run: ``.venv/bin/python benchmarks/next_shapes.py`` (one intra-op thread, as in ``next_ar.py``).
"""

from __future__ import annotations

import tempfile

import torch

from blip3o.config import resolve
from blip3o.config.recipe import SHARED_STAGES
from blip3o.data.next_inputs import image_prompts
from blip3o.infer.ar_sampling import sample_image_tokens
from blip3o.infer.next_pipeline import NextPipeline
from blip3o.train.recipe import run_recipe
from next_ar import generate_then_reforward, median_seconds

from common import emit, shortened

STEPS = 20
PROMPTS = [
    "a photo of a red circle left of a blue star",
    "a photo of two crosses",
    "a photo of a purple triangle and a green square",
    "a photo of a star",
]


def time_batch(pipe: NextPipeline, batch: int) -> None:
    """Emit AR tokens/s (ours and generate + re-forward, and their ratio) and pipeline images/s at ``batch``."""
    n, vocab, backbone = pipe.next.image_tokens, pipe.model.vocab, pipe.model.backbone
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    seeds = list(range(batch))
    ids, mask = image_prompts(pipe.tokenizer, vocab, prompts)
    ours = median_seconds(
        lambda: sample_image_tokens(backbone, ids, mask, n, vocab.code_range, seeds=seeds, prompt_hidden=1), 3, "cpu"
    )
    theirs = median_seconds(lambda: generate_then_reforward(backbone, ids, mask, n), 3, "cpu")
    emit(f"next.ar.batch{batch}", batch * n / ours, "tokens/s", tokens=n)
    emit(f"next.ar_generate.batch{batch}", batch * n / theirs, "tokens/s", tokens=n)
    emit(f"next.ar_speedup.batch{batch}", theirs / ours, "x", note="ours vs generate + re-forward")
    seconds = median_seconds(lambda: pipe(prompts, seed=seeds), 2, "cpu")
    emit(
        f"next.generate.batch{batch}",
        batch / seconds,
        "images/s",
        tokens=n,
        sana_steps=pipe.next.steps,
        cfg=pipe.next.guidance_scale,
    )


def main() -> None:
    torch.set_num_threads(1)
    cfg = resolve("shapes-next", ["world.n_train=256", "world.n_heldout=32"])
    cfg = shortened(cfg, STEPS)
    with tempfile.TemporaryDirectory() as tmp:
        summaries = run_recipe(cfg, tmp, progress=False)
        for stage, summary in summaries.items():
            if stage not in SHARED_STAGES:
                emit(
                    f"next.train.{stage}",
                    summary["samples_per_s"],
                    "samples/s",
                    batch_size=cfg.recipe.stage(stage).batch_size,
                )
        pipe = NextPipeline.from_run(tmp)
        pipe.model.backbone.generation_config.eos_token_id = None  # generate must run all N steps
        for batch in (1, 16):
            time_batch(pipe, batch)


if __name__ == "__main__":
    main()
