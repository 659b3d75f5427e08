"""The MM-DiT: shapes for every preset (3b/7b on the meta device), zero init, and the attention rule as the
whole model sees it; activation recomputation against the plain forward."""

import re
from pathlib import Path

import pytest
import torch

from vincie.config import latent_input_width, load_config
from vincie.model.batch import collate, patchify, unpatchify
from vincie.model.mmdit import PointwiseHead, build_on_meta, count_parameters
from vincie.model.sequence import BlockType, Role
from vincie.model.vae import SpaceToDepthVAE
from vincie.training.parallel import init_distributed

from helpers import micro_batch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def dist():
    init_distributed()


def test_output_is_one_velocity_per_latent_token_and_zero_at_init():
    cfg, model, samples = micro_batch()
    batch = collate(samples, torch.device("cpu"), cfg.model.text_dim)
    out = model(batch.inputs)
    assert out.shape == batch.inputs.latent_tokens.shape == (batch.inputs.latent_index.numel(), 192)
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: the final layer starts at zero


@pytest.mark.parametrize("preset, low, high", [("tiny", 3e5, 5e7), ("small", 5e7, 5e8), ("3b", 3.0e9, 3.6e9),
                                               ("7b", 7.0e9, 7.5e9)])
def test_presets_build_and_match_the_documented_sizes(preset, low, high):
    cfg = load_config(preset)
    model = build_on_meta(cfg.model)
    count = count_parameters(model)
    assert low < count < high
    doc = (REPO / "docs" / "model.md").read_text()
    assert f"{count:,}" in doc, f"docs/model.md must state the {preset} parameter count {count:,}"


def test_3b_forward_shapes_on_meta():
    cfg = load_config("3b")
    model = build_on_meta(cfg.model)
    _, _, samples = micro_batch(n=1)
    batch = collate(samples, torch.device("cpu"), cfg.model.text_dim)
    inputs = batch.inputs
    n_lat = inputs.latent_index.numel()
    inputs.text_tokens = torch.zeros(inputs.text_tokens.shape[0], cfg.model.text_dim)
    inputs.text_turn = torch.full((inputs.text_tokens.shape[0],), -1)  # the 3b's turn tokens: none here
    inputs.latent_tokens = torch.zeros(n_lat, latent_input_width(cfg.model))  # 33 values per cell x 2 x 2
    assert inputs.latent_tokens.shape[1] == 132
    out = model(inputs.to("meta"))
    assert out.shape == (n_lat, 64)


def perturb_and_compare(model, cfg, samples, block_index: int):
    """Changes one block's input tokens; returns which blocks' outputs changed."""
    batch = collate(samples, torch.device("cpu"), cfg.model.text_dim)
    base = model(batch.inputs)
    sample = samples[0]
    latent_blocks = [j for j, b in enumerate(sample.blocks) if b.type != BlockType.TEXT]
    k = latent_blocks.index(block_index)
    sample.latents[k] = sample.latents[k] + torch.randn_like(sample.latents[k])
    moved = model(collate(samples, torch.device("cpu"), cfg.model.text_dim).inputs)
    changed = (moved - base).abs().amax(dim=-1) > 1e-6  # per latent token
    size = sample.latents[0].shape[0]  # tokens per latent block; one row, so its latent tokens come in block order
    per_block = changed.reshape(len(latent_blocks), size).any(dim=1)
    return {latent_blocks[i] for i in range(len(latent_blocks)) if per_block[i]}


def test_model_respects_block_causal_attention():
    cfg, model, samples = micro_batch(n=1, seed=3)
    for p in model.parameters():  # leave adaLN-Zero so information flows
        torch.nn.init.normal_(p, std=0.05)
    blocks = samples[0].blocks
    for j, block in enumerate(blocks):
        if block.type == BlockType.TEXT:
            continue
        changed = perturb_and_compare(model, cfg, samples, j)
        if block.role == Role.NOISY:
            assert changed == {j}, (j, block, changed)  # nothing attends to a NOISY block but itself
        else:
            assert min(changed) == j and j in changed  # no earlier block sees it
            later_context = {i for i in range(j + 1, len(blocks)) if blocks[i].type != BlockType.TEXT}
            assert later_context <= changed  # every later latent block sees it


def test_model_doc_names_the_release_values():
    doc = (REPO / "docs" / "model.md").read_text()
    assert re.search(r"hidden 2560, 32 layers, 20 heads", doc)


def test_source_channels_give_each_target_the_image_its_turn_edits():
    """model.source=channels: every NOISY latent token carries the same token of the current image of its turn
    (I_k for the turn-k targets: next image, current and next mask), zeros where the context dropped I_k, and the
    targets' outputs depend on it."""
    cfg, model, samples = micro_batch(n=4, seed=3, **{"model.source": "channels"})
    checked = 0
    for s in samples:
        latent_blocks = [b for b in s.blocks if b.type != BlockType.TEXT]
        clean_images = {b.source: x for b, x in zip(latent_blocks, s.latents)
                        if b.type == BlockType.IMAGE and b.role == Role.CLEAN}
        for b, source in zip(latent_blocks, s.sources):
            if b.role == Role.CLEAN or b.turn not in clean_images:
                assert source is None
            else:
                assert torch.equal(source, clean_images[b.turn])
                checked += 1
    assert checked >= 4
    batch = collate(samples, torch.device("cpu"), cfg.model.text_dim)
    assert batch.inputs.latent_source.shape == batch.inputs.latent_tokens.shape
    assert batch.inputs.latent_source[~batch.target_select].abs().sum() == 0
    with torch.no_grad():
        for p in model.parameters():  # off adaLN-Zero, so that the inputs reach the output
            p.add_(torch.randn_like(p) * 0.05)
        before = model(batch.inputs)
        batch.inputs.latent_source = batch.inputs.latent_source + torch.randn_like(batch.inputs.latent_source)
        after = model(batch.inputs)
    moved = (after - before).abs().amax(dim=1) > 1e-4  # (N_lat,)
    assert moved[batch.target_select].all()


