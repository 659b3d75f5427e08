"""DALI decoding against the PIL reference: exact 8-bit pixels for JPEG and PNG, resizing to the aspect-ratio
buckets within a pixel level (masks equal except where nearest neighbour is a tie), bad members named; and
non-square buckets through the sequence builder and the model."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from data_index.synthetic.world import generate_session
from vincie.config import SynthConfig, load_config
from vincie.data.decode import DaliDecoder, PilDecoder, Request, crop_box, nearest_bucket
from vincie.model.batch import SessionEncoder, collate, tensor_to_image
from vincie.model.components import build_components
from vincie.sessions.loaded import from_session
from vincie.sessions.session import SessionFormatError, encode_mask
from vincie.training.loss import flow_loss_sums
from vincie.training.parallel import init_distributed

from helpers import MICRO_OVERRIDES

SQUARE_AND_WIDE = [(32, 32), (24, 40), (40, 24)]  # data.buckets [1:1, 16:9, 9:16] at resolution 32


def smooth_image(rng, height, width):
    """A photo-like image (smooth colour fields plus texture), so resizing errors are not hidden by flat areas."""
    small = (rng.random((height // 8 + 1, width // 8 + 1, 3)) * 255).astype(np.uint8)
    base = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC)).astype(np.int16)
    return np.clip(base + rng.integers(-20, 21, (height, width, 3)), 0, 255).astype(np.uint8)


def encode(array, fmt, **options):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **options)
    return buf.getvalue()


def members(height, width, count=3, seed=0, fmt="JPEG", **options):
    rng = np.random.default_rng(seed)
    ext = "jpg" if fmt == "JPEG" else "png"
    images = [(f"{i:03d}.img.{ext}", encode(smooth_image(rng, height, width), fmt, **options)) for i in range(count)]
    masks = [(f"{i:03d}.{kind}.png", encode_mask(rng.random((height, width)) < 0.3))
             for i in range(count - 1) for kind in ("cur", "next")]
    return images, masks


def nearest_candidates(mask, box, shape):
    """The mask sampled at the output pixel centres, by the nearest source pixel, and (where a centre falls
    exactly on a source pixel edge, so either neighbour is nearest) by the other one: DALI's float32 arithmetic
    may pick either side of such a tie. -> (4, h, w) bool: each choice of side per axis."""
    (h, w), (x0, y0, x1, y1) = shape, box
    axes = []
    for start, end, n, size in ((y0, y1, h, mask.shape[0]), (x0, x1, w, mask.shape[1])):
        centre = start + (np.arange(n) + 0.5) * (end - start) / n
        nearest = np.floor(centre).astype(int)
        other = np.where(np.isclose(centre, np.round(centre)), nearest - 1, nearest)
        axes.append([np.clip(nearest, 0, size - 1), np.clip(other, 0, size - 1)])
    return np.stack([mask[rows][:, cols] for rows in axes[0] for cols in axes[1]])


@pytest.mark.parametrize("fmt, options", [("JPEG", {"quality": 95, "subsampling": 0}),
                                          ("JPEG", {"quality": 80}),  # PIL's default 4:2:0 chroma subsampling
                                          ("PNG", {})])
def test_dali_decodes_exactly_the_pixels_pil_decodes(fmt, options):
    images, masks = members(40, 56, fmt=fmt, **options)
    frames = DaliDecoder([(40, 56)], threads=2, max_batch=8).decode("k", images, masks, 56, 40)  # no resize
    for (name, data), pixels in zip(images, frames.images):
        reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert np.array_equal(tensor_to_image(pixels), reference), name
    for (name, data), mask in zip(masks, frames.masks):
        assert np.array_equal(mask.numpy(), np.asarray(Image.open(io.BytesIO(data))) >= 128), name


@pytest.mark.parametrize("source", [(64, 64), (48, 80), (80, 48), (30, 30)])
@pytest.mark.parametrize("resolution", [32, 96])
def test_dali_resizes_to_the_buckets_as_the_reference_does(source, resolution):
    height, width = source
    shapes = [(h * resolution // 32, w * resolution // 32) for h, w in SQUARE_AND_WIDE]
    images, masks = members(height, width, fmt="PNG")
    shape = nearest_bucket(width, height, shapes)
    dali = DaliDecoder(shapes, threads=2, max_batch=8).decode("k", images, masks, width, height)
    pil = PilDecoder(shapes, threads=2).decode("k", images, masks, width, height)
    assert dali.images.shape == pil.images.shape == (3, 3, *shape)
    levels = (dali.images - pil.images).abs().max().item() * 127.5  # in 0..255 pixel levels
    # PIL resizes 8-bit images in two passes, each rounded to 8 bits (<= 0.5 level each; the second averages the
    # first's errors with non-negative weights), with fixed-point weights: at most one level. Measured on these
    # images: PIL's bicubic is off by 8-13 levels, its bilinear without the edge padding by 2-3 when downscaling.
    assert levels <= 1.0 + 1e-3, levels
    box = crop_box(width, height, shape)
    for (name, data), got, reference in zip(masks, dali.masks.numpy(), pil.masks.numpy()):
        candidates = nearest_candidates(np.asarray(Image.open(io.BytesIO(data))) >= 128, box, shape)
        assert np.array_equal(candidates[0], reference), name  # the reference is the first choice
        assert (candidates == got).any(axis=0).all(), name  # DALI: the nearest pixel, either side of a tie


def test_bucket_choice_and_centre_crop():
    assert nearest_bucket(1920, 1080, SQUARE_AND_WIDE) == (24, 40)
    assert nearest_bucket(1080, 1920, SQUARE_AND_WIDE) == (40, 24)
    assert nearest_bucket(1100, 1000, SQUARE_AND_WIDE) == (32, 32)
    assert crop_box(80, 48, (32, 32)) == (16.0, 0.0, 64.0, 48.0)
    assert crop_box(64, 64, (24, 40)) == (0.0, 12.8, 64.0, 51.2)


def test_bad_members_are_named_and_the_decoder_recovers():
    images, masks = members(32, 32, fmt="PNG")
    decoder = DaliDecoder([(32, 32)], threads=2, max_batch=8)
    truncated = [images[0], (images[1][0], images[1][1][:len(images[1][1]) // 2]), images[2]]
    with pytest.raises(SessionFormatError, match="001.img.png is truncated") as info:
        decoder.decode("k", truncated, masks, 32, 32)
    assert info.value.reason == "corrupt_image"
    broken = bytearray(images[2][1])
    broken[200:400] = bytes(200)  # keeps the end marker: only the decoder can tell
    with pytest.raises(SessionFormatError, match="cannot decode 002.img.png") as info:
        decoder.decode("k", images[:2] + [(images[2][0], bytes(broken))], masks, 32, 32)
    assert info.value.reason == "corrupt_image"
    with pytest.raises(SessionFormatError, match="000.img.png is 32x32, expected 48x32"):
        decoder.decode("k", images, masks, 48, 32)
    assert decoder.decode("k", images, masks, 32, 32).images.shape == (3, 3, 32, 32)  # usable after the errors


def test_sessions_decoded_together_equal_sessions_decoded_alone_and_a_bad_one_fails_alone():
    decoder = DaliDecoder(SQUARE_AND_WIDE, threads=2, max_batch=8)  # 3 sessions of 3 images: several runs
    sessions = [members(64, 64, seed=0, fmt="PNG"), members(48, 80, seed=1), members(30, 30, seed=2, fmt="PNG")]
    sizes = [(64, 64), (80, 48), (30, 30)]
    requests = [Request(f"s{k}", images, masks, w, h, nearest_bucket(w, h, SQUARE_AND_WIDE))
                for k, ((images, masks), (w, h)) in enumerate(zip(sessions, sizes))]
    together = decoder.decode_many(requests)
    for r, frames in zip(requests, together):
        alone = decoder.decode(r.key, r.images, r.masks, r.width, r.height)
        assert torch.equal(frames.images, alone.images) and torch.equal(frames.masks, alone.masks)
    broken = bytearray(requests[1].masks[2][1])
    broken[100:200] = bytes(100)
    requests[1].masks[2] = (requests[1].masks[2][0], bytes(broken))
    results = decoder.decode_many(requests)
    assert isinstance(results[1], SessionFormatError) and "s1: cannot decode 001.cur.png" in str(results[1])
    for k in (0, 2):
        assert torch.equal(results[k].images, together[k].images)


def test_non_square_buckets_train_through_the_sequence_builder_and_the_model():
    init_distributed()
    cfg = load_config("tiny", ["data.buckets=['1:1', '16:9']",
                               *MICRO_OVERRIDES])
    model, vae, text = build_components(cfg, torch.device("cpu"))
    encoder = SessionEncoder(cfg, vae, text, torch.device("cpu"))
    session = generate_session(SynthConfig(resolution=64, min_turns=2, max_turns=2), "train", 0, 0).session
    images, masks = members(45, 80, count=3, fmt="PNG")
    frames = DaliDecoder([(32, 32), (24, 40)], threads=2, max_batch=8).decode("wide", images, masks, 80, 45)
    wide = from_session(session)
    wide.size, wide.images = (24, 40), frames.images
    wide.cur_masks, wide.next_masks = frames.masks[0::2], frames.masks[1::2]
    square = from_session(generate_session(SynthConfig(resolution=32, min_turns=2, max_turns=2), "train", 0, 1).session)
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    samples = [encoder.training_sample(s, rng, gen) for s in (wide, square)]
    assert samples[0].grid == (3, 5) and samples[1].grid == (4, 4)  # 8-pixel cells (VAE 4 x patch 2)
    batch = collate(samples, torch.device("cpu"), cfg.model.text_dim)
    latent_positions = batch.inputs.positions[:, 0][batch.inputs.positions[:, 0, 0] >= 4096]
    assert latent_positions[:, 1].max() == 2 and latent_positions[:, 2].max() == 4  # rows 0..2, columns 0..4
    out = model(batch.inputs)
    assert out.shape == batch.inputs.latent_tokens.shape
    loss, _ = flow_loss_sums(out, batch, cfg.diffusion.loss_weights, cfg.diffusion.prediction)
    loss.backward()
    assert all(p.grad is not None for p in model.dit.final.parameters())
