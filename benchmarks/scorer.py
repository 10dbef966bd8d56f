"""Scorer throughput: GenEval-rule scoring (shapes detector) and OCR reward, images per second."""

from __future__ import annotations

import random

from blip3o.eval.geneval import GenEvalScorer
from blip3o.eval.ocr import OCRScorer
from blip3o.world.prompts import eval_prompts, split
from blip3o.world.samples import render_record
from blip3o.world.text import WORDS, render_text, text_prompt

from common import emit, rate


def main() -> None:
    _, held = split(0, 0.25)
    prompts = eval_prompts(held, 200, 0)
    scorer = GenEvalScorer()
    for size in (64, 256):
        rng = random.Random(0)
        images = [(render_record(p, size, rng)[0], p) for p in prompts]

        def score(images=images) -> int:
            for image, record in images:
                scorer.score(image, record)
            return len(images)

        emit(f"scorer.geneval.{size}px", rate(score), "images/s")
    ocr = OCRScorer()
    texts = [(render_text(w, 64), text_prompt(w)) for w in WORDS[:20]]

    def read() -> int:
        ocr.score_prompts([t[0] for t in texts], [t[1] for t in texts])
        return len(texts)

    emit("scorer.ocr.64px", rate(read), "images/s")


if __name__ == "__main__":
    main()
