"""GRPO post-training of a BLIP3o-NEXT run: rollouts, verifiable rewards, clipped updates, exact resume.

One step (the official recipe, §7 of the reference spec, without its bugs):

1. draw ``prompts_per_step`` training prompts (a pure function of the seed and the step);
2. rollout: ``group_size`` images per prompt, each with its own seed: KV-cached AR sampling of the image
   codes (the run's temperature / top-k / top-p), which also yields the conditioning hidden states,
   then SANA and the VAE, all without gradient;
3. rewards (:mod:`blip3o.rl.rewards`) → group-normalised advantages;
4. ``num_iterations`` optimiser steps on that batch with the clipped, KL-regularised, token-mean loss of
   :mod:`blip3o.rl.loss`; log-probs of the old policy are kept from before the first, those of the
   frozen reference (the starting policy) come from its own copy of the backbone.

Only the AR policy learns (``grpo.trainable``, the backbone by default); the connector and SANA only
render, as officially. trl's ``GRPOTrainer`` does not fit cleanly: its rollouts are text completions
scored by text rewards, while ours are images rendered by a second network from the sampler's hidden
states, and our runs keep this project's checkpoints and layout; the loss is the same as trl's (tested).

Exact resume: the prompts and every rollout's token and noise draws are functions of (seed, step), the
learning rate of the step, and checkpoints hold the policy and AdamW state; so a resumed run repeats
the uninterrupted one. Single process: a rollout batch at shapes scale fits one CPU.

RL run directory ``OUT/``::

    config.yaml         the source run's config with the grpo section
    tokenizer clip vae decoder scales.safetensors image_tokenizer world next instruct
                        links to the source run's (so ``--stage instruct`` gives the starting model)
    grpo/model.safetensors  the tuned BLIP3o-NEXT weights (what ``blip3o generate OUT`` loads)
    grpo/metrics.jsonl  one line per step: reward mean / std (and per reward), KL, clip fraction, entropy …
    grpo/curves.png     those curves
    grpo/samples/step-000010.png  fixed prompts and seeds, every ``sample_every`` steps
    grpo/checkpoints/   resumable checkpoints
    grpo/summary.json   written when the run finishes
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from blip3o.config import RunConfig, apply_overrides, dump_yaml, load_yaml, to_dict
from blip3o.config.grpo import grpo_preset
from blip3o.config.next import NextConfig
from blip3o.data.next_inputs import image_prompts
from blip3o.data.processing import to_images
from blip3o.infer.next_pipeline import NextPipeline, last_stage
from blip3o.infer.pipeline import MODEL_FILE, require
from blip3o.report import image_grid
from blip3o.rl.loss import completion_logps, group_advantages, grpo_loss
from blip3o.rl.rewards import build_reward
from blip3o.train.checkpoint import export_model, latest_checkpoint, load_checkpoint, save_checkpoint, write_json
from blip3o.train.plots import plot_curves
from blip3o.train.recipe import link_into
from blip3o.train.trainer import build_optimizer, lr_at, truncate_metrics
from blip3o.world.text import text_prompt

__all__ = ["STAGE", "default_prompts", "grpo_run_config", "load_prompt_file", "run_grpo"]

logger = logging.getLogger(__name__)

STAGE = "grpo"
"""The RL run's stage directory, and the pipeline's name for its weights."""

LINKED = ("tokenizer", "clip", "vae", "decoder", "scales.safetensors", "image_tokenizer", "world", "next", "instruct")
"""What an RL run links from its source run."""


NOT_PLOTTED = frozenset({"rollout_s", "update_s", "skipped", "ratio"})
"""Metrics logged but left out of ``curves.png``."""


def load_prompt_file(path: str | Path) -> list[dict[str, Any]]:
    """Prompt records from a ``.jsonl`` (objects with at least ``prompt``) or a text file (one prompt per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(lines, start=1):
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{path}:{n}: each line must be a JSON object with a string 'prompt'")
            records.append(record)
    else:
        records = [{"prompt": line.strip()} for line in lines]
    if not records:
        raise ValueError(f"prompt file {path} holds no prompts")
    return records


def default_prompts(world: Path, rewards: str) -> list[dict[str, Any]]:
    """The world's training prompts: its training words as text prompts when every reward is OCR, else its
    GenEval-schema training prompts."""
    names = {part.split(":")[0].strip() for part in rewards.split(",")}
    if names == {"ocr"}:
        words = json.loads((world / "world.json").read_text())["words"]["train"]
        return [{"prompt": text_prompt(w), "text": w} for w in words]
    return load_prompt_file(world / "train_prompts.jsonl")


def _sample_prompts(
    records: list[dict[str, Any]], count: int, by_tag: dict[str, list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """``count`` records: the first of each tag in turn when tags are balanced, else spread over the list."""
    if by_tag:
        columns = [by_tag[t] for t in sorted(by_tag)]
        ordered = [c[i] for i in range(max(map(len, columns))) for c in columns if i < len(c)]
        return ordered[:count]
    return records[:: max(1, len(records) // count)][:count]


class _GRPO:
    """One RL run's state: the pipeline (whose model is the policy), reference, optimiser, rewards, prompts."""

    def __init__(self, source: Path, out: Path, cfg: RunConfig) -> None:
        assert cfg.grpo is not None
        self.g, self.dir = cfg.grpo, out / STAGE
        self.pipe = NextPipeline.from_run(source, self.g.init_stage or last_stage(source))
        self.pipe.apply_sampling(cfg)
        self.sampling: NextConfig = self.pipe.next
        if self.sampling.temperature <= 0:
            raise ValueError("GRPO needs a sampling temperature > 0 (next.temperature); greedy rollouts have no spread")
        if self.sampling.ar_guidance_scale != 1.0:
            raise ValueError("GRPO scores tokens under the unguided policy; set next.ar_guidance_scale=1")
        self.render_cfg = replace(self.sampling, steps=self.g.rollout_steps or self.sampling.steps)
        self.policy = self.pipe.model
        self.policy.requires_grad_(False)
        for path in self.g.trainable:
            self.policy.get_submodule(path).requires_grad_(True)
        self.reference = copy.deepcopy(self.policy.backbone).eval() if self.g.beta > 0 else None
        self.optimizer = build_optimizer(self.policy, self.g.optim)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.reward = build_reward(self.g.rewards, http_url=self.g.http_url, http_timeout=self.g.http_timeout)
        self.records = (
            load_prompt_file(self.g.prompts) if self.g.prompts else default_prompts(source / "world", self.g.rewards)
        )
        self.by_tag: dict[str, list[dict[str, Any]]] = {}
        if self.g.balance_tags and all("tag" in r for r in self.records):
            for record in self.records:
                self.by_tag.setdefault(record["tag"], []).append(record)
        self.fixed = _sample_prompts(self.records, self.g.sample_prompts, self.by_tag)

    # -- rollouts -------------------------------------------------------------------------------------

    def step_records(self, step: int) -> list[dict[str, Any]]:
        """The prompts of ``step``: with ``balance_tags``, a tag drawn uniformly, then a prompt of that tag
        (GenEval-style tags are rarely balanced in a prompt file), else prompts drawn without replacement."""
        rng = random.Random(f"{self.g.seed}-grpo-{step}")
        n = self.g.prompts_per_step
        if self.by_tag:
            tags = sorted(self.by_tag)
            return [rng.choice(self.by_tag[rng.choice(tags)]) for _ in range(n)]
        if n <= len(self.records):
            return [self.records[i] for i in rng.sample(range(len(self.records)), n)]
        return [rng.choice(self.records) for _ in range(n)]

    @torch.no_grad()
    def rollout(self, records: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
        """Sample and render one image per (record, seed); records and seeds are aligned."""
        self.policy.eval()
        ids, mask = image_prompts(self.pipe.tokenizer, self.policy.vocab, [r["prompt"] for r in records])
        sample = self.pipe.sample_tokens(ids, mask, seeds, self.sampling)
        codes = self.pipe.model.vocab.ids_to_codes(sample.tokens)
        images = to_images(self.pipe.render(sample.hidden, seeds, self.render_cfg, codes=codes))
        return {"input_ids": ids, "attention_mask": mask, "tokens": sample.tokens, "images": images}

    def logps(self, model: torch.nn.Module, batch: dict[str, Any], rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return completion_logps(
            model,
            batch["input_ids"][rows],
            batch["attention_mask"][rows],
            batch["tokens"][rows],
            id_range=self.policy.vocab.code_range,
            temperature=self.sampling.temperature,
        )

    @torch.no_grad()
    def frozen_logps(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        size, b = self.g.micro_batch, batch["tokens"].shape[0]
        return torch.cat([self.logps(model, batch, slice(i, i + size))[0] for i in range(0, b, size)])

    # -- one step -------------------------------------------------------------------------------------

    def step(self, step: int) -> dict[str, float]:
        g = self.g
        started = time.perf_counter()
        chosen = self.step_records(step)
        records = [r for r in chosen for _ in range(g.group_size)]
        seeds = [g.seed * 1_000_003 + step * g.rollouts + i for i in range(len(records))]
        batch = self.rollout(records, seeds)
        scores = self.reward(batch["images"], records)
        rewards = torch.tensor(scores.total, dtype=torch.float32)
        advantages = group_advantages(rewards, g.group_size, scale=g.scale_rewards, eps=g.adv_eps)
        rolled = time.perf_counter()

        record = {
            "step": step + 1,
            "reward": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "reward_group_std": float(rewards.view(-1, g.group_size).std(dim=1).mean()),
            **{f"reward_{name}": sum(v) / len(v) for name, v in scores.parts.items() if len(scores.parts) > 1},
            "lr": lr_at(step, g.optim, g.steps),
            "rollout_s": rolled - started,
        }
        if not bool(advantages.any()):  # every group tied: no signal, and AdamW's moments would still move
            return {**record, "skipped": 1.0, "update_s": 0.0}
        self.policy.backbone.train()
        ref = self.frozen_logps(self.reference, batch) if self.reference is not None else None
        old = self.frozen_logps(self.policy.backbone, batch) if g.num_iterations > 1 else None
        b, n = batch["tokens"].shape
        for group in self.optimizer.param_groups:
            group["lr"] = record["lr"]
        sums = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "ratio": 0.0, "entropy": 0.0}
        for _ in range(g.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            for start in range(0, b, g.micro_batch):
                rows = slice(start, start + g.micro_batch)
                logps, entropy = self.logps(self.policy.backbone, batch, rows)
                terms = grpo_loss(
                    logps,
                    logps.detach() if old is None else old[rows],
                    advantages[rows],
                    torch.ones_like(logps),
                    ref_logps=None if ref is None else ref[rows],
                    beta=g.beta,
                    epsilon_low=g.epsilon,
                    epsilon_high=g.epsilon_high,
                    num_tokens=float(b * n),
                )
                terms.loss.backward()
                share = logps.shape[0] / b / g.num_iterations
                sums["loss"] += terms.loss.detach() / g.num_iterations
                for key in ("kl", "clip_fraction", "ratio"):
                    sums[key] += getattr(terms, key) * share
                sums["entropy"] += entropy.mean() * share
            clip = g.optim.grad_clip if g.optim.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
            self.optimizer.step()
        return {
            **record,
            **{k: float(v) for k, v in sums.items()},
            "skipped": 0.0,
            "grad_norm": float(grad_norm),
            "update_s": time.perf_counter() - rolled,
        }

    # -- outputs --------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample_grid(self, step: int) -> Path:
        """Images of the fixed prompts with fixed seeds, captioned with their reward."""
        records = self.fixed
        batch = self.rollout(records, [self.g.seed] * len(records))
        scores = self.reward(batch["images"], records)
        captions = [f"{s:.2f} {r['prompt']}" for s, r in zip(scores.total, records, strict=True)]
        path = self.dir / "samples" / f"step-{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.png")
        image_grid(batch["images"], captions, columns=min(8, len(records))).save(tmp)
        tmp.replace(path)
        return path


def grpo_run_config(
    source: str | Path,
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    **fields: Any,
) -> RunConfig:
    """The config of an RL run from ``source``: its config with a ``grpo`` section, the source's own when it
    is an RL run and no ``preset`` is named, else ``preset`` (default ``shapes-geneval``); then the given
    ``fields`` of that section that are not None (``rewards=…``, ``prompts=…``), then dotted ``overrides``."""
    base = load_yaml(require(Path(source) / "config.yaml", "any"), RunConfig)
    if base.next is None:
        raise ValueError(f"{source} is a BLIP3-o run; GRPO tunes a BLIP3o-NEXT run (`blip3o train shapes-next`)")
    section = base.grpo if base.grpo is not None and preset is None else grpo_preset(preset or "shapes-geneval")
    section = replace(section, **{k: v for k, v in fields.items() if v is not None})
    return apply_overrides(replace(base, grpo=section), list(overrides))


def run_grpo(
    source: str | Path, out: str | Path, cfg: RunConfig, *, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """GRPO-tune the NEXT model of run ``source`` into RL run ``out`` (layout in the module docstring).

    ``cfg`` is the source run's config with a ``grpo`` section (and any overrides). A finished run is
    returned as is; an interrupted one continues from its last checkpoint only with ``resume=True``.
    Returns the summary (steps, first and last rewards, seconds).
    """
    source, out = Path(source), Path(out)
    if cfg.grpo is None or cfg.next is None:
        raise ValueError("run_grpo needs a BLIP3o-NEXT config with a grpo section")
    require(source / "config.yaml", "any")
    g = cfg.grpo
    stage_dir = out / STAGE
    saved = out / "config.yaml"
    if saved.is_file() and to_dict(load_yaml(saved, RunConfig)) != to_dict(cfg):
        raise ValueError(f"{out} holds an RL run with a different config; pick another --out")
    summary_path = stage_dir / "summary.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    checkpoint = latest_checkpoint(stage_dir)
    if (checkpoint is not None or (stage_dir / "metrics.jsonl").is_file()) and not resume:
        raise FileExistsError(f"{out} holds an unfinished RL run; pass --resume to continue it")

    torch.manual_seed(g.seed)
    run = _GRPO(source, out, cfg)
    stage_dir.mkdir(parents=True, exist_ok=True)
    link_into(source, out, LINKED)
    dump_yaml(cfg, saved)
    metrics = stage_dir / "metrics.jsonl"
    first = 0
    elapsed = 0.0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, run.policy, run.optimizer)
        first, elapsed = state["step"], state.get("elapsed_s", 0.0)
        truncate_metrics(metrics, first)
    else:
        run.sample_grid(0)
    begun = time.perf_counter()
    bar = tqdm(range(first, g.steps), desc="grpo", unit="step", disable=not progress, initial=first, total=g.steps)
    for step in bar:
        record = run.step(step)
        bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record.get('kl', math.nan):.4f}")
        done = step + 1
        if done % g.log_every == 0 or done == g.steps:
            record["elapsed_s"] = elapsed + time.perf_counter() - begun
            with metrics.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if g.sample_every and done % g.sample_every == 0 and done != g.steps:
            run.sample_grid(done)
        if done % g.ckpt_every == 0 or done == g.steps:
            state = {"elapsed_s": elapsed + time.perf_counter() - begun}
            save_checkpoint(stage_dir, done, run.policy, run.optimizer, trainer_state=state, keep=g.keep_checkpoints)
            plot_curves(metrics, stage_dir / "curves.png", skip=NOT_PLOTTED)
    run.sample_grid(g.steps)
    export_model(run.policy, stage_dir / MODEL_FILE)
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    summary = {
        "steps": g.steps,
        "first_reward": records[0]["reward"] if records else None,
        "last_reward": records[-1]["reward"] if records else None,
        "seconds": elapsed + time.perf_counter() - begun,
        "source": str(source),
        "init_stage": g.init_stage or last_stage(source),
    }
    write_json(summary_path, summary)
    return summary
