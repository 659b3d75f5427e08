"""`vincie export`: a training checkpoint (any TP/PP layout, either format) -> a directory anyone can run.

    OUT/model.safetensors   every trained parameter, whole (TP slices joined, PP stages merged), by training name
    OUT/config.json         model dimensions, latent and text encoder, sampler defaults, where the weights came from
    OUT/README.md           model card

Weight names are the training parameter names (`dit.layers.3.latent.linear_qkv.weight`, `text_encoder.embed.weight`
for the built-in hashed-word encoder), so a checkpoint and its export are read by the same code; the tensors are
the full, unsplit ones. docs/inference.md ("Names against the released VINCIE") maps them to the released VINCIE's
module boundaries.

`config.json` holds the sections of vincie's run config that inference needs, in the same form (`model`,
`sequence.mode`, `data.resolution`, `text_encoder`, `vae`, and the sampler defaults in `diffusion`), so it is read
back into a `Config` and checked by the one `validate()`. A `transformers` text encoder or `diffusers` VAE is
referenced by its local directory (made absolute), not copied; the built-in space-to-depth latent has no
parameters and the hashed-word text encoder's table is in model.safetensors.

Loading (`load_model`) reads JSON and safetensors only: nothing is unpickled, and it never imports megatron-core
(vincie.model.mmdit is plain PyTorch). Export itself reads the training checkpoint (torch / torch.distributed.checkpoint
files) and writes into a temporary directory that is renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable

import torch

from vincie import storage
from vincie.config import Config, ConfigError, from_dict, preset_dir, read_yaml, to_dict, validate
from vincie.errors import VincieError
from vincie.model.mmdit import MMDiT, count_parameters
from vincie.model.model_dir import CONFIG, FORMAT, FORMAT_VERSION, RELEASE_VAE_DIR, WEIGHTS, check_weights, read_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# diffusion.* that inference reads
SAMPLER_KEYS = ("prediction", "sample_steps", "sample_shift", "cfg_scale", "negative_prompt")


# ---------------------------------------------------------------------------------------------------------------
# The model from a state dict (exports and training checkpoints alike)


def build_model(cfg: Config, weights: dict[str, torch.Tensor], device: torch.device, source: str):
    """Training-named weights -> (MMDiT, text encoder) in fp32 on `device`, plain PyTorch (no megatron-core). Built
    on the meta device and filled by assignment: no initialisation work, and every parameter must be given."""
    from vincie.model.text_encoder import build_text_encoder

    with torch.device("meta"):
        model = MMDiT(cfg.model)
    text_encoder = build_text_encoder(cfg.text_encoder, cfg.model.text_dim)
    check_weights(model, text_encoder, weights, source)
    model.load_state_dict({n[4:]: t for n, t in weights.items() if n.startswith("dit.")}, assign=True)
    if getattr(text_encoder, "trainable", False):
        text_encoder.load_state_dict({n[13:]: t for n, t in weights.items() if n.startswith("text_encoder.")})
    return model.float().to(device).eval(), text_encoder.float().to(device).eval()


# ---------------------------------------------------------------------------------------------------------------
# Export


def resolve_checkpoint(path: str) -> str:
    """A training run directory (its latest checkpoint) or one checkpoint step directory -> the step directory."""
    from vincie.training import checkpoint

    if not os.path.isdir(path):
        raise VincieError(f"--checkpoint {path}: no such directory")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        latest = checkpoint.latest(path)
        if latest is None:
            raise VincieError(f"--checkpoint {path}: no complete checkpoint under checkpoints/")
        return latest
    if os.path.isfile(os.path.join(path, checkpoint.STATE)) or os.path.isfile(os.path.join(path, ".metadata")):
        return path
    raise VincieError(f"--checkpoint {path}: not a training run directory (checkpoints/) nor a checkpoint step "
                      "directory (state.pt, or a distributed checkpoint's .metadata)")


def checkpoint_common(step_dir: str) -> dict:
    """The common state every checkpoint carries (step, config, ...), from either format. These are the training
    checkpoint's own pickles, read with torch.load: export trusts the run it exports."""
    from vincie.training import checkpoint

    if os.path.isfile(os.path.join(step_dir, checkpoint.STATE)):
        return checkpoint.load(step_dir)["common"]
    common = os.path.join(step_dir, "common.pt")  # written by megatron-core's dist_checkpointing
    if not os.path.isfile(common):
        raise VincieError(f"{step_dir}: distributed checkpoint without common.pt (expected one written by vincie)")
    return torch.load(common, map_location="cpu", weights_only=False)["common"]


