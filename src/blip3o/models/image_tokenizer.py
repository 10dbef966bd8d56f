"""A discrete image tokenizer over frozen vision features, after TA-Tok: SimVQ quantiser, scale pooling, decoder.

BLIP3o-NEXT writes an image as a sequence of discrete tokens produced by TA-Tok (Tar, Han et al. 2025,
"Vision as a Dialect", arXiv:2506.18898): SigLIP2 patch features, optionally average-pooled to a coarser
grid, are projected to a small code width and snapped to the nearest entry of a SimVQ codebook; a
feature decoder maps the codes back to the vision features, which is what the tokenizer is trained on.

:class:`SimVQ` is the quantiser of Zhu et al. 2024, "Addressing Representation Collapse in Vector
Quantized Models with One Linear Layer" (arXiv:2411.02038). The codebook ``C`` (K, d) is drawn once
from N(0, 1/d) and frozen; only a linear map ``W`` (d, d) learns, and the effective codebook is
``C Wᵀ``. Because every code moves whenever ``W`` does, codes that are never selected still follow the
data, which is how SimVQ avoids the collapse of plain VQ, where unused codes receive no gradient. The
nearest code is the argmin of the squared L2 distance, computed for all codes at once in fp32 through
the expansion ‖x‖² − 2 x·c + ‖c‖². Gradients reach the input through the straight-through estimator,
written as ``(x − sg(x)) + sg(q)`` so that the forward value is exactly the selected code. The
codebook loss ‖q − sg(x)‖² trains ``W``; the commitment loss ‖x − sg(q)‖² pulls the encoder output
towards its code; both are returned separately together with their sum ``codebook + β·commit``.

:class:`ImageTokenizer` takes features (B, N, D) of a g×g patch grid from a frozen encoder that runs
outside it (the encoder is injected by the caller, never built here). A scale is a pool factor ``p``:
the grid is average-pooled by ``p`` before quantising, so that scale has (g/p)² tokens, as TA-Tok's
scale-adaptive pooling (27×27 → 13×13 or 9×9) does. Pooling happens on the features, before the
linear ``in_proj``; every scale shares one projection, one codebook and one decoder. The decoder maps
codes to width D, repeats each coarse token over its p×p block (nearest upsampling) and refines every
token with a residual two-layer GELU MLP, giving (B, N, D) again.

Differences from TA-Tok, all deliberate: the vision tower is not part of the module; the argmin is
always deterministic (TA-Tok can sample codes from a softmax over cosine similarity during training,
and BLIP3o-NEXT switches that off); codes are not L2-normalised; the codebook is random rather than
initialised from LLM token embeddings; and the decoder is a token-wise MLP instead of a three-layer
ViT. The quantiser losses live in ``forward`` because they are the quantiser's own regularisers and
need the pre-straight-through tensors; all losses are reduced in fp32.

:class:`LayoutTokenizer` is the other kind of image code (``next.image_codes=layout``): one token per cell of
the mini-CLIP's grounded reading, a fixed quantiser whose codebook is the one-hot layouts (nothing to train).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from blip3o.config.checks import ConfigError, check_float, check_int
from blip3o.config.next import ImageTokenizerConfig
from blip3o.models.heads import LAYOUT_VOCAB, ids_to_layout, layout_to_ids, pool_ids
from blip3o.world.spec import COLOR_NAMES, SHAPES, plural

__all__ = [
    "ImageTokenizer",
    "ImageTokenizerConfig",
    "LayoutTokenizer",
    "QuantizerOutput",
    "SimVQ",
    "TokenizerOutput",
    "codebook_usage",
    "perplexity",
]


@dataclass
class QuantizerOutput:
    """What :class:`SimVQ` returns; the losses are fp32 scalars."""

    quantised: torch.Tensor
    """(..., d) the selected codes in the forward pass, the identity in the backward pass."""
    ids: torch.Tensor
    """(...) int64 code indices."""
    codebook_loss: torch.Tensor
    """mean ‖q − sg(x)‖²: trains the projection W."""
    commit_loss: torch.Tensor
    """mean ‖x − sg(q)‖²: trains whatever produced x."""
    loss: torch.Tensor
    """codebook_loss + β · commit_loss."""


class SimVQ(nn.Module):
    """Vector quantiser with a frozen random codebook C (K, d) and a learnt projection: codes are C Wᵀ."""

    def __init__(self, codebook_size: int, code_dim: int, *, beta: float = 0.25) -> None:
        super().__init__()
        check_int("codebook_size", codebook_size, ge=1)
        check_int("code_dim", code_dim, ge=1)
        check_float("beta", beta, ge=0.0)
        self.codebook_size = codebook_size
        self.beta = beta
        # A buffer, not a parameter: saved with the model, invisible to optimisers, requires_grad False.
        self.register_buffer("codebook", torch.randn(codebook_size, code_dim) * code_dim**-0.5)
        self.proj = nn.Linear(code_dim, code_dim, bias=False)

    def codes(self) -> torch.Tensor:
        """The effective codebook C Wᵀ, (K, d); differentiable with respect to W."""
        return self.proj(self.codebook)

    @torch.no_grad()
    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) → ids (...) of the code nearest in squared L2 distance (ties go to the lower id)."""
        flat = x.detach().reshape(-1, x.shape[-1]).float()  # (M, d)
        codes = self.codes().float()  # (K, d)
        # ‖x − c‖² = ‖x‖² − 2 x·c + ‖c‖², all M × K distances in one matmul.
        dist = flat.pow(2).sum(1, keepdim=True) - 2.0 * flat @ codes.T + codes.pow(2).sum(1)  # (M, K)
        return dist.argmin(dim=1).reshape(x.shape[:-1])

    def indices_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) int → codes (..., d)."""
        return F.embedding(ids, self.codes())

    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        """x (..., d) → :class:`QuantizerOutput` with ``quantised`` of the same shape and dtype as x."""
        ids = self.nearest(x)
        q = self.indices_to_codes(ids)  # (..., d), carries the gradient to W
        codebook_loss = F.mse_loss(q.float(), x.detach().float())
        commit_loss = F.mse_loss(x.float(), q.detach().float())
        # Straight-through: x − sg(x) is exactly zero, so the value is exactly q and d(out)/dx is the identity.
        quantised = (x - x.detach()) + q.detach().to(x.dtype)
        return QuantizerOutput(
            quantised=quantised,
            ids=ids,
            codebook_loss=codebook_loss,
            commit_loss=commit_loss,
            loss=codebook_loss + self.beta * commit_loss,
        )


def _code_histogram(ids: torch.Tensor, codebook_size: int) -> torch.Tensor:
    flat = ids.reshape(-1)
    if flat.numel() and (flat.min() < 0 or flat.max() >= codebook_size):
        raise ValueError(f"ids must lie in [0, {codebook_size}), got values in [{flat.min()}, {flat.max()}]")
    return torch.bincount(flat, minlength=codebook_size)


def codebook_usage(ids: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Fraction of the K codes that occur at least once in ``ids`` (any shape); a 0-d fp32 tensor."""
    return (_code_histogram(ids, codebook_size) > 0).float().mean()


