"""Discrete flow matching with a masked source, for maps of categorical cells (a layout's class-and-colour ids).

The probability path (Gat et al. 2024, "Discrete Flow Matching"; Campbell et al. 2024; with the linear
scheduler): at noise level σ ∈ [0, 1] every cell independently shows its true id with probability 1 − σ
and the mask id otherwise, so σ = 1 is all masks (the source) and σ = 0 the data. The network predicts,
for every cell, the distribution of its clean id given the partly masked map; training minimises the
cross-entropy of the masked cells' true ids (:func:`mask_cells`, :func:`masked_ce`).

Sampling integrates the path from σ = 1 to 0 on :func:`blip3o.diffusion.sampler.sigma_schedule`: between
σ and σ' a masked cell is revealed with probability (σ − σ')/σ and takes an id drawn from the predicted
distribution (with classifier-free guidance on the log-probabilities and a temperature). That is the same
as giving every cell its own uniform reveal time u ∈ (0, 1) and revealing it at the step whose interval
holds u, which is how :func:`unmask_sample` draws it: each image's reveal times and Gumbel noise are given
by the caller (one draw per image from its own seed), so a batch samples what its images sample alone,
and no random number is drawn inside the loop. A cell keeps the id it is revealed with.

Unlike a Gaussian flow over one-hot vectors, a cell is always one id (one class in one colour), and
cells revealed later are drawn given the ones revealed before, so an object's cells agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from blip3o.diffusion.sampler import cfg_combine, guided_condition, sigma_schedule

__all__ = ["LogitsFn", "corrupt_cells", "gumbel", "mask_cells", "masked_ce", "unmask_sample"]

LogitsFn = Callable[[Tensor, Tensor, Any], Tensor]
"""``logits(ids (B, h, w), sigma (B,), cond) -> (B, V, h, w)``: the predicted clean-id distribution per cell."""


def mask_cells(ids: Tensor, sigma: Tensor, mask_id: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A draw of the path at σ: ids (B, ...) long, σ (B,) → (masked ids, which cells are masked (B, ...) bool)."""
    masked = torch.rand(ids.shape, generator=generator, device=generator.device).to(ids.device)
    masked = masked < sigma.view(-1, *[1] * (ids.dim() - 1))
    return torch.where(masked, mask_id, ids), masked


