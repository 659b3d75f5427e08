"""The sequence builder and the attention rule, as properties over random sessions, and flex == SDPA."""

import json

import numpy as np
import pytest
import torch

from vincie.config import SequenceConfig
from vincie.model.attention import MaskSpec, allowed, dense_mask, flex_attention, flex_block_mask
from vincie.model.sequence import BlockType, Role, build_blocks, full_attention_blocks, layout, pack

from conftest import run_main

GRID = (2, 3)


def random_layout(rng, full=False):
    turns = int(rng.integers(1, 6))
    blocks = build_blocks(turns, bool(rng.random() < 0.8), SequenceConfig(), rng)
    if full:
        blocks = full_attention_blocks(blocks, rng)
    text_lengths = [int(rng.integers(1, 5)) for _ in range(turns)]
    return layout(blocks, text_lengths, GRID, full_attention=full)


def reference_allowed(blocks, qb, kb):
    """DESIGN.md's rule, written from the twins rather than from block order."""
    if qb == kb:
        return True
    if blocks[kb].role == Role.NOISY:
        return False  # nothing attends to a NOISY block except that block itself
    q = blocks[qb]
    if q.role == Role.NOISY:  # every CLEAN/TEXT block strictly before its clean twin
        twins = [j for j, b in enumerate(blocks) if b.role == Role.CLEAN and (b.type, b.source) == (q.type, q.source)]
        limit = twins[0] if twins else qb + 1
        return kb < limit
    return kb < qb  # a CLEAN or TEXT block: every CLEAN/TEXT block before it


def block_mask_of(l):
    mask = dense_mask(MaskSpec.from_layouts([l]))[0, 0]
    tb = l.token_block
    return mask, tb


@pytest.mark.parametrize("seed", range(20))
def test_block_causal_rule_matches_design(seed):
    rng = np.random.default_rng(seed)
    l = random_layout(rng)
    mask, tb = block_mask_of(l)
    nb = len(l.blocks)
    for qb in range(nb):
        for kb in range(nb):
            sub = mask[tb == qb][:, tb == kb]
            expected = reference_allowed(l.blocks, qb, kb)
            assert bool(sub.all()) == expected and bool(sub.any()) == expected, (qb, kb, l.blocks)
            if expected and kb != qb:
                assert kb < qb  # no block sees a later block
            if l.blocks[kb].role == Role.NOISY and qb != kb:
                assert not expected  # nothing sees a NOISY block but itself


@pytest.mark.parametrize("seed", range(10))
def test_full_mode_sees_all_and_has_one_target_last(seed):
    rng = np.random.default_rng(100 + seed)
    l = random_layout(rng, full=True)
    assert [b.role for b in l.blocks].count(Role.NOISY) == 1 and l.blocks[-1].role == Role.NOISY
    mask, _ = block_mask_of(l)
    assert mask.all()


def test_packed_samples_never_see_each_other():
    rng = np.random.default_rng(7)
    parts = [random_layout(rng) for _ in range(3)]
    packed = pack(parts)
    mask = dense_mask(MaskSpec.from_layouts([packed]))[0, 0]
    sample = packed.token_sample
    assert not mask[sample[:, None] != sample[None, :]].any()
    # within each sample the rule is the unpacked one
    start = 0
    for p in parts:
        own = dense_mask(MaskSpec.from_layouts([p]))[0, 0]
        n = p.num_tokens
        assert torch.equal(mask[start:start + n, start:start + n], own)
        start += n


def test_without_dropout_the_sequence_follows_the_design_order():
    blocks = build_blocks(2, True, SequenceConfig(), rng=None)
    kinds = [(b.type.name, b.role.name, b.source) for b in blocks]
    assert kinds == [
        ("IMAGE", "CLEAN", 0), ("TEXT", "CLEAN", 0),
        ("CUR_MASK", "NOISY", 0), ("CUR_MASK", "CLEAN", 0), ("NEXT_MASK", "NOISY", 0), ("NEXT_MASK", "CLEAN", 0),
        ("IMAGE", "NOISY", 1), ("IMAGE", "CLEAN", 1),
        ("TEXT", "CLEAN", 1),
        ("CUR_MASK", "NOISY", 1), ("CUR_MASK", "CLEAN", 1), ("NEXT_MASK", "NOISY", 1), ("NEXT_MASK", "CLEAN", 1),
        ("IMAGE", "NOISY", 2),
    ]
    assert [b.task for b in blocks if b.role == Role.NOISY] == ["csp", "nsp", "nip", "csp", "nsp", "nip"]


