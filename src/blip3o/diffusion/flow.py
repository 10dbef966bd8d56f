"""Rectified-flow training path: timesteps, shift, interpolation, target, condition dropout, loss.

Convention (DESIGN.md, "Flow matching conventions"; the SD3 / diffusers / BLIP3-o convention):

    x_σ = (1 − σ)·x0 + σ·ε,    v = dx_σ/dσ = ε − x0,    σ ∈ (0, 1]

σ = 0 is data, σ = 1 is pure noise. The DiT is only a velocity network v_θ(x_σ, σ, cond); everything
stochastic about training lives here as pure functions that take a ``torch.Generator``, in the shape of
torchtitan's ``models/flux/trainer.py: forward_backward_step`` (continuous σ, no scheduler lookup).

The official BLIP3-o code draws an index into the 1000 discrete (shifted) scheduler timesteps and looks
each one up with a per-sample ``.nonzero().item()`` loop (``blip3o_qwen.py: get_sigmas``). Here σ is
continuous, which is the limit of that scheme and needs no host sync. Parameters are plain arguments; the
config dataclasses that supply them live in ``blip3o.config``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "SIGMA_MIN",
    "drop_condition",
    "flow_loss",
    "interpolate",
    "sample_sigmas",
    "shift_sigmas",
    "velocity_target",
]

SIGMA_MIN = 1e-5
"""Lower clamp of sampled training σ, so that σ is never exactly 0 (a pure-data input carries no
training signal, and any 1/σ weighting a caller applies stays finite)."""


def shift_sigmas(sigma: Tensor, shift: float) -> Tensor:
    """Resolution shift of SD3 (Esser et al. 2024, eq. 23), as diffusers applies it.

    σ' = shift·σ / (1 + (shift − 1)·σ). ``shift`` > 1 moves σ towards 1 (more noise), which suits
    larger images; ``shift`` = 1 is the identity (exactly, in floating point). The map fixes 0 and 1 and
    is monotone. It equals diffusers' dynamic "exponential" time shift with ``shift = exp(mu)``.

    Args:
        sigma: σ values in [0, 1], any shape.
        shift: positive shift factor.

    Returns:
        Shifted σ, same shape and dtype as ``sigma``.
    """
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    # Same operation order as FlowMatchEulerDiscreteScheduler.set_timesteps, so float32 results agree bitwise.
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(
    n: int,
    *,
    generator: torch.Generator,
    mode: Literal["uniform", "logit_normal"] = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 1.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw training noise levels σ ∈ [SIGMA_MIN, 1].

    ``uniform``: σ ~ U(0, 1] (official BLIP3-o). ``logit_normal``: σ = sigmoid(u), u ~ N(logit_mean,
    logit_std²) (SD3's default; its median is sigmoid(logit_mean)). The shift is applied after drawing,
    then σ is clamped to [SIGMA_MIN, 1].

    Args:
        n: number of σ to draw (the batch size).
        generator: the random source; σ are drawn on its device.
        mode: the base distribution.
        logit_mean, logit_std: parameters of ``logit_normal`` (ignored for ``uniform``).
        shift: resolution shift, see :func:`shift_sigmas`.
        device: where the result goes; defaults to the generator's device.

    Returns:
        σ of shape (n,), float32.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    gen_device = generator.device
    if mode == "uniform":
        # 1 − U[0, 1) lies in (0, 1]: σ = 1 (pure noise) is reachable, σ = 0 is not.
        sigma = 1.0 - torch.rand(n, generator=generator, device=gen_device)
    elif mode == "logit_normal":
        if not logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        u = torch.randn(n, generator=generator, device=gen_device) * logit_std + logit_mean
        sigma = torch.sigmoid(u)
    else:
        raise ValueError(f"mode must be one of 'uniform', 'logit_normal'; got {mode!r}")
    sigma = shift_sigmas(sigma, shift).clamp(SIGMA_MIN, 1.0)
    return sigma.to(device) if device is not None else sigma


def _expand_sigma(sigma: Tensor, like: Tensor) -> Tensor:
    """(B,) or scalar σ → shape broadcastable against ``like`` (B, ...)."""
    if sigma.ndim == 0:
        return sigma
    if sigma.ndim != 1 or sigma.shape[0] != like.shape[0]:
        raise ValueError(f"sigma must be a scalar or have shape ({like.shape[0]},), got {tuple(sigma.shape)}")
    return sigma.view(-1, *([1] * (like.ndim - 1)))  # (B, 1, ..., 1)


def interpolate(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """Point on the straight path: x_σ = (1 − σ)·x0 + σ·ε.

    Args:
        x0: clean data (B, ...).
        noise: ε, same shape as ``x0``.
        sigma: (B,) or a scalar; broadcast over the trailing dims.

    Returns:
        x_σ with the shape and dtype of ``x0``. The mix is computed in the promoted dtype of the inputs
        (float32 σ with bf16 latents mixes in float32) and rounded once at the end.
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 and noise must have the same shape, got {tuple(x0.shape)} and {tuple(noise.shape)}")
    s = _expand_sigma(sigma, x0)
    return ((1 - s) * x0 + s * noise).to(x0.dtype)


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """Regression target v = ε − x0, the σ-derivative of :func:`interpolate` (independent of σ)."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 and noise must have the same shape, got {tuple(x0.shape)} and {tuple(noise.shape)}")
    return noise - x0


def drop_condition(cond: Tensor, p: float, *, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Classifier-free-guidance dropout: zero the whole condition of each sample with probability ``p``.

    A zero condition is what the sampler's unconditional branch is fed, so training and sampling agree.
    The input is not modified.

    Args:
        cond: condition (B, ...), e.g. (B, T, D) hidden states.
        p: drop probability in [0, 1] (DESIGN.md: 0.1).
        generator: the random source; draws happen on its device.

    Returns:
        ``(dropped, keep)``: the condition with dropped rows set to exactly 0 (same shape, dtype, device),
        and the keep mask (B,) bool on ``cond``'s device (True where the condition was kept).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if cond.ndim == 0:
        raise ValueError("cond must have a batch dimension")
    # U[0, 1) ≥ p: p = 0 keeps every row, p = 1 drops every row.
    keep = torch.rand(cond.shape[0], generator=generator, device=generator.device) >= p  # (B,)
    keep = keep.to(cond.device)
    mask = keep.view(-1, *([1] * (cond.ndim - 1)))  # (B, 1, ..., 1)
    # where, not multiply: a dropped row is exactly zero even if cond holds inf/nan.
    dropped = torch.where(mask, cond, torch.zeros((), dtype=cond.dtype, device=cond.device))
    return dropped, keep


def flow_loss(
    pred: Tensor,
    target: Tensor,
    reduction: Literal["mean", "per_sample", "none"] = "mean",
) -> Tensor:
    """Mean squared error between predicted and target velocity, computed in float32.

    Args:
        pred: v_θ (B, ...).
        target: ε − x0, same shape.
        reduction: ``mean`` → scalar over all elements; ``per_sample`` → (B,) mean over each sample's
            elements; ``none`` → elementwise (B, ...) float32, for callers that weight or mask tokens
            themselves (``train/losses.py`` owns global-token normalisation).

    Returns:
        The loss in float32.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    err = (pred.float() - target.float()).square()
    if reduction == "mean":
        return err.mean()
    if reduction == "per_sample":
        return err.reshape(err.shape[0], -1).mean(dim=1)
    if reduction == "none":
        return err
    raise ValueError(f"reduction must be one of 'mean', 'per_sample', 'none'; got {reduction!r}")
