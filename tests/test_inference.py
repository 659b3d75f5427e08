"""The multi-turn editor: the block-causal KV cache gives what recomputing the whole sequence gives (5 turns, with
guidance, with chained masks), runs only the target's tokens per denoising step, is deterministic for a seed;
full-attention models recompute; given true images replace the model's own as context; `vincie bench inference`
runs."""

import json

import numpy as np
import pytest
import torch

from vincie.config import load_config
from vincie.errors import VincieError
from vincie.inference.editor import Context, Editor
from vincie.model.mmdit import MMDiT
from vincie.model.sequence import Block, BlockType, Role
from vincie.model.text_encoder import build_text_encoder
from vincie.model.vae import build_vae

from conftest import run_main
from helpers import MICRO_OVERRIDES

INSTRUCTIONS = [["move the red circle to the left", "make the blue square bigger", "remove the green triangle",
                 "turn the circle yellow", "add a small cross at the top"],
                ["recolour the square orange", "the triangle moves down", "delete the square",
                 "grow the circle", "move everything right"]]


def micro_editor(*overrides: str, dtype: torch.dtype = torch.float32) -> Editor:
    """A micro model with random weights (off adaLN-Zero, so every layer and the context matter)."""
    cfg = load_config("tiny", ["data.resolution=32", *MICRO_OVERRIDES, *overrides])
    torch.manual_seed(0)
    model, text_encoder = MMDiT(cfg.model), build_text_encoder(cfg.text_encoder, cfg.model.text_dim)
    with torch.no_grad():
        for p in [*model.parameters(), *text_encoder.parameters()]:
            p.normal_(0.0, 0.05)
    return Editor(cfg, model, build_vae(cfg.vae), text_encoder, torch.device("cpu"), dtype=dtype)


def sources(n: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]


class TokenCounter:
    """Wraps the model's forward and records how many tokens per row each call runs."""

    def __init__(self, editor: Editor):
        self.calls: list[int] = []
        forward = editor.model.forward

        def counted(inputs, cache=None):
            self.calls.append(inputs.mask.num_tokens)
            return forward(inputs, cache)

        editor.model.forward = counted


# the released VINCIE's architecture trained block-causally (docs/release.md, "Block-causal continued training"):
# its input channels, turn tokens, timestep-only conditioning and output layer; image time from 0
RELEASE_ARCHITECTURE = ("model.input_layout=release", "model.conditioning=timestep", "model.turn_token=true",
                        "model.final_modulation=shared", "model.qkv_bias=false", "model.mlp_bias=false",
                        "model.rope_axes=thirds", "model.rope_time=image_index", "model.ffn_multiple=256",
                        "model.head_dim=24", "text_encoder.prompt_template='Based on <IMG{turn}>, {instruction}. "
                        "Output <IMG{next_turn}>: '")


@pytest.mark.parametrize("cfg_scale, chain_masks, overrides", [(1.0, False, ()), (3.0, False, ()), (3.0, True, ()),
                                                               (3.0, True, ("model.source=channels",)),
                                                               (3.0, False, ("model.source=residual",
                                                                             "diffusion.prediction=x0")),
                                                               (3.0, False, ("model.source=residual",
                                                                             "diffusion.prediction=x0",
                                                                             "model.output_head=pointwise")),
                                                               (3.0, True, ("model.pooled_text=true",)),
                                                               (3.0, False, RELEASE_ARCHITECTURE)],
                         ids=["plain", "guidance", "guidance-chained-masks", "source-channels", "source-residual",
                              "pointwise-head", "pooled-text", "release-architecture"])
def test_kv_cache_equals_recompute_over_five_turns(cfg_scale, chain_masks, overrides):
    """In float64, so that the comparison is about the algorithm: in float32 the two ways differ by ~1e-6 (other
    summation orders), which can move one value across a uint8 rounding boundary of a generated image that then
    becomes context (the next test compares float32 outputs before rounding)."""
    editor = micro_editor(*overrides, dtype=torch.float64)
    results = {}
    for cached in (True, False):
        editor.use_cache = cached
        counter = TokenCounter(editor)
        results[cached] = editor.edit(sources(), INSTRUCTIONS, steps=2, cfg_scale=cfg_scale, seed=5,
                                      chain_masks=chain_masks)
        calls = counter.calls
        if cached:  # every step runs the 16 target tokens; prefills run one block (<= 32 text tokens + turn token)
            assert max(calls) <= 33 and calls.count(16) >= 5 * 2 * (3 if chain_masks else 1)
        else:  # the whole sequence, growing with the turns
            assert min(calls) > 16 and max(calls) > 5 * 16
    for cached, recomputed in zip(results[True], results[False]):
        assert len(cached) == 5
        for a, b in zip(cached, recomputed):
            # per pixel within 1e-4 (of the [0, 1] range): the uint8 images are identical
            assert np.abs(a.image.astype(np.float64) - b.image).max() / 255 <= 1e-4
            if chain_masks:
                assert np.array_equal(a.cur_mask, b.cur_mask) and np.array_equal(a.next_mask, b.next_mask)
    turns = [r.image for r in results[True][0]]
    assert any(not np.array_equal(turns[0], other) for other in turns[1:])  # the turns differ: a real session


