"""Precomputed features that may ride along in a session's sample (DESIGN.md "Session data"), written by
`vincie data precompute`:

    latents.safetensors   image (K+1, C, h, w), cur / next (K, C, h, w): the VAE latents of every image and mask
                          at the session's bucket; metadata: vae, height, width (the bucket in pixels)
    text.safetensors      000, 001, ... (L_i, D): the text encoder's output per instruction; metadata: text_encoder

The loader uses them in place of decoding and encoding when they were made for the run's config (same VAE and
bucket; same frozen text encoder). A trainable text encoder (the built-in hashed words) changes as it trains, so
its output is never precomputed.
"""

from __future__ import annotations

import torch
from safetensors.torch import load, save

from vincie.config import Config

LATENTS = "latents.safetensors"
TEXT = "text.safetensors"


def vae_id(cfg: Config) -> str:
    return f"space_to_depth/{cfg.vae.factor}" if cfg.vae.kind == "space_to_depth" else f"{cfg.vae.kind}/{cfg.vae.path}"


def text_encoder_id(cfg: Config) -> str | None:
    """None for a trainable encoder (never precomputed)."""
    t = cfg.text_encoder
    if t.kind == "hashed_words":
        return None
    return f"{t.kind}/{t.path}/{t.max_tokens}" + (f"/template={t.prompt_template}" if t.prompt_template else "")


def latents_bytes(latents: dict[str, torch.Tensor], vae: str, shape: tuple[int, int]) -> bytes:
    return save({k: v.contiguous().cpu() for k, v in latents.items()},
                metadata={"vae": vae, "height": str(shape[0]), "width": str(shape[1])})


def text_bytes(texts: list[torch.Tensor], encoder: str) -> bytes:
    return save({f"{i:03d}": t.contiguous().cpu() for i, t in enumerate(texts)}, metadata={"text_encoder": encoder})


def metadata(data: bytes) -> dict:
    """The safetensors header's metadata without reading the tensors (raises ValueError if unreadable)."""
    import json

    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8:
        raise ValueError("safetensors header runs past the end")
    return json.loads(data[8:8 + length]).get("__metadata__") or {}


def read_latents(data: bytes, vae: str, shape: tuple[int, int]) -> dict[str, torch.Tensor] | None:
    """The latents, or None when they were made for another VAE or bucket. Raises ValueError if unreadable."""
    meta = metadata(data)
    if (meta.get("vae"), meta.get("height"), meta.get("width")) != (vae, str(shape[0]), str(shape[1])):
        return None
    return load(data)


def read_text(data: bytes, encoder: str | None) -> list[torch.Tensor] | None:
    """The text features, or None when they were made by another encoder (or this one is trainable)."""
    if encoder is None or metadata(data).get("text_encoder") != encoder:
        return None
    tensors = load(data)
    return [tensors[f"{i:03d}"] for i in range(len(tensors))]
