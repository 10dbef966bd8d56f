"""The scorer's acceptance figures: oracle renders of the 553 held-out prompts, clean, mismatched and degraded
(Gaussian blur radius 1 px + pixel noise σ = 0.05), at 32, 64 and 256 px. One JSON line per (size, check)."""

from __future__ import annotations

from blip3o.eval.selfcheck import self_check
from blip3o.world.prompts import eval_prompts, split

from common import emit


def main() -> None:
    _, held = split(0, 0.25)
    prompts = eval_prompts(held, 553, seed=0)
    for size in (32, 64, 256):
        for check, summary in self_check(prompts, size).items():
            tags = {k: round(v, 4) for k, v in summary["tags"].items()}
            emit(f"selfcheck.{check}.{size}px", summary["overall"], "geneval_overall", tags=tags)


if __name__ == "__main__":
    main()
