"""Rectified flow: x_t = (1 - t) x0 + t noise, the model predicts the velocity noise - x0.

Training draws t per target block from a logit-normal; sampling integrates from t = 1 (noise) to t = 0 with
Euler steps on shifted timesteps (more steps at high noise, as SD3 and the VINCIE release do).
"""

from __future__ import annotations

import torch


def sample_timesteps(count: int, loc: float, scale: float, generator: torch.Generator) -> torch.Tensor:
    """(count,) logit-normal t in (0, 1)."""
    return torch.sigmoid(loc + scale * torch.randn(count, generator=generator))


def noisy(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0, noise (N, D); t broadcastable to (N, 1)."""
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * t / (1 + (shift - 1) * t)


def sampling_schedule(steps: int, shift: float) -> torch.Tensor:
    """(steps + 1,) decreasing from 1 to 0."""
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1), shift)


def euler_sample(velocity, noise: torch.Tensor, steps: int, shift: float) -> torch.Tensor:
    """Integrates dx/dt = velocity(x, t) from t = 1 (x = noise) to t = 0. `velocity(x, t)` takes x like noise and
    a float t and returns a tensor like x."""
    x = noise
    schedule = sampling_schedule(steps, shift)
    for t, t_next in zip(schedule[:-1], schedule[1:]):
        x = x + (t_next - t) * velocity(x, float(t))
    return x
