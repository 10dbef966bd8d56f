"""blip3o.diffusion: flow path math against closed forms, sampler against diffusers' FlowMatch Euler scheduler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from blip3o.diffusion import (
    SIGMA_MIN,
    cfg_combine,
    drop_condition,
    euler_sample,
    flow_loss,
    interpolate,
    sample_sigmas,
    shift_sigmas,
    sigma_schedule,
    velocity_target,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def scheduler_cls():
    diffusers = pytest.importorskip("diffusers")
    return diffusers.FlowMatchEulerDiscreteScheduler


class TinyVelocity(nn.Module):
    """A fixed, seeded, nonlinear velocity field v(x, σ) on (B, 2, 3, 4) tensors (ignores cond)."""

    def __init__(self, seed: int = 0, dim: int = 24, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        g = gen(seed)
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        h = torch.cat([x.flatten(1), sigma[:, None].to(x.dtype)], dim=1)  # (B, 25)
        return self.net(h).view_as(x)


# ---------------------------------------------------------------- path


def test_interpolate_endpoints_and_closed_form():
    x0, eps = torch.randn(3, 2, 5, generator=gen(1)), torch.randn(3, 2, 5, generator=gen(2))
    assert_close(interpolate(x0, eps, torch.zeros(3)), x0, rtol=0, atol=0)
    assert_close(interpolate(x0, eps, torch.ones(3)), eps, rtol=0, atol=0)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    expected = torch.stack([(1 - s) * x0[i] + s * eps[i] for i, s in enumerate(sigma.tolist())])
    assert_close(interpolate(x0, eps, sigma), expected)
    # A scalar σ applies to every sample.
    assert_close(interpolate(x0, eps, torch.tensor(0.25)), 0.75 * x0 + 0.25 * eps)
    # Mixed precision: bf16 data stays bf16.
    assert interpolate(x0.bfloat16(), eps.bfloat16(), sigma).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="sigma"):
        interpolate(x0, eps, torch.ones(2))


def test_velocity_target_is_path_derivative():
    x0 = torch.randn(4, 3, 2, generator=gen(3), dtype=torch.float64)
    eps = torch.randn(4, 3, 2, generator=gen(4), dtype=torch.float64)
    sigma = torch.tensor([0.05, 0.3, 0.6, 0.95], dtype=torch.float64)
    h = 1e-6
    fd = (interpolate(x0, eps, sigma + h) - interpolate(x0, eps, sigma - h)) / (2 * h)
    assert_close(velocity_target(x0, eps), fd, rtol=1e-7, atol=1e-8)
    assert_close(velocity_target(x0, eps), eps - x0)


# ---------------------------------------------------------------- shift and σ sampling


@pytest.mark.parametrize("shift", [0.5, 3.0, 6.0])
def test_shift_matches_diffusers(scheduler_cls, shift):
    base = scheduler_cls(num_train_timesteps=1000, shift=1.0).sigmas  # 1 .. 1/1000, unshifted
    # The scheduler's training sigmas apply the static shift in __init__ ...
    assert_close(shift_sigmas(base, shift), scheduler_cls(num_train_timesteps=1000, shift=shift).sigmas)
    # ... and set_timesteps(sigmas=...) applies it to custom sigmas too (then appends a terminal 0).
    s = scheduler_cls(num_train_timesteps=1000, shift=shift)
    custom = np.linspace(1.0, 0.02, 50)
    s.set_timesteps(sigmas=custom)
    assert_close(s.sigmas[:-1], shift_sigmas(torch.from_numpy(custom).float(), shift), rtol=0, atol=0)
    # Dynamic "exponential" time shift with mu = log(shift) is the same map.
    d = scheduler_cls(num_train_timesteps=1000, use_dynamic_shifting=True)
    d.set_timesteps(sigmas=custom, mu=math.log(shift))
    assert_close(d.sigmas[:-1], shift_sigmas(torch.from_numpy(custom).float(), shift), rtol=1e-6, atol=1e-6)


def test_shift_identity_and_validation():
    sigma = torch.rand(100, generator=gen())
    assert torch.equal(shift_sigmas(sigma, 1.0), sigma)
    assert_close(shift_sigmas(torch.tensor([0.0, 1.0]), 3.0), torch.tensor([0.0, 1.0]))
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="shift"):
            shift_sigmas(sigma, bad)


def test_sample_sigmas_range_determinism_and_moments():
    n = 200_000
    u = sample_sigmas(n, generator=gen(0))
    assert u.shape == (n,) and u.dtype == torch.float32
    assert u.min() >= SIGMA_MIN and u.max() <= 1.0
    assert torch.equal(u, sample_sigmas(n, generator=gen(0)))
    assert not torch.equal(u, sample_sigmas(n, generator=gen(1)))
    assert abs(u.mean().item() - 0.5) < 5e-3
    assert abs(u.var().item() - 1 / 12) < 2e-3

    ln = sample_sigmas(n, generator=gen(0), mode="logit_normal", logit_mean=0.7, logit_std=1.2)
    assert ln.min() >= SIGMA_MIN and ln.max() <= 1.0
    assert abs(ln.median().item() - 1 / (1 + math.exp(-0.7))) < 5e-3
    # The logit of the draws is N(mean, std²).
    assert abs(torch.logit(ln.double()).std().item() - 1.2) < 1e-2

    shifted = sample_sigmas(n, generator=gen(0), shift=3.0)
    assert_close(shifted, shift_sigmas(u, 3.0).clamp(SIGMA_MIN, 1.0))
    assert shifted.mean() > u.mean() + 0.1  # shift > 1 moves mass towards noise
    # Clamping keeps σ away from 0 even for an extreme distribution.
    assert torch.all(sample_sigmas(100, generator=gen(), mode="logit_normal", logit_mean=-200.0) == SIGMA_MIN)
    with pytest.raises(ValueError, match="mode"):
        sample_sigmas(4, generator=gen(), mode="cosine")  # type: ignore[arg-type]


# ---------------------------------------------------------------- condition dropout and loss


def test_drop_condition():
    cond = torch.randn(20_000, 3, 4, generator=gen(5))
    cond[0] = float("inf")
    before = cond.clone()
    p = 0.3
    dropped, keep = drop_condition(cond, p, generator=gen(6))
    assert torch.equal(cond, before)  # not modified in place
    assert keep.shape == (20_000,) and keep.dtype == torch.bool
    assert abs((~keep).float().mean().item() - p) < 0.015
    assert torch.equal(dropped[keep], cond[keep])
    assert torch.all(dropped[~keep] == 0)  # exactly zero, also for the inf row if it was dropped
    again, keep2 = drop_condition(cond, p, generator=gen(6))
    assert torch.equal(keep, keep2) and torch.equal(dropped, again)

    small = torch.randn(64, 5, generator=gen(7))
    out, k = drop_condition(small, 0.0, generator=gen())
    assert k.all() and torch.equal(out, small)
    out, k = drop_condition(small, 1.0, generator=gen())
    assert not k.any() and torch.equal(out, torch.zeros_like(small))
    with pytest.raises(ValueError, match="p must be"):
        drop_condition(small, 1.5, generator=gen())


def test_flow_loss_float32_and_reductions():
    pred = torch.randn(4, 3, 5, generator=gen(8)).bfloat16()
    target = torch.randn(4, 3, 5, generator=gen(9)).bfloat16()
    ref = (pred.double() - target.double()).square()
    loss = flow_loss(pred, target)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss.double(), ref.mean(), rtol=1e-6, atol=1e-7)
    per = flow_loss(pred, target, reduction="per_sample")
    assert per.shape == (4,)
    assert_close(per.double(), ref.flatten(1).mean(1), rtol=1e-6, atol=1e-7)
    assert flow_loss(pred, target, reduction="none").shape == (4, 3, 5)
    with pytest.raises(ValueError, match="reduction"):
        flow_loss(pred, target, reduction="sum")  # type: ignore[arg-type]


# ---------------------------------------------------------------- sampler


@pytest.mark.parametrize(("num_steps", "shift"), [(30, 1.0), (7, 1.0), (30, 3.0), (12, 0.7)])
def test_sampler_matches_diffusers_scheduler(scheduler_cls, num_steps, shift):
    velocity = TinyVelocity(seed=1)
    noise = torch.randn(3, 2, 3, 4, generator=gen(10))

    sched = scheduler_cls(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps))
    # The schedule is identical, and timesteps are σ·1000 (floats, not integer indices).
    assert torch.equal(sigma_schedule(num_steps, shift=shift), sched.sigmas)
    assert_close(sched.timesteps, sched.sigmas[:-1] * 1000)
    x = noise.clone()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            v = velocity(x, sched.sigmas[i].expand(x.shape[0]))
            x = sched.step(model_output=v, timestep=t, sample=x).prev_sample
    ours = euler_sample(velocity, noise, None, num_steps=num_steps, shift=shift)
    assert_close(ours, x, rtol=1e-6, atol=1e-6)
    # The field is not trivial: the sample moved far from the noise.
    assert (ours - noise).abs().max() > 0.5


def test_sigma_schedule():
    s = sigma_schedule(30)
    assert s.shape == (31,) and s.dtype == torch.float32
    assert s[0] == 1.0 and s[-1] == 0.0 and torch.all(s[1:] < s[:-1])
    assert_close(s[-2], torch.tensor(1 / 30))
    assert_close(sigma_schedule(1), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="num_steps"):
        sigma_schedule(0)


def _stub_velocity(calls: list):
    """v = −x + σ·Σ_t m_t h_t + 0.1·x²: known cond and uncond outputs; records each call's shapes."""

    def velocity(x, sigma, cond):
        h, m = cond["hidden"], cond["mask"]
        calls.append((tuple(x.shape), tuple(sigma.shape), tuple(h.shape), tuple(m.shape), h.clone()))
        pooled = (h * m[..., None]).sum(1)  # (B', D)
        return -x + sigma[:, None] * pooled + 0.1 * x.square()

    return velocity


