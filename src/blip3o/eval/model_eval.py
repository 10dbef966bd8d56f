"""Evaluating a trained run: GenEval on the world's held-out prompts, and question answering (VQA).

Both take a pipeline (see :mod:`blip3o.infer.pipeline`) and return summaries; the GenEval path writes
images in GenEval's layout first, so the folder can be re-scored or inspected.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from blip3o.config import EvalConfig
from blip3o.eval.geneval import GenEvalScorer, evaluate_folder, write_layout, write_results
from blip3o.world.shards import read_shards, shard_paths


def load_prompts(world: Path, n: int | None = None) -> list[dict[str, Any]]:
    """The held-out GenEval-schema prompts of a world; given n, the first of each tag in GenEval's proportions."""
    from blip3o.world.prompts import proportional
    from blip3o.world.spec import TAG_COUNTS, TAGS

    prompts = [json.loads(line) for line in (world / "prompts.jsonl").read_text().splitlines()]
    if n is None or n >= len(prompts):
        return prompts
    counts = proportional(n, TAG_COUNTS)
    return [p for tag in TAGS for p in [q for q in prompts if q["tag"] == tag][: counts[tag]]]


def sample_layout(
    pipe, records: list[dict[str, Any]], images_per_prompt: int, seed: int, batch_size: int, out: Path, progress: bool
) -> Path:
    """Sample ``images_per_prompt`` images per record (seed ``seed`` per prompt, images seed + k), a batch of
    prompts at a time, into GenEval's folder layout under ``out``; returns ``out``."""
    cache: dict[str, list] = {}

    def generate(record: dict[str, Any], k: int) -> list:
        if record["index"] not in cache:
            start = records.index(record)
            chunk = records[start : start + max(1, batch_size // k)]
            images = pipe([p["prompt"] for p in chunk], num_images=k, seed=[seed] * len(chunk))
            for i, p in enumerate(chunk):
                cache[p["index"]] = images[i * k : (i + 1) * k]
        return cache.pop(record["index"])

    write_layout(records, images_per_prompt, generate, out, progress=progress)
    return out


def geneval_run(pipe, world: Path, cfg: EvalConfig, out: Path, *, progress: bool = True) -> dict[str, Any]:
    """Sample the held-out prompts (seed ``cfg.seed`` per prompt, images seed + k) and score them."""
    prompts = load_prompts(world, cfg.n_prompts)
    images_dir = sample_layout(pipe, prompts, cfg.images_per_prompt, cfg.seed, cfg.batch_size, out / "images", progress)
    results, summary = evaluate_folder(images_dir, GenEvalScorer(), progress=progress)
    write_results(results, summary, out / "geneval_results.jsonl")
    return summary


def text_prompts(world: Path, split: str = "heldout") -> list[dict[str, Any]]:
    """Text-rendering prompts of a world's training or held-out words (``text`` holds the word)."""
    from blip3o.world.text import text_prompt

    words = json.loads((world / "world.json").read_text())["words"][split]
    return [{"index": f"{i:05d}", "tag": "text", "prompt": text_prompt(w), "text": w} for i, w in enumerate(words)]


def ocr_run(
    pipe, world: Path, cfg: EvalConfig, out: Path, *, n: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Draw the world's held-out words (the first ``n``; ``cfg.images_per_prompt`` images each, seeds as in
    :func:`geneval_run`) and score them by OCR reward (:func:`blip3o.eval.ocr.evaluate_ocr_folder`)."""
    from blip3o.eval.ocr import evaluate_ocr_folder

    records = text_prompts(world)[:n]
    images_dir = sample_layout(pipe, records, cfg.images_per_prompt, cfg.seed, cfg.batch_size, out / "images", progress)
    return evaluate_ocr_folder(images_dir, out / "ocr_results.jsonl")


def normalise_answer(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def vqa_run(
    pipe, world: Path, *, split: str = "heldout", batch_size: int = 32, limit: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Exact-match accuracy (case- and space-insensitive) per question type and overall on a split's scenes."""
    items = []
    for sample in read_shards(shard_paths(world, split)):
        if sample["meta"]["kind"] != "scene":
            continue
        items.extend((sample["image"], qa) for qa in sample["meta"]["qa"])
    items = items[:limit] if limit else items
    correct: dict[str, list[bool]] = defaultdict(list)
    for start in tqdm(range(0, len(items), batch_size), desc="vqa", disable=not progress, unit="batch"):
        chunk = items[start : start + batch_size]
        answers = pipe.chat([im for im, _ in chunk], [qa["question"] for _, qa in chunk])
        for (_, qa), answer in zip(chunk, answers, strict=True):
            correct[qa["type"]].append(normalise_answer(answer) == normalise_answer(qa["answer"]))
    per_type = {t: sum(v) / len(v) for t, v in sorted(correct.items())}
    total = [x for v in correct.values() for x in v]
    return {"types": per_type, "overall": sum(total) / len(total) if total else 0.0, "questions": len(total)}


def reconstruction_run(pipe, world: Path, n: int = 100) -> dict[str, Any]:
    """How much of a held-out image survives each decoding stage, judged by the GenEval-rule scorer
    against the image's own prompt: ``vae`` (encode → decode) and ``decoder`` (its real CLIP map, or
    its layout for a layout-target model → pixel decoder → VAE). Generation cannot score above what its
    decoder reconstructs."""
    from blip3o.data.processing import to_images, to_pixels
    from blip3o.data.world_data import load_split

    data = load_split(world, "heldout")
    pixels = to_pixels(data.images[:n])
    records = [m["metadata"] for m in data.meta[:n]]
    condition = pipe.encoders.encoder(pipe.cfg.decoder_input)(pixels)  # the real CLIP map, or its layout
    decoded = {
        "vae": to_images(pipe.encoders.decode(pipe.encoders.latents(pixels))),
        "decoder": to_images(pipe.decode_features(condition, list(range(len(records))))),
    }
    scorer = GenEvalScorer()
    out: dict[str, Any] = {"images": len(records)}
    for name, images in decoded.items():
        out[name] = sum(scorer.score(im, r)["correct"] for im, r in zip(images, records, strict=True)) / len(records)
    return out


def edit_run(
    pipe,
    world: Path,
    out: Path,
    *,
    limit: int | None = None,
    seed: int = 42,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Edit the held-out scenes that have an edit triplet, one image each (seed ``seed`` + triplet index),
    and score edit accuracy and consistency (:class:`blip3o.eval.edit.EditScorer`).

    Writes ``out/images/{k:05d}_{source,edit,target}.png`` and ``out/edit_results.jsonl`` (one line per
    triplet, then the summary line).
    """
    from blip3o.data.processing import to_images, to_pixels
    from blip3o.data.world_data import load_split
    from blip3o.eval.edit import EditScorer, summarise_edits

    data = load_split(world, "heldout")
    rows = list(range(len(data.edited)))[:limit] if limit else list(range(len(data.edited)))
    if not rows:
        raise ValueError(f"{world} has no held-out edit triplets")
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    scorer, results = EditScorer(), []
    for start in tqdm(range(0, len(rows), batch_size), desc="edit", disable=not progress, unit="batch"):
        chunk = rows[start : start + batch_size]
        scenes = [data.edited[j] for j in chunk]
        sources = to_images(to_pixels(data.images[scenes]))
        metas = [data.meta[i] for i in scenes]
        edited = pipe.edit(sources, [m["edit"]["instruction"] for m in metas], seed=[seed + j for j in chunk])
        targets = to_images(to_pixels(data.edit_images[chunk]))
        for j, src, im, tgt, meta in zip(chunk, sources, edited, targets, metas, strict=True):
            for name, picture in (("source", src), ("edit", im), ("target", tgt)):
                picture.save(images_dir / f"{j:05d}_{name}.png")
            result = scorer.score(im, meta)
            results.append({"index": j, **{k: v for k, v in result.items() if k != "detections"}})
    summary = summarise_edits(results)
    with (out / "edit_results.jsonl").open("w", encoding="utf-8") as handle:
        for r in results:
            handle.write(json.dumps(r) + "\n")
        handle.write(json.dumps({"summary": summary}) + "\n")
    return summary
