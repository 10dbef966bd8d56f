"""The autoregressive image-token sampler against HF ``generate``, full forwards and per-row references."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from blip3o.infer.ar_sampling import filter_logits, pick_tokens, sample_image_tokens
from blip3o.models.unified import positions_from_mask

VOCAB = 300
PAD = 0
LO, HI = 100, 260


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = Qwen3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        # Wider than the default 0.02 so logits spread (std ≈ 1.5) and greedy picks are not near-ties.
        initializer_range=0.2,
    )
    return Qwen3ForCausalLM(cfg).eval()


PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15], [16, 17]]


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (length - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def full_hidden(model, ids: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Last hidden states of one full forward over prompt + tokens, positions from the mask."""
    seq = torch.cat([ids, tokens], 1)
    m = torch.cat([mask, torch.ones_like(tokens)], 1)
    with torch.no_grad():
        return model.model(input_ids=seq, attention_mask=m, position_ids=positions_from_mask(m)).last_hidden_state


def test_greedy_matches_generate_and_full_forward(model):
    ids, mask = left_pad(PROMPTS)
    n = 10
    out = sample_image_tokens(model, ids, mask, n, temperature=0, prompt_hidden=2)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, pad_token_id=PAD)
    torch.testing.assert_close(out.tokens, ref[:, ids.shape[1] :], rtol=0, atol=0)
    hidden = full_hidden(model, ids, mask, out.tokens)[:, -(n + 2) :]
    torch.testing.assert_close(out.hidden, hidden, rtol=1e-5, atol=1e-5)


def test_top_k_one_is_greedy(model):
    ids, mask = left_pad(PROMPTS)
    greedy = sample_image_tokens(model, ids, mask, 6, (LO, HI), temperature=0)
    top1 = sample_image_tokens(model, ids, mask, 6, (LO, HI), temperature=1.0, top_k=1, seeds=[1, 2, 3])
    torch.testing.assert_close(top1.tokens, greedy.tokens, rtol=0, atol=0)


def test_batch_equals_rows_alone(model):
    ids, mask = left_pad(PROMPTS)
    seeds = [11, 22, 33]
    kw = {"temperature": 1.0, "top_k": 60, "top_p": 0.9, "prompt_hidden": 1}
    batch = sample_image_tokens(model, ids, mask, 12, (LO, HI), seeds=seeds, **kw)
    for i, (p, s) in enumerate(zip(PROMPTS, seeds, strict=True)):
        one = torch.tensor([p])
        alone = sample_image_tokens(model, one, torch.ones_like(one), 12, (LO, HI), seeds=[s], **kw)
        torch.testing.assert_close(batch.tokens[i], alone.tokens[0], rtol=0, atol=0)
        torch.testing.assert_close(batch.hidden[i], alone.hidden[0], rtol=1e-5, atol=1e-5)
    # Sampling is on: different seeds for the same prompt give different tokens.
    one = torch.tensor([PROMPTS[0]])
    other = sample_image_tokens(model, one, torch.ones_like(one), 12, (LO, HI), seeds=[12], **kw)
    assert not torch.equal(other.tokens[0], batch.tokens[0])


def test_tokens_stay_in_range():
    torch.manual_seed(1)
    cfg = Qwen3Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=VOCAB,
        initializer_range=0.2,
    )
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # out-of-range ids dominate the unrestricted distribution
        model.lm_head.weight[:LO] *= 50
        model.lm_head.weight[HI:] *= 50
    ids, mask = left_pad(PROMPTS)
    free = sample_image_tokens(model, ids, mask, 20, temperature=1.0, top_k=None, top_p=1.0, seeds=[0, 1, 2])
    assert ((free.tokens < LO) | (free.tokens >= HI)).any()
    for kw in ({"temperature": 0.0}, {"temperature": 1.0, "top_k": None, "top_p": 1.0}, {"temperature": 2.0}):
        out = sample_image_tokens(model, ids, mask, 20, (LO, HI), seeds=[0, 1, 2], **kw)
        assert ((out.tokens >= LO) & (out.tokens < HI)).all(), kw
    assert out.tokens.unique().numel() > 10


