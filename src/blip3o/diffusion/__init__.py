"""The generative process: rectified-flow training path and the Euler/CFG ODE sampler.

The DiT is only a velocity network; noise, timesteps, shift, interpolation, targets, condition dropout and
sampling live here (STYLE.md 2.1.2).
"""

from blip3o.diffusion.flow import (
    SIGMA_MIN,
    drop_condition,
    flow_loss,
    interpolate,
    sample_sigmas,
    shift_sigmas,
    velocity_target,
)
from blip3o.diffusion.sampler import Cond, VelocityFn, cfg_combine, euler_sample, sigma_schedule

__all__ = [
    "SIGMA_MIN",
    "Cond",
    "VelocityFn",
    "cfg_combine",
    "drop_condition",
    "euler_sample",
    "flow_loss",
    "interpolate",
    "sample_sigmas",
    "shift_sigmas",
    "sigma_schedule",
    "velocity_target",
]
