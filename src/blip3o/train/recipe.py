"""The staged shapes recipe in one run directory, and loading a finished run back as a pipeline.

Run directory::

    config.yaml      the resolved RunConfig
    world/           the shapes world (made once, reused when the world config matches)
    tokenizer/       the BPE tokenizer trained on the world's text
    clip/ vae/ reader/ decoder/ understanding/ generation/   one trainer run per stage (metrics, curves, checkpoints,
                     model.safetensors, summary.json)
    image_tokenizer/ next/ instruct/   the BLIP3o-NEXT stages (image_tokenizer/codebook.json: codebook usage
                     and perplexity over held-out images)
    scales.safetensors  statistics that standardise CLIP maps and VAE latents, measured after clip and vae

Stages already finished in the directory are skipped; an interrupted stage resumes from its last
checkpoint. A BLIP3o-NEXT run can take the world, tokenizer and shared stages (clip, vae, decoder) of
a BLIP3-o run (``reuse``): they are linked, after checking that the two configs agree on them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch.distributed as dist
from safetensors.torch import save_file

from blip3o.config import RunConfig, dump_yaml
from blip3o.config.io import load_yaml, to_dict
from blip3o.config.recipe import SHARED_STAGES, STAGES
from blip3o.config.train import TrainConfig
from blip3o.data.tokenizer import load_tokenizer, save_tokenizer, train_bpe_tokenizer
from blip3o.data.world_data import load_split
from blip3o.infer.pipeline import MODEL_FILE, SCALES_FILE, load_encoders, require
from blip3o.models.build import Encoders, measure_scales, unit_scales
from blip3o.train.distributed import init_distributed
from blip3o.train.next_tasks import ImageTokenizerTask, NextTask, codebook_report, image_tokenizer_weights
from blip3o.train.tasks import (
    ClipTask,
    DecoderTask,
    GenerationTask,
    ReaderTask,
    StageTask,
    UnderstandingTask,
    VAETask,
)
from blip3o.train.trainer import train
from blip3o.world.corpus import world_texts
from blip3o.world.shards import ensure_world

log = logging.getLogger(__name__)


def prepare(cfg: RunConfig, out: Path, progress: bool = True) -> tuple[Path, Path]:
    """The world and tokenizer of a run directory, made if missing."""
    if cfg.model.vision.image_size != cfg.world.size:
        raise ValueError(
            f"model.vision.image_size ({cfg.model.vision.image_size}) must equal world.size ({cfg.world.size})"
        )
    world = ensure_world(cfg.world, out / "world", progress)
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        save_tokenizer(train_bpe_tokenizer(world_texts(world), vocab_size=cfg.recipe.vocab_size), tok_dir)
    return world, tok_dir


def encoders(cfg: RunConfig, out: Path) -> Encoders:
    """The frozen mini-CLIP vision tower and VAE of a run, with their scales (measured once, then read)."""
    vocab = len(load_tokenizer(out / "tokenizer"))
    scales_path = out / SCALES_FILE
    clip_w, vae_w = require(out / "clip" / MODEL_FILE, "clip"), require(out / "vae" / MODEL_FILE, "vae")
    if not scales_path.is_file():
        raw = Encoders.from_weights(cfg.model, vocab, clip_w, vae_w, unit_scales(cfg.model))
        scales = measure_scales(raw.vision, raw.vae, load_split(out / "world", "train").images, cfg.model.vision.pool)
        tmp = scales_path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in scales.items()}, str(tmp))
        os.replace(tmp, scales_path)
    enc = load_encoders(out, cfg.model, vocab)
    enc.cache = out / CACHE_DIR
    return enc


def stage_config(cfg: RunConfig, stage: str) -> TrainConfig:
    """The training settings of ``stage``; the BLIP3o-NEXT stages train, unless their config lists modules
    itself, the backbone, the connector and the SANA modules of ``next.train_sana`` (one declaration), and in
    ``next`` the code upsampler when the model has one (``instruct`` keeps it as ``next`` left it)."""
    tcfg = cfg.recipe.stage(stage)
    if stage in ("next", "instruct") and not tcfg.trainable and cfg.next is not None:
        upsampler = ["upsampler"] if cfg.next.upsample_codes and stage == "next" else []
        sana = [f"dit.{p}" for p in cfg.next.train_sana]
        return replace(tcfg, trainable=["backbone", "connector", *sana, *upsampler])
    return tcfg


def make_task(stage: str, cfg: RunConfig, out: Path) -> StageTask:
    """The task of one stage, wired to the run directory's world, tokenizer and earlier stages."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; allowed: {', '.join(STAGES)}")
    tcfg = cfg.recipe.stage(stage)
    common = (cfg.model, out / "world", out / "tokenizer", tcfg.batch_size, tcfg.seed)
    kwargs = {"grad_accum": tcfg.grad_accum}
    if stage == "clip":
        return ClipTask(
            *common, **kwargs, local_weight=cfg.recipe.clip_local_weight, shift_weight=cfg.recipe.clip_shift_weight
        )
    if stage == "vae":
        return VAETask(*common, **kwargs)
    kwargs["encoders"] = encoders(cfg, out)
    if stage == "reader":
        return ReaderTask(*common, **kwargs)
    if stage == "decoder":
        return DecoderTask(*common, **kwargs)
    if stage == "understanding":
        return UnderstandingTask(*common, **kwargs, qa_turns=cfg.recipe.qa_turns)
    if stage == "image_tokenizer":
        return ImageTokenizerTask(*common, **kwargs, next_cfg=cfg.next)
    if stage in ("next", "instruct"):
        if stage == "next":  # SANA from the pixel decoder, images asked for by caption
            start = {"decoder": require(out / "decoder" / MODEL_FILE, "decoder")}
            data = {"prompt_fraction": cfg.recipe.next_prompt_fraction}
        else:  # from the next stage, on the curated set
            start = {"init": require(out / "next" / MODEL_FILE, "next")}
            data = {"prompt_fraction": cfg.recipe.instruct_prompt_fraction, "curated": cfg.recipe.instruct_per_tag}
        return NextTask(
            *common,
            **kwargs,
            next_cfg=cfg.next,
            image_tokenizer=image_tokenizer_weights(cfg.next, out),
            qa_turns=cfg.recipe.qa_turns,
            train_upsampler="upsampler" in stage_config(cfg, stage).trainable,
            **start,
            **data,
        )
    weight = cfg.recipe.joint_weight if cfg.recipe.training == "joint" else 0.0
    init = require(out / "understanding" / MODEL_FILE, "understanding")
    return GenerationTask(
        *common,
        **kwargs,
        init=init,
        joint_weight=weight,
        prompt_fraction=cfg.recipe.generation_prompt_fraction,
        qa_turns=cfg.recipe.qa_turns,
    )


