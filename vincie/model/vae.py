"""Latent spaces behind one interface: images (N, 3, H, W) in [-1, 1] <-> latents (N, C, h, w).

- `space_to_depth` (built in, for the synthetic world): a lossless, parameter-free pixel-space latent; each
  f x f x 3 patch becomes one latent cell of 3 f^2 channels.
- `diffusers`: an AutoencoderKL from a local directory (never from a hub), frozen; latents are the posterior mean
  times the VAE's scaling factor.
- `release`: a released VINCIE VAE (3B or 7B) converted by `vincie convert release --vae`, as its single-image 2D
  network (vincie.model.release_vae).
Masks go through the same path as images: a mask is rendered as an image (white region on black) first.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vincie.config import VAEConfig
from vincie.errors import VincieError


class SpaceToDepthVAE(nn.Module):
    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor
        self.channels = 3 * factor * factor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images, self.factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents, self.factor)


class DiffusersVAE(nn.Module):
    def __init__(self, path: str, factor: int):
        super().__init__()
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise VincieError("vae.kind 'diffusers' needs the diffusers package (pip install diffusers)") from None
        try:
            vae = AutoencoderKL.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, EnvironmentError) as exc:
            raise VincieError(f"vae.path {path}: not a loadable diffusers AutoencoderKL directory "
                              f"({str(exc).splitlines()[0]})") from None
        vae.requires_grad_(False).eval()
        object.__setattr__(self, "vae", vae)  # frozen, referenced by path, not saved in vincie's checkpoints
        self.channels = vae.config.latent_channels
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if self.factor != factor:
            raise VincieError(f"vae.factor is {factor} but the AutoencoderKL at {path} downsamples by {self.factor} "
                              f"(2^(len(block_out_channels) - 1)): set vae.factor={self.factor}")
        self.scaling = vae.config.scaling_factor

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images).latent_dist.mean * self.scaling

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling).sample

    def to(self, *args, **kwargs):
        self.vae.to(*args, **kwargs)
        return super().to(*args, **kwargs)


def build_vae(cfg: VAEConfig) -> nn.Module:
    if cfg.kind == "space_to_depth":
        return SpaceToDepthVAE(cfg.factor)
    if cfg.kind == "release":
        from vincie.model.release_vae import load_release_vae

        return load_release_vae(cfg.path, cfg.factor)
    return DiffusersVAE(cfg.path, cfg.factor)