@pytest.mark.parametrize("head", ["linear", "pointwise"])
def test_source_residual_starts_as_a_copy_of_the_edited_image(head):
    """model.source=residual: with the final layer (and the pointwise head's last layer) at its zero init, every
    next-image target predicts exactly the image its turn edits (zeros where the context dropped it); mask targets
    predict zero."""
    cfg, model, samples = micro_batch(n=4, seed=3, **{"model.source": "residual", "diffusion.prediction": "x0",
                                                      "model.output_head": head})
    batch = collate(samples, torch.device("cpu"), cfg.model.text_dim)
    with torch.no_grad():
        out = model(batch.inputs)
    token_type = torch.cat([torch.full((len(x),), int(b.type)) for s in samples
                            for b, x in zip([b for b in s.blocks if b.type != BlockType.TEXT], s.latents)])
    image = token_type == int(BlockType.IMAGE)
    assert torch.equal(out[image], batch.inputs.latent_source[image])
    assert out[~image].abs().max() == 0 and batch.inputs.latent_source[image & batch.target_select].abs().sum() > 0


def test_pointwise_head_maps_each_pixel_by_its_own_values():
    """model.output_head=pointwise on the space_to_depth latent: a point is one pixel's RGB. Reference computed in
    image space: decoding the head's output for tokens made from two images (source, noisy) gives, at every pixel,
    the shared MLP applied to that pixel's own source and noisy RGB (and the features, zero here)."""
    cfg = load_config("tiny", ["model.output_head=pointwise"])
    m = cfg.model
    torch.manual_seed(0)
    head = PointwiseHead(m.head_channels, m.head_features, m.head_hidden)
    torch.nn.init.normal_(head.mlp[2].weight)  # off its zero init
    vae = SpaceToDepthVAE(cfg.vae.factor)
    source, noisy = torch.rand(2, 1, 3, 32, 32) * 2 - 1  # (1, 3, H, W) each
    side = 32 // (cfg.vae.factor * m.patch_size)  # tokens per image side
    tokens = lambda image: patchify(vae.encode(image), m.patch_size)[0]  # (side * side, 48 * p * p)
    features = torch.zeros(side * side, 48 * m.patch_size ** 2 // 3 * m.head_features)
    with torch.no_grad():
        out = head(features, tokens(source), tokens(noisy))  # (side * side, 48 * p * p)
        picture = vae.decode(unpatchify(out[None], m.patch_size, m.latent_channels, (side, side)))  # (1, 3, 32, 32)
        pixels = lambda image: image[0].permute(1, 2, 0).reshape(-1, 3)  # (H*W, 3)
        expected = head.mlp(torch.cat([torch.zeros(32 * 32, m.head_features), pixels(source), pixels(noisy)], -1))
    assert torch.allclose(pixels(picture), expected, atol=1e-5)


def test_pooled_text_gives_each_target_the_mean_of_its_turns_instruction():
    """model.pooled_text: a NOISY block of turn k is conditioned on the mean of T_k's features (zeros where T_k was
    dropped, and for clean blocks), and its tokens' outputs depend on it."""
    cfg, model, samples = micro_batch(n=4, seed=5, **{"model.pooled_text": "true", "sequence.drop_text": "0.5"})
    dropped = 0
    for s in samples:
        texts = {b.turn: t for b, t in zip([b for b in s.blocks if b.type == BlockType.TEXT], s.text)}
        for b, row in zip(s.blocks, s.block_text):
            if b.role == Role.NOISY and b.turn in texts:
                assert torch.allclose(row, texts[b.turn].mean(dim=0))
            else:
                assert row.abs().sum() == 0
                dropped += b.role == Role.NOISY
    assert dropped >= 1
    batch = collate(samples, torch.device("cpu"), cfg.model.text_dim)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        before = model(batch.inputs)
        batch.inputs.block_text = batch.inputs.block_text + torch.randn_like(batch.inputs.block_text)
        after = model(batch.inputs)
    moved = (after - before).abs().amax(dim=1) > 1e-4
    assert moved[batch.target_select].all()


def test_recompute_gives_the_same_loss_and_gradients():
    """train.recompute=full: every layer runs again in the backward from its saved input; the result must be the
    plain forward's, bit for bit on one CPU (same kernels, same order)."""
    results = []
    for recompute in ("none", "full"):
        cfg, model, samples = micro_batch(n=2, seed=3, **{"train.recompute": recompute})
        assert model.dit.recompute is (recompute == "full")
        torch.manual_seed(0)  # the zero-initialised layers would give zero gradients to most weights
        for p in model.parameters():
            p.data.normal_(0, 0.05)
        calls = []
        for layer in model.dit.layers.values():
            layer.register_forward_pre_hook(lambda *_: calls.append(1))
        batch = collate(samples, torch.device("cpu"), cfg.model.text_dim)
        loss = model(batch.inputs).square().mean()
        loss.backward()
        assert len(calls) == cfg.model.num_layers * (2 if recompute == "full" else 1)  # rerun in the backward
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (plain_loss, plain), (rc_loss, rc) = results
    assert torch.equal(plain_loss, rc_loss) and plain.keys() == rc.keys()
    for name, grad in plain.items():
        assert grad is not None and grad.norm() > 0, f"{name} has no gradient: the check would be empty"
        assert torch.equal(grad, rc[name]), name