def finished(stage_dir: Path, steps: int) -> bool:
    """Whether a stage directory holds a run that reached ``steps``."""
    path = stage_dir / "summary.json"
    return path.is_file() and json.loads(path.read_text()).get("steps", -1) >= steps


CACHE_DIR = "cache"
"""Where a run keeps the frozen encoders' encodings of its world (:meth:`Encoders.encode_all`), keyed by the
images and the encoders' weights, so that a stage reads what an earlier stage, or a reused run, encoded."""

SHARED_FILES = ("world", "tokenizer", *SHARED_STAGES, SCALES_FILE, CACHE_DIR)


def link_shared(cfg: RunConfig, out: Path, source: Path) -> list[str]:
    """Link the world, tokenizer, shared stages and scales of run ``source`` into ``out`` (those ``out``
    lacks); returns what was linked. Raises ``ValueError`` when the two configs differ in anything these
    depend on (world, text vocabulary, vision, VAE, decoder, or the shared stages' training)."""
    theirs = load_yaml(require(source / "config.yaml", "any"), RunConfig)

    def shared(c: RunConfig) -> dict[str, Any]:
        return {
            "world": to_dict(c.world),
            "recipe.vocab_size": c.recipe.vocab_size,
            "recipe.clip_local_weight": c.recipe.clip_local_weight,
            "recipe.clip_shift_weight": c.recipe.clip_shift_weight,
            **{f"model.{k}": to_dict(getattr(c.model, k)) for k in ("vision", "vae")},
            # The decoder's weights, not how it is sampled.
            "model.decoder": {
                k: v for k, v in to_dict(c.model.decoder).items() if k not in ("steps", "guidance_scale")
            },
            **{f"recipe.{k}": to_dict(c.recipe.stage(k)) for k in SHARED_STAGES},
        }

    mine, other = shared(cfg), shared(theirs)
    differ = [k for k in mine if mine[k] != other[k]]
    if differ:
        raise ValueError(f"cannot reuse {source}: its config differs in {', '.join(differ)}")
    return link_into(source, out, SHARED_FILES)


def link_into(source: Path, out: Path, names: tuple[str, ...]) -> list[str]:
    """Symlink each of ``names`` that ``source`` has and ``out`` lacks (to its resolved target, so links of
    links point at the real files); returns what was linked."""
    linked = []
    for name in names:
        target, link = (source / name).resolve(), out / name
        if target.exists() and not link.exists():
            link.symlink_to(target, target_is_directory=target.is_dir())
            linked.append(name)
    return linked


def run_recipe(
    cfg: RunConfig, out: str | Path, *, resume: bool = False, progress: bool = True, reuse: str | Path | None = None
) -> dict[str, Any]:
    """Run the recipe's stages in order into ``out``; returns each stage's summary.

    Finished stages are always skipped; a stage interrupted part-way continues from its last checkpoint
    only with ``resume=True`` (otherwise the trainer refuses the directory and says so). ``reuse``: a run
    whose world, tokenizer and shared stages to link first (:func:`link_shared`).
    """
    out = Path(out)
    multi_rank = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if multi_rank:  # under torchrun: rank 0 makes the world, tokenizer and scales; the others wait
        init_distributed(cfg.recipe.stage(cfg.recipe.stages[0]).device)
    if not multi_rank or dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        if reuse is not None:
            linked = link_shared(cfg, out, Path(reuse))
            log.info("linked %s from %s", ", ".join(linked) or "nothing", reuse)
        dump_yaml(cfg, out / "config.yaml")
        prepare(cfg, out, progress)
        if any(s in cfg.recipe.stages for s in STAGES[2:]) and all(
            (out / s / MODEL_FILE).is_file() for s in ("clip", "vae")
        ):
            encoders(cfg, out)
    if multi_rank:
        dist.barrier()
    summaries = {}
    for stage in cfg.recipe.stages:
        log.info("stage %s", stage)
        summaries[stage] = train(
            make_task(stage, cfg, out),
            stage_config(cfg, stage),
            out / stage,
            resume=resume or finished(out / stage, cfg.recipe.stage(stage).steps),
            config_to_save=cfg,
            progress=progress,
        )
        if stage == "image_tokenizer" and (not multi_rank or dist.get_rank() == 0):
            report = out / stage / "codebook.json"
            if not report.is_file():
                stats = codebook_report(cfg, encoders(cfg, out), out / stage / MODEL_FILE, out / "world")
                report.write_text(json.dumps(stats, indent=1))
            summaries[stage]["codebook"] = json.loads(report.read_text())
    return summaries
