"""The config's sections: plain dataclasses with their defaults, and values derived from them.

A preset (launch/configs/*.yaml) or a YAML file sets some of these fields; the rest keep the defaults below.
Loading and overrides: vincie.config.load; rules across fields: vincie.config.rules.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from typing import Literal

TRANSITIONS = ("move", "recolour", "resize", "add", "remove")  # the default; `undo` refers back (world.py)
Transition = Literal["move", "recolour", "resize", "add", "remove", "undo"]
BACKGROUNDS = ("flat", "gradient", "checker", "stripes", "noise")
Background = Literal["flat", "gradient", "checker", "stripes", "noise"]


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
    # block_causal: teacher forcing, every turn trained in one pass; full: one target, all-to-all attention;
    # release: the released VINCIE's training sequence (docs/release.md): the session's images, all noised at one
    # timestep and all with a velocity target, clean context in the input channels (model.input_layout=release),
    # then its instructions; all-to-all attention; no masks
    mode: Literal["block_causal", "full", "release"] = "block_causal"
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
    # goes to the edit. docs/training.md, "The tiny preset, and why"
    source: Literal["none", "channels", "residual"] = "none"
    # each target block's conditioning (timestep + type + turn embedding, which drives adaLN) also gets the mean of
    # its turn's instruction features, projected (SD3's pooled text): a path from the instruction to every target
    # token that does not have to be found through attention first. Zero when the instruction is dropped (CFG)
    pooled_text: bool = False
    # how a target token's final hidden state becomes its C*p*p output values: "linear" (DiT's final layer), or
    # "pointwise": the final layer gives each point of the token (a group of `head_channels` values: one pixel's
    # RGB for the space_to_depth latent, whose token values are channel-major) `head_features` features, and one
    # small MLP shared by all points maps [features, the source's values, the noisy values] at that point to its
    # output. A convolutional decoder's weight sharing for a latent with no decoder (docs/training.md, "The tiny
    # preset, and why")
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
    # Options that reproduce the released VINCIE DiTs exactly (docs/release.md); the defaults are vincie's own.
    head_dim: int = 0  # attention width per head; 0: hidden_size / num_heads (the 7B: 32 x 128 on 3584)
    ffn_multiple: int = 64  # the SwiGLU width is rounded up to a multiple of this (the release: 256)
    qkv_bias: bool = True  # a bias in the attention's qkv projection (the release: none; its output has one)
    mlp_bias: bool = True  # biases in the SwiGLU projections (the release: none)
    # head dimensions per RoPE axis (time, row, col): "time_first": rows and columns a third each (even), time the
    # rest; "thirds": each axis a third (even), the remainder not rotated (the release)
    rope_axes: Literal["time_first", "thirds"] = "time_first"
    rope_dim: int = 0  # head dimensions RoPE covers (the rest pass unrotated); 0: all (the release's 7B: 120 of 128)
    # the text features' projection: "linear", or "mlp_norm": Linear(D, D), GELU (tanh), Linear(D, hidden), RMSNorm
    # with a weight (the release's 7B)
    text_projector: Literal["linear", "mlp_norm"] = "linear"
    # a latent token's RoPE time: "offset": 4096 + the index of its image (vincie); "after_text": the image index +
    # the session's text length (the release's 3B); "image_index": the image index (the release's 7B)
    rope_time: Literal["offset", "after_text", "image_index"] = "offset"
    # what drives adaLN: "block": timestep + block type + turn embeddings per block; "timestep": the timestep
    # alone (the release, whose inputs give every token of a session the session's one timestep)
    conditioning: Literal["block", "timestep"] = "block"
    # a learned vector per turn, in the text encoder's feature space, as the first token of each instruction
    # (the release's prompt-id embedding); the sequence gives that token's slot
    turn_token: bool = False
    # what a latent token carries: "latent": its latent (noisy or clean by block); "release": [noisy latent,
    # clean latent or 0, context flag] on the channel axis, (2C + 1) x p x p values (the release's 33 for 3B); in
    # the block-causal and full sequences a clean block is [x, x, 1] and a NOISY one [x_t, 0, 0]
    input_layout: Literal["latent", "release"] = "latent"
    # the final layer's shift and scale: "own" (DiT: a projection of the conditioning), "shared": the shared adaLN
    # projection's attention shift / scale plus learned offsets, after an RMSNorm with a weight (the release)
    final_modulation: Literal["own", "shared"] = "own"


@dataclass
class TextEncoderConfig:
    # built-in learned word embeddings; a `transformers` encoder (AutoModel); the release's encoders: "t5" a T5
    # encoder (the 7B's flan-ul2), "causal_lm" a causal LM's last hidden states (the 3B's Qwen-14B-derived llm14b)
    kind: Literal["hashed_words", "hf", "t5", "causal_lm"] = "hashed_words"
    path: str = ""  # local directory of a `transformers` model (kinds hf, t5, causal_lm); never downloaded
    # run Python code shipped in that directory (the 3B's llm14b has its own modeling and tokenizer code): only for
    # a directory you trust
    trust_remote_code: bool = False
    vocab_size: int = 4096  # hashed_words: hash buckets
    max_tokens: int = 32  # per instruction: hashed_words' start token included; a release's turn token comes on top
    # how an instruction becomes the encoder's text: "" as written; else a format string with {instruction}
    # (stripped of surrounding spaces and periods), {turn} and {next_turn}, e.g. the release's
    # "Based on <IMG{turn}>, {instruction}. Output <IMG{next_turn}>: "
    prompt_template: str = ""


@dataclass
class VAEConfig:
    # the built-in pixel-space latent, a diffusers AutoencoderKL, or a released VINCIE VAE converted by
    # `vincie convert release --vae` (docs/release.md)
    kind: Literal["space_to_depth", "diffusers", "release"] = "space_to_depth"
    # local directory of the AutoencoderKL (diffusers) or of the converted VAE (release); in a model directory's
    # config.json a relative path is relative to that directory
    path: str = ""
    # pixels per latent cell along each side: space_to_depth's cell; for the others the VAE's downsampling
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
    # sequence.mode release: guidance's negative text, which replaces all of a session's instructions (the release's
    # "Worst quality, ..."); other modes leave the turn's instruction out instead
    negative_prompt: str = ""


@dataclass
class DataConfig:
    train_url: str = "runs/run/data/train"
    eval_url: str = "runs/run/data/eval"  # held-out sessions `vincie eval` reports on by default (a test split)
    # held-out sessions validation reads during training (train.eval_every): a validation split, apart from
    # eval_url's test split, so that what a run is tuned on is not what it reports
    val_url: str = ""
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
    # pack sessions into rows of up to max_tokens tokens (rows of even length: vincie.model.batch.pack_rows; no
    # attention between sessions), as the paper's authors do: far less padding between sessions of different
    # lengths, which pays where attention skips masked tiles (flex, on GPUs); parallel.micro_batch_size then counts
    # rows
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
    # dali: NVIDIA DALI (nvJPEG on a GPU); pil: PIL, the reference it is tested against, for machines without DALI
    decoder: Literal["dali", "pil"] = "dali"
    decode_threads: int = 1  # threads per decoding process
    read_batch: int = 4  # sessions a loader process reads and decodes together (one DALI run)
    prefetch_steps: int = 2  # steps' worth of sessions the loader processes read ahead, together
    # a run stops when more than this share of the sessions it read were bad (skipped), once it read bad_min_sessions
    max_bad_share: float = 0.01
    bad_min_sessions: int = 100
    # each rank appends the keys of the sessions it consumed, per step, to OUT/sessions/rank-NNN.jsonl (cut back
    # to the checkpoint on resume, so it holds what the run committed): an audit of exactly-once reading
    record_sessions: bool = False


LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass
class LoRAConfig:
    """Low-rank adapters (train.lora): the MM-DiT's chosen projections get W + (alpha / rank) B A with A (rank x in)
    and B (out x rank, zero at the start); everything else is frozen, and `vincie export` merges them."""
    rank: int = 0  # 0: off (every parameter trains)
    alpha: float = 0.0  # 0: the rank (scale 1)
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


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
    # a model directory (`vincie export` or `vincie convert release`) whose weights a new run starts from (a run
    # with a checkpoint resumes from that instead); its model section must equal this config's
    init_from: str = ""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # validation every this many steps (and at the last step; 0 = never) on data.val_url's first eval_sessions
    # sessions (vincie/evaluation/validation.py): the loss per task and turn at each of eval_timesteps, with noise
    # and context dropout fixed per session (curves compare across steps and runs); then, on the first
    # eval_success_sessions of them, edits by the EMA weights scored by the synthetic judge (success per turn)
    # and a sample grid PNG (OUT/validation/step-N.png). Its random streams are its own: the training's are
    # unchanged.
    eval_every: int = 0
    eval_sessions: int = 8
    eval_timesteps: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    eval_success_sessions: int = 4  # 0: losses only; > 0 needs parallel.tensor = pipeline = 1 (one process edits)
    eval_sample_steps: int = 0  # sampler steps of those edits; 0: diffusion.sample_steps


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
    # failurePolicy.maxRestarts, PyTorchJob runPolicy.backoffLimit); each resumes from the latest checkpoint.
    # A JobSet's restarts after a preemption, eviction or node drain are not counted
    max_restarts: int = 3
    # seconds a pod has between SIGTERM and SIGKILL (terminationGracePeriodSeconds): the training processes finish
    # the step in progress and write a checkpoint in this time (torchrun waits for them 10 s less)
    termination_grace_s: int = 300
    # Kueue: the LocalQueue that admits the job (label kueue.x-k8s.io/queue-name); empty: not queued by Kueue
    queue: str = ""


@dataclass
class MetricsConfig:
    """Prometheus endpoint and utilisation figures (vincie/training/metrics.py)."""
    # base port of the HTTP endpoint: the process with local rank L serves http://0.0.0.0:(port + L)/metrics;
    # 0 = no endpoint (the figures still go to metrics.jsonl and the progress bar)
    port: int = 0
    # the GPU card MFU is stated against (vincie/gpus.py: model TFLOP/s over the card's datasheet dense peak at
    # train.precision, bf16 for FP8 runs too): a card of vincie.gpus.CARDS (a100, h100, h200, b200), or "auto",
    # the card torch.cuda.get_device_name() names; on the CPU or an unlisted card model TFLOP/s is reported, MFU is not
    gpu: str = "auto"
    # an explicit dense peak TFLOP/s per GPU at train.precision, replacing the card's: for a card the table lacks
    # (an H100 PCIe: 756 in bf16); 0 = the card's datasheet figure
    peak_tflops: float = 0.0
    # also write the training and validation series and the validation sample grids as TensorBoard events
    # (OUT/tensorboard, rank 0): `tensorboard --logdir OUT/tensorboard`
    tensorboard: bool = False


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
    rounded up to a multiple of model.ffn_multiple."""
    return -(-int(2 * m.mlp_ratio * m.hidden_size / 3) // m.ffn_multiple) * m.ffn_multiple


def head_dim(m: ModelConfig) -> int:
    """Attention width per head: model.head_dim, or hidden_size / num_heads."""
    return m.head_dim or m.hidden_size // m.num_heads


def latent_input_width(m: ModelConfig) -> int:
    """Values per latent token at the model's input: C*p*p, or (2C + 1)*p*p with the release's layout (the clean
    latent and the context flag per cell)."""
    cells = m.patch_size ** 2
    return (2 * m.latent_channels + 1) * cells if m.input_layout == "release" else m.latent_channels * cells


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
