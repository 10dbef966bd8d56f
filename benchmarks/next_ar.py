"""BLIP3o-NEXT's autoregressive stage: image tokens/s of our KV-cached sampler vs HF ``generate`` + re-forward.

Both paths turn a left-padded batch of prompts (20–40 tokens) into N image-token ids AND the last-layer
hidden states of those N positions, which is what the DiT condition needs:

- ours: :func:`blip3o.infer.ar_sampling.sample_image_tokens` (top-k 1200 capped at the image-id range,
  top-p 0.95, temperature 1, one seed per row), which keeps the hidden states while decoding;
- generate: the official route (reference spec §5.6), ``model.generate(do_sample=True, top_k=1200,
  top_p=0.95, max_new_tokens=N)`` over the whole vocabulary, then one more forward over prompt +
  generated tokens to collect the hidden states, with the attention mask (prompt mask + ones), i.e.
  the fixed version of issue #83.

The backbone is a randomly initialised ``transformers.Qwen3ForCausalLM`` (weights do not change the
speed; EOS is disabled so every row runs all N steps), the image tokens are the last ``--image-tokens``
ids of the vocabulary. Each path is warmed up once and timed as the median of ``--runs`` (3) runs, at batch 1
and 16; figures are AR tokens/s (batch × N / seconds) and the ratio ours / generate. CPU runs use one
intra-op thread by default: decoding a small model is a chain of tiny matmuls, and with the cores
shared, OpenMP threads waiting on each other made a 2-thread run ~30× slower than a 1-thread one.

Run: ``.venv/bin/python benchmarks/next_ar.py`` (CPU, float32, a 256-wide 4-layer model); on a GPU e.g.
``.venv/bin/python benchmarks/next_ar.py --device cuda --dtype bfloat16 --hidden 2048 --layers 28
--heads 16 --kv-heads 8 --vocab 151936 --image-tokens 65536 --tokens 729``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor
from transformers import Qwen3Config, Qwen3ForCausalLM

from blip3o.infer.ar_sampling import sample_image_tokens

from common import emit

TOP_K = 1200
TOP_P = 0.95
PAD_ID = 0
BATCHES = (1, 16)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--image-tokens", type=int, default=1024, help="image ids are the last this many of the vocab")
    p.add_argument("--tokens", type=int, default=64, help="N image tokens generated per prompt")
    p.add_argument("--runs", type=int, default=3, help="timed runs per figure (median), after one warm-up")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads; 0 keeps torch's default")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    if not 0 < args.image_tokens < args.vocab:
        p.error(f"--image-tokens must be in (0, vocab {args.vocab}), got {args.image_tokens}")
    return args


def build_model(args: argparse.Namespace) -> Qwen3ForCausalLM:
    config = Qwen3Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=4096,
        pad_token_id=PAD_ID,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    # A random model would stop wherever it samples EOS; the image stage always runs all N steps.
    model.generation_config.eos_token_id = None
    return model


def make_prompts(batch: int, text_vocab: int, device: str) -> tuple[Tensor, Tensor]:
    """``batch`` prompts of 20–40 text ids (never the pad id), left-padded: ids and mask (B, L)."""
    g = torch.Generator().manual_seed(batch)
    lengths = torch.randint(20, 41, (batch,), generator=g).tolist()
    width = max(lengths)
    ids = torch.full((batch, width), PAD_ID, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(1, text_vocab, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids.to(device), mask.to(device)


def median_seconds(fn: Callable[[], None], runs: int, device: str) -> float:
    """Median wall time of ``runs`` calls of ``fn`` after one warm-up call."""

    def timed() -> float:
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed()  # warm-up
    return statistics.median(timed() for _ in range(runs))


@torch.no_grad()
def generate_then_reforward(model: Qwen3ForCausalLM, ids: Tensor, mask: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The official route: HF sampling over the whole vocabulary, then one forward for the hidden states.

    Returns tokens (B, N) and hidden states (B, N, H) at the generated positions.
    """
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        top_k=TOP_K,
        top_p=TOP_P,
        temperature=1.0,
        max_new_tokens=n,
        pad_token_id=PAD_ID,
    )  # (B, L + N)
    tokens = out[:, ids.shape[1] :]
    assert tokens.shape[1] == n, f"generate stopped after {tokens.shape[1]} of {n} tokens"
    full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], n)], dim=1)  # (B, L + N)
    # The mask alone is the fix of issue #83: RoPE scores depend only on relative positions, so the
    # per-row offset left by padding in the default positions changes nothing.
    hidden = model.get_decoder()(input_ids=out, attention_mask=full_mask).last_hidden_state  # (B, L + N, H)
    return tokens, hidden[:, -n:]


def main() -> None:
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model = build_model(args)
    lo, hi = args.vocab - args.image_tokens, args.vocab
    n = args.tokens
    info = {
        "device": args.device,
        "dtype": args.dtype,
        "hidden": args.hidden,
        "layers": args.layers,
        "vocab": args.vocab,
        "image_tokens": args.image_tokens,
        "tokens": n,
        "threads": torch.get_num_threads(),
    }
    for batch in BATCHES:
        ids, mask = make_prompts(batch, lo, args.device)
        seeds = list(range(batch))

        def ours(ids: Tensor = ids, mask: Tensor = mask, seeds: list[int] = seeds) -> None:
            out = sample_image_tokens(
                model, ids, mask, n, (lo, hi), temperature=1.0, top_k=min(TOP_K, hi - lo), top_p=TOP_P, seeds=seeds
            )
            assert out.hidden.shape[:2] == (ids.shape[0], n)

        def official(ids: Tensor = ids, mask: Tensor = mask) -> None:
            torch.manual_seed(0)
            generate_then_reforward(model, ids, mask, n)

        ours_rate = batch * n / median_seconds(ours, args.runs, args.device)
        generate_rate = batch * n / median_seconds(official, args.runs, args.device)
        emit(f"next_ar.ours.batch{batch}", ours_rate, "tokens/s", **info)
        emit(f"next_ar.generate_reforward.batch{batch}", generate_rate, "tokens/s", **info)
        emit(f"next_ar.ours_over_generate.batch{batch}", ours_rate / generate_rate, "x", **info)


if __name__ == "__main__":
    main()