def test_cfg_one_batched_call_per_step_and_values():
    b, t, d, steps, scale = 3, 5, 4, 6, 2.5
    hidden = torch.randn(b, t, d, generator=gen(11))
    mask = (torch.arange(t)[None] < torch.tensor([[5], [3], [1]])).float()  # (B, T)
    cond = {"hidden": hidden, "mask": mask}
    uncond = {"hidden": torch.zeros_like(hidden), "mask": torch.ones_like(mask)}
    noise = torch.randn(b, d, generator=gen(12))

    calls: list = []
    out = euler_sample(_stub_velocity(calls), noise, cond, uncond=uncond, num_steps=steps, guidance_scale=scale)
    assert len(calls) == steps
    for x_shape, s_shape, h_shape, m_shape, h in calls:
        assert x_shape == (2 * b, d) and s_shape == (2 * b,) and h_shape == (2 * b, t, d) and m_shape == (2 * b, t)
        assert torch.equal(h[:b], uncond["hidden"]) and torch.equal(h[b:], hidden)  # [uncond; cond]

    # Reference: two separate branch calls per step, combined by hand.
    ref_calls: list = []
    f = _stub_velocity(ref_calls)
    sigmas = sigma_schedule(steps)
    x = noise.clone()
    for i in range(steps):
        s = sigmas[i].expand(b)
        v_u, v_c = f(x, s, uncond), f(x, s, cond)
        x = x + (sigmas[i + 1] - sigmas[i]) * (v_u + scale * (v_c - v_u))
    assert_close(out, x, rtol=1e-6, atol=1e-6)
    # Guidance changes the result (the test can fail if CFG were skipped).
    plain = euler_sample(_stub_velocity([]), noise, cond, num_steps=steps)
    assert (plain - out).abs().max() > 1e-2


