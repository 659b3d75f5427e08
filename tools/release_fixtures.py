"""Golden fixtures from the VINCIE release's own code, for vincie's parity tests (docs/release.md, "Fixtures").

Run it in a scratch environment, never inside vincie: it imports the release (ByteDance-Seed/VINCIE, a checkout at
--release-src) and runs its model code on the CPU with tiny random weights, then writes what vincie must
reproduce into --out:

    python tools/release_fixtures.py --release-src /scratch/VINCIE --out tests/data/release/3b-tiny
    python tools/release_fixtures.py --release-src /scratch/VINCIE --variant 7b --vae-src /scratch/VINCIE-c6ee69b \
        --out tests/data/release/7b-tiny

The 3B's VAE is in the release's models/vae; the 7B's (models/ae/modules) only in commit c6ee69b's tree, so
--vae-src names a checkout of that commit for the 7B (default: --release-src).

Besides vincie's own requirements it needs `einops omegaconf beartype tabulate` (the release's imports). What it
changes in the release, all here and nowhere else:
- `flash_attn.flash_attn_varlen_func` -> plain PyTorch (scaled_dot_product_attention per packed sequence);
- `apex.normalization.FusedRMSNorm` / `FusedLayerNorm` -> torch.nn.RMSNorm / LayerNorm (same arguments);
- the attention's bf16 cast (`.bfloat16()` on q, k, v in NaMMAttention) is a no-op while the model runs, so that
  the fixtures are fp32 throughout;
- `generate.get_device` gives the CPU (it gives CUDA);
- the 7B variant runs the 7B's config (commit c6ee69b) through this checkout's modules: NaDiT, whose text-list
  and MLP-projector paths and patch v2 the 7B uses; `fused_single` and `fused_mm_full` as `single` and `mm_full`,
  the modules c6ee69b itself uses when its fused kernels (turbox) are absent; and `mmrope3d_v3` as this
  checkout's mmrope3d with image time starting at 0 instead of after the text (c6ee69b's V3 rule). Its session
  text is assembled by this checkout's generator, which c6ee69b's generate_7b.py repeats per text encoder;
- modules the DiT never uses but its files import (`mediapy`, `torchvision.transforms`) are empty stand-ins;
- the VAE runs in eval mode on single images, fp32; latents are the posterior's mode (`use_sample: False`, which
  the release offers for deterministic encoding) scaled as the generator's vae_encode scales them,
  (z - shifting_factor) * scaling_factor, and decoded as its vae_decode does, from latents / scale + shift.
The release's session-text assembly (VINCIEGenerator.get_session_text_embedding) and its Euler sampler with
classifier-free guidance run unchanged; the text encoder is replaced by random per-prompt features.

Fixture format (one directory): `config.yaml` (the release's generate.yaml layout: dit.model,
prompt_id_embedding.model, diffusion), `dit.pth` (the release-format state dict, as the release saves it) and
`cases.safetensors`, tensors named `<case>.<field>`:

    <case>.vid          (L, 2C+1) float  the DiT's input per latent cell: [noisy, clean or 0, context flag]
    <case>.vid_shape    (B, 3) int64     per session: frames, latent rows, latent columns (before patching)
    <case>.text         (N, D) float     per-prompt text-encoder features, prompts one after another
    <case>.text_lengths (P,) int64       tokens per prompt
    <case>.prompts      (B,) int64       prompts per session (a session's prompts have turn ids 0, 1, ...)
    <case>.timestep     (B,) float       in [0, T] (T = 1000)
    <case>.out          (L, C) float     the DiT's output (velocity) per latent cell
A sampling case has no `out`, `timestep` or `vid`'s noisy part; instead `<case>.noise` (L, C), `<case>.cond`
(L, C+1), the negative prompt as `<case>.neg_text` / `<case>.neg_text_lengths` (one prompt per session),
`<case>.settings` = [steps, shift, cfg_scale] and `<case>.latents` (L, C): the sampler's final latents.
The VAE: `vae.pth` (its release-format state dict), config.yaml's `vae` section (scaling_factor, shifting_factor,
and the tiny model's arguments) and `vae_cases.safetensors`: `images` (N, 3, H, W) in [-1, 1], `latents`
(N, C, H / f, W / f) their scaled encodings, `decoded` (N, 3, H, W) the decoding of `latents`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import os
import sys
import types

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

# A tiny model on the 3B code path: dual-stream first layer, shared weights after, SwiGLU rounded to 256,
# adaLN-single, mmrope3d over a head width (32) that is not hidden / heads (48 / 2) and leaves 2 dims unrotated.
TINY_3B = {
    "vid_in_channels": 9, "vid_out_channels": 4, "vid_dim": 48, "vid_out_norm": "fusedrms", "txt_in_dim": 40,
    "txt_in_norm": "fusedln", "txt_dim": "${.vid_dim}", "emb_dim": "${eval:'6 * ${.vid_dim}'}", "heads": 2,
    "head_dim": 32, "expand_ratio": 4, "norm": "fusedrms", "norm_eps": 1e-5, "ada": "single", "qk_bias": False,
    "qk_rope": True, "qk_norm": "fusedrms", "patch_size": [1, 2, 2], "num_layers": 3, "mm_layers": 1,
    "mlp_type": "swiglu", "block_type": "mmdit", "msa_type": "mm_full", "rope_type": "mmrope3d", "rope_dim": 32,
}
# A tiny model on the 7B code path (configs/generate_7b.yaml of commit c6ee69b): one text encoder through an MLP and
# an RMSNorm, patch v2 at 1x1x1, RoPE over 30 of the 32 head dimensions with image time from 0 (mmrope3d_v3).
TINY_7B = {
    "vid_in_channels": 13, "vid_out_channels": 6, "vid_dim": 40, "vid_out_norm": "fusedrms", "txt_in_dim": [24],
    "txt_in_norm": "fusedrms", "txt_dim": "${.vid_dim}", "emb_dim": "${eval:'6 * ${.vid_dim}'}", "heads": 2,
    "head_dim": 32, "expand_ratio": 4, "norm": "fusedrms", "norm_eps": 1e-5, "ada": "fused_single", "qk_bias": False,
    "qk_rope": True, "qk_norm": "fusedrms", "patch_size": [1, 1, 1], "num_layers": 3, "mm_layers": 1,
    "mlp_type": "swiglu", "block_type": "mmdit", "msa_type": "fused_mm_full", "rope_type": "mmrope3d_v3",
    "rope_dim": 30, "patch_type": "v2", "txt_proj_type": "mlp",
}
VARIANTS = {"3b": TINY_3B, "7b": TINY_7B}
# Tiny VAEs on each release's VAE code path: three blocks (4x) with one temporal resampler each way (so that the
# encoder and decoder have temporal and non-temporal ones), latent channels = the DiT's. The 3B's are 32 wide
# throughout (64-wide mid blocks would dominate the file); the 7B's widen in their last blocks (shortcut
# convolutions).
TINY_VAE = {
    "3b": {"module": "models.vae.modules.video_vae", "class": "VideoAutoencoderKLWrapper",
           "scaling_factor": 0.9152, "shifting_factor": 0.0,
           "model": {"act_fn": "silu", "block_out_channels": [32, 32, 32],
                     "down_block_types": ["DownEncoderBlock3D"] * 3, "up_block_types": ["UpDecoderBlock3D"] * 3,
                     "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
                     "norm_num_groups": 32, "slicing_sample_min_size": 4, "temporal_scale_num": 1,
                     "inflation_mode": "pad", "spatial_downsample_factor": 4, "temporal_downsample_factor": 2,
                     "use_quant_conv": False, "use_post_quant_conv": False}},
    "7b": {"module": "models.ae.modules.video_vae", "class": "VideoAutoencoderKL",
           "scaling_factor": 0.9045, "shifting_factor": -0.0025,
           "model": {"enc_block_out_channels": [32, 32, 64], "dec_block_out_channels": [32, 32, 64],
                     "enc_time_receptive_field": "full", "dec_time_receptive_field": "full",
                     "enc_layers_per_block": 1, "dec_layers_per_block": 2, "slicing_sample_min_size": 4,
                     "temporal_scale_num": 1, "inflation_mode": "tail", "in_channels": 3, "latent_channels": 6,
                     "out_channels": 3, "use_quant_conv": False, "use_post_quant_conv": False,
                     "spatial_downsample_factor": 4, "temporal_downsample_factor": 2}},
}
MAX_PROMPTS = 8
SAMPLING = {"steps": 4, "shift": 3.0, "cfg_scale": 3.0}


def module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                           deterministic=False, **kwargs):
    """flash-attn's packed attention in plain PyTorch: q, k, v (L, heads, D); each packed sequence attends to
    itself only, softmax scale 1/sqrt(D)."""
    out = torch.empty_like(q)
    for start, end in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
        qs, ks, vs = (x[start:end].transpose(0, 1) for x in (q, k, v))  # (heads, l, D)
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1)
    return out


class Unused:
    """Whatever a stand-in module is asked for: imported by the release's files, never used by the DiT."""

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return self