def test_context_dropout_rates_follow_config():
    cfg = SequenceConfig()
    rng = np.random.default_rng(0)
    n = 4000
    counts = {"text": 0, "image0": 0, "masks": 0, "cur": 0}
    for _ in range(n):
        blocks = build_blocks(1, True, cfg, rng)
        types = [(b.type, b.role) for b in blocks]
        counts["text"] += (BlockType.TEXT, Role.CLEAN) not in types
        counts["image0"] += (BlockType.IMAGE, Role.CLEAN) not in types
        has_any_mask = any(t in (BlockType.CUR_MASK, BlockType.NEXT_MASK) for t, _ in types)
        counts["cur"] += (BlockType.CUR_MASK, Role.NOISY) in types
        counts["masks"] += has_any_mask
        assert (BlockType.IMAGE, Role.NOISY) in types  # the next image is always a target
    assert abs(counts["text"] / n - cfg.drop_text) < 0.02
    assert abs(counts["image0"] / n - cfg.drop_current_image) < 0.025
    # masks present (0.8) and kept (0.3 each): P(cur present) = 0.8 * 0.3
    assert abs(counts["cur"] / n - cfg.masks_present * (1 - cfg.drop_current_mask)) < 0.025
    assert abs(counts["masks"] / n - cfg.masks_present * (1 - 0.7 * 0.7)) < 0.025


def test_positions_twins_share_and_text_is_1d():
    blocks = build_blocks(2, True, SequenceConfig(), rng=None)
    l = layout(blocks, [3, 4], GRID)
    for j, b in enumerate(blocks):
        tokens = l.positions[l.token_block == j]
        if b.type == BlockType.TEXT:
            assert (tokens[:, 0] == tokens[:, 1]).all() and (tokens[:, 1] == tokens[:, 2]).all()
            assert torch.equal(tokens[:, 0], torch.arange(tokens[0, 0], tokens[0, 0] + len(tokens)))
        else:
            assert len(tokens) == GRID[0] * GRID[1] and len(set(tokens[:, 0].tolist())) == 1
            twin = [i for i, c in enumerate(blocks) if (c.type, c.source) == (b.type, b.source) and i != j]
            for i in twin:
                assert torch.equal(l.positions[l.token_block == i], tokens)
    latent_time = {(b.type, b.source): int(l.positions[l.token_block == j][0, 0]) for j, b in enumerate(blocks)
                   if b.type != BlockType.TEXT}
    # images at consecutive times whatever the text between them; masks at the time of the image they cover
    assert latent_time[(BlockType.IMAGE, 1)] - latent_time[(BlockType.IMAGE, 0)] == 1
    assert latent_time[(BlockType.IMAGE, 2)] - latent_time[(BlockType.IMAGE, 1)] == 1
    assert latent_time[(BlockType.CUR_MASK, 1)] == latent_time[(BlockType.IMAGE, 1)]
    assert latent_time[(BlockType.NEXT_MASK, 1)] == latent_time[(BlockType.IMAGE, 2)]
    text_max = int(l.positions[torch.tensor([blocks[int(j)].type == BlockType.TEXT for j in l.token_block])].max())
    assert text_max < min(latent_time.values())


def attention_inputs(seed, B=2, H=2, D=16):
    rng = np.random.default_rng(seed)
    rows = [pack([random_layout(rng) for _ in range(2)]) for _ in range(B)]
    spec = MaskSpec.from_layouts(rows)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, spec.num_tokens, D, generator=g) for _ in range(3))
    return spec, q, k, v


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("seed", range(3))
def test_flex_block_mask_equals_dense_sdpa(seed):
    spec, q, k, v = attention_inputs(seed)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(spec))
    out = flex_attention(q, k, v, flex_block_mask(spec, block_size=16), compiled=False)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(8))
