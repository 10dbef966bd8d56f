"""Self-checks of the GenEval scorer on ground-truth renders: clean, mismatched and degraded.

- *clean*: oracle renders scored against their own prompts (should be ≈ 1);
- *mismatch*: each image scored against another prompt of the set (should be near chance);
- *degraded*: Gaussian blur plus Gaussian pixel noise, the blur and noise generated images show.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageFilter
from tqdm import tqdm

from blip3o.eval.geneval import GenEvalScorer, oracle_generator, summarise

#: Mismatched pairs score image i against prompt (i * STRIDE + OFFSET) mod n: a fixed derangement-like shuffle.
STRIDE, OFFSET = 7, 13


def degrade(image: Image.Image, rng: np.random.Generator, blur: float = 1.0, noise: float = 0.05) -> Image.Image:
    """Gaussian blur of radius ``blur`` px, then Gaussian noise of std ``noise`` on [0, 1] pixel values."""
    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    array = array + rng.normal(0.0, noise, array.shape)
    return Image.fromarray((np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8))


def self_check(
    prompts: Sequence[dict[str, Any]],
    size: int,
    *,
    images_per_prompt: int = 1,
    seed: int = 42,
    scorer: GenEvalScorer | None = None,
    blur: float = 1.0,
    noise: float = 0.05,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Summaries (see :func:`~blip3o.eval.geneval.summarise`) for the clean, mismatch and degraded checks."""
    scorer = scorer or GenEvalScorer()
    generate = oracle_generator(size, seed)
    rng = np.random.default_rng(seed)
    rows: dict[str, list[dict[str, Any]]] = {"clean": [], "mismatch": [], "degraded": []}
    n = len(prompts)
    for i, record in enumerate(tqdm(prompts, desc=f"self-check {size}px", disable=not progress, unit="prompt")):
        other = prompts[(i * STRIDE + OFFSET) % n]
        for image in generate(record, images_per_prompt):
            cases = {
                "clean": (image, record),
                "mismatch": (image, other),
                "degraded": (degrade(image, rng, blur, noise), record),
            }
            for name, (img, rec) in cases.items():
                verdict = scorer.score(img, rec)
                rows[name].append({"tag": rec["tag"], "index": rec["index"], "correct": verdict["correct"]})
    return {name: summarise(r) for name, r in rows.items()}