def corrupt_cells(
    x: Tensor, masked: Tensor, rate: float, vocab: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Replace each unmasked cell of ``x`` with probability ``rate`` by an id drawn uniformly from [0, vocab):
    → (corrupted map, which cells were drawn (B, ...) bool). Training on such maps (their drawn cells counted in
    the loss beside the masked ones) teaches the network to doubt revealed cells, as corrector rounds ask it to."""
    u = torch.rand(x.shape, generator=generator, device=generator.device).to(x.device)
    drawn = torch.randint(0, vocab, x.shape, generator=generator, device=generator.device).to(x.device)
    corrupted = (u < rate) & ~masked
    return torch.where(corrupted, drawn, x), corrupted


def masked_ce(logits: Tensor, ids: Tensor, masked: Tensor) -> Tensor:
    """Cross-entropy (float32) of the true ids of the masked cells, averaged over them: logits (B, V, ...)."""
    ce = F.cross_entropy(logits.float(), ids, reduction="none")  # (B, ...)
    weight = masked.to(ce.dtype)
    return (ce * weight).sum() / weight.sum().clamp_min(1.0)


def gumbel(uniform: Tensor) -> Tensor:
    """Standard Gumbel noise from uniform draws in [0, 1): argmax(logits + g) samples softmax(logits)."""
    tiny = torch.finfo(uniform.dtype).tiny
    return -torch.log(-torch.log(uniform.clamp(tiny, 1 - 1e-7)))


@torch.no_grad()
def unmask_sample(
    logits_fn: LogitsFn,
    reveal: Tensor,
    noise: Tensor,
    cond: Any,
    *,
    mask_id: int,
    uncond: Any = None,
    num_steps: int = 30,
    guidance_scale: float = 1.0,
    temperature: float = 1.0,
    shift: float = 1.0,
    order: str = "random",
    confidence_noise: float = 1.0,
    refine_steps: int = 0,
    refine_threshold: float = 0.1,
    progress: bool = False,
) -> Tensor:
    """Sample id maps from the all-mask source (module docstring).

    Args:
        logits_fn: the network; with guidance it is called once per step on the doubled batch
            [uncond; cond], as :func:`blip3o.diffusion.sampler.euler_sample` calls a velocity.
        reveal: each cell's reveal time u ∈ [0, 1), (B, h, w): the cell is revealed at the step σ → σ' with
            σ' ≤ u < σ (every cell by the last step, whose σ' is 0).
        noise: Gumbel noise (B, V, h, w) (:func:`gumbel`); a cell's id is argmax(log p / temperature + noise)
            at its reveal step.
        cond, uncond: condition and unconditional condition (same structure), as for ``euler_sample``.
        mask_id: the id of a masked cell (the network's extra input category).
        num_steps, shift: the σ schedule (:func:`blip3o.diffusion.sampler.sigma_schedule`).
        guidance_scale: CFG on log-probabilities, l = l_u + s·(l_c − l_u); 1 runs the conditional branch alone.
        temperature: > 0; below 1 sharpens each cell's distribution.
        order: ``random`` reveals each cell at its own reveal time (the path's sampler); ``confidence`` reveals, at
            each step, as many cells as the schedule frees (round(N·(1 − σ')) revealed after it, N cells an image)
            and chooses the masked cells whose drawn ids are most probable (MaskGIT, Chang et al. 2022), each
            score perturbed by ``confidence_noise`` · σ · Gumbel noise taken from the reveal times.
        confidence_noise: ≥ 0, the scale of that perturbation (0 reveals strictly by confidence).
        refine_steps: corrector rounds after the last step, each two calls: the network reads the finished map
            (at σ = 1/N), the cells whose id it then gives a probability under ``refine_threshold`` are masked
            again, and redrawn (with their Gumbel noise) from its prediction given the rest, at σ = the share
            masked. A cell revealed early, before the cells around it, can so be taken back.
        refine_threshold: in (0, 1), the probability under which a cell is redrawn.
        progress: a tqdm bar over steps.

    Returns:
        ids (B, h, w), long.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if order not in ("random", "confidence"):
        raise ValueError(f"order must be 'random' or 'confidence', got {order!r}")
    if confidence_noise < 0:
        raise ValueError(f"confidence_noise must be >= 0, got {confidence_noise}")
    if refine_steps < 0 or not 0 < refine_threshold < 1:
        raise ValueError(
            f"refine_steps must be >= 0 and refine_threshold in (0, 1), got {refine_steps} and {refine_threshold}"
        )
    b, v = noise.shape[:2]
    if reveal.shape != (b, *noise.shape[2:]):
        raise ValueError(
            f"reveal must be {(b, *noise.shape[2:])} for noise {tuple(noise.shape)}, got {tuple(reveal.shape)}"
        )
    use_cfg = guidance_scale != 1.0
    model_cond = guided_condition(cond, uncond, guidance_scale)
    sigmas = sigma_schedule(num_steps, shift=shift, device=noise.device)
    ids = torch.full(reveal.shape, mask_id, dtype=torch.long, device=noise.device)
    n_cells = reveal[0].numel()
    choice_noise = gumbel(reveal).flatten(1)  # (B, N): the confidence order's perturbation, from the seeds
    n_revealed = [n_cells - round(s * n_cells) for s in sigmas[1:].tolist()]  # cells revealed after each step

    def predict(ids: Tensor, sigma: Tensor) -> Tensor:
        """Guided log-probabilities (B, V, h, w) for the map ``ids`` at levels σ (B,)."""
        x_in = torch.cat([ids, ids]) if use_cfg else ids
        sigma_in = torch.cat([sigma, sigma]) if use_cfg else sigma
        logits = logits_fn(x_in, sigma_in, model_cond)[:, :v].float().log_softmax(1)
        return cfg_combine(logits[:b], logits[b:], guidance_scale) if use_cfg else logits

    for i in tqdm(range(num_steps), disable=not progress, desc="unmasking", leave=False):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        logits = predict(ids, sigma.expand(b))
        drawn = (logits / temperature + noise).argmax(1)  # (B, h, w)
        masked = ids == mask_id
        if order == "random":
            now = masked & (reveal >= sigma_next)
        else:
            logp = (logits / temperature).log_softmax(1).gather(1, drawn.unsqueeze(1)).squeeze(1)
            score = (logp.flatten(1) + confidence_noise * sigma * choice_noise).masked_fill(
                ~masked.flatten(1), torch.inf
            )
            keep = torch.zeros_like(score, dtype=torch.bool)
            keep.scatter_(1, score.topk(n_revealed[i], dim=1).indices, True)
            now = masked & keep.view_as(masked)
        ids = torch.where(now, drawn, ids)
    for _ in range(refine_steps):
        logp = (predict(ids, torch.full((b,), 1 / n_cells, device=ids.device)) / temperature).log_softmax(1)
        redo = logp.gather(1, ids.unsqueeze(1)).squeeze(1) < math.log(refine_threshold)
        share = redo.flatten(1).float().mean(1).clamp_min(1 / n_cells)
        drawn = (predict(torch.where(redo, mask_id, ids), share) / temperature + noise).argmax(1)
        ids = torch.where(redo, drawn, ids)
    return ids