def reference_filter(row: torch.Tensor, top_k: int | None, top_p: float) -> torch.Tensor:
    """One row, spelled out: top-k by sorting, then top-p by accumulating probabilities; ties kept."""
    values = sorted(row.tolist(), reverse=True)
    kept = values if top_k is None else [v for v in values if v >= values[min(top_k, len(values)) - 1]]
    if top_p < 1.0:
        z = sum(torch.tensor(kept, dtype=torch.float64).exp().tolist())
        mass, last = 0.0, kept[0]
        for v in kept:
            last = v
            mass += torch.tensor(v, dtype=torch.float64).exp().item() / z
            if mass >= top_p:
                break
        kept = [v for v in kept if v >= last]
    cutoff = kept[-1]
    return row.masked_fill(row < cutoff, float("-inf"))


@pytest.mark.parametrize(
    ("top_k", "top_p"), [(None, 1.0), (5, 1.0), (1, 1.0), (None, 0.5), (20, 0.8), (3, 0.999), (500, 0.9), (7, 1e-6)]
)
def test_filter_logits_matches_reference(top_k, top_p):
    g = torch.Generator().manual_seed(0)
    smooth = torch.randn(6, 50, generator=g) * 2
    tied = torch.randint(0, 4, (6, 50), generator=g).float()  # many ties at every boundary
    for logits in (smooth, tied):
        got = filter_logits(logits, top_k, top_p)
        ref = torch.stack([reference_filter(r, top_k, top_p) for r in logits])
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        assert (got.isfinite().sum(-1) >= 1).all()


@pytest.mark.parametrize(("top_k", "top_p"), [(5, 1.0), (None, 0.7), (30, 0.9)])
def test_filter_logits_matches_transformers_warpers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(8, 200, generator=torch.Generator().manual_seed(1)) * 3
    ref = logits
    if top_k is not None:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(None, ref)
    torch.testing.assert_close(filter_logits(logits, top_k, top_p), ref, rtol=0, atol=0)


def test_top_p_stops_once_the_mass_is_reached():
    # top_p equal to the mass of the three most likely tokens, computed as filter_logits sums it.
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(2))
    top_p = logits.sort(-1, descending=True).values.softmax(-1).cumsum(-1)[0, 2].item()
    assert filter_logits(logits, top_p=top_p).isfinite().sum() == 3


def test_filter_keeps_every_tie_at_the_boundary():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0, 2.0]])
    assert filter_logits(logits, top_k=2).isfinite().tolist() == [[True, False, True, True, False, True]]
    # One token carries ~0.5 of the mass: top_p = 0.3 keeps only it, even though it is not a tie.
    assert filter_logits(logits, top_p=0.3).isfinite().sum() == 1


def test_pick_tokens_is_inverse_cdf():
    logits = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5]).log_softmax(-1).expand(4000, -1)
    u = torch.rand(4000, generator=torch.Generator().manual_seed(3))
    picks = pick_tokens(logits, u, top_k=3, top_p=1.0)
    probs = filter_logits(logits[:1], 3).softmax(-1)[0]
    freq = torch.bincount(picks, minlength=5).float() / len(picks)
    torch.testing.assert_close(freq, probs, rtol=0, atol=0.03)
    # Exact inverse CDF in vocabulary order: u = 0 gives the first kept id, u → 1 the last.
    edge = pick_tokens(logits[:2], torch.tensor([0.0, 1 - 1e-7]), top_k=3)
    assert edge.tolist() == [1, 4]


def test_guidance_scale_one_equals_no_guidance(model):
    ids, mask = left_pad(PROMPTS)
    u_ids, u_mask = left_pad([[3] * 9, [4], [3, 4]])  # longer than the prompts: the batch is re-padded
    kw = {"temperature": 1.0, "top_k": 60, "top_p": 0.9, "seeds": [5, 6, 7], "prompt_hidden": 1}
    plain = sample_image_tokens(model, ids, mask, 10, (LO, HI), **kw)
    guided = sample_image_tokens(
        model, ids, mask, 10, (LO, HI), uncond_input_ids=u_ids, uncond_attention_mask=u_mask, guidance_scale=1.0, **kw
    )
    torch.testing.assert_close(guided.tokens, plain.tokens, rtol=0, atol=0)
    torch.testing.assert_close(guided.hidden, plain.hidden, rtol=1e-5, atol=1e-5)