def install_stand_ins() -> None:
    module("flash_attn", flash_attn_varlen_func=flash_attn_varlen_func)
    module("apex")
    module("apex.normalization",
           FusedRMSNorm=lambda normalized_shape, elementwise_affine=True, eps=1e-5:
           torch.nn.RMSNorm(normalized_shape, eps=eps, elementwise_affine=elementwise_affine),
           FusedLayerNorm=lambda normalized_shape, elementwise_affine=True, eps=1e-5:
           torch.nn.LayerNorm(normalized_shape, eps=eps, elementwise_affine=elementwise_affine))
    module("mediapy")
    import diffusers.models.autoencoders.vae  # noqa: F401  (first: the VAEs' imports; its import inspects modules)
    import transformers.modeling_utils  # noqa: F401  (first: it must see that torchvision is not installed)
    module("torchvision")
    transforms = module("torchvision.transforms", functional=module("torchvision.transforms.functional"))
    transforms.__getattr__ = lambda name: Unused()
    sys.modules["torchvision.transforms.functional"].__getattr__ = lambda name: Unused()


@contextlib.contextmanager
def fp32_attention():
    """The release casts q, k, v to bf16 for flash-attn; here the cast keeps fp32."""
    cast = torch.Tensor.bfloat16
    torch.Tensor.bfloat16 = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.bfloat16 = cast


