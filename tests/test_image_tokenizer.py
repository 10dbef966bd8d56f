"""The SimVQ quantiser and the TA-Tok-style image tokenizer: nearest codes, gradients, scales, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from blip3o.models.image_tokenizer import (
    ImageTokenizer,
    ImageTokenizerConfig,
    SimVQ,
    codebook_usage,
    perplexity,
)


def _vq(seed: int = 0, codebook_size: int = 64, code_dim: int = 8) -> SimVQ:
    torch.manual_seed(seed)
    return SimVQ(codebook_size, code_dim)


def test_nearest_code_matches_brute_force_argmin():
    vq = _vq()
    x = torch.randn(3, 20, 8, generator=torch.Generator().manual_seed(1))
    codes = vq.codebook @ vq.proj.weight.T  # (K, d), C Wᵀ written out
    expected = torch.stack(
        [torch.stack([((v - codes) ** 2).sum(-1).argmin() for v in row]) for row in x]
    )  # one vector at a time
    out = vq(x)
    assert torch.equal(out.ids, expected)
    assert torch.equal(vq.nearest(x), expected)
    assert out.ids.dtype == torch.int64 and out.quantised.shape == x.shape


def test_straight_through_gradient_and_codebook_gradient():
    vq = _vq()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 10, 8, generator=gen, requires_grad=True)
    g = torch.randn(4, 10, 8, generator=gen)
    (vq(x).quantised * g).sum().backward()
    assert torch.equal(x.grad, g)
    assert vq.proj.weight.grad is None  # the straight-through path does not reach W

    x.grad = None
    out = vq(x)
    out.codebook_loss.backward()
    assert x.grad is None  # the codebook loss stops the gradient to the input
    assert vq.codebook.requires_grad is False and vq.codebook.grad is None
    assert all(p is not vq.codebook for p in vq.parameters())
    # loss = mean((e Wᵀ − x)²) with e = C[ids] ⇒ dL/dW = 2/(M d) · (q − x)ᵀ e
    e = vq.codebook[out.ids].reshape(-1, 8)
    q = e @ vq.proj.weight.detach().T
    expected = 2.0 / q.numel() * (q - x.detach().reshape(-1, 8)).T @ e
    assert_close(vq.proj.weight.grad, expected)
    assert vq.proj.weight.grad.abs().sum() > 0

    vq.proj.weight.grad = None
    x.grad = None
    vq(x).commit_loss.backward()
    assert vq.proj.weight.grad is None  # the commitment loss trains only the input side
    assert_close(x.grad, 2.0 / x.numel() * (x.detach() - q.reshape(x.shape)))


def test_quantised_value_is_the_selected_code_and_losses():
    vq = _vq()
    vq.beta = 0.5
    x = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(3))
    out = vq(x)
    codes = vq.indices_to_codes(out.ids)
    assert torch.equal(out.quantised, codes)
    mse = ((codes - x) ** 2).mean()
    assert_close(out.codebook_loss, mse)
    assert_close(out.commit_loss, mse)
    assert_close(out.loss, 1.5 * mse)


def test_usage_and_perplexity_closed_forms():
    k = 16
    same = torch.full((4, 9), 5)
    assert_close(codebook_usage(same, k), torch.tensor(1 / k))
    assert_close(perplexity(same, k), torch.tensor(1.0))
    uniform = torch.arange(k).repeat(3).reshape(6, 8)
    assert_close(codebook_usage(uniform, k), torch.tensor(1.0))
    assert_close(perplexity(uniform, k), torch.tensor(float(k)))
    half = torch.arange(0, k, 2).repeat(5)  # 8 codes used equally often
    assert_close(codebook_usage(half, k), torch.tensor(0.5))
    assert_close(perplexity(half, k), torch.tensor(k / 2))
    skewed = torch.tensor([0, 0, 0, 1])  # p = (3/4, 1/4)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert_close(perplexity(skewed, k), torch.tensor(math.exp(entropy)))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 16\)"):
        codebook_usage(torch.tensor([0, 16]), k)


def _tokenizer(pool_factors: tuple[int, ...], grid: int, feature_dim: int = 16, seed: int = 0) -> ImageTokenizer:
    torch.manual_seed(seed)
    cfg = ImageTokenizerConfig(codebook_size=32, code_dim=8, pool_factors=pool_factors)
    return ImageTokenizer(cfg, feature_dim=feature_dim, grid=grid)


def test_scale_pooling_equals_encoding_pooled_features():
    tok = _tokenizer((1, 2), grid=8)
    features = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(4))
    ids = tok.encode(features, scale_index=1)
    assert ids.shape == (2, 16) and tok.num_tokens(1) == 16 and tok.num_tokens(0) == 64

    grid = features.transpose(1, 2).reshape(2, 16, 8, 8)  # (B, D, g, g), row-major tokens
    pooled = F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)  # (B, 16, D)
    coarse = _tokenizer((1,), grid=4, seed=1)
    coarse.load_state_dict(tok.state_dict())  # shared in_proj, codebook, W and decoder
    assert torch.equal(ids, coarse.encode(pooled, scale_index=0))
    assert torch.equal(tok(features, scale_index=1).ids, ids)


def test_decode_upsamples_nearest_and_matches_forward():
    tok = _tokenizer((1, 2), grid=8)
    features = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = tok(features, scale_index=1)
        decoded = tok.decode(out.ids, scale_index=1)
        assert_close(out.reconstruction, decoded)
        # Independent decoder: code → out_proj → residual MLP per coarse token, then repeat over 2×2 blocks.
        h = tok.out_proj(tok.quantizer.indices_to_codes(out.ids))
        h = (h + tok.mlp(h)).reshape(2, 4, 4, 16)
        expected = h.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).reshape(2, 64, 16)
    assert_close(decoded, expected)
    assert_close(out.reconstruction_loss, ((decoded - features) ** 2).mean())
    assert_close(out.loss, out.reconstruction_loss + out.codebook_loss + 0.25 * out.commit_loss)


def test_training_on_clustered_features_reconstructs_and_spreads_codes():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    feature_dim, grid, clusters = 32, 4, 16
    centres = torch.randn(clusters, feature_dim, generator=gen)

    def batch() -> torch.Tensor:
        which = torch.randint(0, clusters, (16, grid * grid), generator=gen)
        return centres[which] + 0.05 * torch.randn(16, grid * grid, feature_dim, generator=gen)

    tok = ImageTokenizer(ImageTokenizerConfig(codebook_size=64, code_dim=8), feature_dim=feature_dim, grid=grid)
    opt = torch.optim.Adam(tok.parameters(), lr=1e-2)
    held_out = batch()
    with torch.no_grad():
        before = tok(held_out).reconstruction_loss
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small only lose time to thread hand-offs on a busy machine
    try:
        for _ in range(200):
            loss = tok(batch()).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        after = tok(held_out)
    assert after.reconstruction_loss < before / 50
    assert after.ids.unique().numel() >= 12
    assert perplexity(after.ids, 64) > 10


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"codebook_size": 0}, r"image_tokenizer\.codebook_size: must be an int >= 1, got 0"),
        ({"codebook_size": True}, r"image_tokenizer\.codebook_size"),
        ({"code_dim": -3}, r"image_tokenizer\.code_dim: must be an int >= 1"),
        ({"commit_weight": -0.1}, r"image_tokenizer\.commit_weight: must be a float >= 0"),
        ({"pool_factors": ()}, r"image_tokenizer\.pool_factors: must be a non-empty tuple"),
        ({"pool_factors": (1, 0)}, r"image_tokenizer\.pool_factors: every factor must be a positive int, got 0"),
        ({"pool_factors": (1.5,)}, r"image_tokenizer\.pool_factors: every factor must be a positive int"),
        ({"pool_factors": (2, 2)}, r"image_tokenizer\.pool_factors: factors must be distinct"),
        ({"decoder_mlp_ratio": 0}, r"image_tokenizer\.decoder_mlp_ratio"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageTokenizerConfig(**kwargs)


def test_grid_and_input_validation():
    assert ImageTokenizerConfig(pool_factors=[1, 3]).pool_factors == (1, 3)
    cfg = ImageTokenizerConfig(codebook_size=8, code_dim=4, pool_factors=(1, 2, 4))
    with pytest.raises(ValueError, match=r"pool_factors: every factor must divide the feature grid side 6.*\[4\]"):
        ImageTokenizer(cfg, feature_dim=8, grid=6)
    tok = _tokenizer((1, 2), grid=4)
    with pytest.raises(ValueError, match=r"scale_index must be in \[0, 2\)"):
        tok.encode(torch.zeros(1, 16, 16), scale_index=2)
    with pytest.raises(ValueError, match=r"features must be \(B, 16, 16\)"):
        tok.encode(torch.zeros(1, 15, 16))
    with pytest.raises(ValueError, match=r"ids must be \(B, 4\) at scale_index 1"):
        tok.decode(torch.zeros(1, 16, dtype=torch.long), scale_index=1)