def test_cfg_tuple_cond_and_guidance_one():
    b, d = 2, 3
    h = torch.randn(b, 4, d, generator=gen(13))
    m = torch.ones(b, 4)
    seen: list = []

    def velocity(x, sigma, cond):
        hs, ms = cond
        seen.append((x.shape[0], hs.shape[0], ms.shape[0]))
        return -x + hs.mean(1) * ms.mean(1, keepdim=True)

    noise = torch.randn(b, d, generator=gen(14))
    euler_sample(velocity, noise, (h, m), uncond=(torch.zeros_like(h), m), num_steps=3, guidance_scale=3.0)
    assert seen == [(2 * b, 2 * b, 2 * b)] * 3
    seen.clear()
    # guidance 1: only the conditional branch, uncond ignored.
    euler_sample(velocity, noise, (h, m), uncond=(torch.zeros_like(h), m), num_steps=3, guidance_scale=1.0)
    assert seen == [(b, b, b)] * 3
    with pytest.raises(ValueError, match="uncond"):
        euler_sample(velocity, noise, (h, m), num_steps=3, guidance_scale=2.0)
    with pytest.raises(ValueError, match="uncond"):
        euler_sample(velocity, noise, (h, m), uncond=(h[:1], m[:1]), num_steps=3, guidance_scale=2.0)


def test_cfg_combine():
    v_u, v_c = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])
    assert_close(cfg_combine(v_u, v_c, 1.0), v_c)
    assert_close(cfg_combine(v_u, v_c, 0.0), v_u)
    assert_close(cfg_combine(v_u, v_c, 3.0), torch.tensor([7.0, 4.0]))


