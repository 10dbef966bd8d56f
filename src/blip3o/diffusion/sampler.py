"""Euler ODE sampler for the rectified flow, with classifier-free guidance.

Integrates dx/dσ = v(x, σ, cond) from σ = 1 (noise) to σ = 0 (data) on the official BLIP3-o schedule
``linspace(1, 1/N, N)`` (shifted, then a final 0). This is exactly what diffusers'
``FlowMatchEulerDiscreteScheduler`` does after ``set_timesteps(sigmas=linspace(1, 1/N, N))`` followed by
``step`` per timestep; ``tests/test_flow.py`` checks the two agree numerically, with and without shift.
Unlike the scheduler this sampler is stateless, needs no host sync per step (no ``.item()``, no timestep
lookup), and hands the velocity network σ ∈ (0, 1] rather than the scheduler's ``timestep = 1000·σ``; an
adapter whose network expects the 0–1000 scale multiplies by ``num_train_timesteps`` itself.

With guidance, the unconditional and conditional branches run as ONE batched call of the velocity
function, [uncond; cond] along dim 0, and combine as v = v_u + s·(v_c − v_u).

``eta`` > 0 makes each step stochastic (DDIM's η, Song et al. 2021, on the straight path α = 1 − σ):
from v the step takes x̂0 = x − σ·v and ε̂ = x + (1 − σ)·v, and goes from σ to σ' by
x' = α'·x̂0 + √(σ'² − c²)·ε̂ + c·z, with fresh noise z and c = η·σ'·√(1 − (α·σ'/(α'·σ))²), the
posterior std of x_σ' given x_σ and x0 times η. η = 0 is the Euler step exactly and η = 1 the ancestral
(DDPM) step; as steps shrink every η samples the path's marginals, and the fresh noise lets later steps
correct what an imperfect model got wrong earlier (Karras et al. 2022, §4).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from blip3o.diffusion.flow import shift_sigmas

__all__ = ["Cond", "VelocityFn", "cfg_combine", "euler_sample", "guided_condition", "sigma_schedule"]

Cond = Tensor | tuple[Any, ...] | list[Any] | Mapping[str, Any] | None
"""A condition: a tensor batched on dim 0, or a tuple/list/dict of such tensors (``None`` leaves allowed),
e.g. ``(hidden_states, attention_mask)``."""

VelocityFn = Callable[[Tensor, Tensor, Any], Tensor]
"""``velocity(x (B, ...), sigma (B,), cond) -> v (B, ...)``."""


def sigma_schedule(
    num_steps: int,
    *,
    shift: float = 1.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Sampling noise levels: ``shift_sigmas(linspace(1, 1/num_steps, num_steps), shift)`` then 0.

    Bitwise equal to ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(sigmas=linspace(1, 1/N,
    N))`` → ``scheduler.sigmas``: the linspace is taken in float64 and rounded to float32 as numpy's is
    there, and the shift uses the scheduler's operation order. (Do not compare with ``set_timesteps(N)``
    without ``sigmas``: diffusers then spaces from 1 to its already-shifted ``sigma_min`` and shifts again.)

    Args:
        num_steps: number of Euler steps N ≥ 1.
        shift: resolution shift (> 0), see :func:`blip3o.diffusion.flow.shift_sigmas`.
        device: where the schedule goes.

    Returns:
        (N + 1,) float32, decreasing from 1 to 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    base = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64).to(torch.float32)
    sigmas = torch.cat([shift_sigmas(base, shift), torch.zeros(1)])
    return sigmas.to(device) if device is not None else sigmas


def cfg_combine(v_uncond: Tensor, v_cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: v = v_u + s·(v_c − v_u). s = 1 gives v_c, s = 0 gives v_u."""
    return v_uncond + scale * (v_cond - v_uncond)


def _cat_cond(uncond: Cond, cond: Cond) -> Cond:
    """[uncond; cond] along dim 0 for every tensor of a (possibly nested) condition structure."""
    if isinstance(cond, Tensor):
        if not isinstance(uncond, Tensor) or uncond.shape != cond.shape:
            got = tuple(uncond.shape) if isinstance(uncond, Tensor) else type(uncond).__name__
            raise ValueError(
                f"uncond must match cond leaf for leaf; got {got} for a cond tensor of shape {tuple(cond.shape)} "
                "(pad the unconditional condition to the conditional one's shape and batch size)"
            )
        return torch.cat([uncond, cond], dim=0)
    if cond is None:
        if uncond is not None:
            raise ValueError("uncond has a value where cond has None")
        return None
    if isinstance(cond, Mapping):
        if not isinstance(uncond, Mapping) or set(uncond) != set(cond):
            raise ValueError(f"uncond must be a mapping with keys {sorted(cond)}")
        return {k: _cat_cond(uncond[k], cond[k]) for k in cond}
    if isinstance(cond, tuple | list):
        if not isinstance(uncond, tuple | list) or len(uncond) != len(cond):
            raise ValueError(f"uncond must be a sequence of length {len(cond)} like cond")
        return type(cond)(_cat_cond(u, c) for u, c in zip(uncond, cond, strict=True))
    raise TypeError(f"cond leaves must be tensors or None, got {type(cond).__name__}")


