"""A session as the training loader hands it to the sequence builder: pixels at its aspect bucket as tensors, or
precomputed latents and text features; and cuts of it to fewer turns."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from vincie.sessions.session import Session


@dataclass
class LoadedSession:
    """A session ready for the sequence builder: pixels at its bucket, or precomputed latents."""
    key: str
    instructions: list[str]  # K
    has_masks: bool
    size: tuple[int, int]  # (H, W) of the bucket, pixels
    images: torch.Tensor | None  # (K+1, 3, H, W) float32 in [-1, 1]; None when `latents` holds them
    cur_masks: torch.Tensor | None  # (K, H, W) bool: changed region in image i; None without masks or with latents
    next_masks: torch.Tensor | None  # (K, H, W) bool: changed region in image i+1
    latents: dict[str, torch.Tensor] | None = None  # precomputed: image (K+1, C, h, w), cur / next (K, C, h, w)
    text: list[torch.Tensor] | None = None  # precomputed text-encoder output per instruction: (L_i, D)
    meta: dict = dataclasses.field(default_factory=dict)  # the json member's meta (source, transitions, ...)

    @property
    def turns(self) -> int:
        return len(self.instructions)


def from_session(session: Session) -> LoadedSession:
    """An in-memory Session (uint8 pixels, at its own size) as the loader would hand it over at that size."""
    def masks(ms):
        return torch.from_numpy(np.stack(ms)) if session.has_masks else None

    images = torch.from_numpy(np.stack(session.images)).permute(0, 3, 1, 2).float()  # (K+1, 3, H, W)
    return LoadedSession(key=session.key, instructions=list(session.instructions), has_masks=session.has_masks,
                         size=(session.height, session.width), images=(images - 127.5) / 127.5,
                         cur_masks=masks(session.cur_masks), next_masks=masks(session.next_masks),
                         meta=session.meta)


def sub_session(session: LoadedSession, first: int, turns: int) -> LoadedSession:
    """Turns [first, first + turns) with their images [first, first + turns]."""
    last = first + turns

    def cut(x, images: bool):
        return None if x is None else x[first:last + 1] if images else x[first:last]

    latents = None if session.latents is None else \
        {name: cut(x, name == "image") for name, x in session.latents.items()}
    return dataclasses.replace(session, instructions=session.instructions[first:last],
                               images=cut(session.images, True), cur_masks=cut(session.cur_masks, False),
                               next_masks=cut(session.next_masks, False), latents=latents,
                               text=cut(session.text, False))


def truncate(session: LoadedSession, turns: int) -> LoadedSession:
    return session if session.turns <= turns else sub_session(session, 0, turns)
