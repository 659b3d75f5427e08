"""The block-causal KV cache: context keys and values computed once, reused by every denoising step and turn.

Why it is exact. In block-causal mode a query may attend to a key iff the key is in the query's own block or in
an earlier block that is not NOISY (vincie.model.sequence). At inference the sequence is [CLEAN/TEXT context blocks...,
one NOISY target], so:
- nothing attends to the target except the target itself: every context token's hidden state, at every layer,
  is the same whatever the target holds;
- the adaLN modulation is per token, from the token's own block (t = 0 for clean and text blocks, its type and
  turn), so it does not depend on the target's timestep either;
- a context block sees itself and the blocks before it, never a later one.
So each layer's keys and values of a context block are a function of that block and the blocks before it only.
They are computed once, when the block joins the context, by running the block's own tokens against the cached
keys and values of the blocks before it (the same attention the whole-sequence forward gives them), and kept.
Each denoising step then runs only the target's tokens against the cache. A finished image joins the context as
a clean block the same way, and so does the next turn's instruction. RoPE positions, block timestep, type and
turn of the new tokens are those of the whole sequence (vincie.inference.editor computes them with the same `layout`).

Layout. A context keeps, per block, `BlockKV`: for every layer its keys and values, (heads, n, D) each, after
QK-norm and RoPE. Contexts may share blocks by reference (the unconditional row of guidance reuses the
conditional row's blocks before this turn's instruction; nothing is copied). For one forward over new tokens,
`KVCache.build` lays the rows' contexts out as one [B, heads, L, D] tensor per layer, padded to the longest
row with a key mask, so attention is one batched call; that layout (a copy per row) lives for one target's
sampling or one block's prefill.

Full-attention models (sequence.mode: full) cannot use it: there the context attends to the target.
"""

from __future__ import annotations

import torch

BlockKV = dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer index -> (keys, values), each (heads, n, D)


class LayerCache:
    """One layer's keys and values for a batch of rows: [B, heads, L + T, D], the rows' contexts (padded to L)
    followed by room for the T new tokens, which every forward writes in place (no copy of the context)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, context_length: int, record: bool):
        self.keys, self.values, self.L, self.record = keys, values, context_length, record
        self.new: tuple[torch.Tensor, torch.Tensor] | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The new tokens' keys and values (B, heads, T, D) -> [context, new] (B, heads, L + T, D); the new ones
        are kept when recording (a block joining the context)."""
        self.keys[:, :, self.L:] = k
        self.values[:, :, self.L:] = v
        if self.record:
            self.new = (k, v)
        return self.keys, self.values


class KVCache:
    """The context of B rows for forwards over T new tokens per row (vincie.model.mmdit.MMDiT.forward's `cache`)."""

    def __init__(self, layers: dict[int, LayerCache], context_valid: torch.Tensor):
        self.layers = layers
        self.context_valid = context_valid  # (B, L) bool: real context tokens (False: padding)
        self.mask: torch.Tensor | None = None  # the rows' layout is fixed for the cache's life: built once

    @staticmethod
    def build(contexts: list[list[BlockKV]], layers: list[int], heads: int, head_dim: int, new_tokens: int,
              device: torch.device, dtype: torch.dtype, record: bool = False) -> "KVCache":
        """contexts[b]: row b's context, one BlockKV per block in sequence order; `new_tokens`: T. `record`: keep
        the new tokens' keys and values (read them with `new_blocks`)."""
        lengths = [sum(block[layers[0]][0].shape[1] for block in row) for row in contexts]
        B, L = len(contexts), max(lengths, default=0)
        context_valid = torch.arange(L, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
        cached = {}
        for layer in layers:
            keys = torch.zeros(B, heads, L + new_tokens, head_dim, device=device, dtype=dtype)
            values = torch.zeros_like(keys)
            for b, row in enumerate(contexts):
                start = 0
                for block in row:
                    k, v = block[layer]
                    keys[b, :, start:start + k.shape[1]] = k
                    values[b, :, start:start + k.shape[1]] = v
                    start += k.shape[1]
            cached[layer] = LayerCache(keys, values, L, record)
        return KVCache(cached, context_valid)

    def layer(self, index: int) -> LayerCache:
        return self.layers[index]

    def attention_mask(self, own: torch.Tensor) -> torch.Tensor:
        """own (B, 1, T, T): the rule among the new tokens -> (B, 1, T, L + T): every new token also sees every
        real context token (the new block comes after all of them and they are all clean)."""
        if self.mask is None:
            B, _, T, _ = own.shape
            self.mask = torch.cat([self.context_valid[:, None, None, :].expand(B, 1, T, -1), own], dim=-1)
        return self.mask

    def new_blocks(self, lengths: list[int]) -> list[BlockKV]:
        """After a recording forward: per row, the new block's keys and values without its padding (row b's
        block has lengths[b] tokens, placed first)."""
        return [{layer: (cache.new[0][b, :, :n].clone(), cache.new[1][b, :, :n].clone())
                 for layer, cache in self.layers.items()} for b, n in enumerate(lengths)]
