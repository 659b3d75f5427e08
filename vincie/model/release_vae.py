"""The released VINCIE VAEs, as the single-image 2D networks they are for one frame.

Both releases ship causal 3D VAEs. For one image every causal 3D convolution sees its one frame replicated over
its temporal taps, so it equals a 2D convolution whose kernel is the sum of those taps, and an upsampler's
temporal doubling keeps only its first frame. vincie runs these 2D equivalents; `vincie.inference.convert`
reduces the release's 3D weights to them (the parity fixtures tie both to the release's own code).

Two layouts, read from the weights:
- `mid_attention` (3B, the release's models/vae): n blocks of resnets, a 3x3 stride-2 downsampler after a
  right/bottom zero pad on all but the last; a mid block resnet-attention-resnet (one head, the channel width);
  the decoder mirrors it (mid block first), with upsamplers: a 1x1 convolution to 4x the channels, pixel shuffle,
  a 3x3 convolution.
- `final_block` (7B, models/ae at c6ee69b): no attention; a 4x4 stride-2 downsampler (padding 1) in every down
  block, then a final block of resnets; upsamplers with a 3x3 convolution to 4x the channels.
Either way the encoder has n - 1 down blocks then a last stack of resnets, the decoder n - 1 up blocks then a last
stack. GroupNorm has 32 groups and eps 1e-6 throughout. Latents are the posterior mean, (mean - shift) * scale
(the release samples the posterior; vincie uses its mean, the deterministic choice).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vincie.errors import VincieError

LAYOUTS = ("mid_attention", "final_block")
CONFIG = "config.json"
WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class ReleaseVAESpec:
    layout: str  # one of LAYOUTS
    encoder_channels: tuple[int, ...]  # per block, narrowest first
    decoder_channels: tuple[int, ...]  # per block, as the decoder runs (widest first)
    encoder_layers: int  # resnets per encoder block
    decoder_layers: int  # resnets per decoder block
    latent_channels: int
    scale: float  # latent = (posterior mean - shift) * scale
    shift: float = 0.0

    @property
    def factor(self) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** (len(self.encoder_channels) - 1)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class Resnet(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """One head as wide as the channels over the cells of an image, with a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.group_norm = group_norm(channels)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W)
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (N, HW, C)
        attended = F.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))
        return x + self.to_out[0](attended).transpose(1, 2).reshape(x.shape)


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.resnets = nn.ModuleList([Resnet(channels, channels), Resnet(channels, channels)])
        self.attention = Attention(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attention(self.resnets[0](x)))


