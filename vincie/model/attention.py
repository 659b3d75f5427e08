"""Attention over block layouts, one rule and two backends (DESIGN.md "Sequence and attention").

- `flex`: torch flex attention with a BlockMask built from the block ids, so tiles the rule masks out are
  skipped (GPU training and inference). PyTorch 2.13 has no flex-attention backward on CPU.
- `sdpa`: scaled_dot_product_attention with a dense boolean mask (CPU training, and the reference in tests).

Both read the rule from one function, `allowed`, written with tensor indexing only so that it serves as the
flex `mask_mod` and, broadcast over all index pairs, builds the dense mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from vincie.model.sequence import Layout

Backend = Literal["flex", "sdpa"]


@dataclass
class MaskSpec:
    """The attention rule's inputs for a batch of rows padded to T tokens."""
    token_block: torch.Tensor  # (B, T) int64: block index per token (padding: a block of its own)
    token_sample: torch.Tensor  # (B, T) int64: packed sample per token (padding: -1 - token index, unique)
    block_noisy: torch.Tensor  # (B, NB) bool: NOISY blocks (padding blocks are not)
    full_attention: bool

    @property
    def batch(self) -> int:
        return int(self.token_block.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.token_block.shape[1])

    @staticmethod
    def from_layouts(layouts: list[Layout], num_tokens: int | None = None) -> "MaskSpec":
        T = num_tokens or max(l.num_tokens for l in layouts)
        NB = max(len(l.blocks) for l in layouts) + 1
        B = len(layouts)
        token_block = torch.full((B, T), NB - 1, dtype=torch.int64)
        token_sample = -1 - torch.arange(T).repeat(B, 1)
        block_noisy = torch.zeros((B, NB), dtype=torch.bool)
        for row, l in enumerate(layouts):
            if l.num_tokens > T:
                raise ValueError(f"row {row} has {l.num_tokens} tokens, more than the {T} allowed")
            token_block[row, :l.num_tokens] = l.token_block
            token_sample[row, :l.num_tokens] = l.token_sample
            block_noisy[row, :len(l.blocks)] = l.block_noisy
        if any(l.full_attention != layouts[0].full_attention for l in layouts):
            raise ValueError("all rows of a batch must use the same attention mode")
        return MaskSpec(token_block, token_sample, block_noisy, layouts[0].full_attention)

    def to(self, device: torch.device | str) -> "MaskSpec":
        return MaskSpec(self.token_block.to(device), self.token_sample.to(device), self.block_noisy.to(device),
                        self.full_attention)