def test_kv_cache_equals_recompute_in_float32_after_a_five_turn_context():
    """float32, guidance: the last turn's target (after five source images and instructions, masks included),
    sampled against the cache and by recomputing, before any rounding to pixels."""
    editor = micro_editor()
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2 * 5)]
    outputs = []
    for cached in (True, False):
        editor.use_cache = cached
        sessions = editor.extend([Context(), Context()], Block(BlockType.IMAGE, Role.CLEAN, 0, 0),
                                 editor.encode_images(images[:2]))
        for turn in range(5):
            uncond = sessions
            sessions = editor.extend(sessions, Block(BlockType.TEXT, Role.CLEAN, turn, turn),
                                     editor.encode_texts([x[turn] for x in INSTRUCTIONS]))
            for kind in (BlockType.CUR_MASK, BlockType.NEXT_MASK, BlockType.IMAGE)[:3 if turn < 4 else 2]:
                block = Block(kind, Role.CLEAN, turn + (kind == BlockType.IMAGE), turn + (kind == BlockType.IMAGE))
                clean = editor.encode_images(images[2 * turn:2 * turn + 2])
                sessions = editor.extend(sessions, block, clean)
                uncond = editor.extend(uncond, block, clean) if kind != BlockType.IMAGE else uncond
        target = Block(BlockType.IMAGE, Role.NOISY, 4, 5)
        outputs.append(editor.generate(sessions, uncond, target, 3, 3.0, torch.Generator().manual_seed(0)))
    assert len(sessions[0].blocks) == 1 + 5 * 3 + 4 and outputs[0].abs().mean() > 0.1
    assert float((outputs[0] - outputs[1]).abs().max()) / 2 <= 1e-4  # latents span [-1, 1]: per pixel of [0, 1]


def test_edit_is_deterministic_for_a_seed():
    editor = micro_editor()
    first = editor.edit(sources(1), INSTRUCTIONS[:1], steps=2, seed=3)[0]
    again = editor.edit(sources(1), INSTRUCTIONS[:1], steps=2, seed=3)[0]
    other = editor.edit(sources(1), INSTRUCTIONS[:1], steps=2, seed=4)[0]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, again))
    assert not np.array_equal(first[0].image, other[0].image)


def test_given_images_replace_the_models_own_edits_as_context():
    editor = micro_editor()
    free = editor.edit(sources(1), INSTRUCTIONS[:1], steps=2, seed=3)[0]
    # its own edits given back: the same context, so the same results (an off-by-one turn would differ)
    own = [sources(1)[0], *[r.image for r in free]]
    again = editor.edit(sources(1), INSTRUCTIONS[:1], steps=2, seed=3, given_images=[own])[0]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(free, again))
    # other images given: turn 1 has nothing given and is unchanged; every later turn edits another image
    forced = editor.edit(sources(1), INSTRUCTIONS[:1], steps=2, seed=3, given_images=[sources(6)])[0]
    assert np.array_equal(forced[0].image, free[0].image)
    assert not any(np.array_equal(a.image, b.image) for a, b in zip(forced[1:], free[1:]))


def test_several_input_images_need_a_release_mode_model():
    editor = micro_editor()
    with pytest.raises(VincieError, match="several input images per session: only release-mode models"):
        editor.edit([[sources(1)[0], sources(1)[0]]], [["make it red"]], steps=1)


def test_full_attention_models_recompute_with_full_attention():
    editor = micro_editor("sequence.mode=full")
    assert not editor.use_cache
    seen = []
    forward = editor.model.forward

    def recorded(inputs, cache=None):
        seen.append((inputs.mask.full_attention, cache, inputs.mask.num_tokens))
        return forward(inputs, cache)

    editor.model.forward = recorded
    editor.edit(sources(1), [INSTRUCTIONS[0][:2]], steps=2, cfg_scale=1.0)
    assert seen and all(full and cache is None for full, cache, _ in seen)
    assert max(n for _, _, n in seen) > 3 * 16  # turn 2 runs I0, T0, I1, T1 and the target


def test_bench_inference_reports_both_ways(capsys):
    """A smoke test of the command (no timing is asserted): both ways ran the same session, their outputs agree
    to within one uint8 level (float32), and peak memory was measured."""
    micro = list(MICRO_OVERRIDES)
    result = run_main(capsys, "bench", "inference", "--json", "--turns", "2", "--steps", "2", "--repeats", "1",
                      "data.resolution=32", *micro, check=True)
    report = json.loads(result.stdout)
    assert report["turns"] == 2 and report["tokens_per_image"] == 16
    assert len(report["cache_s"]) == len(report["recompute_s"]) == 1 and report["speedup"] > 0
    assert report["max_pixel_difference"] <= 1
    assert all(peak is None or peak > 0 for peak in report["peak_memory_mib"].values())


@pytest.mark.slow
def test_bench_train_compares_eager_and_compiled_steps(capsys):
    """A smoke test of `vincie bench train` (no timing is asserted): both modes ran every pass, and the compiled
    forward computes what the eager one does."""
    result = run_main(capsys, "bench", "train", "--json", "--batches", "1", "--repeats", "1", "data.resolution=32",
                      "train.batch_size=2", *MICRO_OVERRIDES, check=True)
    report = json.loads(result.stdout)
    assert report["batches"] == 1 and all(len(s) == 1 for s in report["seconds"].values())
    assert report["speedup"] > 0 and report["relative_output_difference"] < 1e-4
