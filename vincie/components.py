"""The trainable model and its frozen helpers, built from one config.

`EditModel` is what the optimizer, EMA and checkpoints see: the MM-DiT plus the text encoder when that is
trainable (the built-in hashed-word embeddings). Frozen encoders (a `transformers` text model, a `diffusers` VAE,
the parameter-free space-to-depth latent) stay outside it and are referenced by config.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vincie.config import Config
from vincie.model import MMDiT, ModelInputs
from vincie.text_encoder import build_text_encoder
from vincie.vae import build_vae


class EditModel(nn.Module):
    def __init__(self, cfg: Config, text_encoder: nn.Module):
        super().__init__()
        self.dit = MMDiT(cfg.model)
        self.text_encoder = text_encoder if getattr(text_encoder, "trainable", False) else None

    def forward(self, inputs: ModelInputs) -> torch.Tensor:
        return self.dit(inputs)


def build_components(cfg: Config, device: torch.device):
    """-> (EditModel, vae, text_encoder), on `device`."""
    text_encoder = build_text_encoder(cfg.text_encoder, cfg.model.text_dim)
    vae = build_vae(cfg.vae).to(device)
    if vae.channels != cfg.model.latent_channels:
        from vincie.config import ConfigError

        raise ConfigError(f"config key 'model.latent_channels' is {cfg.model.latent_channels} but the VAE gives "
                          f"{vae.channels} channels")
    model = EditModel(cfg, text_encoder).to(device)
    text_encoder.to(device)
    return model, vae, text_encoder
