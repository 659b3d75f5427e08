"""`vincie convert release`: the released VINCIE DiT (its `.pth` and YAML config) -> vincie's MM-DiT with the release
options, and its VAE -> vincie's ReleaseVAE (docs/release.md).

Every release tensor has one place in vincie's model; where the layouts differ the converter permutes:

    release                                         vincie (MMDiT parameter names)
    vid_in.proj            (dim, (ph pw c))         patch_embed              columns (c ph pw)
    txt_in                                          text_proj
    emb_in.proj_in / proj_hid                       t_embedder.mlp.0 / .2    proj_in's columns: [sin, cos] -> [cos, sin]
    emb_in.proj_out        rows (d, layer, g)       adaln                    rows (layer, g, d); g = shift, scale, gate
    blocks.i.attn.proj_qkv.{vid,txt,all} (o h d)    layers.i.{latent,text}.linear_qkv   rows (h o d), per head
    blocks.i.attn.proj_out / norm_q / norm_k        linear_proj / q_layernorm / k_layernorm
    blocks.i.mlp.*.proj_in_gate, proj_in            linear_fc1               rows interleaved (gate, up) per unit
    blocks.i.mlp.*.proj_out                         linear_fc2
    blocks.i.ada.*.{attn,mlp}_{shift,scale,gate}    modulation (6, H)        scale - 1 (vincie scales by 1 + s)
    vid_out_norm.weight, vid_out_ada.out_*          final.norm_weight, final.modulation (2, H)
    vid_out.proj           rows (ph pw c)           final.linear             rows (c ph pw)
    prompt_id_embedding.embedding                   turn_tokens
    blocks.i.attn.rope.rope.freqs (a buffer)        checked against vincie's RoPE frequencies, not stored

With `--vae`, the release's causal 3D VAE becomes its single-image 2D network (vincie.model.release_vae): each 3D
kernel is the sum of its temporal taps; an upsampler's first convolution keeps the rows of its first frame,
reordered from (x y z c) (3B) or (z x y c) (7B) to pixel shuffle's (c x y); names move from the release's blocks
(down_blocks.i.downsamplers.0 / downsampler, mid_block.attentions.0, final_block) to vincie's (blocks.i.resample,
mid_block.attention, the last of blocks).

`.pth` files are read with `torch.load(weights_only=True)` (tensors and containers only, no code), wrapper prefixes
(`module.`, `_orig_mod.`, `_flops_wrap_module.`) are stripped, and every key must be used: a key left over or
missing is an error naming it.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import math
import operator
import os
import re

import torch
import yaml

from vincie.config import Config, ModelConfig, head_dim
from vincie.errors import VincieError
from vincie.model.mmdit import rope_axes

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_flops_wrap_module.")
RELEASE_ROPE_TIME = {"mmrope3d": "after_text", "mmrope3d_v3": "image_index"}  # where image time starts
NORMS = {"fusedrms", "rms"}


class ConversionError(VincieError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# The release's config


def evaluate(expression: str) -> float:
    """Arithmetic on numbers only (the release's ${eval:'6 * 2560'} after substitution)."""
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv}

    def walk(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](walk(node.left), walk(node.right))
        raise ConversionError(f"cannot evaluate {expression!r}: only arithmetic on numbers is understood")

    return walk(ast.parse(expression, mode="eval").body)


def resolve(section: dict) -> dict:
    """The interpolations the release's configs use inside a section: ${.key} and ${eval:'...'}."""
    out = dict(section)
    for _ in range(len(out)):
        for key, value in out.items():
            if not isinstance(value, str) or "${" not in value:
                continue
            text = re.sub(r"\$\{\.(\w+)\}", lambda m: str(out[m.group(1)]), value)
            match = re.fullmatch(r"\$\{eval:'(.*)'\}", text)
            if match and "${" not in match.group(1):
                result = evaluate(match.group(1))
                out[key] = int(result) if float(result).is_integer() else result
            elif "${" not in text:
                out[key] = int(text) if text.isdigit() else text
    return out


