"""The BLIP3-o paper's study in miniature: CLIP+FM vs CLIP+MSE vs VAE+FM, and sequential vs joint training.

All variants share the world, tokenizer, mini-CLIP, VAE, pixel decoder and understanding stages of
one base run (linked into each variant's directory); only the generation stage differs, trained with
the same steps and batch size. Each variant is measured on GenEval-shapes (per tag and overall),
diversity (mean pairwise mini-CLIP cosine distance between a prompt's images across seeds), the
Fréchet distance between mini-CLIP features of generated and held-out real images, understanding
accuracy before and after its generation training, and the generation stage's steps and wall time.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from blip3o.config import RunConfig
from blip3o.data.processing import to_pixels
from blip3o.data.world_data import load_split
from blip3o.eval.distribution import diversity, frechet_distance
from blip3o.eval.model_eval import geneval_run, load_prompts, vqa_run
from blip3o.infer.pipeline import MODEL_FILE, BLIP3oPipeline
from blip3o.models.build import load_weights
from blip3o.models.unified import GENERATION_PARTS
from blip3o.train.recipe import run_recipe

SHARED = ("world", "tokenizer", "clip", "vae", "decoder", "understanding", "scales.safetensors")


def variants(base: RunConfig) -> dict[str, RunConfig]:
    """The four generation variants of the study, each training only the generation stage."""
    gen = base.model.generation
    only_gen = replace(base.recipe, stages=["generation"])
    joint_stage = replace(base.recipe.generation, trainable=["backbone", "projector", "queries", "connector", "head"])
    return {
        "clip-flow": replace(base, recipe=only_gen),
        "clip-mse": replace(base, model=replace(base.model, generation=replace(gen, objective="mse")), recipe=only_gen),
        "latent-flow": replace(
            base, model=replace(base.model, generation=replace(gen, target="latent")), recipe=only_gen
        ),
        "clip-flow-joint": replace(base, recipe=replace(only_gen, training="joint", generation=joint_stage)),
    }


def _features(pipe: BLIP3oPipeline, images: list) -> torch.Tensor:
    with torch.no_grad():
        pixels = to_pixels(images, pipe.cfg.vision.image_size)
        return pipe.encoders.vision(pixel_values=pixels).last_hidden_state.mean(1)  # (N, D)


def measure(
    run: Path, cfg: RunConfig, *, n_diversity: int = 24, k: int = 4, vqa_limit: int = 400, progress: bool = False
) -> dict[str, Any]:
    """Every study figure of one trained variant directory."""
    pipe = BLIP3oPipeline.from_run(run)
    out: dict[str, Any] = {
        "geneval": geneval_run(pipe, run / "world", cfg.eval, run / "eval" / "geneval", progress=progress)
    }
    prompts = [p["prompt"] for p in load_prompts(run / "world", n_diversity)]
    images = pipe(prompts, num_images=k, seed=[1000 + i for i in range(len(prompts))])
    feats = _features(pipe, images)
    out["diversity"] = diversity(feats.reshape(len(prompts), k, -1))
    real = load_split(run / "world", "heldout").images
    out["frechet_clip"] = frechet_distance(feats, _features(pipe, list(to_pil(real[: len(images)]))))
    out["vqa_after"] = vqa_run(pipe, run / "world", limit=vqa_limit, progress=progress)["overall"]
    load_weights(pipe.model, run / "understanding" / MODEL_FILE, skip=GENERATION_PARTS)
    out["vqa_before"] = vqa_run(pipe, run / "world", limit=vqa_limit, progress=progress)["overall"]
    summary = json.loads((run / "generation" / "summary.json").read_text())
    out["steps"], out["wall_time_s"] = summary["steps"], summary["wall_time_s"]
    return out


def to_pil(images: torch.Tensor):
    from PIL import Image

    return [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]


def run_study(base: RunConfig, out: str | Path, *, progress: bool = True, **measure_kwargs: Any) -> dict[str, Any]:
    """Train the shared stages once, then each variant's generation stage; measure all; write the report."""
    out = Path(out)
    shared_cfg = replace(base, recipe=replace(base.recipe, stages=["clip", "vae", "decoder", "understanding"]))
    run_recipe(shared_cfg, out / "shared", resume=True, progress=progress)
    results = {}
    for name, cfg in variants(base).items():
        vdir = out / name
        vdir.mkdir(parents=True, exist_ok=True)
        for item in SHARED:
            link = vdir / item
            if not link.exists():
                os.symlink((out / "shared" / item).resolve(), link)
        run_recipe(cfg, vdir, resume=True, progress=progress)
        results[name] = measure(vdir, cfg, progress=progress, **measure_kwargs)
        (out / "study.json").write_text(json.dumps(results, indent=1))
    write_report(results, out)
    return results


def write_report(results: dict[str, Any], out: Path) -> None:
    """``study.md`` (one table) and ``study.png`` (GenEval per tag and variant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = list(next(iter(results.values()))["geneval"]["tags"])
    head = ["variant", *tags, "overall", "diversity", "FD (mini-CLIP)", "VQA before", "VQA after", "steps", "wall s"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        g = r["geneval"]
        cells = [
            name,
            *(f"{g['tags'][t]:.3f}" for t in tags),
            f"{g['overall']:.3f}",
            f"{r['diversity']:.3f}",
            f"{r['frechet_clip']:.2f}",
            f"{r['vqa_before']:.3f}",
            f"{r['vqa_after']:.3f}",
            str(r["steps"]),
            f"{r['wall_time_s']:.0f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    (out / "study.md").write_text("\n".join(rows) + "\n")
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(results)
    for i, (name, r) in enumerate(results.items()):
        values = [r["geneval"]["tags"][t] for t in tags] + [r["geneval"]["overall"]]
        ax.bar([x + i * width for x in range(len(values))], values, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(tags) + 1)], [*tags, "overall"], rotation=20)
    ax.set_ylabel("GenEval-shapes accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "study.png", dpi=120)
    plt.close(fig)