def perplexity(ids: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """exp of the entropy of the code histogram of ``ids``: 1 for a single code, K for uniform use; 0-d fp32."""
    counts = _code_histogram(ids, codebook_size).float()
    p = counts / counts.sum().clamp_min(1.0)
    return torch.exp(-torch.special.xlogy(p, p).sum())


@dataclass
class TokenizerOutput:
    """What :meth:`ImageTokenizer.forward` returns; the losses are fp32 scalars."""

    reconstruction: torch.Tensor
    """(B, N, D) decoded features."""
    ids: torch.Tensor
    """(B, n) code ids at the chosen scale, n = (g/p)²."""
    reconstruction_loss: torch.Tensor
    """MSE between the reconstruction and the input features."""
    codebook_loss: torch.Tensor
    commit_loss: torch.Tensor
    loss: torch.Tensor
    """reconstruction_loss + codebook_loss + commit_weight · commit_loss."""


class ImageTokenizer(nn.Module):
    """Features (B, N, D) of a g×g grid ↔ code ids (B, (g/p)²) at each configured pool factor p."""

    def __init__(self, cfg: ImageTokenizerConfig, feature_dim: int, grid: int) -> None:
        super().__init__()
        check_int("feature_dim", feature_dim, ge=1)
        check_int("grid", grid, ge=1)
        bad = [p for p in cfg.pool_factors if grid % p]
        if bad:
            raise ConfigError(
                f"every factor must divide the feature grid side {grid}, but {bad} do not",
                key="image_tokenizer.pool_factors",
            )
        self.cfg = cfg
        self.feature_dim = feature_dim
        self.grid = grid
        self.in_proj = nn.Linear(feature_dim, cfg.code_dim)
        self.quantizer = SimVQ(cfg.codebook_size, cfg.code_dim, beta=cfg.commit_weight)
        self.out_proj = nn.Linear(cfg.code_dim, feature_dim)
        hidden = cfg.decoder_mlp_ratio * feature_dim
        self.mlp = nn.Sequential(nn.Linear(feature_dim, hidden), nn.GELU(), nn.Linear(hidden, feature_dim))

    def pool_factor(self, scale_index: int) -> int:
        """The pool factor of a scale; raises ValueError for an unknown scale index."""
        if not 0 <= scale_index < len(self.cfg.pool_factors):
            raise ValueError(
                f"scale_index must be in [0, {len(self.cfg.pool_factors)}) for pool factors "
                f"{self.cfg.pool_factors}, got {scale_index}"
            )
        return self.cfg.pool_factors[scale_index]

    def num_tokens(self, scale_index: int = 0) -> int:
        """Tokens per image at a scale: (g/p)²."""
        return (self.grid // self.pool_factor(scale_index)) ** 2

    def _project(self, features: torch.Tensor, scale_index: int) -> torch.Tensor:
        """features (B, N, D) → pooled, projected vectors (B, n, d)."""
        if features.ndim != 3 or features.shape[1:] != (self.grid**2, self.feature_dim):
            raise ValueError(
                f"features must be (B, {self.grid**2}, {self.feature_dim}) for a {self.grid}×{self.grid} grid, "
                f"got {tuple(features.shape)}"
            )
        p = self.pool_factor(scale_index)
        if p > 1:
            grid = rearrange(features, "b (h w) c -> b c h w", h=self.grid)  # (B, D, g, g)
            features = rearrange(F.avg_pool2d(grid, p), "b c h w -> b (h w) c")  # (B, (g/p)², D)
        return self.in_proj(features)

    def _decode_codes(self, codes: torch.Tensor, scale_index: int) -> torch.Tensor:
        """codes (B, n, d) → features (B, N, D)."""
        p = self.pool_factor(scale_index)
        h = self.out_proj(codes)  # (B, n, D)
        if p > 1:
            side = self.grid // p
            grid = rearrange(h, "b (h w) c -> b c h w", h=side)  # (B, D, g/p, g/p)
            h = rearrange(F.interpolate(grid, scale_factor=p, mode="nearest"), "b c h w -> b (h w) c")  # (B, N, D)
        return h + self.mlp(h)

    def codebook_vectors(self) -> torch.Tensor:
        """The K code vectors (K, d) that image-token embeddings start from."""
        return self.quantizer.codes()

    def encode(self, features: torch.Tensor, scale_index: int = 0) -> torch.Tensor:
        """features (B, N, D) → ids (B, (g/p)²) int64."""
        return self.quantizer.nearest(self._project(features, scale_index))

    def decode(self, ids: torch.Tensor, scale_index: int = 0) -> torch.Tensor:
        """ids (B, (g/p)²) → features (B, N, D)."""
        n = self.num_tokens(scale_index)
        if ids.ndim != 2 or ids.shape[1] != n:
            raise ValueError(f"ids must be (B, {n}) at scale_index {scale_index}, got {tuple(ids.shape)}")
        return self._decode_codes(self.quantizer.indices_to_codes(ids), scale_index)

    def forward(self, features: torch.Tensor, scale_index: int = 0) -> TokenizerOutput:
        """Quantise and reconstruct features (B, N, D); the returned losses train in_proj, W and the decoder."""
        vq = self.quantizer(self._project(features, scale_index))
        reconstruction = self._decode_codes(vq.quantised, scale_index)
        reconstruction_loss = F.mse_loss(reconstruction.float(), features.float())
        return TokenizerOutput(
            reconstruction=reconstruction,
            ids=vq.ids,
            reconstruction_loss=reconstruction_loss,
            codebook_loss=vq.codebook_loss,
            commit_loss=vq.commit_loss,
            loss=reconstruction_loss + vq.loss,
        )


class LayoutTokenizer(nn.Module):
    """Grounded layouts (B, classes + colours, s, s) ↔ cell ids (B, (s/p)²), row-major, one scale, no parameters.

    A layout is the mini-CLIP's reading of an image (:meth:`blip3o.models.build.Encoders.layout`): each cell
    one class in one colour, one-hot at ±1. Its id is :func:`blip3o.models.heads.layout_to_ids`' (0 for
    background, then one per class-colour pair), so the codebook is the :data:`LAYOUT_VOCAB` one-hot layouts
    and decoding is exact on snapped layouts. With ``pool`` p > 1 a code stands for a p×p block of the
    reading (:func:`blip3o.models.heads.pool_ids`: the object it holds most when half of it is objects), the
    analogue of TA-Tok's scale pooling: p² times fewer tokens an image, and :meth:`decode` gives the
    coarse layout, ``side`` cells a side.
    """

    def __init__(self, reading_side: int, pool: int = 1) -> None:
        super().__init__()
        check_int("reading_side", reading_side, ge=1)
        check_int("pool", pool, ge=1)
        if reading_side % pool:
            raise ValueError(f"pool {pool} must divide the reading's side {reading_side}")
        self.reading_side, self.pool = reading_side, pool
        self.side = reading_side // pool
        """Codes a side of the code grid."""

    def num_tokens(self, scale_index: int = 0) -> int:
        """Tokens per image: one per cell of the code grid."""
        if scale_index != 0:
            raise ValueError(f"layout codes have one scale (index 0), got scale_index {scale_index}")
        return self.side**2

    def codebook_vectors(self) -> torch.Tensor:
        """The one-hot layout cell of each id, (K, classes + colours)."""
        return ids_to_layout(torch.arange(LAYOUT_VOCAB).view(1, 1, -1))[0, :, 0].T

    @staticmethod
    def vector_names() -> list[str]:
        """The words each entry of a codebook vector stands for: the classes, then the colours, each led by
        ``"background"`` (no object, no colour). A class is named in the singular and the plural
        (``"cross crosses"``), since prompts use both and a plural is often a token of its own."""
        return ["background", *(f"{s} {plural(s)}" for s in SHAPES), "background", *COLOR_NAMES]

    def encode(self, layout: torch.Tensor, scale_index: int = 0) -> torch.Tensor:
        """layout (B, classes + colours, s, s) → ids (B, (s/p)²) int64."""
        self.num_tokens(scale_index)  # checks the scale
        s = self.reading_side
        if layout.ndim != 4 or layout.shape[-2:] != (s, s):
            raise ValueError(f"layout must be (B, classes + colours, {s}, {s}), got {tuple(layout.shape)}")
        return self.encode_cells(layout_to_ids(layout))

    def encode_cells(self, cells: torch.Tensor) -> torch.Tensor:
        """The reading's cell ids (B, s, s) → ids (B, (s/p)²) int64: :meth:`encode` of the layout they name."""
        s = self.reading_side
        if cells.ndim != 3 or cells.shape[-2:] != (s, s):
            raise ValueError(f"cells must be (B, {s}, {s}), got {tuple(cells.shape)}")
        return pool_ids(cells.long(), self.pool).reshape(cells.shape[0], self.num_tokens(0))

    def decode(self, ids: torch.Tensor, scale_index: int = 0) -> torch.Tensor:
        """ids (B, (s/p)²) → the one-hot layout of the code grid at ±1 (B, classes + colours, s/p, s/p)."""
        n = self.num_tokens(scale_index)
        if ids.ndim != 2 or ids.shape[1] != n:
            raise ValueError(f"ids must be (B, {n}), got {tuple(ids.shape)}")
        return ids_to_layout(ids.view(-1, self.side, self.side))
