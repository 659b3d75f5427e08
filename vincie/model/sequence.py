"""Session -> ordered blocks -> per-token layout (DESIGN.md "Sequence and attention").

A training sequence is a list of blocks, each with a type (TEXT, IMAGE, CUR_MASK, NEXT_MASK), a turn and a role:

    turn 0: IMAGE I0 | TEXT T0 | CUR_MASK C0 | NEXT_MASK N0 | IMAGE I1
    turn 1:            TEXT T1 | CUR_MASK C1 | NEXT_MASK N1 | IMAGE I2   ...

Block-causal teacher forcing: every target (each mask, each image after I0) appears twice, a NOISY copy that
carries the loss, placed immediately before its CLEAN copy that serves as context for what follows. With that
order the attention rule of DESIGN.md becomes one line over block positions:

    q may attend to k  <=>  k is q's own block, or k comes earlier and is not NOISY

(a CLEAN/TEXT block sees itself and every CLEAN/TEXT block before it; a NOISY block sees itself and every
CLEAN/TEXT block before its clean twin; nobody else sees a NOISY block). Full mode keeps the context before
one chosen target plus that NOISY target, all attending to all.

Context composition (per turn): the current image, the current mask and the next mask can each be dropped,
masks can be absent for the whole sequence, and the instruction can be dropped (for classifier-free guidance).
A dropped block is removed from the sequence, not zeroed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import torch

from vincie.config import SequenceConfig


class BlockType(enum.IntEnum):
    TEXT = 0
    IMAGE = 1
    CUR_MASK = 2
    NEXT_MASK = 3


class Role(enum.IntEnum):
    CLEAN = 0  # context (text blocks are CLEAN too)
    NOISY = 1  # generation target, carries the loss


TASK_OF = {BlockType.IMAGE: "nip", BlockType.CUR_MASK: "csp", BlockType.NEXT_MASK: "nsp"}
TASKS = ("nip", "csp", "nsp")
LATENT_TIME_OFFSET = 4096  # latent time positions start past any text position (64 turns x 64 tokens)


@dataclass(frozen=True)
class Block:
    type: BlockType
    role: Role
    turn: int  # the turn the block belongs to: I0 and T0, C0, N0, I1 are turn 0
    source: int  # which session element: image index for IMAGE, turn index for TEXT and masks

    @property
    def task(self) -> str | None:
        return TASK_OF[self.type] if self.role == Role.NOISY else None


def target_pair(kind: BlockType, turn: int, source: int) -> list[Block]:
    return [Block(kind, Role.NOISY, turn, source), Block(kind, Role.CLEAN, turn, source)]


def build_blocks(turns: int, has_masks: bool, cfg: SequenceConfig, rng: np.random.Generator | None) -> list[Block]:
    """The block-causal teacher-forcing sequence of a session with `turns` turns. With `rng` None nothing is
    dropped (the full sequence); otherwise context composition dropout applies with cfg's probabilities."""

    def keep(p: float) -> bool:
        return rng is None or rng.random() >= p

    masks_on = has_masks and (rng is None or rng.random() < cfg.masks_present)
    blocks: list[Block] = []
    if keep(cfg.drop_current_image):
        blocks.append(Block(BlockType.IMAGE, Role.CLEAN, 0, 0))
    for i in range(turns):
        if keep(cfg.drop_text):
            blocks.append(Block(BlockType.TEXT, Role.CLEAN, i, i))
        if masks_on and keep(cfg.drop_current_mask):
            blocks += target_pair(BlockType.CUR_MASK, i, i)
        if masks_on and keep(cfg.drop_next_mask):
            blocks += target_pair(BlockType.NEXT_MASK, i, i)
        blocks.append(Block(BlockType.IMAGE, Role.NOISY, i, i + 1))
        # the clean copy of I_{i+1} is the current image of turn i+1: dropped with its probability, and not needed
        # at all after the last turn (nothing follows it)
        if i + 1 < turns and keep(cfg.drop_current_image):
            blocks.append(Block(BlockType.IMAGE, Role.CLEAN, i + 1, i + 1))
    return blocks


def release_blocks(turns: int, cfg: SequenceConfig, rng: np.random.Generator | None) -> list[Block]:
    """sequence.mode release: a session cut to `turns` turns as the released VINCIE trains it: its images I_0 ..
    I_turns, all NOISY (each carries the loss; the model sees the context's clean latents in its input channels),
    then its instructions T_0 .. T_{turns-1}, each dropped with sequence.drop_text (for guidance)."""
    images = [Block(BlockType.IMAGE, Role.NOISY, max(i - 1, 0), i) for i in range(turns + 1)]
    return images + [Block(BlockType.TEXT, Role.CLEAN, i, i) for i in range(turns)
                     if rng is None or rng.random() >= cfg.drop_text]


