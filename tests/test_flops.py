"""vincie.model.flops against independent counts: torch's flop counter on the tiny model (dense attention, as SDPA
computes it) and the attention mask itself (the allowed pairs)."""

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from data_index.synthetic.world import generate_session
from vincie.config import load_config
from vincie.model.attention import MaskSpec, dense_mask
from vincie.model.batch import SessionEncoder, collate
from vincie.model.flops import Workload, attention_pairs, forward_flops, training_flops
from vincie.model.mmdit import MMDiT, build_on_meta, count_parameters
from vincie.model.sequence import build_blocks, layout, pack
from vincie.model.text_encoder import build_text_encoder
from vincie.model.vae import build_vae
from vincie.sessions.loaded import from_session


def tiny_samples(n: int, seed: int = 0, *overrides: str):
    cfg = load_config("tiny", ["data.resolution=32", *overrides])
    encoder = SessionEncoder(cfg, build_vae(cfg.vae), build_text_encoder(cfg.text_encoder, cfg.model.text_dim),
                             torch.device("cpu"))
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    synth = load_config("tiny", ["synth.resolution=32"]).synth
    return cfg, [encoder.training_sample(from_session(generate_session(synth, "train", 0, i).session), rng, gen)
                 for i in range(n)]


def counted(model, batch, backward: bool) -> int:
    """FLOPs torch's flop counter sees; the math SDPA kernel, whose products it counts (the fused CPU kernel's it
    does not)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(batch.inputs)
        if backward:
            out.square().sum().backward()
    return counter.get_total_flops()


RELEASE = ["sequence.mode=release", "model.input_layout=release", "model.conditioning=timestep", "model.head_dim=24",
           "model.turn_token=true", "model.final_modulation=shared", "model.qkv_bias=false", "model.mlp_bias=false",
           "model.ffn_multiple=256", "model.rope_axes=thirds", "model.rope_time=after_text", "model.source=none",
           "model.output_head=linear", "model.text_projector=mlp_norm", "model.rope_dim=20"]


@pytest.mark.parametrize("overrides", [["sequence.mode=block_causal"], ["sequence.mode=full"], RELEASE],
                         ids=["block_causal", "full", "release"])
def test_forward_and_training_flops_match_the_flop_counter_on_the_tiny_model(overrides):
    cfg, samples = tiny_samples(1, 0, *overrides)
    torch.manual_seed(0)
    model = MMDiT(cfg.model)
    batch = collate(samples, torch.device("cpu"), cfg.model.text_dim)
    assert batch.work.tokens == batch.inputs.mask.num_tokens  # one row: no padding
    for backward, analytic in ((False, forward_flops), (True, training_flops)):
        reference = counted(model, batch, backward)
        estimate = analytic(cfg.model, batch.work, dense_attention=True)
        assert abs(estimate - reference) / reference < 0.02, (backward, estimate, reference)
    # the training count is about 3x the forward count
    assert 2.9 < training_flops(cfg.model, batch.work) / forward_flops(cfg.model, batch.work) <= 3


def allowed_pairs_of_mask(spec: MaskSpec) -> int:
    """True entries of the dense mask between real tokens (padding tokens see themselves, and only that)."""
    real = spec.token_sample >= 0  # (B, T)
    mask = dense_mask(spec)[:, 0] & real[:, :, None] & real[:, None, :]
    return int(mask.sum())


@pytest.mark.parametrize("mode", ["block_causal", "full"])
def test_allowed_pairs_equal_the_true_entries_of_the_attention_mask(mode):
    cfg, samples = tiny_samples(3, 1, f"sequence.mode={mode}", "sequence.drop_current_image=0.5")
    batch = collate(samples, torch.device("cpu"), cfg.model.text_dim)
    spec = batch.inputs.mask
    assert spec.num_tokens * spec.batch > batch.work.tokens  # rows of different lengths: padding present
    assert batch.work.attention_pairs == allowed_pairs_of_mask(spec)
    assert batch.work.dense_pairs == spec.batch * spec.num_tokens ** 2
    # micro-batches add up
    parts = [collate([s], torch.device("cpu"), cfg.model.text_dim).work for s in samples]
    total = sum(parts)
    assert total.attention_pairs == batch.work.attention_pairs and total.tokens == batch.work.tokens
    assert total.text_tokens + total.latent_tokens == total.tokens > 0


def test_packed_samples_never_count_pairs_across_samples():
    cfg = load_config("tiny")
    rng = np.random.default_rng(0)
    layouts = [layout(build_blocks(turns, True, cfg.sequence, rng), [5] * turns, (4, 4)) for turns in (1, 3, 2)]
    packed = pack(layouts)
    spec = MaskSpec.from_layouts([packed])
    assert attention_pairs(packed) == allowed_pairs_of_mask(spec) == sum(attention_pairs(l) for l in layouts)


def test_block_causal_pairs_by_hand():
    """I0 | T0 | I1 noisy | I1 clean | T1 | I2 noisy: 16-token images, 5-token texts."""
    cfg = load_config("tiny")
    blocks = build_blocks(2, False, cfg.sequence, None)
    row = layout(blocks, [5, 5], (4, 4))
    assert len(blocks) == 6
    expected = 16 * 16 + 5 * (5 + 16) + 16 * (16 + 21) + 16 * (16 + 21) + 5 * (5 + 37) + 16 * (16 + 42)
    assert attention_pairs(row) == expected
    assert attention_pairs(layout(blocks, [5, 5], (4, 4), full_attention=True)) == 74 ** 2


def test_3b_step_flops_are_about_six_parameters_per_token():
    """The usual 6 N D estimate where attention matters little (N: the parameters a token passes through, those
    of a shared layer per layer, from the model built on the meta device)."""
    m = load_config("3b").model
    work = Workload(text_tokens=0, latent_tokens=1024, blocks=1, attention_pairs=1024, dense_pairs=1024)
    per_layer = count_parameters(build_on_meta(m).layers[str(m.num_layers - 1)])
    estimate = 6 * m.num_layers * per_layer * work.tokens
    assert abs(training_flops(m, work) - estimate) / estimate < 0.05
