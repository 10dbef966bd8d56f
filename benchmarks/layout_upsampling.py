"""Can a small network put back the cells that 2×2 block codes drop, so that the pixel decoder draws from them?

The run's layout reader reads training images (16×16 cells); their 2×2-pooled codes
(:func:`blip3o.models.heads.pool_ids`) are the input of :class:`blip3o.models.heads.CodeUpsampler`
(``next.upsample_codes``), trained alone here to predict each cell's id (cross-entropy, AdamW 2e-3, cosine,
batch 64). Held-out scenes' codes are then upsampled by it, and the run's pixel decoder
renders them; the GenEval-rule scorer checks each image against its scene's prompt. Printed beside the
decoder's renders of the full reading and of the blocks drawn back over their cells (``nearest``).

Run: ``.venv/bin/python benchmarks/layout_upsampling.py RUN [--n-train 8000] [--steps 1500] [--n 200]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from blip3o.config import RunConfig, load_yaml
from blip3o.data.processing import to_images, to_pixels
from blip3o.data.tokenizer import load_tokenizer
from blip3o.data.world_data import load_split
from blip3o.eval.geneval import GenEvalScorer
from blip3o.infer.pipeline import decode_with, load_encoders
from blip3o.models.build import load_weights
from blip3o.models.heads import CodeUpsampler, PixelDecoder, ids_to_layout, layout_to_ids, pool_ids, pool_layout
from blip3o.train.tasks import encode_in_chunks

from common import emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--n-train", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--pool", type=int, default=2)
    args = parser.parse_args()

    cfg = load_yaml(args.run / "config.yaml", RunConfig).model
    enc = load_encoders(args.run, cfg, len(load_tokenizer(args.run / "tokenizer")))
    train, heldout = load_split(args.run / "world", "train"), load_split(args.run / "world", "heldout")
    ids = layout_to_ids(encode_in_chunks(train.images[: args.n_train], enc.layout))  # (N, 16, 16)
    codes = pool_ids(ids, args.pool)
    torch.manual_seed(0)
    net = CodeUpsampler(args.pool, args.width)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    start = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, len(ids), (64,))
        loss = F.cross_entropy(net(codes[idx].flatten(1)), ids[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0:
            print(step, round(loss.item(), 4), flush=True)
    train_s = time.perf_counter() - start

    n = min(args.n, len(heldout.meta))
    records = [m["metadata"] for m in heldout.meta[:n]]
    held = layout_to_ids(enc.layout(to_pixels(heldout.images[:n])))
    held_codes = pool_ids(held, args.pool)
    with torch.no_grad():
        up = net(held_codes.flatten(1)).argmax(1)
    objects = held > 0
    emit("upsampled_cell_accuracy", ((up == held) & objects).sum().item() / objects.sum().item(), "object cells")
    c, side, _ = cfg.latent_shape
    decoder = load_weights(
        PixelDecoder(cfg.decoder, c, side, cfg.decoder_channels), args.run / "decoder/model.safetensors"
    )
    decoder.eval()
    scorer = GenEvalScorer()
    reading = ids_to_layout(held)
    for name, layouts in (
        ("reading", reading),
        ("nearest", pool_layout(reading, args.pool)),
        ("upsampled", ids_to_layout(up)),
    ):
        images = to_images(decode_with(decoder, enc, cfg, layouts, range(n)))
        right = sum(scorer.score(im, r)["correct"] for im, r in zip(images, records, strict=True)) / n
        emit("layout_upsampling", right, "fraction correct", cells=name, images=n, train_s=round(train_s))


if __name__ == "__main__":
    main()
