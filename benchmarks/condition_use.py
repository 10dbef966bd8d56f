"""How much of what a prompt decides does the BLIP3-o generation head draw from its condition?

At σ = 1 the head's input is pure noise, so its implied clean map x̂0 = x − v̂ should be the
prompt's conditional mean E[x0 | prompt]. For the training set's most frequent single-object colour
prompts ("a photo of a red star") the probe measures the head's x̂0 against that mean (estimated from
the prompt's training scenes), next to the unconditional mean (what a head that ignores the prompt
gives), and reports the share of the gap the head closes. It then fits small regressors from three
descriptions of the prompt to the maps, with the stage's budget (1,500 AdamW steps of 32): a bag of
the prompt's tokens, the mean of the query states the head is given, and the same after
standardising each (query, channel) over the data. They say whether the prompt is hard to read from
the query states or the head is slow to learn it.

Run: ``.venv/bin/python benchmarks/condition_use.py RUN [--n 8000] [--prompts 20]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from blip3o.data.processing import generation_inputs
from blip3o.data.world_data import load_split
from blip3o.infer.pipeline import BLIP3oPipeline, seeded_noise
from blip3o.train.tasks import encode_in_chunks

from common import emit


def regress(x: torch.Tensor, maps: torch.Tensor, steps: int = 1500, batch: int = 32) -> nn.Module:
    """An MLP (512 hidden) from x (N, F) to the flattened maps, trained like the generation stage."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(x.shape[1], 512), nn.GELU(), nn.Linear(512, maps[0].numel()))
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=0.0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,))
        loss = (net(x[idx]) - maps[idx].flatten(1)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--n", type=int, default=8000, help="training scenes")
    parser.add_argument("--prompts", type=int, default=20, help="most frequent colour prompts to test on")
    parser.add_argument("--seeds", type=int, default=4, help="noise draws per prompt at σ = 1")
    args = parser.parse_args()

    pipe = BLIP3oPipeline.from_run(args.run)
    split = load_split(args.run / "world", "train")
    meta = split.meta[: args.n]  # a split's meta and images are its scenes, in one order
    prompts = [m["prompt"] for m in meta]
    with torch.no_grad():
        maps = encode_in_chunks(split.images[: len(meta)], pipe.encoders.clip)
        cond = torch.cat(
            [
                pipe.model.condition(*generation_inputs(pipe.tokenizer, prompts[i : i + 200]))
                for i in range(0, len(meta), 200)
            ]
        )
    groups: dict[str, list[int]] = {}
    for i, m in enumerate(meta):
        if m["metadata"]["tag"] == "colors":
            groups.setdefault(m["prompt"], []).append(i)
    tested = sorted(groups, key=lambda p: -len(groups[p]))[: args.prompts]
    means = torch.stack([maps[groups[p]].mean(0) for p in tested])  # E[x0 | prompt]
    first = [groups[p][0] for p in tested]
    unconditional = ((maps.mean(0) - means) ** 2).mean().item()
    within = torch.stack([((maps[groups[p]] - maps[groups[p]].mean(0)) ** 2).mean() for p in tested]).mean()
    emit(
        "map_variance", ((maps - maps.mean(0)) ** 2).mean().item(), "mse", within_colour_prompt=round(within.item(), 3)
    )

    with torch.no_grad():
        c = cond[first].repeat(args.seeds, 1, 1)
        x = seeded_noise(pipe.cfg.target_shape, [s for s in range(args.seeds) for _ in tested])
        x0 = x - pipe.model.velocity(x, torch.ones(len(x)), c)  # σ = 1: x̂0 = x − v̂
        head = ((x0 - means.repeat(args.seeds, 1, 1, 1)) ** 2).mean().item()
    emit(
        "head_sigma1_mse_to_conditional_mean",
        head,
        "mse",
        unconditional_mean=round(unconditional, 3),
        share_of_prompt_effect=round(1 - head / unconditional, 3),
    )

    v = len(pipe.tokenizer)
    bag = torch.zeros(len(meta), v)
    for i, p in enumerate(prompts):
        for t in pipe.tokenizer(p)["input_ids"]:
            bag[i, t] += 1
    standardised = (cond - cond.mean(0)) / cond.std(0).clamp_min(1e-4)
    for name, feats in [
        ("bag_of_words", bag),
        ("query_states_mean", cond.mean(1)),
        ("standardised_query_states_mean", standardised.mean(1)),
    ]:
        net = regress(feats, maps)
        fit = (net(feats) - maps.flatten(1)).pow(2).mean().item()
        mse = (net(feats[first]) - means.flatten(1)).pow(2).mean().item()
        emit(
            f"regressor_{name}",
            mse,
            "mse_to_conditional_mean",
            train_mse=round(fit, 3),
            share_of_prompt_effect=round(1 - mse / unconditional, 3),
        )


if __name__ == "__main__":
    main()