def preset_of(cfg: Config) -> str | None:
    """The preset whose model section this config's model equals, if any."""
    for path in sorted(preset_dir().glob("*.yaml")):
        model = from_dict(Config, {"model": read_yaml(path).get("model", {})}).model
        if model == cfg.model:
            return path.stem
    return None


def inference_sections(cfg: Config) -> dict:
    """The run config's sections that inference needs, in the run config's own form."""
    text_encoder = to_dict(cfg.text_encoder)
    vae = to_dict(cfg.vae)
    for section in (text_encoder, vae):
        if section["path"]:
            section["path"] = os.path.abspath(section["path"])
    if vae["kind"] == "release":  # copied into the model directory (write_model_dir)
        vae["path"] = RELEASE_VAE_DIR
    return {"model": to_dict(cfg.model), "sequence": {"mode": cfg.sequence.mode},
            "data": {"resolution": cfg.data.resolution}, "text_encoder": text_encoder, "vae": vae,
            "diffusion": {k: getattr(cfg.diffusion, k) for k in SAMPLER_KEYS}}


def model_card(config: dict) -> str:
    m, src, d = config["model"], config["source"], config["diffusion"]
    te, vae = config["text_encoder"], config["vae"]
    text = (f"built-in hashed words ({te['vocab_size']} buckets, weights in {WEIGHTS})" if te["kind"] == "hashed_words"
            else f"transformers model at {te['path']} (not copied; must exist where this model runs)")
    latent = {"space_to_depth": f"built-in space-to-depth, factor {vae['factor']} (no parameters)",
              "release": f"the released VINCIE VAE, converted, in {RELEASE_VAE_DIR}/ (factor {vae['factor']})"}.get(
        vae["kind"], f"diffusers AutoencoderKL at {vae['path']} (not copied; must exist where this model runs)")
    rows = [
        ("preset", config["preset"] or "custom"),
        ("MM-DiT parameters", f"{config['parameters']:,}"),
        ("shape", f"hidden {m['hidden_size']}, {m['num_layers']} layers ({m['dual_stream_layers']} dual-stream), "
                  f"{m['num_heads']} heads, patch {m['patch_size']}, {m['latent_channels']} latent channels"),
        ("attention", config["sequence"]["mode"]),
        ("resolution", f"{config['data']['resolution']} x {config['data']['resolution']} (inputs are resized to it; "
                       "outputs restored to the input's size)"),
        ("text encoder", text),
        ("latent", latent),
        ("sampler defaults", f"{d['sample_steps']} Euler steps, shift {d['sample_shift']}, guidance "
                             f"{d['cfg_scale']}, network predicts {d['prediction']}"),
    ]
    if "release_dit" in src:  # written by `vincie convert release`
        rows.append(("source", f"the released VINCIE DiT `{src['release_dit']}` (config `{src['release_config']}`), "
                               f"converted by `vincie convert release`, stored as {config['dtype']}"))
        title = f"converted VINCIE release ({os.path.basename(src['release_dit'])})"
        made_by = "`vincie convert release`"
    else:
        rows += [("weights", f"{src['weights']} weights of step {src['step']}, stored as {config['dtype']}"),
                 ("source", f"`{src['checkpoint']}` (trained with tensor parallel {src['parallel']['tensor']}, "
                            f"pipeline parallel {src['parallel']['pipeline']})")]
        title, made_by = f"{src['run_name']} (step {src['step']})", "`vincie export`"
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"""# vincie model: {title}

In-context multi-turn image editing (after VINCIE, arXiv 2506.10941), written by {made_by}.

| | |
|---|---|
{table}

## Use

```bash
vincie edit --model THIS_DIR --image in.png --instruction "..." [--instruction "..."] --out edits/ [--chain-masks]
vincie eval --model THIS_DIR --bench synth --data URL --out eval/
```

In Python (plain PyTorch; megatron-core is not needed):

```python
from vincie.inference.editor import Editor
editor = Editor.load("THIS_DIR")
turns = editor.edit([image], [["first instruction", "second instruction"]])[0]  # image: (H, W, 3) uint8
```

`{WEIGHTS}` holds every parameter under its training name; `{CONFIG}` the dimensions and sampler defaults.
Loading reads only JSON and safetensors.
"""