def read_release_config(path: str) -> dict:
    """The release's YAML (configs/generate.yaml's layout) -> its sections, dit.model resolved."""
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise ConversionError(f"{path}: cannot read the release config: {exc}") from None
    if not isinstance(config, dict) or "model" not in config.get("dit", {}):
        raise ConversionError(f"{path}: not a VINCIE release config (expected a dit.model section)")
    config["dit"]["model"] = resolve(config["dit"]["model"])
    return config


def model_config(release: dict) -> ModelConfig:
    """The release's dit.model (+ prompt_id_embedding.model) -> vincie's ModelConfig with the release options.
    Anything vincie cannot reproduce exactly is an error naming the key."""
    m = release["dit"]["model"]

    def need(key: str, ok: bool, expected: str):
        if not ok:
            raise ConversionError(f"dit.model.{key}: {m.get(key)!r} is not supported; expected {expected}")

    # the fused kernels (turbox) compute what the plain modules compute, and the release falls back to those
    need("block_type", m.get("block_type") == "mmdit", "mmdit")
    need("msa_type", m.get("msa_type") in ("mm_full", "fused_mm_full", None),
         "mm_full or fused_mm_full (full attention in the session)")
    need("rope_type", m.get("rope_type") in RELEASE_ROPE_TIME, "mmrope3d (3B) or mmrope3d_v3 (7B)")
    need("mlp_type", m.get("mlp_type") == "swiglu", "swiglu")
    need("ada", m.get("ada") in ("single", "fused_single"), "single or fused_single")
    need("norm", m.get("norm") in NORMS, "an RMSNorm (fusedrms or rms)")
    need("qk_norm", m.get("qk_norm") in NORMS, "an RMSNorm (fusedrms or rms)")
    need("vid_out_norm", m.get("vid_out_norm") in NORMS, "an RMSNorm (fusedrms or rms)")
    text_in = m.get("txt_in_dim")
    if isinstance(text_in, list):  # the 7B: one text encoder through an MLP and an RMSNorm
        need("txt_in_dim", len(text_in) == 1 and isinstance(text_in[0], int), "one width ([4096] for the 7B)")
        need("txt_proj_type", m.get("txt_proj_type") == "mlp", "mlp with a list txt_in_dim")
        need("txt_in_norm", m.get("txt_in_norm") in NORMS, "an RMSNorm (fusedrms or rms)")
        text_dim, projector = text_in[0], "mlp_norm"
    else:
        need("txt_in_dim", isinstance(text_in, int), "one integer width (the 3B's linear projector) or [width]")
        text_dim, projector = text_in, "linear"
    need("txt_dim", m.get("txt_dim") == m.get("vid_dim"), "equal to vid_dim")
    need("emb_dim", m.get("emb_dim") == 6 * m["vid_dim"], "6 x vid_dim")
    patch = m.get("patch_size")
    patch = [patch] * 3 if isinstance(patch, int) else list(patch)
    need("patch_size", patch[0] == 1 and patch[1] == patch[2], "[1, p, p]")
    need("patch_type", m.get("patch_type", "v1") == "v1" or patch == [1, 1, 1], "v1, or v2 with patch [1, 1, 1]")
    need("vid_in_channels", m.get("vid_in_channels") == 2 * m["vid_out_channels"] + 1,
         "2 x vid_out_channels + 1 ([noisy, clean or 0, context flag])")
    rope_dim = m.get("rope_dim", m["head_dim"] // 2)
    need("rope_dim", rope_dim <= m["head_dim"] and rope_dim % 2 == 0 and rope_dim // 3 >= 2,
         "even and at most head_dim (each axis gets a third)")
    need("mm_layers", isinstance(m.get("mm_layers"), int) and 0 <= m["mm_layers"] < m["num_layers"],
         "an integer below num_layers (the last layer shares its weights)")
    prompts = release.get("prompt_id_embedding", {})
    if prompts.get("fusion_strategy", "seq_concat") != "seq_concat":
        raise ConversionError(f"prompt_id_embedding.fusion_strategy: {prompts.get('fusion_strategy')!r} is not "
                              "supported; expected seq_concat")
    return ModelConfig(
        hidden_size=m["vid_dim"], num_layers=m["num_layers"], dual_stream_layers=m["mm_layers"],
        num_heads=m["heads"], head_dim=m["head_dim"], mlp_ratio=float(m["expand_ratio"]), ffn_multiple=256,
        patch_size=patch[1], latent_channels=m["vid_out_channels"], text_dim=text_dim,
        max_turns=prompts.get("model", {}).get("max_num_prompts", 64), rope_theta=10000.0,
        norm_eps=float(m["norm_eps"]), qkv_bias=bool(m.get("qk_bias", False)), mlp_bias=False, rope_axes="thirds",
        rope_dim=0 if rope_dim == m["head_dim"] else rope_dim, rope_time=RELEASE_ROPE_TIME[m["rope_type"]],
        text_projector=projector, conditioning="timestep", turn_token=True, input_layout="release",
        final_modulation="shared")


# ---------------------------------------------------------------------------------------------------------------
# The release's weights


def load_release_weights(path: str) -> dict[str, torch.Tensor]:
    """A release `.pth` -> its state dict: no code unpickled, one container level unwrapped, wrapper prefixes off."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad or unsafe file
        raise ConversionError(f"{path}: cannot read it as a weights-only torch file: {exc}") from None
    for container in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(container), dict) and len(state) == 1:
            state = state[container]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path}: expected a state dict of tensors")
    out = {}
    for key, value in state.items():
        name = key
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        out[name] = value
    return out


def sin_cos_to_cos_sin(weight: torch.Tensor) -> torch.Tensor:
    """A layer reading sinusoidal features [sin | cos] -> the same layer reading [cos | sin]."""
    half = weight.shape[1] // 2
    return torch.cat([weight[:, half:], weight[:, :half]], dim=1)


def convert_dit(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Release DiT state dict -> vincie MMDiT state dict (fp32). Every key is used once; every vincie parameter is
    given once."""
    H, p, C, D = cfg.hidden_size, cfg.patch_size, cfg.latent_channels, head_dim(cfg)
    heads, C_in = cfg.num_heads, 2 * cfg.latent_channels + 1
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise ConversionError(f"the release weights have no {key}")
        if key in used:
            raise ConversionError(f"{key} used twice (a bug)")
        used.add(key)
        return state[key].float()

    out: dict[str, torch.Tensor] = {}
    # patch in / out: the release's token values are (ph, pw, c), vincie's (c, ph, pw); its patch v2 (the 7B)
    # names the projections img_proj
    proj = "img_proj" if "vid_in.img_proj.weight" in state else "proj"
    w = take(f"vid_in.{proj}.weight")
    out["patch_embed.weight"] = w.reshape(H, p, p, C_in).permute(0, 3, 1, 2).reshape(H, -1)
    out["patch_embed.bias"] = take(f"vid_in.{proj}.bias")
    if cfg.text_projector == "mlp_norm":  # the 7B: Sequential(Sequential(Linear, GELU, Linear), RMSNorm)
        for ours, theirs in (("0", "0.0"), ("2", "0.2")):
            out[f"text_proj.{ours}.weight"] = take(f"txt_in.0.{theirs}.weight")
            out[f"text_proj.{ours}.bias"] = take(f"txt_in.0.{theirs}.bias")
        out["text_proj.3.weight"] = take("txt_in.0.1.weight")
    else:
        out["text_proj.weight"], out["text_proj.bias"] = take("txt_in.weight"), take("txt_in.bias")
    out["turn_tokens.weight"] = take("prompt_id_embedding.embedding.weight")
    if out["turn_tokens.weight"].shape[0] != cfg.max_turns:
        raise ConversionError(f"prompt_id_embedding has {out['turn_tokens.weight'].shape[0]} prompts, the config "
                              f"says {cfg.max_turns}")
    out["t_embedder.mlp.0.weight"] = sin_cos_to_cos_sin(take("emb_in.proj_in.weight"))
    out["t_embedder.mlp.0.bias"] = take("emb_in.proj_in.bias")
    out["t_embedder.mlp.2.weight"], out["t_embedder.mlp.2.bias"] = take("emb_in.proj_hid.weight"), \
        take("emb_in.proj_hid.bias")
    # the shared modulation: the release's rows are (d, layer in {attn, mlp}, g in {shift, scale, gate})
    out["adaln.weight"] = take("emb_in.proj_out.weight").reshape(H, 6, H).transpose(0, 1).reshape(6 * H, H)
    out["adaln.bias"] = take("emb_in.proj_out.bias").reshape(H, 6).t().reshape(6 * H)
    expected_freqs = None
    for i in range(cfg.num_layers):
        dual = i < cfg.dual_stream_layers
        for stream, name in ((("vid", "latent"), ("txt", "text")) if dual else (("all", "latent"),)):
            src, dst = f"blocks.{i}", f"layers.{i}.{name}"
            qkv = take(f"{src}.attn.proj_qkv.{stream}.weight")  # rows (o, head, d)
            out[f"{dst}.linear_qkv.weight"] = qkv.reshape(3, heads, D, H).transpose(0, 1).reshape(3 * heads * D, H)
            if cfg.qkv_bias:
                b = take(f"{src}.attn.proj_qkv.{stream}.bias")
                out[f"{dst}.linear_qkv.bias"] = b.reshape(3, heads, D).transpose(0, 1).reshape(-1)
            out[f"{dst}.linear_proj.weight"] = take(f"{src}.attn.proj_out.{stream}.weight")
            out[f"{dst}.linear_proj.bias"] = take(f"{src}.attn.proj_out.{stream}.bias")
            out[f"{dst}.q_layernorm.weight"] = take(f"{src}.attn.norm_q.{stream}.weight")
            out[f"{dst}.k_layernorm.weight"] = take(f"{src}.attn.norm_k.{stream}.weight")
            gate, up = take(f"{src}.mlp.{stream}.proj_in_gate.weight"), take(f"{src}.mlp.{stream}.proj_in.weight")
            out[f"{dst}.linear_fc1.weight"] = torch.stack([gate, up], dim=1).reshape(-1, H)
            out[f"{dst}.linear_fc2.weight"] = take(f"{src}.mlp.{stream}.proj_out.weight")
            ada = [take(f"{src}.ada.{stream}.{layer}_{g}") for layer in ("attn", "mlp")
                   for g in ("shift", "scale", "gate")]
            ada[1], ada[4] = ada[1] - 1, ada[4] - 1
            out[f"{dst}.modulation"] = torch.stack(ada)
        freqs = take(f"blocks.{i}.attn.rope.rope.freqs")
        if expected_freqs is None:
            pairs, denominator = rope_axes(cfg.rope_dim or D, "thirds")[0]
            expected_freqs = 1.0 / cfg.rope_theta ** (torch.arange(0, 2 * pairs, 2).float() / denominator)
        if freqs.shape != expected_freqs.shape or not torch.allclose(freqs, expected_freqs, rtol=1e-2):
            raise ConversionError(f"blocks.{i}.attn.rope.rope.freqs: not the RoPE frequencies of head width {D} "
                                  f"split in thirds (theta {cfg.rope_theta:g})")
    out["final.norm_weight"] = take("vid_out_norm.weight")
    out["final.modulation"] = torch.stack([take("vid_out_ada.out_shift"), take("vid_out_ada.out_scale") - 1])
    w = take(f"vid_out.{proj}.weight")  # rows (ph, pw, c)
    out["final.linear.weight"] = w.reshape(p, p, C, H).permute(2, 0, 1, 3).reshape(-1, H)
    out["final.linear.bias"] = take(f"vid_out.{proj}.bias").reshape(p, p, C).permute(2, 0, 1).reshape(-1)
    left = sorted(set(state) - used)
    if left:
        raise ConversionError(f"{len(left)} release key(s) have no place in vincie's model, first: {left[0]}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# The release's VAEs (vincie.model.release_vae): 3D causal weights -> their single-image 2D equivalents

# the release's name -> vincie's, applied in order (the 3B's names first, then the 7B's; diffusers' deprecated
# attention names, which the release's loader renames, are accepted too)
VAE_RENAMES = (
    (r"\.downsamplers\.0\.|\.downsampler\.", ".resample."), (r"\.upsamplers\.0\.|\.upsampler\.", ".resample."),
    (r"(coder)\.(down|up)_blocks\.", r"\1.blocks."), (r"\.attentions\.0\.", ".attention."),
    (r"\.attention\.query\.", ".attention.to_q."), (r"\.attention\.key\.", ".attention.to_k."),
    (r"\.attention\.value\.", ".attention.to_v."), (r"\.attention\.proj_attn\.", ".attention.to_out.0."),
)


def vae_spec(state: dict[str, torch.Tensor], scale: float, shift: float):
    """The release VAE's architecture, read from its weights' names and shapes."""
    from vincie.model.release_vae import ReleaseVAESpec

    def side(name: str) -> tuple[tuple[int, ...], int]:
        """(channels per block, resnets per block) of the encoder or decoder, in vincie's names."""
        blocks = sorted({int(m.group(1)) for k in state if (m := re.match(rf"{name}\.blocks\.(\d+)\.", k))})
        if not blocks or blocks != list(range(len(blocks))):
            raise ConversionError(f"VAE weights: no {name} blocks numbered from 0 (is this the release's vae.pth?)")
        channels = tuple(state[f"{name}.blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in blocks)
        layers = len({k.split(".")[4] for k in state if k.startswith(f"{name}.blocks.0.resnets.")})
        return channels, layers

    if "encoder.mid_block.attention.to_q.weight" in state:
        layout = "mid_attention"
    elif any(k.startswith("encoder.final_block.") for k in state):
        layout = "final_block"
    else:
        raise ConversionError("VAE weights: neither the 3B's (encoder.mid_block.attentions) nor the 7B's "
                              "(encoder.final_block) layout")
    if layout == "final_block":  # the 7B's final blocks are vincie's last (non-resampling) block
        for name in ("encoder", "decoder"):
            last = 1 + max(int(k.split(".")[2]) for k in state if k.startswith(f"{name}.blocks."))
            state = {k.replace(f"{name}.final_block.", f"{name}.blocks.{last}."): v for k, v in state.items()}
    encoder, encoder_layers = side("encoder")
    decoder, decoder_layers = side("decoder")
    latent = state["decoder.conv_in.weight"].shape[1]
    return ReleaseVAESpec(layout, encoder, decoder, encoder_layers, decoder_layers, latent, scale, shift), state


def upscale_rows(weight: torch.Tensor, channels: int, layout: str) -> torch.Tensor:
    """An upsampler's first convolution, rows (x y z c) (3B) or (z x y c) (7B), x/y the output's row/column
    offset and z its frame -> the rows of frame 0 only (one image), ordered (c x y) as pixel shuffle reads them."""
    frames = weight.shape[0] // (4 * channels)
    rest = weight.shape[1:]
    if layout == "mid_attention":
        rows = weight.reshape(2, 2, frames, channels, *rest)[:, :, 0]
    else:
        rows = weight.reshape(frames, 2, 2, channels, *rest)[0]
    return rows.movedim(2, 0).reshape(4 * channels, *rest)


def convert_vae(state: dict[str, torch.Tensor], scale: float, shift: float = 0.0):
    """Release VAE state dict (3D causal) -> (ReleaseVAESpec, vincie ReleaseVAE state dict). A 3D kernel becomes
    the sum of its temporal taps; every key is used, every parameter given."""
    from vincie.model.release_vae import ReleaseVAE

    renamed = {}
    for key, value in state.items():
        name = key
        for pattern, replacement in VAE_RENAMES:
            name = re.sub(pattern, replacement, name)
        renamed[name] = value.float()
    spec, renamed = vae_spec(renamed, scale, shift)
    expected = ReleaseVAE(spec).state_dict()
    missing, left = sorted(set(expected) - set(renamed)), sorted(set(renamed) - set(expected))
    if left:
        raise ConversionError(f"{len(left)} release VAE key(s) have no place in vincie's VAE, first: {left[0]}")
    if missing:
        raise ConversionError(f"the release VAE lacks {len(missing)} tensor(s) vincie's needs, first: {missing[0]}")
    out = {}
    for name, given in renamed.items():
        value = given.sum(dim=2) if given.dim() == 5 else given  # one frame, replicated over the causal taps
        if ".resample.upscale_conv." in name:
            value = upscale_rows(value, expected[name].shape[0] // 4, spec.layout)
        if value.shape != expected[name].shape:
            raise ConversionError(f"release VAE {name}: shape {tuple(given.shape)} reduces to {tuple(value.shape)}, "
                                  f"vincie's VAE expects {tuple(expected[name].shape)}")
        out[name] = value
    return spec, out


def check_close(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> tuple[float, float, bool]:
    """-> (max absolute error, relative error = max abs error / max |want|, within tolerance)."""
    error = (got.float() - want.float()).abs().max().item()
    relative = error / max(want.float().abs().max().item(), math.ulp(1.0))
    return error, relative, relative <= tolerance


# ---------------------------------------------------------------------------------------------------------------
# Checking a conversion against fixtures, and writing a model directory


def check_fixture(model: torch.nn.Module, cfg: ModelConfig, fixture_dir: str,
                  tolerance: float = 1e-4) -> list[tuple[str, float, float, bool]]:
    """The converted model against a fixture directory's cases (tools/release_fixtures.py's format): every DiT
    case (`<case>.out`) and every sampling case (`<case>.latents`) -> (case, max abs error, relative error, ok)."""
    from safetensors.torch import load_file

    from vincie.model.release import (
        ReleaseBatch,
        release_inputs,
        release_output,
        release_sample,
    )

    path = os.path.join(fixture_dir, "cases.safetensors")
    try:
        cases = load_file(path)
    except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds
        raise ConversionError(f"{path}: cannot read the fixture cases ({str(exc).splitlines()[0]})") from None
    names = sorted({key.split(".", 1)[0] for key in cases})
    results = []
    for case in names:
        g = {key.split(".", 1)[1]: value for key, value in cases.items() if key.startswith(case + ".")}
        with torch.no_grad():
            if "out" in g:
                batch = ReleaseBatch(g["vid"], g["vid_shape"], g["text"], g["text_lengths"], g["prompts"],
                                     g["timestep"])
                got, want = release_output(cfg, model(release_inputs(cfg, batch)), batch.vid_shape), g["out"]
            elif "latents" in g:
                steps, shift, scale = g["settings"].tolist()
                sessions = g["vid_shape"].shape[0]
                got = release_sample(model, cfg, g["noise"], g["cond"], g["vid_shape"],
                                     (g["text"], g["text_lengths"], g["prompts"]),
                                     (g["neg_text"], g["neg_text_lengths"], torch.ones(sessions, dtype=torch.int64)),
                                     int(steps), shift, scale)
                want = g["latents"]
            else:
                raise ConversionError(f"{path}: case {case} has neither an 'out' nor a 'latents' tensor")
        results.append((case, *check_close(got, want, tolerance)))
    return results


def vae_scaling(release: dict, path: str) -> tuple[float, float]:
    """The release config's vae.scaling_factor and vae.shifting_factor (0 when absent)."""
    vae = release.get("vae") or {}
    scale, shift = vae.get("scaling_factor"), vae.get("shifting_factor", 0.0)
    if not isinstance(scale, (int, float)) or not isinstance(shift, (int, float)):
        raise ConversionError(f"{path}: vae.scaling_factor (and vae.shifting_factor, if given) must be numbers to "
                              f"convert the VAE, got {scale!r} and {shift!r}")
    return float(scale), float(shift)


def check_vae_fixture(vae: torch.nn.Module, fixture_dir: str,
                      tolerance: float = 1e-4) -> list[tuple[str, float, float, bool]]:
    """The converted VAE against a fixture's vae_cases.safetensors: `images` (N, 3, H, W) -> `latents`
    (N, C, H / f, W / f) (encode), `latents` -> `decoded` (N, 3, H, W) (decode)."""
    from safetensors.torch import load_file

    path = os.path.join(fixture_dir, "vae_cases.safetensors")
    try:
        cases = load_file(path)
    except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds
        raise ConversionError(f"{path}: cannot read the fixture's VAE cases ({str(exc).splitlines()[0]})") from None
    return [("vae.encode", *check_close(vae.encode(cases["images"]), cases["latents"], tolerance)),
            ("vae.decode", *check_close(vae.decode(cases["latents"]), cases["decoded"], tolerance))]


def convert_release(dit: str, release_config: str, base: Config, out_dir: str | None = None,
                    check: str | None = None, dtype: str = "fp32", tolerance: float = 1e-4,
                    overwrite: bool = False, vae: str | None = None) -> tuple[dict | None, list]:
    """The release's DiT `.pth` (and VAE `.pth`, when given) and YAML -> vincie's weights, checked against `check`
    (a fixture directory) when given, written as a model directory to `out_dir` when given. `base`: the run config
    whose text encoder, VAE (unless `vae` is given), resolution and sampler the model directory keeps (its model
    section and sequence mode are the release's). -> (config.json content or None, check results)."""
    from vincie.config import validate
    from vincie.inference.export import DTYPES, check_out_dir, write_model_dir
    from vincie.model.mmdit import MMDiT, count_parameters

    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if out_dir is not None:
        check_out_dir(out_dir, overwrite)
    release = read_release_config(release_config)
    model_cfg = model_config(release)
    weights = convert_dit(load_release_weights(dit), model_cfg)
    model = MMDiT(model_cfg).eval()
    model.load_state_dict(weights, strict=True)
    results = check_fixture(model, model_cfg, check, tolerance) if check else []
    cfg = dataclasses.replace(base, model=model_cfg, sequence=dataclasses.replace(base.sequence, mode="release"))
    write_vae = None
    if vae is not None:
        from vincie.model.model_dir import RELEASE_VAE_DIR
        from vincie.model.release_vae import ReleaseVAE, save_release_vae

        spec, vae_weights = convert_vae(load_release_weights(vae), *vae_scaling(release, release_config))
        if spec.latent_channels != model_cfg.latent_channels:
            raise ConversionError(f"--vae {vae}: {spec.latent_channels} latent channels, the DiT of "
                                  f"{release_config} reads {model_cfg.latent_channels}")
        converted = ReleaseVAE(spec).eval()
        converted.load_state_dict(vae_weights, strict=True)
        results += check_vae_fixture(converted, check, tolerance) if check else []
        cfg = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, kind="release", path=RELEASE_VAE_DIR,
                                                               factor=spec.factor))  # written into the directory
        write_vae = functools.partial(save_release_vae, spec, vae_weights)
    if out_dir is None:
        return None, results
    sampling = release.get("diffusion", {}).get("timesteps", {}).get("sampling", {})
    guidance = release.get("diffusion", {}).get("cfg", {})
    cfg = dataclasses.replace(cfg, diffusion=dataclasses.replace(
        cfg.diffusion, prediction="velocity", sample_steps=int(sampling.get("steps", cfg.diffusion.sample_steps)),
        sample_shift=float(sampling.get("shift", cfg.diffusion.sample_shift)),
        cfg_scale=float(guidance.get("scale", cfg.diffusion.cfg_scale))))
    if cfg.text_encoder.kind == "hashed_words":
        raise ConversionError("text_encoder.kind is hashed_words: the release's DiT reads a text encoder's features "
                              "(set text_encoder.kind and text_encoder.path: causal_lm for the 3B's llm14b, t5 for "
                              "the 7B's flan-ul2)")
    validate(cfg)
    source = {"release_dit": os.path.abspath(dit), "release_config": os.path.abspath(release_config)}
    if vae is not None:
        source["release_vae"] = os.path.abspath(vae)
    return write_model_dir(cfg, {f"dit.{k}": v for k, v in weights.items()}, count_parameters(model), source,
                           out_dir, dtype, write_vae), results
