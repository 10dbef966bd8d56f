"""World rendering throughput: scenes drawn per second, and whole samples (image, caption, QA, edit) per second."""

from __future__ import annotations

import random

from blip3o.world.prompts import split
from blip3o.world.samples import make_sample, render_record
from blip3o.world.text import split_words

from common import emit, rate


def main() -> None:
    train, _ = split(0, 0.25)
    words, _ = split_words(0, 0.25)
    records = [r for tag in train for r in train[tag]]
    for size in (64, 256):
        rng = random.Random(0)

        def scenes(size=size, rng=rng) -> int:
            for _ in range(50):
                render_record(rng.choice(records), size, rng)
            return 50

        counter = iter(range(10**9))

        def samples(size=size, counter=counter) -> int:
            for _ in range(50):
                make_sample(
                    "train",
                    next(counter),
                    seed=0,
                    pools=train,
                    words=words,
                    size=size,
                    text_size=64,
                    text_fraction=0.1,
                )
            return 50

        emit(f"world.render_scene.{size}px", rate(scenes), "images/s")
        emit(f"world.make_sample.{size}px", rate(samples), "samples/s")


if __name__ == "__main__":
    main()