def test_guidance_matches_two_forwards(model):
    prompts, uncond = PROMPTS, [[3] * 9, [4], [3, 4]]
    ids, mask = left_pad(prompts)
    u_ids, u_mask = left_pad(uncond)
    n, scale = 4, 3.0
    out = sample_image_tokens(
        model, ids, mask, n, (LO, HI), temperature=0, uncond_input_ids=u_ids, uncond_attention_mask=u_mask,
        guidance_scale=scale,
    )  # fmt: skip
    for i, (p, q) in enumerate(zip(prompts, uncond, strict=True)):
        c_seq, u_seq = list(p), list(q)
        for t in range(n):
            with torch.no_grad():
                c = model(torch.tensor([c_seq])).logits[0, -1, LO:HI]
                u = model(torch.tensor([u_seq])).logits[0, -1, LO:HI]
            token = int((u + scale * (c - u)).argmax()) + LO
            assert out.tokens[i, t].item() == token, (i, t)
            c_seq.append(token)
            u_seq.append(token)
    plain = sample_image_tokens(model, ids, mask, n, (LO, HI), temperature=0)
    assert not torch.equal(plain.tokens, out.tokens)


def test_copy_bias_matches_biased_greedy_forwards(model):
    """Greedy with a copy prior picks argmax(logits + bias·[id == copy id]) at every step (full forwards, one
    row at a time); a bias of 0 changes nothing, and a huge one writes the copy ids whatever the sampling."""
    ids, mask = left_pad(PROMPTS)
    n, bias = 5, 2.0
    copy = torch.randint(LO, HI, (len(PROMPTS), n), generator=torch.Generator().manual_seed(3))
    out = sample_image_tokens(model, ids, mask, n, (LO, HI), temperature=0, copy_ids=copy, copy_bias=bias)
    for i, p in enumerate(PROMPTS):
        seq = list(p)
        for t in range(n):
            with torch.no_grad():
                logits = model(torch.tensor([seq])).logits[0, -1, LO:HI].clone()
            logits[copy[i, t] - LO] += bias
            seq.append(int(logits.argmax()) + LO)
            assert out.tokens[i, t].item() == seq[-1], (i, t)
    plain = sample_image_tokens(model, ids, mask, n, (LO, HI), temperature=0)
    assert not torch.equal(plain.tokens, out.tokens)  # the bias of 2 flips some picks
    zero = sample_image_tokens(model, ids, mask, n, (LO, HI), temperature=0, copy_ids=copy, copy_bias=0.0)
    torch.testing.assert_close(zero.tokens, plain.tokens, rtol=0, atol=0)
    kw = {"temperature": 1.0, "top_k": 60, "top_p": 0.9, "seeds": [5, 6, 7]}
    forced = sample_image_tokens(model, ids, mask, n, (LO, HI), copy_ids=copy, copy_bias=1e4, **kw)
    torch.testing.assert_close(forced.tokens, copy, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_tokens": 0}, "num_tokens must be >= 1"),
        ({"id_range": (5, 5)}, r"id_range must satisfy 0 <= lo < hi <= vocab size 300"),
        ({"id_range": (10, 3)}, "id_range must satisfy"),
        ({"id_range": (0, 301)}, "id_range must satisfy"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": 0}, "top_k must be >= 1 or None"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"seeds": [1, 2]}, "seeds must have one entry per row: got 2 for a batch of 3"),
        ({"prompt_hidden": 8}, r"prompt_hidden must be in \[0, prompt length 7\]"),
        ({"uncond_input_ids": torch.ones(2, 4, dtype=torch.long)}, "uncond_input_ids and uncond_attention_mask"),
        ({"copy_bias": -1.0}, "copy_bias must be >= 0"),
        ({"copy_ids": torch.full((3, 3), LO)}, r"copy_ids must be \(B, num_tokens\) = \(3, 2\)"),
        ({"copy_ids": torch.full((3, 2), HI)}, r"copy_ids must lie in id_range \[100, 260\)"),
    ],
)
def test_bad_arguments_raise(model, kwargs, message):
    ids, mask = left_pad(PROMPTS)
    args = {"num_tokens": 2, "id_range": (LO, HI)} | kwargs
    with pytest.raises(ValueError, match=message):
        sample_image_tokens(model, ids, mask, **args)