def text_width(model: dict) -> int:
    """The text encoder's width: txt_in_dim, an int (3B) or a list of one (7B)."""
    return model["txt_in_dim"][0] if isinstance(model["txt_in_dim"], list) else model["txt_in_dim"]


def resolve(model: dict) -> dict:
    """The config's model with txt_dim and emb_dim as numbers (the release's configs write them as ${.vid_dim} and
    ${eval:'6 * ${.vid_dim}'})."""
    out = dict(model)
    out["txt_dim"] = model["vid_dim"]
    out["emb_dim"] = 6 * model["vid_dim"]
    return out


class Release:
    """The release's DiT and its generator's text assembly and sampler, imported from `src`."""

    def __init__(self, src: str, model: dict, seed: int):
        install_stand_ins()
        self.text_list = isinstance(model["txt_in_dim"], list)  # the 7B passes text as a list (one per encoder)
        sys.path.insert(0, os.path.abspath(src))
        import generate
        from common.diffusion import (
            classifier_free_guidance_dispatcher,
            create_sampler_from_config,
            create_sampling_timesteps_from_config,
            create_schedule_from_config,
        )
        from generate import VINCIEGenerator
        from models.dit.nadit import NaDiT
        from models.embedding.prompt_emb import PromptEmbedding
        from omegaconf import OmegaConf

        generate.get_device = lambda: torch.device("cpu")
        self.OmegaConf, self.generator = OmegaConf, VINCIEGenerator
        self.cfg_dispatch = classifier_free_guidance_dispatcher
        self.create = (create_schedule_from_config, create_sampling_timesteps_from_config, create_sampler_from_config)
        torch.manual_seed(seed)
        args = {k: v for k, v in resolve(model).items() if k != "qk_rope"}
        if args["rope_type"] == "mmrope3d_v3":
            image_time_from_zero()
            args["rope_type"] = "mmrope3d"
        args["ada"] = {"fused_single": "single"}.get(args["ada"], args["ada"])
        args["msa_type"] = {"fused_mm_full": "mm_full"}.get(args["msa_type"], args["msa_type"])
        self.dit = NaDiT(**args).eval()
        self.dit.prompt_id_embedding = PromptEmbedding(MAX_PROMPTS, text_width(model))
        with torch.no_grad():  # the release initialises gates and a few projections small: make every path count
            for p in self.dit.parameters():
                p.add_(torch.randn_like(p) * 0.05)

    def session_text(self, text: torch.Tensor, lengths: list[int], prompts: list[int] | None):
        """The generator's own assembly of session text (turn-id token + prompt, prompts of a session in a row);
        `prompts` None: one prompt per session, all with id 0 (how the release embeds the negative prompt)."""
        outer = types.SimpleNamespace(dit=self.dit, config=self.OmegaConf.create(
            {"prompt_id_embedding": {"fusion_strategy": "seq_concat"}}))
        outer.fuse_prompt_id_emb = lambda *a: self.generator.fuse_prompt_id_emb(outer, *a)
        outer.text_encode = lambda texts: (text, torch.tensor(lengths)[:, None])
        names = [f"p{i}" for i in range(len(lengths))]
        if prompts is None:
            return self.generator.get_session_text_embedding(outer, names)
        sessions, start = [], 0
        for count in prompts:
            sessions.append(names[start:start + count])
            start += count
        return self.generator.get_session_text_embedding(outer, sessions)

    def text(self, txt, txt_shape):
        return ([txt], [txt_shape]) if self.text_list else (txt, txt_shape)

    @torch.no_grad()
    def forward(self, vid, vid_shape, txt, txt_shape, timestep):
        txt, txt_shape = self.text(txt, txt_shape)
        with fp32_attention():
            return self.dit(vid=vid, txt=txt, vid_shape=vid_shape, txt_shape=txt_shape, timestep=timestep).vid_sample

    @torch.no_grad()
    def sample(self, noise, cond, vid_shape, pos, neg, steps: int, shift: float, scale: float):
        """The generator's sampling loop (VINCIEGenerator.inference without the VAE)."""
        OmegaConf = self.OmegaConf
        schedule = self.create[0](OmegaConf.create({"type": "lerp", "T": 1000.0}), device="cpu")
        timesteps = self.create[1](OmegaConf.create({"type": "uniform_trailing", "steps": steps, "shift": shift}),
                                   schedule=schedule, device="cpu")
        sampler = self.create[2](OmegaConf.create({"type": "euler", "prediction_type": "v_lerp"}),
                                 schedule=schedule, timesteps=timesteps)
        batch = vid_shape.shape[0]
        pos, neg = self.text(*pos), self.text(*neg)
        with fp32_attention():
            return sampler.sample(x=noise, f=lambda args: self.cfg_dispatch(
                pos=lambda: self.dit(vid=torch.cat([args.x_t, cond], dim=-1), txt=pos[0], vid_shape=vid_shape,
                                     txt_shape=pos[1], timestep=args.t.repeat(batch)).vid_sample,
                neg=lambda: self.dit(vid=torch.cat([args.x_t, cond], dim=-1), txt=neg[0], vid_shape=vid_shape,
                                     txt_shape=neg[1], timestep=args.t.repeat(batch)).vid_sample,
                scale=scale))


