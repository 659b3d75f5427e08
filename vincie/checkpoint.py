"""Training checkpoints: one directory per step, published atomically, and a `latest` pointer moved after.

    OUT/checkpoints/step-000200/state.pt    model, EMA, optimizer, scheduler, RNG states, step, data position
    OUT/checkpoints/latest                  "step-000200"

A checkpoint is written to `step-000200.tmp-*` and renamed when complete; `latest` is rewritten (temp file,
rename) only after that, so a run killed mid-save resumes from the previous complete checkpoint. Issue [3/8]
moves the state to megatron-core dist_checkpointing (any TP/PP layout); the directory rules stay.
"""

from __future__ import annotations

import os
import shutil

import torch

from vincie import storage

LATEST = "latest"


def checkpoint_dir(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def save(out_dir: str, step: int, state: dict, keep: int) -> str:
    root = checkpoint_dir(out_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, step_name(step))
    tmp = storage.temp_name(final)
    os.makedirs(tmp)
    torch.save(state, os.path.join(tmp, "state.pt"))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    storage.write_bytes_atomic(os.path.join(root, LATEST), step_name(step).encode())
    steps = sorted(n for n in os.listdir(root) if n.startswith("step-") and not storage.is_temp_name(n))
    for old in steps[:-keep]:
        shutil.rmtree(os.path.join(root, old))
    for name in os.listdir(root):  # temp directories of saves that were killed
        if storage.is_temp_name(name) and os.path.isdir(os.path.join(root, name)) and name != os.path.basename(tmp):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return final


def latest(out_dir: str) -> str | None:
    """The directory of the newest complete checkpoint, or None."""
    pointer = os.path.join(checkpoint_dir(out_dir), LATEST)
    if not os.path.exists(pointer):
        return None
    path = os.path.join(checkpoint_dir(out_dir), open(pointer).read().strip())
    return path if os.path.isdir(path) else None


def load(path: str) -> dict:
    return torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
