"""What an optimizer step adds to AdamW: the learning-rate schedule (linear warmup, cosine to a floor) and the EMA of
the weights that exports use by default."""

from __future__ import annotations

import math

import torch

from vincie.config import Config


def lr_factor(step: int, cfg: Config) -> float:
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class EMA:
    """Exponential moving average of the weights, with a warmup: the decay at update n is
    min(decay, (1 + n) / (warmup + n)), so short runs do not average in their random initialisation (warmup 10 is
    the usual choice; a smaller one averages over more of a short run's last updates). One shadow dict per model
    chunk (a pipeline rank may hold several)."""

    def __init__(self, chunks: list[torch.nn.Module], decay: float, warmup: float):
        self.decay, self.warmup = decay, warmup
        self.updates = 0
        self.shadow = [{n: p.detach().clone() for n, p in chunk.named_parameters()} for chunk in chunks]

    @torch.no_grad()
    def update(self, chunks: list[torch.nn.Module]) -> None:
        decay = min(self.decay, (1 + self.updates) / (self.warmup + self.updates))
        self.updates += 1
        for shadow, chunk in zip(self.shadow, chunks):
            names, params = zip(*chunk.named_parameters())
            torch._foreach_lerp_([shadow[n] for n in names], [p.detach() for p in params], 1 - decay)