def full_attention_blocks(blocks: list[Block], rng: np.random.Generator) -> list[Block]:
    """Full mode: one NOISY target chosen uniformly, preceded by the context (CLEAN/TEXT) blocks before it."""
    targets = [j for j, b in enumerate(blocks) if b.role == Role.NOISY]
    j = targets[int(rng.integers(0, len(targets)))]
    return [b for b in blocks[:j] if b.role == Role.CLEAN] + [blocks[j]]


@dataclass
class Layout:
    """Per-token description of one sequence (or several packed ones). T tokens, B blocks."""
    blocks: list[Block]
    block_start: torch.Tensor  # (B,) int64: first token of each block
    block_length: torch.Tensor  # (B,) int64
    token_block: torch.Tensor  # (T,) int64: block index of each token, non-decreasing
    token_sample: torch.Tensor  # (T,) int64: which packed sample each token belongs to
    block_noisy: torch.Tensor  # (B,) bool
    positions: torch.Tensor  # (T, 3) int64: RoPE coordinates (time, row, col); text tokens (p, p, p)
    full_attention: bool

    @property
    def num_tokens(self) -> int:
        return int(self.token_block.shape[0])


def layout(blocks: list[Block], text_lengths: list[int], grid: tuple[int, int], full_attention: bool = False,
           sample: int = 0, rope_time: str = "offset") -> Layout:
    """Blocks -> token layout. `text_lengths[i]` is the token count of instruction i; every latent block
    (image or mask) has grid[0] x grid[1] tokens.

    Positions: text tokens count up from 0 over the sequence and get (p, p, p), i.e. 1D RoPE. Latent tokens get
    (start + time, row, col) (3D RoPE), where time is the index of the image the block shows or is aligned with:
    I_k -> k, C_i -> i (a region of I_i), N_i -> i + 1 (a region of I_{i+1}), and start is model.rope_time's:
    LATENT_TIME_OFFSET ("offset": so the offset between two images does not depend on how long the instructions
    between them are), the sequence's text length ("after_text", the release's 3B) or 0 ("image_index", its 7B).
    A NOISY copy shares its positions with its CLEAN twin."""
    gh, gw = grid
    text_total = sum(text_lengths[b.source] for b in blocks if b.type == BlockType.TEXT)
    start_time = {"offset": LATENT_TIME_OFFSET, "after_text": text_total, "image_index": 0}[rope_time]
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    starts, lengths, token_block, positions = [], [], [], []
    p, start = 0, 0
    for index, block in enumerate(blocks):
        if block.type == BlockType.TEXT:
            n = text_lengths[block.source]
            pos = torch.arange(p, p + n)
            positions.append(torch.stack([pos, pos, pos], dim=1))
            p += n
        else:
            n = gh * gw
            time = torch.full((n,), start_time + block.source + (block.type == BlockType.NEXT_MASK))
            positions.append(torch.stack([time, rows, cols], dim=1))
        starts.append(start)
        lengths.append(n)
        token_block.append(torch.full((n,), index))
        start += n
    return Layout(
        blocks=blocks,
        block_start=torch.tensor(starts, dtype=torch.int64),
        block_length=torch.tensor(lengths, dtype=torch.int64),
        token_block=torch.cat(token_block).to(torch.int64),
        token_sample=torch.full((start,), sample, dtype=torch.int64),
        block_noisy=torch.tensor([b.role == Role.NOISY for b in blocks], dtype=torch.bool),
        positions=torch.cat(positions).to(torch.int64),
        full_attention=full_attention,
    )


def pack(layouts: list[Layout]) -> Layout:
    """Several sequences into one row: block indices are offset so they stay increasing; tokens of different
    samples never attend to each other (token_sample)."""
    if any(l.full_attention != layouts[0].full_attention for l in layouts):
        raise ValueError("cannot pack block-causal and full-attention sequences together")
    blocks, starts, token_block, token_sample = [], [], [], []
    block_offset = token_offset = 0
    for sample, l in enumerate(layouts):
        blocks += l.blocks
        starts.append(l.block_start + token_offset)
        token_block.append(l.token_block + block_offset)
        token_sample.append(torch.full_like(l.token_sample, sample))
        block_offset += len(l.blocks)
        token_offset += l.num_tokens
    return Layout(
        blocks=blocks,
        block_start=torch.cat(starts),
        block_length=torch.cat([l.block_length for l in layouts]),
        token_block=torch.cat(token_block),
        token_sample=torch.cat(token_sample),
        block_noisy=torch.cat([l.block_noisy for l in layouts]),
        positions=torch.cat([l.positions for l in layouts]),
        full_attention=layouts[0].full_attention,
    )