def image_time_from_zero() -> None:
    """mmrope3d_v3 (c6ee69b): the 3B's rotary embedding with a session's image time starting at 0, not after its
    text length (c6ee69b computes that with offsets [0, 0, 0]: the same angles)."""
    from models.dit.rope import NaMMRotaryEmbedding3d

    def get_freqs(self, vid_shape, txt_shape):
        vid, txt = [], []
        for (f, h, w), l in zip(vid_shape.tolist(), txt_shape[:, 0].tolist()):
            axial = self.rope.get_axial_freqs(f, h, w)
            vid.append(axial.reshape(-1, axial.size(-1)))
            txt.append(self.get_axial_freqs(l).repeat(1, 3).reshape(-1, axial.size(-1)))
        return torch.cat(vid), torch.cat(txt)

    NaMMRotaryEmbedding3d.get_freqs = get_freqs


def condition(latents: torch.Tensor, frames: int) -> torch.Tensor:
    """The release's get_condition for one session, flattened: (F*h*w, C) clean latents -> (F*h*w, C+1): every
    frame but the last keeps its latent and flag 1; the last (the output) is zeros."""
    cond = torch.zeros(latents.shape[0], latents.shape[1] + 1)
    context = latents.shape[0] // frames * (frames - 1)
    cond[:context, :-1] = latents[:context]
    cond[:context, -1] = 1.0
    return cond


