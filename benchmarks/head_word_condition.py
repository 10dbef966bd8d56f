"""Does the generation head follow a prompt when its condition is the prompt's own words?

A fresh head of the run's config is trained with the generation stage's budget on the run's targets,
conditioned not on the backbone's query states but on a learned embedding of each prompt token (a
bag of words with positions left to the head's cross-attention; padding zeroed). The run's pipeline then
samples the held-out GenEval prompts with this head and scores them, as ``blip3o eval geneval`` does.
If this head scores about as the run's own, the backbone's query states are not what loses the prompt:
the head's training is.

Run: ``.venv/bin/python benchmarks/head_word_condition.py RUN [--steps 1500] [--guidance 3]``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from blip3o.config import RunConfig, load_yaml
from blip3o.data.processing import generation_inputs
from blip3o.data.world_data import load_split
from blip3o.diffusion.flow import flow_loss
from blip3o.eval.model_eval import geneval_run
from blip3o.infer.pipeline import BLIP3oPipeline
from blip3o.models.heads import FlowHead
from blip3o.train.tasks import encode_in_chunks, flow_step

from common import emit, fit


class WordCondition(nn.Module):
    """Stands in for the model's ``condition``/``velocity``: prompt token embeddings → a fresh head."""

    def __init__(self, vocab: int, width: int, head: FlowHead) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, width), head

    def condition(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids) * attention_mask[..., None].to(self.embed.weight.dtype)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.head(x, sigma, cond)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--guidance", type=float, default=None)
    args = parser.parse_args()
    run = Path(args.run)
    pipe = BLIP3oPipeline.from_run(run)
    cfg, gen = pipe.cfg, pipe.cfg.generation
    if gen.prior or gen.objective != "flow":
        raise SystemExit("this probe builds a plain flow head; use a run without a prior and with objective=flow")
    data = load_split(run / "world", "train")
    targets = encode_in_chunks(data.images, pipe.encoders.encoder(gen.target))
    prompts = [m["prompt"] for m in data.meta]
    c, side, _ = cfg.target_shape
    width = gen.dit.hidden_size
    torch.manual_seed(0)
    head = FlowHead(gen.dit, c, side, width, prediction=gen.prediction, patch=cfg.target_patch)
    model = WordCondition(len(pipe.tokenizer), width, head)
    g = torch.Generator().manual_seed(0)

    def step_loss(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(targets), (args.batch,), generator=g).tolist()
        ids, mask = generation_inputs(pipe.tokenizer, [prompts[i] for i in idx])
        sigma, x_t, target, keep = flow_step(gen.cond_dropout, gen.shift, gen.timestep_sampling, targets[idx], step)
        cond = model.condition(ids, mask) * keep[:, None, None]
        return flow_loss(model.velocity(x_t, sigma, cond), target)

    start = time.perf_counter()
    loss = fit(model, step_loss, args.steps, args.lr)
    emit("word-conditioned head: flow loss, last 100 steps", loss, "loss", run=args.run)
    emit("word-conditioned head: training time", time.perf_counter() - start, "s", run=args.run)
    pipe.model = model.eval()
    if args.guidance is not None:
        pipe.cfg = replace(cfg, generation=replace(gen, guidance_scale=args.guidance))
    with torch.no_grad():
        summary = geneval_run(
            pipe,
            run / "world",
            load_yaml(run / "config.yaml", RunConfig).eval,
            run / "eval" / "word_condition",
            progress=True,
        )
    emit("word-conditioned head: GenEval-shapes overall", summary["overall"], "accuracy", run=args.run)
    for tag, value in summary["tags"].items():
        emit(f"word-conditioned head: {tag}", value, "accuracy", run=args.run)


if __name__ == "__main__":
    main()