class Downsample(nn.Module):
    def __init__(self, channels: int, layout: str):
        super().__init__()
        self.pad_right_bottom = layout == "mid_attention"
        self.conv = (nn.Conv2d(channels, channels, 3, stride=2) if self.pad_right_bottom
                     else nn.Conv2d(channels, channels, 4, stride=2, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.pad_right_bottom else x)


class Upsample(nn.Module):
    """A convolution to 4x the channels, ordered (channel, row, column) for pixel shuffle, then a 3x3 one."""

    def __init__(self, channels: int, layout: str):
        super().__init__()
        kernel = 1 if layout == "mid_attention" else 3
        self.upscale_conv = nn.Conv2d(channels, 4 * channels, kernel, padding=kernel // 2)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pixel_shuffle(self.upscale_conv(x), 2))


class Block(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, resample: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList([Resnet(in_channels if i == 0 else out_channels, out_channels)
                                      for i in range(layers)])
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.resample is None else self.resample(x)


def stages(channels: tuple[int, ...], layers: int, resample) -> nn.ModuleList:
    """n - 1 blocks that resample, then a last one that does not; block i maps channels[i - 1] -> channels[i]."""
    return nn.ModuleList([Block(channels[max(i - 1, 0)], channels[i], layers,
                                resample(channels[i]) if i < len(channels) - 1 else None)
                          for i in range(len(channels))])


class Encoder(nn.Module):
    def __init__(self, spec: ReleaseVAESpec):
        super().__init__()
        ch = spec.encoder_channels
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        self.blocks = stages(ch, spec.encoder_layers, lambda c: Downsample(c, spec.layout))
        self.mid_block = MidBlock(ch[-1]) if spec.layout == "mid_attention" else None
        self.conv_norm_out = group_norm(ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * spec.latent_channels, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, 2 latent, H / f, W / f)
        x = self.conv_in(images)
        for block in self.blocks:
            x = block(x)
        if self.mid_block is not None:
            x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, spec: ReleaseVAESpec):
        super().__init__()
        ch = spec.decoder_channels
        self.conv_in = nn.Conv2d(spec.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0]) if spec.layout == "mid_attention" else None
        self.blocks = stages(ch, spec.decoder_layers, lambda c: Upsample(c, spec.layout))
        self.conv_norm_out = group_norm(ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 3, 3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:  # (N, latent, h, w) -> (N, 3, h f, w f)
        x = self.conv_in(latents)
        if self.mid_block is not None:
            x = self.mid_block(x)
        for block in self.blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class ReleaseVAE(nn.Module):
    """images (N, 3, H, W) in [-1, 1] <-> latents (N, C, H / f, W / f), frozen."""

    def __init__(self, spec: ReleaseVAESpec):
        super().__init__()
        if spec.layout not in LAYOUTS:
            raise VincieError(f"release VAE layout {spec.layout!r}: expected one of {', '.join(LAYOUTS)}")
        self.spec = spec
        self.channels = spec.latent_channels
        self.factor = spec.factor
        self.encoder = Encoder(spec)
        self.decoder = Decoder(spec)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        mean = self.encoder(images)[:, :self.channels]
        return (mean - self.spec.shift) * self.spec.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents / self.spec.scale + self.spec.shift)


def save_release_vae(spec: ReleaseVAESpec, weights: dict[str, torch.Tensor], out_dir: str) -> None:
    """A VAE directory: config.json (the spec) and model.safetensors, each written to a temp file, then renamed."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    config = os.path.join(out_dir, CONFIG)
    with open(config + ".tmp", "w") as f:
        json.dump({"format": "vincie-release-vae", **asdict(spec)}, f, indent=2)
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(out_dir, WEIGHTS + ".tmp"))
    os.replace(os.path.join(out_dir, WEIGHTS + ".tmp"), os.path.join(out_dir, WEIGHTS))
    os.replace(config + ".tmp", config)


def load_release_vae(path: str, factor: int) -> ReleaseVAE:
    """A directory written by `vincie convert release --vae` -> the frozen VAE; `factor` is checked (vae.factor)."""
    from safetensors.torch import load_file

    config = os.path.join(path, CONFIG)
    try:
        with open(config) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise VincieError(f"vae.path {path}: no readable {CONFIG} of a converted release VAE "
                          f"({type(exc).__name__}; write one with `vincie convert release --vae`)") from None
    if raw.pop("format", None) != "vincie-release-vae":
        raise VincieError(f"vae.path {path}: {CONFIG} is not a converted release VAE's (format vincie-release-vae)")
    for key in ("encoder_channels", "decoder_channels"):
        raw[key] = tuple(raw.get(key, ()))
    try:
        spec = ReleaseVAESpec(**raw)
    except TypeError as exc:
        raise VincieError(f"vae.path {path}: {CONFIG}: {exc}") from None
    if spec.factor != factor:
        raise VincieError(f"vae.factor is {factor} but the release VAE at {path} downsamples by {spec.factor}: "
                          f"set vae.factor={spec.factor}")
    vae = ReleaseVAE(spec)
    try:
        weights = load_file(os.path.join(path, WEIGHTS))
    except OSError as exc:
        raise VincieError(f"vae.path {path}: cannot read {WEIGHTS} ({exc})") from None
    missing, unexpected = vae.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise VincieError(f"vae.path {path}: {WEIGHTS} does not fit its {CONFIG} "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return vae.requires_grad_(False).eval()