def make_cases(release: Release, channels: int, text_dim: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sessions = {"single": [((3, 4, 6), [5, 7])],
                "batch": [((3, 4, 6), [5, 7]), ((2, 6, 4), [4])]}
    timesteps = {"single": [731.5], "batch": [250.0, 900.0]}
    out: dict[str, torch.Tensor] = {}

    def inputs(name: str, negative: bool):
        shapes = torch.tensor([s for s, _ in sessions[name]])
        lengths = [9] * len(shapes) if negative else [n for _, prompts in sessions[name] for n in prompts]
        prompts = [1] * len(shapes) if negative else [len(p) for _, p in sessions[name]]
        text = torch.randn(sum(lengths), text_dim, generator=g)
        clean = [torch.randn(int(s.prod()), channels, generator=g) for s in shapes]
        cond = torch.cat([condition(c, int(s[0])) for c, s in zip(clean, shapes)])
        return shapes, text, lengths, prompts, cond

    for case, base, negative in (("single", "single", False), ("batch", "batch", False),
                                 ("negative", "batch", True)):
        shapes, text, lengths, prompts, cond = inputs(base, negative)
        noisy = torch.randn(cond.shape[0], channels, generator=g)
        vid = torch.cat([noisy, cond], dim=-1)
        t = torch.tensor(timesteps[base])
        txt, txt_shape = release.session_text(text, lengths, None if negative else prompts)
        out |= {f"{case}.vid": vid, f"{case}.vid_shape": shapes, f"{case}.text": text,
                f"{case}.text_lengths": torch.tensor(lengths), f"{case}.prompts": torch.tensor(prompts),
                f"{case}.timestep": t, f"{case}.out": release.forward(vid, shapes, txt, txt_shape, t)}

    shapes, text, lengths, prompts, cond = inputs("batch", False)
    _, neg_text, neg_lengths, _, _ = inputs("batch", True)
    noise = torch.randn(cond.shape[0], channels, generator=g)
    pos = release.session_text(text, lengths, prompts)
    neg = release.session_text(neg_text, neg_lengths, None)
    latents = release.sample(noise, cond, shapes, pos, neg, SAMPLING["steps"], SAMPLING["shift"],
                             SAMPLING["cfg_scale"])
    out |= {"sampling.noise": noise, "sampling.cond": cond, "sampling.vid_shape": shapes, "sampling.text": text,
            "sampling.text_lengths": torch.tensor(lengths), "sampling.prompts": torch.tensor(prompts),
            "sampling.neg_text": neg_text, "sampling.neg_text_lengths": torch.tensor(neg_lengths),
            "sampling.settings": torch.tensor([SAMPLING["steps"], SAMPLING["shift"], SAMPLING["cfg_scale"]]),
            "sampling.latents": latents}
    return {k: v.contiguous() for k, v in out.items()}


def vae_cases(src: str, variant: str, seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The release's VAE (tiny, random weights) and its encodings and decodings of two random images."""
    import importlib

    sys.path.insert(0, os.path.abspath(src))
    spec = TINY_VAE[variant]
    torch.manual_seed(seed)
    vae = getattr(importlib.import_module(spec["module"]), spec["class"])(**spec["model"]).eval()
    scale, shift = spec["scaling_factor"], spec["shifting_factor"]
    with torch.no_grad():
        for p in vae.parameters():  # the upsamplers start as identities: make every path count
            p.add_(torch.randn_like(p) * 0.05)
        images = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        mode = vae.encode(images).posterior.mode().squeeze(2)
        latents = (mode - shift) * scale
        decoded = vae.decode(latents / scale + shift).sample
    return vae, {"images": images, "latents": latents.contiguous(), "decoded": decoded.squeeze(2).contiguous()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release-src", required=True, help="a checkout of ByteDance-Seed/VINCIE")
    parser.add_argument("--out", required=True, help="the fixture directory to write")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="3b", help="the release's code path")
    parser.add_argument("--vae-src", help="a checkout holding the variant's VAE code (the 7B's: commit c6ee69b); "
                                          "default: --release-src")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float32)
    model = VARIANTS[args.variant]
    release = Release(args.release_src, model, args.seed)
    text_dim = text_width(model)
    cases = make_cases(release, model["vid_out_channels"], text_dim, args.seed + 1)
    os.makedirs(args.out, exist_ok=True)
    config = {"dit": {"model": model},
              "prompt_id_embedding": {"model": {"max_num_prompts": MAX_PROMPTS, "embedding_dim": text_dim},
                                      "fusion_strategy": "seq_concat"},
              "diffusion": {"schedule": {"type": "lerp", "T": 1000.0},
                            "timesteps": {"sampling": {"type": "uniform_trailing", **SAMPLING}}},
              "vae": {key: TINY_VAE[args.variant][key] for key in ("model", "scaling_factor", "shifting_factor")}}
    with open(os.path.join(args.out, "config.yaml"), "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    torch.save(release.dit.state_dict(), os.path.join(args.out, "dit.pth"))
    save_file(cases, os.path.join(args.out, "cases.safetensors"))
    vae, vae_tensors = vae_cases(args.vae_src or args.release_src, args.variant, args.seed + 2)
    torch.save(vae.state_dict(), os.path.join(args.out, "vae.pth"))
    save_file(vae_tensors, os.path.join(args.out, "vae_cases.safetensors"))
    print(f"wrote {args.out}: {len(cases)} tensors, "
          f"{sum(p.numel() for p in release.dit.parameters()):,} DiT parameters")


if __name__ == "__main__":
    main()