def guided_condition(cond: Cond, uncond: Cond, guidance_scale: float) -> Cond:
    """What a sampler passes its network: ``[uncond; cond]`` along dim 0 with guidance (``guidance_scale`` ≠ 1),
    else ``cond``; guidance without an unconditional condition is an error."""
    if guidance_scale == 1.0:
        return cond
    if uncond is None:
        raise ValueError(
            f"guidance_scale={guidance_scale} needs an unconditional condition: pass uncond= (same structure and "
            "shapes as cond; zeros, matching training-time condition dropout), or use guidance_scale=1.0"
        )
    return _cat_cond(uncond, cond)


@torch.no_grad()
def euler_sample(
    velocity: VelocityFn,
    noise: Tensor,
    cond: Cond,
    *,
    uncond: Cond = None,
    num_steps: int = 30,
    guidance_scale: float = 1.0,
    shift: float = 1.0,
    start: float = 1.0,
    eta: float = 0.0,
    step_noise: Callable[[], Tensor] | None = None,
    progress: bool = False,
) -> Tensor:
    """Integrate the flow ODE from ``noise`` (σ = 1) to a sample (σ = 0) with Euler steps.

    Each step: x ← x + (σ_next − σ)·v, over :func:`sigma_schedule` (``num_steps``, ``shift``). With
    ``guidance_scale`` ≠ 1 the velocity is called ONCE per step on the batch ``x`` duplicated (2B) with the
    condition ``[uncond; cond]`` and combined by :func:`cfg_combine`; with ``guidance_scale`` = 1 only the
    conditional branch runs (batch B) and ``uncond`` is ignored.

    Precision: the state is kept in float32 (or wider) between steps, the velocity is called with x in
    ``noise.dtype`` and σ as float32 (B',), and the result is returned in ``noise.dtype``. For float32
    inputs this equals diffusers' scheduler loop; for bf16/fp16 diffusers rounds the state to the model
    dtype after every step, which this sampler avoids.

    Args:
        velocity: ``velocity(x, sigma, cond) -> v`` with x (B', ...), sigma (B',), v shaped like x.
        noise: starting noise ε (B, ...), e.g. drawn with ``torch.randn(..., generator=g)``.
        cond: condition batched on dim 0: a tensor or tuple/list/dict of tensors.
        uncond: the unconditional condition, same structure and shapes as ``cond``; needed when
            ``guidance_scale`` ≠ 1 (training drops the condition to zeros, so usually zeros).
        num_steps: Euler steps (official BLIP3-o: 30).
        guidance_scale: CFG scale s (BLIP3-o 3.0, NEXT 2.0; 1 disables guidance).
        shift: resolution shift of the schedule.
        start: the noise level of ``noise``, in (0, 1]: with ``start`` < 1 it is a partly noised sample
            x = (1 − start)·x₀ + start·ε (SDEdit: editing from a noised reference) and the schedule is
            scaled to run from ``start`` to 0 in ``num_steps`` steps.
        eta: stochasticity in [0, 1] (module docstring); 0 is the deterministic Euler sampler.
        step_noise: with ``eta`` > 0, returns a fresh standard-normal tensor shaped like ``noise`` per call
            (one per step); callers that need a batch to equal its rows one at a time draw it per row.
        progress: show a tqdm bar over steps.

    Returns:
        The sample x_0 (B, ...) in ``noise.dtype``.
    """
    use_cfg = guidance_scale != 1.0
    model_cond = guided_condition(cond, uncond, guidance_scale)
    b = noise.shape[0]
    if not 0.0 < start <= 1.0:
        raise ValueError(f"start must be in (0, 1], got {start}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if eta > 0 and step_noise is None:
        raise ValueError("eta > 0 needs step_noise, a function returning fresh noise shaped like `noise`")
    sigmas = sigma_schedule(num_steps, shift=shift, device=noise.device)  # (N + 1,)
    if start < 1.0:
        sigmas = sigmas * start
    state_dtype = torch.promote_types(noise.dtype, torch.float32)
    x = noise.to(state_dtype)  # (B, ...)
    for i in tqdm(range(num_steps), disable=not progress, desc="sampling", leave=False):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]  # 0-dim device tensors: no host sync
        x_in = x.to(noise.dtype)
        if use_cfg:
            x_in = torch.cat([x_in, x_in], dim=0)  # (2B, ...): [uncond; cond]
        v = velocity(x_in, sigma.expand(x_in.shape[0]), model_cond)
        if v.shape != x_in.shape:
            raise ValueError(f"velocity returned shape {tuple(v.shape)}, expected {tuple(x_in.shape)}")
        if use_cfg:
            v = cfg_combine(v[:b], v[b:], guidance_scale)
        v = v.to(state_dtype)
        if eta == 0 or i == num_steps - 1:  # the last step lands on x̂0 either way
            x = x + (sigma_next - sigma) * v
        else:
            x0, eps = x - sigma * v, x + (1 - sigma) * v
            ratio = (1 - sigma) * sigma_next / ((1 - sigma_next) * sigma)
            c = eta * sigma_next * (1 - ratio.square()).clamp_min(0).sqrt()
            z = step_noise().to(state_dtype)
            x = (1 - sigma_next) * x0 + (sigma_next.square() - c.square()).sqrt() * eps + c * z
    return x.to(noise.dtype)