def test_tile_built_block_mask_equals_create_block_mask(seed):
    """flex_block_mask builds the BlockMask from blocks; flex's create_block_mask evaluates the rule at every
    (query, key) pair. Every field must agree: packed rows, padding, tiles cut by the sequence's end, both
    attention modes."""
    from torch.nn.attention.flex_attention import create_block_mask

    rng = np.random.default_rng(seed)
    B, full = int(rng.integers(1, 4)), seed % 4 == 3  # two of the seeds in full-attention mode
    rows = [pack([random_layout(rng, full) for _ in range(int(rng.integers(1, 4)))]) for _ in range(B)]
    spec = MaskSpec.from_layouts(rows, num_tokens=max(r.num_tokens for r in rows) + int(rng.integers(0, 40)))
    for tile in (8, 16, 32):
        built = flex_block_mask(spec, tile)
        reference = create_block_mask(lambda b, h, q, kv: allowed(spec, b, q, kv), B, None, spec.num_tokens,
                                      spec.num_tokens, device="cpu", BLOCK_SIZE=tile)
        assert int(reference.kv_num_blocks.sum()) > 0 and (tile > 8 or int(reference.full_kv_num_blocks.sum()) > 0)
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                     "q_indices", "full_q_num_blocks", "full_q_indices"):
            assert torch.equal(getattr(built, name), getattr(reference, name)), (tile, name)


def test_bench_blockmask_builds_the_same_mask_both_ways(capsys):
    """A smoke test of `vincie bench blockmask` (no timing is asserted): rows of 1024 tokens packed with whole
    sessions, both builders timed, and the two BlockMasks the same."""
    result = run_main(capsys, "bench", "blockmask", "--json", "--repeats", "1", "data.max_tokens=1024", check=True)
    report = json.loads(result.stdout)
    assert report["rows"] == 2 and report["tokens_per_row"] == 1024
    assert max(report["session_tokens"]) <= 1024 and sum(report["session_tokens"]) <= report["rows"] * 1024
    assert report["identical"] and 0 < report["sparsity_percent"] < 100
    for name in ("from_tiles", "every_pair"):
        assert len(report["seconds"][name]) == 1 and report["median_s"][name] > 0
    assert report["peak_memory_mib"]["every_pair"] is None or report["peak_memory_mib"]["every_pair"] > 0


def test_flex_block_mask_skips_masked_tiles():
    blocks = build_blocks(5, True, SequenceConfig(), rng=None)
    l = layout(blocks, [8] * 5, (8, 8))
    block_mask = flex_block_mask(MaskSpec.from_layouts([l]), block_size=64)
    assert block_mask.sparsity() > 40  # percent of tiles never computed


def fixed_length_inputs(seed: int, T: int = 320, B: int = 2, H: int = 2, D: int = 16):
    """Rows of random packed sessions padded to T tokens: the same shape, another number of blocks per seed."""
    rng = np.random.default_rng(seed)
    rows = []
    while len(rows) < B:
        row = pack([random_layout(rng) for _ in range(int(rng.integers(1, 3)))])
        if row.num_tokens <= T:
            rows.append(row)
    spec = MaskSpec.from_layouts(rows, num_tokens=T)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    return spec, q, k, v


def test_flex_mask_mod_captures_only_row_by_token_tensors():
    """A compiled kernel is guarded on the shapes of what mask_mod captures: they must not include the number of
    blocks, which changes from batch to batch at a fixed length (data.pad_multiple)."""
    shapes = set()
    for seed in range(3):
        spec, *_ = fixed_length_inputs(seed)
        cells = [c.cell_contents for c in flex_block_mask(spec, 16).mask_mod.__closure__]
        shapes |= {tuple(c.shape) for c in cells if isinstance(c, torch.Tensor)}
        assert spec.block_noisy.shape[1] != spec.num_tokens
    assert shapes == {(2, 320)}


@pytest.mark.slow
def test_compiled_flex_equals_dense_sdpa_without_recompiling_for_other_block_counts():
    block_counts = set()
    for seed in range(3):  # one length, 2 rows, another number of blocks each time
        spec, q, k, v = fixed_length_inputs(seed)
        block_counts.add(spec.block_noisy.shape[1])
        reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(spec))
        with torch._dynamo.config.patch(error_on_recompile=seed > 0):  # the first call may compile this shape
            out = flex_attention(q, k, v, flex_block_mask(spec, block_size=16), compiled=True)
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert len(block_counts) == 3
