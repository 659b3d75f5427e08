"""Rectified flow: x_t = (1 - t) x0 + t noise, velocity noise - x0.

Training draws t per target block from a logit-normal; the network predicts the velocity or the clean latent
(`diffusion.prediction`), and the loss is on the velocity either way. Sampling integrates from t = 1 (noise) to
t = 0 with Euler steps on shifted timesteps (more steps at high noise, as SD3 and the VINCIE release do).
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


X0_MIN_T = 0.05  # x0 prediction: velocity = (x_t - x0) / max(t, X0_MIN_T), so t -> 0 does not divide by zero


def output_to_velocity(output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction: str) -> torch.Tensor:
    """The network's output for noisy tokens x_t at time t (broadcastable to x_t) -> their velocity.

    "velocity": the output is the velocity. "x0": the output is the clean latent; since x_t = (1 - t) x0 + t noise,
    the velocity noise - x0 equals (x_t - x0) / t. Predicting x0 lets a narrow network leave the noise out of its
    hidden state (Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise")."""
    if prediction == "velocity":
        return output
    return (x_t - output) / t.clamp(min=X0_MIN_T)


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