def allowed(spec: MaskSpec, b: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """True where query token q of row b may attend to key token kv (broadcasting index tensors).

    Block-causal: kv is in q's own block, or in an earlier block that is not NOISY (see vincie.model.sequence).
    Full: any token of the same packed sample. Never across packed samples; padding sees only itself."""
    return token_rule(spec.token_block, spec.token_sample, token_clean(spec), spec.full_attention, b, q, kv)


def token_clean(spec: MaskSpec) -> torch.Tensor:
    """(B, T) bool: the token's block is not NOISY (padding's block is not)."""
    return ~spec.block_noisy.gather(1, spec.token_block)


def token_rule(token_block: torch.Tensor, token_sample: torch.Tensor, clean: torch.Tensor, full_attention: bool,
               b: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """`allowed` from per-token tensors only, all (B, T): what flex's mask_mod captures, so that a compiled
    kernel depends on the rows and the length, not on how many blocks the rows hold."""
    same_sample = token_sample[b, q] == token_sample[b, kv]
    if full_attention:
        return same_sample
    q_block, kv_block = token_block[b, q], token_block[b, kv]
    return same_sample & ((q_block == kv_block) | ((kv_block < q_block) & clean[b, kv]))


def dense_mask(spec: MaskSpec) -> torch.Tensor:
    """(B, 1, T, T) bool, for SDPA."""
    index = torch.arange(spec.num_tokens, device=spec.token_block.device)
    b = torch.arange(spec.batch, device=spec.token_block.device)[:, None, None]
    return allowed(spec, b, index[None, :, None], index[None, None, :])[:, None]


def tile_maps(spec: MaskSpec, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full), (B, 1, n, n) int8 with n = ceil(T / tile): which (query tile, key tile) pairs hold some
    allowed pairs but not only those, and which hold only allowed pairs. Computed from blocks, never from the
    T x T mask: a tile spans a run of whole or cut blocks, and whether a query may see a key depends only on
    their blocks (one block is one sample's), so a tile pair has an allowed pair iff some pair of its blocks
    is allowed, and all its pairs are allowed iff all pairs of its blocks are. Padding tokens (the last block
    id, each its own sample) see only themselves: diagonal tiles only, never full. A tile cut short by the end
    of the sequence is never full (as flex's create_block_mask counts it)."""
    B, T = spec.token_block.shape
    NB = spec.block_noisy.shape[1]
    device = spec.token_block.device
    n = -(-T // tile)
    ids = torch.arange(NB, device=device)
    exists = torch.zeros(B, NB, dtype=torch.bool, device=device).scatter_(1, spec.token_block, True)
    block_sample = torch.zeros(B, NB, dtype=torch.int64, device=device).scatter_(1, spec.token_block,
                                                                                 spec.token_sample)
    real = exists & (ids < NB - 1)  # (B, NB): blocks with tokens, padding's excluded
    block_allowed = real[:, :, None] & real[:, None, :] & (block_sample[:, :, None] == block_sample[:, None, :])
    if not spec.full_attention:  # the block-causal rule: its own block, or an earlier one that is not NOISY
        earlier_context = (ids[None, None, :] < ids[None, :, None]) & ~spec.block_noisy[:, None, :]
        block_allowed &= (ids[:, None] == ids[None, :]) | earlier_context

    def prefix(x: torch.Tensor) -> torch.Tensor:  # (B, NB, NB) -> (B, NB + 1, NB + 1) 2D prefix sums
        return torch.nn.functional.pad(x.to(torch.int64).cumsum(1).cumsum(2), (1, 0, 1, 0))

    starts = torch.arange(n, device=device) * tile
    ends = torch.clamp(starts + tile, max=T)  # (n,): one past each tile's last token
    lo = spec.token_block[:, starts]  # (B, n): first and last block of each tile (block ids never decrease)
    hi = spec.token_block[:, ends - 1]
    P = prefix(block_allowed)
    rows = torch.arange(B, device=device)[:, None, None]
    qlo, qhi, klo, khi = lo[:, :, None], hi[:, :, None] + 1, lo[:, None, :], hi[:, None, :] + 1
    count = P[rows, qhi, khi] - P[rows, qlo, khi] - P[rows, qhi, klo] + P[rows, qlo, klo]  # (B, n, n)
    blocks_in = exists.to(torch.int64).cumsum(1)
    blocks_in = torch.nn.functional.pad(blocks_in, (1, 0))
    existing = blocks_in.gather(1, hi + 1) - blocks_in.gather(1, lo)  # (B, n): blocks with tokens in each tile
    whole = ends - starts == tile  # (n,): tiles not cut by the end
    full = (count == existing[:, :, None] * existing[:, None, :]) & whole[None, :, None] & whole[None, None, :]
    has_padding = hi == NB - 1  # (B, n): padding sits at the end of a row
    diagonal = torch.eye(n, dtype=torch.bool, device=device)[None]
    some = (count > 0) | (diagonal & has_padding[:, :, None])
    return (some & ~full)[:, None].to(torch.int8), full[:, None].to(torch.int8)


def ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., n, n) 0/1 tile map -> (tiles per row, their column indices first), flex's ordered layout."""
    return dense.sum(-1).to(torch.int32), torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)


def flex_block_mask(spec: MaskSpec, block_size: int = 128):
    """flex attention's BlockMask of the rule, built from tiles (`tile_maps`): no T x T mask is made, which
    create_block_mask would make (its mask_mod evaluated at every pair: gigabytes at 16k tokens)."""
    from torch.nn.attention.flex_attention import BlockMask

    # dynamo guards on the shapes of what mask_mod captures: (B, T) tensors only (block_noisy is (B, blocks))
    token_block, token_sample, clean, full_attention = (spec.token_block, spec.token_sample, token_clean(spec),
                                                        spec.full_attention)

    def mask_mod(b, h, q_idx, kv_idx):
        return token_rule(token_block, token_sample, clean, full_attention, b, q_idx, kv_idx)

    partial, full = tile_maps(spec, block_size)
    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=block_size, mask_mod=mask_mod,
                                    seq_lengths=(spec.num_tokens, spec.num_tokens))


_compiled_flex = None


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, compiled: bool = True):
    from torch.nn.attention.flex_attention import flex_attention as flex

    global _compiled_flex
    if not compiled:
        return flex(q, k, v, block_mask=block_mask)
    if _compiled_flex is None:
        # one kernel per shape: the trainer keeps the lengths few (data.pad_multiple). dynamic=True would serve all
        # lengths with one kernel, but inductor's CPU flex template fails to compile it (PyTorch 2.13)
        _compiled_flex = torch.compile(flex, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, backend: Backend) -> torch.Tensor:
    """q, k, v: (B, H, T, D) -> (B, H, T, D). `mask` is what `prepare_mask` returned for this backend."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if backend == "flex":
        if torch.is_autocast_enabled(q.device.type):  # flex is not autocast: norms and RoPE leave q, k in fp32
            dtype = torch.get_autocast_dtype(q.device.type)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        return flex_attention(q, k, v, mask, compiled=True)
    raise ValueError(f"unknown attention backend {backend!r} (expected 'flex' or 'sdpa')")


def prepare_mask(spec: MaskSpec, backend: Backend, block_size: int = 128):
    """Built once per batch and shared by every layer."""
    return dense_mask(spec) if backend == "sdpa" else flex_block_mask(spec, block_size)
