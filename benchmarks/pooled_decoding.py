"""How well a run's pixel decoder draws held-out scenes from their layouts pooled into p×p blocks.

Each held-out image is read by the run's layout reader, pooled by each ``--pools`` side
(:func:`blip3o.models.heads.pool_layout`: what BLIP3o-NEXT's ``next.layout_pool`` codes carry, drawn back over
the reading's cells, as SANA's spatial input sees them), decoded by the run's pixel decoder and VAE, and
scored against the scene's own prompt by the GenEval-rule scorer. Pool 1 is the decoder's ceiling from the
reading as it is; pool 2 the ceiling of NEXT's renderer before it is trained on written codes. Compare a
decoder trained on the reading alone (``decoder.layout_pools=[1]``) with one trained on blocks too.

Run: ``.venv/bin/python benchmarks/pooled_decoding.py RUN [RUN ...] [--pools 1 2] [--n 200]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

from blip3o.config import RunConfig, load_yaml
from blip3o.data.processing import to_images, to_pixels
from blip3o.data.tokenizer import load_tokenizer
from blip3o.data.world_data import load_split
from blip3o.eval.geneval import GenEvalScorer
from blip3o.infer.pipeline import decode_with, load_encoders
from blip3o.models.build import load_weights
from blip3o.models.heads import PixelDecoder, pool_layout

from common import emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--pools", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--n", type=int, default=200, help="held-out scenes")
    parser.add_argument("--batch", type=int, default=50)
    args = parser.parse_args()

    scorer = GenEvalScorer()
    for run in args.runs:
        cfg = load_yaml(run / "config.yaml", RunConfig).model
        if cfg.decoder_input != "layout":
            parser.error(f"{run}: its decoder reads CLIP maps; this benchmark needs a layout-target run")
        enc = load_encoders(run, cfg, len(load_tokenizer(run / "tokenizer")))
        c, side, _ = cfg.latent_shape
        decoder = load_weights(
            PixelDecoder(cfg.decoder, c, side, cfg.decoder_channels), run / "decoder/model.safetensors"
        )
        decoder.eval()
        heldout = load_split(run / "world", "heldout")
        n = min(args.n, len(heldout.meta))
        records = [m["metadata"] for m in heldout.meta[:n]]
        for pool in args.pools:
            right = 0
            for start in range(0, n, args.batch):
                seeds = list(range(start, min(start + args.batch, n)))
                layouts = pool_layout(enc.layout(to_pixels(heldout.images[seeds])), pool)
                images = to_images(decode_with(decoder, enc, cfg, layouts, seeds))
                right += sum(scorer.score(im, records[s])["correct"] for im, s in zip(images, seeds, strict=True))
            emit(
                "pooled_decoding", right / n, "fraction correct", run=str(run), pool=pool, images=n,
                trained_pools=cfg.decoder.layout_pools,
            )  # fmt: skip


if __name__ == "__main__":
    main()