def export(checkpoint_path: str, out_dir: str, weights: str = "ema", dtype: str = "fp32",
           overwrite: bool = False) -> dict:
    """-> the written config.json content. Raises VincieError on bad input, leaving nothing at `out_dir`."""
    from vincie.training import checkpoint, lora

    if weights not in ("ema", "raw"):
        raise VincieError(f"--weights {weights}: expected 'ema' or 'raw'")
    if dtype not in DTYPES:
        raise VincieError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    check_out_dir(out_dir, overwrite)
    step_dir = resolve_checkpoint(checkpoint_path)
    common = checkpoint_common(step_dir)
    try:
        cfg = from_dict(Config, common["config"])
        validate(cfg)
    except ConfigError as exc:
        raise VincieError(f"{step_dir}: the checkpoint's config is not valid here ({exc})") from None
    state = checkpoint.load_weights(step_dir, use_ema=weights == "ema")
    state = {name: tensor for name, tensor in state.items() if isinstance(tensor, torch.Tensor)}  # no _extra_state
    if cfg.train.lora.rank:  # train.lora's adapters folded into their projections
        state = lora.merge(state, cfg.train.lora)
    model, _ = build_model(cfg, state, torch.device("cpu"), step_dir)  # checks names and shapes
    source = {"checkpoint": os.path.abspath(step_dir), "step": common["step"], "run_name": cfg.run.name,
              "weights": weights, "parallel": {"tensor": cfg.parallel.tensor, "pipeline": cfg.parallel.pipeline}}
    return write_model_dir(cfg, state, count_parameters(model), source, out_dir, dtype)


def check_out_dir(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise VincieError(f"--out {out_dir} exists and is not empty (pass --overwrite to replace it)")


def write_model_dir(cfg: Config, state: dict[str, torch.Tensor], parameters: int, source: dict, out_dir: str,
                    dtype: str = "fp32", write_release_vae: Callable[[str], None] | None = None) -> dict:
    """Weights (training names) and the config's inference sections -> OUT/{model.safetensors, config.json,
    README.md}, written to a temporary directory and renamed into place. A release VAE (vae.kind release) travels
    inside, in OUT/vae/: copied from vae.path, or written by `write_release_vae(dir)` (the converter's).
    -> the config.json content."""
    from safetensors.torch import save_file

    tensors = {name: tensor.detach().to(DTYPES[dtype]).contiguous() for name, tensor in sorted(state.items())}
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "preset": preset_of(cfg),
              "parameters": parameters, "dtype": dtype, **inference_sections(cfg), "source": source}
    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = storage.temp_name(out_dir)
    os.makedirs(tmp)
    try:
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": FORMAT})
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(config, f, indent=1)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(config))
        if cfg.vae.kind == "release":
            vae_dir = os.path.join(tmp, RELEASE_VAE_DIR)
            (write_release_vae or (lambda d: shutil.copytree(cfg.vae.path, d)))(vae_dir)
        if os.path.exists(out_dir):  # replaced (--overwrite, or an empty directory): old moved aside, then deleted
            old = storage.temp_name(out_dir)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return config


# ---------------------------------------------------------------------------------------------------------------
# Loading an export: JSON and safetensors only


def load_model(path: str, device: torch.device):
    """An export directory -> (Config, MMDiT, vae, text encoder), from JSON and safetensors only."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from vincie.model.vae import build_vae

    cfg, _ = read_config(path)
    try:
        weights = load_file(os.path.join(path, WEIGHTS), device="cpu")
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise VincieError(f"{os.path.join(path, WEIGHTS)}: cannot read ({str(exc).splitlines()[0]})") from None
    model, text_encoder = build_model(cfg, weights, device, os.path.join(path, WEIGHTS))
    vae = build_vae(cfg.vae).to(device)
    if vae.channels != cfg.model.latent_channels:
        raise VincieError(f"{path}: the VAE gives {vae.channels} latent channels, the model expects "
                          f"{cfg.model.latent_channels}")
    return cfg, model, vae, text_encoder