@pytest.mark.parametrize(("num_steps", "shift"), [(1, 1.0), (5, 1.0), (30, 1.0), (30, 3.0)])
def test_exact_field_of_a_point_mass_lands_on_it(num_steps, shift):
    # Data = the single point x0: x_σ = (1−σ)x0 + σε ⇒ ε = (x − (1−σ)x0)/σ, so v = ε − x0 = (x − x0)/σ.
    # Euler then scales (x − x0) by σ_next/σ each step, reaching exactly x0 at σ = 0.
    x0 = torch.randn(2, 3, 4, generator=gen(15))
    noise = torch.randn(2, 3, 4, generator=gen(16)) * 2

    def velocity(x, sigma, cond):
        return (x - x0) / sigma.view(-1, 1, 1)

    out = euler_sample(velocity, noise, None, num_steps=num_steps, shift=shift)
    assert_close(out, x0, rtol=1e-5, atol=1e-5)


def test_batch_equals_single_and_dtype():
    velocity = TinyVelocity(seed=2)
    noise = torch.randn(4, 2, 3, 4, generator=gen(17))
    batch = euler_sample(velocity, noise, None, num_steps=10, shift=2.0)
    singles = torch.cat([euler_sample(velocity, n[None], None, num_steps=10, shift=2.0) for n in noise])
    assert_close(batch, singles, rtol=1e-5, atol=1e-5)
    assert not batch.requires_grad
    assert euler_sample(velocity.double(), noise.double(), None, num_steps=2).dtype == torch.float64


def test_progress_bar_runs(capsys):
    velocity = TinyVelocity(seed=3)
    out = euler_sample(velocity, torch.randn(1, 2, 3, 4, generator=gen(18)), None, num_steps=2, progress=True)
    assert torch.isfinite(out).all()


def test_euler_sample_from_a_partly_noised_sample_sdedit():
    """With the exact velocity of a straight path to x0, v = (x − x0)/σ, Euler lands on x0 from any start;
    ``start`` = s takes x = (1 − s)·x0 + s·ε and runs ``num_steps`` steps with σ from s down to 0."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    seen = []

    def velocity(x, sigma, cond):
        seen.append(float(sigma[0]))
        return (x - cond) / sigma[:, None]

    out = euler_sample(velocity, 0.4 * x0 + 0.6 * eps, x0, num_steps=5, start=0.6)
    torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)
    assert len(seen) == 5 and abs(seen[0] - 0.6) < 1e-6 and seen == sorted(seen, reverse=True)
    with pytest.raises(ValueError, match=r"start must be in \(0, 1\]"):
        euler_sample(velocity, eps, x0, start=1.5)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_stochastic_steps_keep_the_marginal_of_gaussian_data(eta):
    """x0 ~ N(μ, s²): the exact velocity is (x − E[x0 | x_σ])/σ with E[x0 | x_σ] = μ + a·s²·(x − aμ)/(a²s² + σ²),
    a = 1 − σ. Every η of the DDIM family then samples N(μ, s²) up to the steps' discretisation error."""
    mu, s = 1.5, 0.4

    def velocity(x, sigma, cond):
        sig = sigma.view(-1, 1)
        a = 1 - sig
        x0 = mu + a * s**2 * (x - a * mu) / (a**2 * s**2 + sig**2)
        return (x - x0) / sig

    g = gen(21)
    out = euler_sample(
        velocity,
        torch.randn(40000, 1, generator=g),
        None,
        num_steps=200,
        eta=eta,
        step_noise=lambda: torch.randn(40000, 1, generator=g),
    )
    assert abs(out.mean().item() - mu) < 0.01
    assert abs(out.std().item() - s) < 0.01


def test_stochastic_steps_differ_from_euler_and_need_noise():
    velocity = TinyVelocity(seed=4)
    noise = torch.randn(2, 2, 3, 4, generator=gen(22))
    g = gen(23)
    ode = euler_sample(velocity, noise, None, num_steps=6)
    sde = euler_sample(
        velocity, noise, None, num_steps=6, eta=0.5, step_noise=lambda: torch.randn(2, 2, 3, 4, generator=g)
    )
    assert not torch.allclose(ode, sde)
    with pytest.raises(ValueError, match="needs step_noise"):
        euler_sample(velocity, noise, None, eta=0.5)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        euler_sample(velocity, noise, None, eta=1.5, step_noise=lambda: noise)
