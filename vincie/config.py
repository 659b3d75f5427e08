"""Run configuration: plain dataclasses, loaded from YAML, overridden with `key.sub=value`, validated in one place.

A config source is a preset name (`tiny` -> launch/configs/tiny.yaml, shipped inside the package) or a YAML path.
Keys the file leaves out keep the dataclass defaults below. Every problem (bad YAML, unknown key, wrong type,
inconsistent values) raises `ConfigError` with one line naming the key, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import importlib.util
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vincie.errors import VincieError

TRANSITIONS = ("move", "recolour", "resize", "add", "remove")
Transition = Literal["move", "recolour", "resize", "add", "remove"]
BACKGROUNDS = ("flat", "gradient", "checker", "stripes", "noise")
Background = Literal["flat", "gradient", "checker", "stripes", "noise"]


class ConfigError(VincieError):
    pass


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs/run"  # any fsspec URL; the resolved config is written here as config.yaml
    seed: int = 0


@dataclass
class StorageConfig:
    # S3 endpoint and region; empty means: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS_DEFAULT_REGION from the
    # environment, else the AWS defaults. Credentials come only from the environment (or the AWS config files),
    # never from this config, so a dumped config never holds a secret.
    s3_endpoint_url: str = ""
    s3_region: str = ""
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    max_attempts: int = 3  # botocore's attempts per request
    # the training loader's retries of one session read (on top of botocore's): attempt k waits
    # retry_backoff_s * 2^(k-1) (at most 30 s) before it; after the last, the session is skipped and counted
    read_attempts: int = 6
    retry_backoff_s: float = 0.5


@dataclass
class SynthConfig:
    resolution: int = 64  # square frames, pixels
    min_turns: int = 2
    max_turns: int = 6
    min_objects: int = 1
    max_objects: int = 5
    transitions: list[Transition] = field(default_factory=lambda: list(TRANSITIONS))
    backgrounds: list[Background] = field(default_factory=lambda: list(BACKGROUNDS))  # drawn uniformly per scene
    pairs: bool = False  # one-turn sessions (the paper's "pair data" ablation)
    noise_std: float = 0.0  # sensor noise, in 0..255 pixel units; never touches labels
    jitter_px: int = 0  # camera jitter: per-frame random shift of up to this many pixels; masks follow it
    image_format: Literal["jpg", "png"] = "jpg"
    jpeg_quality: int = 95
    shard_size: int = 256  # sessions per shard


@dataclass
class VLMConfig:
    """An OpenAI-compatible chat-completions endpoint for transition text (`vincie data ingest`)."""
    url: str = ""  # base URL (…/v1) or the full …/chat/completions URL
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this environment variable, never from config
    timeout_s: float = 60.0  # per request
    attempts: int = 3  # per request; a malformed reply counts as a failed attempt
    backoff_s: float = 1.0  # wait before attempt k: backoff_s * 2^(k-1)
    requests_per_s: float = 2.0  # for the whole run, shared by its worker processes
    cache_dir: str = ""  # response cache (local dir); empty: <out>/vlm_cache
    image_side: int = 512  # frames sent at most this size (longer side)


@dataclass
class IngestConfig:
    """`vincie data ingest`: real video -> sessions (data_index/ingest/scenes.py, regions.py, annotators.py)."""
    extensions: list[str] = field(default_factory=lambda: [".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v"])
    decode_threads: int = 1  # FFmpeg threads per video (0: FFmpeg's choice); parallelism is across videos
    max_side: int = 512  # session frames: longer side at most this (pixels)
    detect_side: int = 256  # frames given to the scene detector
    scene_threshold: float = 27.0  # PySceneDetect ContentDetector threshold
    min_scene_s: float = 1.0  # shorter scenes are dropped
    max_scene_s: float = 60.0  # longer scenes are split (bounds memory: one scene's candidates are held)
    candidate_fps: float = 4.0  # frames kept per second as sampling candidates
    interval_s: float = 1.0  # hybrid sampling: a frame every interval_s ...
    per_scene: int = 4  # ... plus this many spread evenly over each scene
    pixel_threshold: float = 30.0  # a pixel changed when a channel differs by more (0..255)
    min_change: float = 0.004  # a frame changing fewer pixels than this share is a near-duplicate (dropped)
    max_change: float = 0.5  # a pair changing more than this share is not one edit (session break)
    dark_luma: float = 20.0  # frames with a lower mean luma are dropped
    border_luma: float = 16.0  # border rows/columns darker than this in every frame are cropped
    max_border: float = 0.25  # scenes with a wider border on one side are dropped
    align: bool = True  # estimate the camera shift between frames (integer translation) before differencing
    max_shift: float = 0.1  # largest camera shift considered, share of the frame size
    close_px: float = 0.08  # offline masks: gaps up to this share of the frame inside a change are closed
    background_ring: float = 0.1  # offline masks: background colours come from this far around the change
    # (share of the frame size)
    rim: float = 0.4  # offline masks: edge pixels nearer the background than this share of the object's typical
    # distance from it are dropped (colours mixed by blur)
    one_sided: float = 0.25  # a frame whose mask is smaller than this share of the other's: appear/disappear
    min_turns: int = 1
    max_turns: int = 6  # longer runs of frames are cut into several sessions
    text: Literal["offline", "vlm"] = "offline"  # transition text annotator
    masks: str = "offline"  # offline | grounded | module.path:ClassName (a MaskAnnotator plug-in)
    masks_weights_dir: str = ""  # grounded: local dir with GroundingDINO and SAM2 weights
    vlm: VLMConfig = field(default_factory=VLMConfig)
    shard_size: int = 64  # sessions per shard (whole videos per shard, so shards may run a little over)
    image_format: Literal["jpg", "png"] = "jpg"
    jpeg_quality: int = 95
    source: str = "video"  # the index's `source` column for these sessions


@dataclass
class SequenceConfig:
    # block_causal: teacher forcing, every turn trained in one pass; full: one target, all-to-all attention
    # (the attention of the released VINCIE checkpoints)
    mode: Literal["block_causal", "full"] = "block_causal"
    # context composition (per turn), the paper's probabilities; a dropped block is removed from the sequence
    drop_current_image: float = 0.2
    drop_current_mask: float = 0.7
    drop_next_mask: float = 0.7
    masks_present: float = 0.8  # per sequence: masks (and so CSP/NSP targets) present at all
    drop_text: float = 0.1  # instruction dropped, for classifier-free guidance


@dataclass
class ModelConfig:
    """The MM-DiT. Presets set these (launch/configs/*.yaml); 3b follows the released VINCIE-3B shape."""
    hidden_size: int = 256
    num_layers: int = 6
    dual_stream_layers: int = 2  # the first N layers keep separate text and image weights
    num_heads: int = 4
    mlp_ratio: float = 4.0  # SwiGLU hidden size = mlp_ratio * hidden_size
    patch_size: int = 1  # latent patch (1 x p x p)
    latent_channels: int = 48  # channels of the latent space (VAE output)
    text_dim: int = 256  # width of the text encoder's output
    max_turns: int = 64  # learned turn-index embeddings
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    spec: Literal["local", "te"] = "local"  # layer implementations: pure PyTorch, or Transformer Engine
    # what a target gets of the image its turn edits (the current image I_k, when in the context), besides attention:
    # "channels": its tokens also carry I_k through their own input projection (InstructPix2Pix's channel
    # concatenation: concat + linear = a sum of two linears); "residual": channels, and a next-image target's
    # output is I_k plus the network's output (x0 prediction only), so the untrained network copies and learning
    # goes to the edit. docs/ARCHITECTURE.md, "The tiny preset"
    source: Literal["none", "channels", "residual"] = "none"
    # each target block's conditioning (timestep + type + turn embedding, which drives adaLN) also gets the mean of
    # its turn's instruction features, projected (SD3's pooled text): a path from the instruction to every target
    # token that does not have to be found through attention first. Zero when the instruction is dropped (CFG)
    pooled_text: bool = False
    # how a target token's final hidden state becomes its C*p*p output values: "linear" (DiT's final layer), or
    # "pointwise": the final layer gives each point of the token (a group of `head_channels` values: one pixel's
    # RGB for the space_to_depth latent, whose token values are channel-major) `head_features` features, and one
    # small MLP shared by all points maps [features, the source's values, the noisy values] at that point to its
    # output. A convolutional decoder's weight sharing for a latent with no decoder (docs/ARCHITECTURE.md)
    output_head: Literal["linear", "pointwise"] = "linear"
    head_channels: int = 3
    head_features: int = 16
    head_hidden: int = 64
    # FP8 GEMMs in the layers' projections (spec te, train.precision bf16); adaLN, embedders, the final layer
    # and attention stay bf16. Format: e4m3 throughout, or hybrid (e4m3 forward, e5m2 gradients)
    fp8: Literal["off", "e4m3", "hybrid"] = "off"
    # scaling: delayed (amax history), tensorwise (current scaling), blockwise (Hopper), mxfp8 (Blackwell)
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "tensorwise"
    attention_backend: Literal["auto", "flex", "sdpa"] = "auto"  # auto: flex on GPU, sdpa on CPU


@dataclass
class TextEncoderConfig:
    kind: Literal["hashed_words", "hf"] = "hashed_words"  # built-in learned word embeddings, or a HF model
    path: str = ""  # local directory of a `transformers` model (kind: hf); never downloaded
    vocab_size: int = 4096  # hashed_words: hash buckets
    max_tokens: int = 32  # per instruction, turn token included


@dataclass
class VAEConfig:
    kind: Literal["space_to_depth", "diffusers"] = "space_to_depth"  # built-in pixel-space latent, or AutoencoderKL
    path: str = ""  # local directory of a `diffusers` AutoencoderKL (kind: diffusers)
    # pixels per latent cell along each side: space_to_depth's cell; for diffusers the AutoencoderKL's downsampling
    # (2^(down blocks - 1)), checked when it loads. Buckets and `vincie plan` need it before any VAE is loaded.
    factor: int = 4


@dataclass
class DiffusionConfig:
    logit_normal_loc: float = 0.0  # training t ~ sigmoid(N(loc, scale)); loc > 0 trains more at high noise
    logit_normal_scale: float = 1.0
    # what the network outputs: the velocity itself, or the clean latent x0 turned into a velocity (JiT, for
    # pixel-space latents whose patches are about as wide as the hidden state); the loss is on the velocity either way
    prediction: Literal["velocity", "x0"] = "velocity"
    # where the squared error is measured: the velocity (the rectified-flow loss) or the clean latent x0 (the
    # velocity error times t^2: the same optimum, with the weight moved from low-noise steps to high-noise ones,
    # where the target must be read from the context)
    loss_space: Literal["velocity", "x0"] = "velocity"
    # loss weight of next-image tokens that touch the turn's changed region (C | N masks; 1 = every token alike, as
    # in the paper): edits cover a few percent of an image, so copying the source is a strong first minimum
    changed_region_weight: float = 1.0
    loss_weights: dict[str, float] = field(default_factory=lambda: {"nip": 1.0, "csp": 0.5, "nsp": 0.5})
    sample_steps: int = 30
    sample_shift: float = 3.0  # timestep shift of the Euler sampler (the release: 12 for 3B at 256px)
    cfg_scale: float = 3.0  # text classifier-free guidance


@dataclass
class DataConfig:
    train_url: str = "runs/run/data/train"
    eval_url: str = "runs/run/data/eval"
    mode: Literal["sessions", "pairs"] = "sessions"  # pairs: train on one-turn pairs only (the paper's ablation)
    resolution: int = 64  # side of the 1:1 bucket (buckets share its area); `vincie edit` resizes to it
    # aspect-ratio buckets, "W:H": each session goes to the bucket nearest its aspect ratio, centre-cropped to it
    # and resized (images: linear with antialiasing, masks: nearest); sides are rounded to the latent cell
    buckets: list[str] = field(default_factory=lambda: ["1:1"])
    max_turns: int = 6  # longer sessions are cut to their first turns
    # a curriculum over session length: {from_step: max_turns}, e.g. {0: 2, 500: 6} trains on sessions cut to
    # 2 turns until step 500 (short sequences, cheap steps), then on up to 6; empty: data.max_turns throughout
    turn_curriculum: dict[int, int] = field(default_factory=dict)
    max_tokens: int = 4096  # sequence cap per sample; whole trailing turns are dropped to fit
    # pack sessions into rows of up to max_tokens tokens (rows of even length: vincie.model.batch.pack_rows; no attention
    # between sessions), as the paper's authors do: far less padding between sessions of different lengths, which
    # pays where attention skips masked tiles (flex, on GPUs); parallel.micro_batch_size then counts rows
    pack: bool = False
    # pad every micro-batch's token count up to a multiple of this. Compiled flex attention (GPUs) builds one kernel
    # per sequence length and, after torch._dynamo.config.recompile_limit (8) of them, runs uncompiled (unfused,
    # the whole score matrix in memory): a coarse multiple keeps the lengths few; data.max_tokens with data.pack
    # gives every row one length
    pad_multiple: int = 1
    # which sessions of the index are used (the index columns split, turns, width/height, source)
    split: str = ""  # only this split; empty: every split
    min_turns: int = 1  # sessions with fewer turns are left out
    min_resolution: int = 0  # sessions whose shorter side has fewer pixels are left out
    # per-epoch resampling by source: 2.0 = every session of that source twice per epoch, 0.5 = a different half
    # each epoch, 0 = none; sources not listed keep 1.0
    source_weights: dict[str, float] = field(default_factory=dict)
    workers: int = 1  # loader processes per rank that read and decode sessions ahead (0: in the training process)
    decode_threads: int = 1  # DALI threads per decoding process
    read_batch: int = 4  # sessions a loader process reads and decodes together (one DALI run)
    prefetch_steps: int = 2  # steps' worth of sessions the loader processes read ahead, together
    # a run stops when more than this share of the sessions it read were bad (skipped), once it read bad_min_sessions
    max_bad_share: float = 0.01
    bad_min_sessions: int = 100
    # each rank appends the keys of the sessions it consumed, per step, to OUT/sessions/rank-NNN.jsonl (cut back
    # to the checkpoint on resume, so it holds what the run committed): an audit of exactly-once reading
    record_sessions: bool = False


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # sessions per optimizer step, over all data-parallel ranks
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    # the EMA's decay at update n is min(ema_decay, (1 + n) / (ema_warmup + n)): while that is below ema_decay the
    # average spans about the last n / (ema_warmup - 1) updates, so short runs do not average in their init
    ema_warmup: float = 10.0
    precision: Literal["fp32", "bf16"] = "fp32"  # autocast dtype for the forward pass
    # activation recomputation: "full" keeps only each layer's input in the forward and runs the layer again in the
    # backward (about a third more compute, a fraction of the activation memory; `vincie plan` shows both)
    recompute: Literal["none", "full"] = "none"
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2


@dataclass
class ParallelConfig:
    """How the model and the batch are split over the processes (megatron-core's parallel_state). The
    data-parallel size is what is left: world size / (tensor x pipeline x context)."""
    tensor: int = 1  # heads and MLP width split over this many ranks
    pipeline: int = 1  # contiguous layer ranges, one stage per rank
    virtual_pipeline: int = 1  # >1: interleaved 1F1B, this many layer chunks per pipeline rank
    context: int = 1  # sequence split for attention (not supported yet: must be 1)
    sequence_parallel: bool = False  # with tensor > 1: norms, modulation and residuals hold 1/tensor of the tokens
    distributed_optimizer: bool = False  # ZeRO-1: optimizer state sharded over data-parallel ranks
    micro_batch_size: int = 0  # sessions (rows with data.pack) per micro-batch on one data-parallel rank; 0 = all


@dataclass
class K8sConfig:
    """A Kubernetes training job (`vincie k8s`, k8s/): nodes x GPUs per node processes under torchrun."""
    kind: Literal["jobset", "pytorchjob"] = "jobset"  # JobSet (jobset.x-k8s.io) or Kubeflow PyTorchJob
    namespace: str = "default"
    image: str = "vincie:0.1.0"  # built from k8s/image/Dockerfile and pushed where the cluster pulls from
    nodes: int = 1
    gpus_per_node: int = 8  # torchrun processes per pod
    cpu: str = "32"  # per pod (Kubernetes quantities)
    memory: str = "256Gi"
    shm_size: str = "64Gi"  # /dev/shm (memory-backed emptyDir) for the loader processes and NCCL
    # Secret (created by the user, never rendered) with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and optionally
    # AWS_ENDPOINT_URL and AWS_DEFAULT_REGION: the S3 credentials and endpoint
    s3_secret: str = "vincie-s3"
    # PersistentVolumeClaim (ReadWriteMany) for run.out_dir: checkpoints, metrics.jsonl; mounted at /checkpoints,
    # run.out_dir becomes /checkpoints/<run.name> in the rendered config
    checkpoint_pvc: str = "vincie-checkpoints"
    # torchrun restarts of dead worker processes inside a pod, and restarts of the whole job (JobSet
    # failurePolicy.maxRestarts, PyTorchJob runPolicy.backoffLimit); each resumes from the latest checkpoint
    max_restarts: int = 3


@dataclass
class MetricsConfig:
    """Prometheus endpoint and utilisation figures (vincie/training/metrics.py)."""
    # base port of the HTTP endpoint: the process with local rank L serves http://0.0.0.0:(port + L)/metrics;
    # 0 = no endpoint (the figures still go to metrics.jsonl and the progress bar)
    port: int = 0
    # the device's peak dense TFLOP/s at the training precision (e.g. 989 for an H100 SXM in bf16), for MFU;
    # 0 = unknown: model TFLOP/s is reported, MFU is not
    peak_tflops: float = 0.0


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    k8s: K8sConfig = field(default_factory=K8sConfig)


def bucket_shapes(cfg: Config) -> list[tuple[int, int]]:
    """(height, width) in pixels of each data.buckets entry "W:H": the area of the resolution x resolution square,
    each side rounded to the nearest multiple of the latent cell (vae.factor x model.patch_size), at least one."""
    cell = cfg.vae.factor * cfg.model.patch_size
    shapes = []
    for text in cfg.data.buckets:
        w, h = (int(v) for v in text.split(":"))
        side = lambda x: max(cell, round(cfg.data.resolution * (x / math.sqrt(w * h)) / cell) * cell)  # noqa: E731
        shapes.append((side(h), side(w)))
    return shapes


def ffn_hidden_size(m: ModelConfig) -> int:
    """SwiGLU hidden width: 2/3 of mlp_ratio x hidden (the LLaMA convention, same FLOPs as a plain x4 MLP),
    rounded up to a multiple of 64."""
    return -(-int(2 * m.mlp_ratio * m.hidden_size / 3) // 64) * 64


# ---------------------------------------------------------------------------------------------------------------
# Loading


def preset_dir() -> Path:
    return Path(str(importlib.resources.files("launch") / "configs"))


def preset_names() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def resolve_source(source: str) -> Path:
    """A preset name or a YAML path -> the file to read."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file {source} does not exist (expected a YAML file or a preset: "
                              f"{', '.join(preset_names())})")
        return path
    preset = preset_dir() / f"{source}.yaml"
    if not preset.is_file():
        raise ConfigError(f"unknown config preset '{source}' (expected one of: {', '.join(preset_names())}, "
                          "or a path ending in .yaml)")
    return preset


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"cannot parse {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (run:, data:, ...), got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML: 3 -> int, true -> bool, [1, 2] -> list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. synth.resolution=32)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(raw: dict, path: list[str], value: Any) -> None:
    node = raw
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = value


def load_config(source: str = "tiny", overrides: typing.Sequence[str] = ()) -> Config:
    path = resolve_source(source)
    raw = read_yaml(path)
    for text in overrides:
        apply_override(raw, *parse_override(text))
    cfg = from_dict(Config, raw, prefix="")
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Typed construction from plain data


def all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        hint = typing.get_type_hints(cls)[f.name]
        keys += all_keys(hint, name + ".") if dataclasses.is_dataclass(hint) else [name]
    return keys


def unknown_key_error(cls: type, prefix: str, key: str) -> ConfigError:
    full = prefix + str(key)
    candidates = all_keys(Config)
    near = difflib.get_close_matches(full, candidates, n=3, cutoff=0.6)
    if not near:  # compare the last part alone, so `synth.resolutoin` and `resolutoin` both find a match
        local = [prefix + f.name for f in dataclasses.fields(cls)]
        near = difflib.get_close_matches(full, local, n=3, cutoff=0.4)
    hint = f"did you mean {' or '.join(repr(n) for n in near)}?" if near else \
        f"valid keys here: {', '.join(f.name for f in dataclasses.fields(cls))}"
    return ConfigError(f"unknown config key '{full}' ({hint})")


def type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is list:
        return f"a list of {type_name(typing.get_args(hint)[0])}"
    if origin is dict:
        return f"a mapping of {type_name(typing.get_args(hint)[1])}"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    expected = f"config key '{key}' expects {type_name(hint)}, got {type(value).__name__} {value!r}"
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(expected)
        return from_dict(hint, value, prefix=key + ".")
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(expected)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(expected)
        (item,) = typing.get_args(hint)
        return [convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(expected)
        key_type, value_type = typing.get_args(hint)
        return {convert(key_type, k, key): convert(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            if option is type(None) and value is None:
                return None
        option = next(o for o in typing.get_args(hint) if o is not type(None))
        return convert(option, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(expected)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(expected)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(expected)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(expected)
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")


def from_dict(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise unknown_key_error(cls, prefix, key)
    values = {name: convert(hints[name], raw[name], prefix + name) for name in names if name in raw}
    return cls(**values)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------------------------------------------------------
# Validation: every rule that spans more than one value's type lives here.


def require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}' {message}")


def validate_synth(s: SynthConfig, prefix: str = "synth.") -> None:
    require(16 <= s.resolution <= 1024 and s.resolution % 8 == 0, prefix + "resolution",
            f"must be a multiple of 8 between 16 and 1024, got {s.resolution}")
    require(s.min_turns >= 1, prefix + "min_turns", f"must be >= 1, got {s.min_turns}")
    require(s.max_turns >= s.min_turns, prefix + "max_turns",
            f"must be >= min_turns ({s.min_turns}), got {s.max_turns}")
    require(s.max_turns <= 63, prefix + "max_turns", f"must be <= 63 (64 images), got {s.max_turns}")
    require(1 <= s.min_objects <= s.max_objects, prefix + "min_objects",
            f"must be between 1 and max_objects ({s.max_objects}), got {s.min_objects}")
    require(s.max_objects <= 6, prefix + "max_objects", f"must be <= 6 (one colour each), got {s.max_objects}")
    require(len(s.transitions) > 0, prefix + "transitions", "must name at least one transition")
    require(len(set(s.transitions)) == len(s.transitions), prefix + "transitions", "must not repeat a transition")
    require(len(s.backgrounds) > 0, prefix + "backgrounds", "must name at least one background")
    require(len(set(s.backgrounds)) == len(s.backgrounds), prefix + "backgrounds", "must not repeat a background")
    require(s.noise_std >= 0, prefix + "noise_std", f"must be >= 0, got {s.noise_std}")
    require(0 <= s.jitter_px <= s.resolution // 8, prefix + "jitter_px",
            f"must be between 0 and resolution/8 ({s.resolution // 8}), got {s.jitter_px}")
    require(1 <= s.jpeg_quality <= 100, prefix + "jpeg_quality", f"must be in 1..100, got {s.jpeg_quality}")
    require(s.shard_size >= 1, prefix + "shard_size", f"must be >= 1, got {s.shard_size}")


def validate_ingest(g: IngestConfig, prefix: str = "ingest.") -> None:
    require(len(g.extensions) > 0 and all(e.startswith(".") for e in g.extensions), prefix + "extensions",
            f"must list file suffixes starting with '.', got {g.extensions}")
    require(g.decode_threads >= 0, prefix + "decode_threads", f"must be >= 0, got {g.decode_threads}")
    for name in ("max_side", "detect_side"):
        require(getattr(g, name) >= 16, prefix + name, f"must be >= 16, got {getattr(g, name)}")
    for name in ("min_scene_s", "candidate_fps", "interval_s", "scene_threshold", "pixel_threshold"):
        require(getattr(g, name) > 0, prefix + name, f"must be > 0, got {getattr(g, name)}")
    require(g.max_scene_s > g.min_scene_s, prefix + "max_scene_s",
            f"must be > min_scene_s ({g.min_scene_s}), got {g.max_scene_s}")
    require(g.per_scene >= 0, prefix + "per_scene", f"must be >= 0, got {g.per_scene}")
    require(0 <= g.min_change < g.max_change <= 1, prefix + "min_change",
            f"and max_change must satisfy 0 <= min_change < max_change <= 1, got {g.min_change}, {g.max_change}")
    for name in ("max_border", "max_shift", "close_px", "background_ring", "rim", "one_sided"):
        require(0 <= getattr(g, name) < 1, prefix + name, f"must be in [0, 1), got {getattr(g, name)}")
    require(1 <= g.min_turns <= g.max_turns, prefix + "min_turns",
            f"must be between 1 and max_turns ({g.max_turns}), got {g.min_turns}")
    require(g.max_turns <= 63, prefix + "max_turns", f"must be <= 63 (64 images), got {g.max_turns}")
    require(g.masks in ("offline", "grounded") or re.fullmatch(r"[\w.]+:\w+", g.masks) is not None, prefix + "masks",
            f"must be offline, grounded or module.path:ClassName, got {g.masks!r}")
    require(g.masks != "grounded" or g.masks_weights_dir != "", prefix + "masks_weights_dir",
            "must name the local weights directory when ingest.masks is grounded")
    require(g.text != "vlm" or (g.vlm.url != "" and g.vlm.model != ""), prefix + "vlm.url",
            "and ingest.vlm.model must be set when ingest.text is vlm")
    v = g.vlm
    require(v.timeout_s > 0, prefix + "vlm.timeout_s", f"must be > 0, got {v.timeout_s}")
    require(v.attempts >= 1, prefix + "vlm.attempts", f"must be >= 1, got {v.attempts}")
    require(v.backoff_s >= 0, prefix + "vlm.backoff_s", f"must be >= 0, got {v.backoff_s}")
    require(v.requests_per_s > 0, prefix + "vlm.requests_per_s", f"must be > 0, got {v.requests_per_s}")
    require(v.image_side >= 16, prefix + "vlm.image_side", f"must be >= 16, got {v.image_side}")
    require(1 <= g.jpeg_quality <= 100, prefix + "jpeg_quality", f"must be in 1..100, got {g.jpeg_quality}")
    require(g.shard_size >= 1, prefix + "shard_size", f"must be >= 1, got {g.shard_size}")
    require(re.fullmatch(r"[\w-]+", g.source) is not None, prefix + "source",
            f"must be a plain name (letters, digits, '_', '-'), got {g.source!r}")


def validate_parallel(cfg: Config) -> None:
    """The sizes that do not depend on the world size; `check_world` checks the rest once it is known."""
    p, m = cfg.parallel, cfg.model
    for name in ("tensor", "pipeline", "virtual_pipeline", "context"):
        require(getattr(p, name) >= 1, f"parallel.{name}", f"must be >= 1, got {getattr(p, name)}")
    require(p.context == 1, "parallel.context", f"must be 1 (context parallel is not supported yet), got {p.context}")
    require(m.num_heads % p.tensor == 0, "parallel.tensor",
            f"must divide model.num_heads ({m.num_heads}), got {p.tensor}")
    require(m.hidden_size % p.tensor == 0, "parallel.tensor",
            f"must divide model.hidden_size ({m.hidden_size}), got {p.tensor}")
    require(ffn_hidden_size(m) % p.tensor == 0, "parallel.tensor",
            f"must divide the MLP width ({ffn_hidden_size(m)}), got {p.tensor}")
    require(m.num_layers % (p.pipeline * p.virtual_pipeline) == 0, "parallel.pipeline",
            f"x parallel.virtual_pipeline ({p.pipeline} x {p.virtual_pipeline}) must divide model.num_layers "
            f"({m.num_layers})")
    require(p.virtual_pipeline == 1 or p.pipeline > 1, "parallel.virtual_pipeline",
            f"needs parallel.pipeline > 1, got {p.virtual_pipeline} with parallel.pipeline 1")
    require(not p.sequence_parallel or p.tensor > 1, "parallel.sequence_parallel",
            "needs parallel.tensor > 1")
    require(p.micro_batch_size >= 0, "parallel.micro_batch_size", f"must be >= 0, got {p.micro_batch_size}")
    require(not cfg.data.pack or p.pipeline == 1 or p.micro_batch_size <= 1, "parallel.micro_batch_size",
            f"must be 0 or 1 with data.pack and parallel.pipeline > 1 (the pipeline sends micro-batches of one "
            f"shape, and packing varies the number of rows), got {p.micro_batch_size}")


def check_model_parallel(p: ParallelConfig, world_size: int) -> int:
    """-> the data-parallel size: what TP x PP x CP leaves of `world_size` processes."""
    model_parallel = p.tensor * p.pipeline * p.context
    require(world_size % model_parallel == 0, "parallel.tensor",
            f"x parallel.pipeline x parallel.context ({p.tensor} x {p.pipeline} x {p.context}) must divide "
            f"the world size ({world_size})")
    return world_size // model_parallel


def check_world(cfg: Config, world_size: int) -> int:
    """-> the data-parallel size for `world_size` processes; a one-line error when the sizes do not divide."""
    p = cfg.parallel
    dp = check_model_parallel(p, world_size)
    require(cfg.train.batch_size % dp == 0, "train.batch_size",
            f"({cfg.train.batch_size}) must be divisible by the number of data-parallel ranks ({dp})")
    local = cfg.train.batch_size // dp
    micro = p.micro_batch_size or local
    require(cfg.data.pack or local % micro == 0, "parallel.micro_batch_size",
            f"must divide the sessions per data-parallel rank ({local}), got {micro}")
    return dp


def validate(cfg: Config) -> None:
    validate_synth(cfg.synth)
    validate_ingest(cfg.ingest)
    for name in ("drop_current_image", "drop_current_mask", "drop_next_mask", "masks_present", "drop_text"):
        value = getattr(cfg.sequence, name)
        require(0.0 <= value <= 1.0, f"sequence.{name}", f"must be a probability in [0, 1], got {value}")
    require(cfg.run.name != "", "run.name", "must not be empty")
    require(cfg.run.out_dir != "", "run.out_dir", "must not be empty")
    m = cfg.model
    require(m.hidden_size % m.num_heads == 0, "model.num_heads",
            f"must divide model.hidden_size ({m.hidden_size}), got {m.num_heads}")
    require((m.hidden_size // m.num_heads) % 8 == 0, "model.num_heads",
            f"must leave a head dimension divisible by 8 (3D RoPE), got {m.hidden_size // m.num_heads}")
    require(0 <= m.dual_stream_layers <= m.num_layers, "model.dual_stream_layers",
            f"must be between 0 and model.num_layers ({m.num_layers}), got {m.dual_stream_layers}")
    require(set(cfg.diffusion.loss_weights) == {"nip", "csp", "nsp"}, "diffusion.loss_weights",
            f"must give weights for exactly nip, csp and nsp, got {sorted(cfg.diffusion.loss_weights)}")
    require(cfg.diffusion.logit_normal_scale > 0, "diffusion.logit_normal_scale", "must be > 0")
    require(cfg.diffusion.sample_steps >= 1, "diffusion.sample_steps", "must be >= 1")
    require(cfg.diffusion.changed_region_weight >= 1, "diffusion.changed_region_weight",
            f"must be >= 1 (1: no extra weight), got {cfg.diffusion.changed_region_weight}")
    require(cfg.diffusion.sample_shift > 0, "diffusion.sample_shift", "must be > 0")
    require(m.source != "residual" or cfg.diffusion.prediction == "x0", "model.source",
            "'residual' adds the current image to a predicted clean image: it needs diffusion.prediction=x0, got "
            f"{cfg.diffusion.prediction}")
    if m.output_head == "pointwise":
        require(m.source != "none", "model.output_head",
                "'pointwise' reads the source image per point: it needs model.source=channels or residual")
        require(m.head_channels >= 1 and (m.latent_channels * m.patch_size ** 2) % m.head_channels == 0,
                "model.head_channels", f"must divide the token's {m.latent_channels * m.patch_size ** 2} values "
                f"(latent_channels * patch_size^2), got {m.head_channels}")
        require(m.head_features >= 1 and m.head_hidden >= 1, "model.head_features",
                f"model.head_features and model.head_hidden must be >= 1, got {m.head_features}, {m.head_hidden}")
    if cfg.vae.kind == "space_to_depth":
        require(m.latent_channels == 3 * cfg.vae.factor ** 2, "model.latent_channels",
                f"must be 3 * vae.factor^2 = {3 * cfg.vae.factor ** 2} for the space_to_depth VAE, "
                f"got {m.latent_channels}")
    if cfg.text_encoder.kind == "hashed_words":
        require(m.text_dim == m.hidden_size, "model.text_dim",
                f"must equal model.hidden_size ({m.hidden_size}) for the hashed_words text encoder, got {m.text_dim}")
    for kind, path, name in ((cfg.text_encoder.kind, cfg.text_encoder.path, "text_encoder"),
                             (cfg.vae.kind, cfg.vae.path, "vae")):
        if kind in ("hf", "diffusers"):
            require(path != "", f"{name}.path", f"must name a local model directory when {name}.kind is {kind}")
    t = cfg.train
    require(t.steps >= 1, "train.steps", "must be >= 1")
    require(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    require(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio",
            f"must be in [0, 1] (the cosine's floor as a share of train.lr), got {t.min_lr_ratio}")
    require(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", "must be two numbers in [0, 1)")
    require(0 <= t.ema_decay < 1, "train.ema_decay", "must be in [0, 1)")
    require(t.ema_warmup > 1, "train.ema_warmup", f"must be > 1 (10: the usual warmup), got {t.ema_warmup}")
    require(t.checkpoint_every >= 1 and t.keep_checkpoints >= 1, "train.checkpoint_every",
            "and train.keep_checkpoints must be >= 1")
    require(cfg.data.max_turns >= 1, "data.max_turns", "must be >= 1")
    curriculum = cfg.data.turn_curriculum
    require(not curriculum or 0 in curriculum, "data.turn_curriculum", f"must start at step 0, got {curriculum}")
    require(all(1 <= k <= cfg.data.max_turns for k in curriculum.values()), "data.turn_curriculum",
            f"turns must be in 1..data.max_turns ({cfg.data.max_turns}), got {curriculum}")
    cell = cfg.vae.factor * m.patch_size
    require(cfg.data.resolution % cell == 0, "data.resolution",
            f"must be a multiple of vae.factor x model.patch_size ({cell}), got {cfg.data.resolution}")
    validate_parallel(cfg)
    validate_precision(cfg)
    validate_data(cfg)
    st = cfg.storage
    require(st.connect_timeout_s > 0, "storage.connect_timeout_s", "must be > 0")
    require(st.read_timeout_s > 0, "storage.read_timeout_s", "must be > 0")
    require(st.max_attempts >= 1, "storage.max_attempts", "must be >= 1")
    require(st.read_attempts >= 1, "storage.read_attempts", "must be >= 1")
    require(st.retry_backoff_s >= 0, "storage.retry_backoff_s", "must be >= 0")
    require(cfg.metrics.port == 0 or 1024 <= cfg.metrics.port <= 65535, "metrics.port",
            f"must be 0 (off) or a port in 1024..65535, got {cfg.metrics.port}")
    validate_k8s(cfg.k8s)
    require(cfg.metrics.peak_tflops >= 0, "metrics.peak_tflops",
            f"must be >= 0 (0: unknown, no MFU), got {cfg.metrics.peak_tflops}")


QUANTITY = r"[0-9]+(\.[0-9]+)?([numkMGTPE]|[KMGTPE]i)?"
DNS_LABEL = r"[a-z]([-a-z0-9]*[a-z0-9])?"


def validate_k8s(k: K8sConfig) -> None:
    require(re.fullmatch(DNS_LABEL, k.namespace) is not None and len(k.namespace) <= 63, "k8s.namespace",
            f"must be a DNS label (lowercase letters, digits, '-'), got {k.namespace!r}")
    require(k.image != "", "k8s.image", "must name a container image")
    require(k.nodes >= 1, "k8s.nodes", f"must be >= 1, got {k.nodes}")
    require(1 <= k.gpus_per_node <= 8, "k8s.gpus_per_node",
            f"must be in 1..8 (metrics ports metrics.port..+7 per pod), got {k.gpus_per_node}")
    for name in ("cpu", "memory", "shm_size"):
        value = getattr(k, name)
        require(re.fullmatch(QUANTITY, value) is not None, f"k8s.{name}",
                f"must be a Kubernetes quantity such as 32, 500m, 256Gi, got {value!r}")
    for name in ("s3_secret", "checkpoint_pvc"):
        value = getattr(k, name)
        require(re.fullmatch(DNS_LABEL, value) is not None, f"k8s.{name}",
                f"must name a Kubernetes object (DNS label), got {value!r}")
    require(k.max_restarts >= 0, "k8s.max_restarts", f"must be >= 0, got {k.max_restarts}")


TE_INSTALL = "pip install --no-build-isolation 'transformer_engine[pytorch]' (on a CUDA machine)"


def have_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def fp8_gemm_shapes(m: ModelConfig, tensor: int) -> dict[str, tuple[int, int]]:
    """(in, out) features of each layer projection on one tensor-parallel rank: the FP8 GEMMs' weight dims."""
    h, f = m.hidden_size, ffn_hidden_size(m)
    return {"linear_qkv": (h, 3 * h // tensor), "linear_proj": (h // tensor, h),
            "linear_fc1": (h, 2 * f // tensor), "linear_fc2": (f // tensor, h)}


def fp8_alignment(recipe: str) -> int:
    """FP8 GEMM dimensions must be multiples of this (MXFP8 scales blocks of 32 values)."""
    return 32 if recipe == "mxfp8" else 16


def validate_precision(cfg: Config) -> None:
    m = cfg.model
    if m.spec == "te" or m.fp8 != "off":
        require(have_transformer_engine(), "model.spec" if m.fp8 == "off" else "model.fp8",
                f"needs Transformer Engine, which is not installed: {TE_INSTALL}; or use model.spec=local "
                "model.fp8=off")
    if m.fp8 == "off":
        return
    require(m.spec == "te", "model.fp8", f"needs model.spec=te (Transformer Engine layers), got {m.spec!r}")
    require(cfg.train.precision == "bf16", "model.fp8", f"needs train.precision=bf16, got {cfg.train.precision!r}")
    require(cfg.train.recompute == "none" or m.fp8_recipe != "delayed", "train.recompute",
            "'full' with model.fp8_recipe=delayed would record each GEMM's amax twice per step (forward and "
            "recompute) in the delayed-scaling history; use a current-scaling recipe (tensorwise) or recompute=none")
    align = fp8_alignment(m.fp8_recipe)
    for name, (n_in, n_out) in fp8_gemm_shapes(m, cfg.parallel.tensor).items():
        require(n_in % align == 0 and n_out % align == 0, "model.fp8",
                f"needs every FP8 GEMM dimension to be a multiple of {align}: {name} is {n_in} x {n_out} per "
                f"tensor-parallel rank (model.hidden_size {m.hidden_size}, MLP width {ffn_hidden_size(m)}, "
                f"parallel.tensor {cfg.parallel.tensor})")


def validate_data(cfg: Config) -> None:
    d = cfg.data
    require(d.pad_multiple >= 1, "data.pad_multiple", f"must be >= 1, got {d.pad_multiple}")
    require(len(d.buckets) > 0, "data.buckets", "must list at least one aspect ratio")
    for text in d.buckets:
        require(re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", text) is not None, "data.buckets",
                f"entries must look like W:H with positive integers (e.g. 16:9), got {text!r}")
    require(len(set(bucket_shapes(cfg))) == len(d.buckets), "data.buckets",
            f"must give distinct sizes at data.resolution {d.resolution}, got {d.buckets} -> {bucket_shapes(cfg)}")
    require(d.min_turns >= 1, "data.min_turns", f"must be >= 1, got {d.min_turns}")
    require(d.min_resolution >= 0, "data.min_resolution", f"must be >= 0, got {d.min_resolution}")
    require(all(w >= 0 for w in d.source_weights.values()), "data.source_weights",
            f"must be >= 0, got {d.source_weights}")
    require(d.workers >= 0, "data.workers", f"must be >= 0, got {d.workers}")
    require(d.decode_threads >= 1, "data.decode_threads", f"must be >= 1, got {d.decode_threads}")
    require(d.read_batch >= 1, "data.read_batch", f"must be >= 1, got {d.read_batch}")
    require(d.prefetch_steps >= 1, "data.prefetch_steps", f"must be >= 1, got {d.prefetch_steps}")
    require(0 <= d.max_bad_share <= 1, "data.max_bad_share", f"must be in [0, 1], got {d.max_bad_share}")
    require(d.bad_min_sessions >= 1, "data.bad_min_sessions", f"must be >= 1, got {d.bad_min_sessions}")
