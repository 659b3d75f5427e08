"""A model directory, as `vincie export` and `vincie convert release` write it (vincie.inference.export):

    DIR/model.safetensors   every parameter, whole, by training name     DIR/config.json   the inference config
    DIR/vae/                a converted release VAE (vae.kind release), when the model uses one

Here: its names, how its config is read (JSON only) and how its weights are checked against a model, low enough
for training to start from one (train.init_from) as well as inference to load one.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
import torch.nn as nn

from vincie.config import Config, ConfigError, from_dict, validate
from vincie.errors import VincieError

FORMAT = "vincie-inference"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
RELEASE_VAE_DIR = "vae"  # a converted release VAE, inside the model directory (vae.path relative to it)


def is_export(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG)) and os.path.isfile(os.path.join(path, WEIGHTS))


def read_config(path: str) -> tuple[Config, dict]:
    """An export directory -> (its inference Config, validated; the raw config.json)."""
    file = os.path.join(path, CONFIG)
    try:
        with open(file) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise VincieError(f"{path}: no {CONFIG} (expected a directory written by vincie export)") from None
    except json.JSONDecodeError as exc:
        raise VincieError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise VincieError(f"{file}: not a vincie export (expected \"format\": \"{FORMAT}\")")
    if raw.get("format_version") != FORMAT_VERSION:
        raise VincieError(f"{file}: format_version {raw.get('format_version')!r}; this vincie reads "
                          f"{FORMAT_VERSION}")
    sections = {name: raw.get(name, {}) for name in ("model", "sequence", "data", "text_encoder", "vae", "diffusion")}
    try:
        cfg = from_dict(Config, sections)
        validate(cfg)
    except ConfigError as exc:
        raise VincieError(f"{file}: {exc}") from None
    if cfg.vae.kind == "release" and not os.path.isabs(cfg.vae.path):  # a converted VAE inside the directory
        cfg = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, path=os.path.join(os.path.abspath(path),
                                                                                       cfg.vae.path)))
    return cfg, raw


def check_weights(model: nn.Module, text_encoder: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Training-named weights against the MMDiT `model` (the meta device is enough) and the text encoder (its
    parameters are weights only when it is trainable): every parameter given with its shape, nothing left over."""
    expected = {f"dit.{n}": p.shape for n, p in model.named_parameters()}
    if getattr(text_encoder, "trainable", False):
        expected |= {f"text_encoder.{n}": p.shape for n, p in text_encoder.named_parameters()}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise VincieError(f"{source}: weights do not fit the model config (missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]})")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != tuple(shape):
            raise VincieError(f"{source}: weight {name} has shape {tuple(weights[name].shape)}, the model config "
                              f"expects {tuple(shape)}")
