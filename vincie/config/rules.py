"""Every config rule that spans more than one value's type, in one place: `validate` runs on every loaded config,
`check_world` once the number of processes is known. A broken rule is one ConfigError line naming the key."""

from __future__ import annotations

import re

from vincie.config.sections import (
    LORA_TARGETS,
    TE_INSTALL,
    Config,
    IngestConfig,
    K8sConfig,
    ParallelConfig,
    SynthConfig,
    bucket_shapes,
    ffn_hidden_size,
    fp8_alignment,
    fp8_gemm_shapes,
    have_transformer_engine,
    head_dim,
)
from vincie.errors import ConfigError
from vincie.gpus import CARDS


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
    require(set(s.transitions) != {"undo"}, prefix + "transitions",
            "must name an edit besides undo (a session's first turn has nothing to undo)")
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


def validate_validation(cfg: Config) -> None:
    t = cfg.train
    require(t.eval_every >= 0, "train.eval_every", f"must be >= 0 (0: no validation), got {t.eval_every}")
    if not t.eval_every:
        return
    require(cfg.data.val_url != "", "data.val_url", "must name held-out validation sessions when train.eval_every "
            "> 0 (a split of its own, e.g. vincie data synth --split val)")
    require(cfg.data.val_url != cfg.data.eval_url, "data.val_url", "must differ from data.eval_url (the sessions "
            "a run reports on are not the ones it is tuned on)")
    require(t.eval_sessions >= 1, "train.eval_sessions", f"must be >= 1, got {t.eval_sessions}")
    require(len(t.eval_timesteps) >= 1 and all(0 < x < 1 for x in t.eval_timesteps), "train.eval_timesteps",
            f"must be one or more timesteps in (0, 1), got {t.eval_timesteps}")
    require(0 <= t.eval_success_sessions <= t.eval_sessions, "train.eval_success_sessions",
            f"must be in 0..train.eval_sessions ({t.eval_sessions}), got {t.eval_success_sessions}")
    require(t.eval_success_sessions == 0 or cfg.parallel.tensor == cfg.parallel.pipeline == 1,
            "train.eval_success_sessions", "must be 0 under tensor or pipeline parallelism (the editor runs in one "
            "process): validation losses still run; score checkpoints with vincie eval --model RUN_DIR")
    require(t.eval_sample_steps >= 0, "train.eval_sample_steps", f"must be >= 0, got {t.eval_sample_steps}")


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
    # every stage pools the instruction from its own copy of the text encoder, and only the first stage's copy is
    # trained and checkpointed: the later stages' conditioning would drift from the single-process model's
    require(not m.pooled_text or p.pipeline == 1, "model.pooled_text",
            f"is not supported with parallel.pipeline > 1 (got {p.pipeline}): the later stages would pool the "
            "instruction from an untrained copy of the text encoder")
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
    if m.head_dim:
        require(m.head_dim % 2 == 0 and m.head_dim >= 6, "model.head_dim",
                f"must be even and >= 6 (3D RoPE), or 0 for hidden_size / num_heads, got {m.head_dim}")
    else:
        require(m.hidden_size % m.num_heads == 0, "model.num_heads",
                f"must divide model.hidden_size ({m.hidden_size}) unless model.head_dim is set, got {m.num_heads}")
        require((m.hidden_size // m.num_heads) % 8 == 0, "model.num_heads",
                f"must leave a head dimension divisible by 8 (3D RoPE), got {m.hidden_size // m.num_heads}")
    require(m.ffn_multiple >= 1, "model.ffn_multiple", f"must be >= 1, got {m.ffn_multiple}")
    width = head_dim(m)
    require(0 <= m.rope_dim <= width and m.rope_dim % 2 == 0, "model.rope_dim",
            f"must be even and at most the head width ({width}), 0 for all of it, got {m.rope_dim}")
    lora = cfg.train.lora
    require(lora.rank >= 0, "train.lora.rank", f"must be >= 0 (0: off), got {lora.rank}")
    require(lora.alpha >= 0, "train.lora.alpha", f"must be >= 0 (0: the rank), got {lora.alpha}")
    require(bool(lora.targets) and set(lora.targets) <= set(LORA_TARGETS), "train.lora.targets",
            f"must be a non-empty list of {', '.join(LORA_TARGETS)}, got {lora.targets}")
    release_sequence = cfg.sequence.mode == "release"
    require(not release_sequence or m.input_layout == "release", "model.input_layout",
            f"must be release with sequence.mode release (the release's input channels), got {m.input_layout}")
    require(cfg.sequence.mode != "block_causal" or m.rope_time != "after_text", "model.rope_time",
            "must not be after_text with sequence.mode block_causal: an image's position would depend on "
            "instructions that come after it (use image_index or offset)")
    require(not release_sequence or m.conditioning == "timestep", "model.conditioning",
            f"must be timestep with sequence.mode release (one timestep per session), got {m.conditioning}")
    require(not release_sequence or m.source == "none", "model.source",
            f"must be none with sequence.mode release (the context's clean latents are input channels), got "
            f"{m.source}")
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
        if kind in ("hf", "t5", "causal_lm", "diffusers", "release"):
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
    validate_validation(cfg)
    st = cfg.storage
    require(st.connect_timeout_s > 0, "storage.connect_timeout_s", "must be > 0")
    require(st.read_timeout_s > 0, "storage.read_timeout_s", "must be > 0")
    require(st.max_attempts >= 1, "storage.max_attempts", "must be >= 1")
    require(st.read_attempts >= 1, "storage.read_attempts", "must be >= 1")
    require(st.retry_backoff_s >= 0, "storage.retry_backoff_s", "must be >= 0")
    require(cfg.metrics.port == 0 or 1024 <= cfg.metrics.port <= 65535, "metrics.port",
            f"must be 0 (off) or a port in 1024..65535, got {cfg.metrics.port}")
    validate_k8s(cfg.k8s)
    require(cfg.metrics.gpu == "auto" or cfg.metrics.gpu in CARDS, "metrics.gpu",
            f"must be auto or a known GPU card ({', '.join(CARDS)}), got {cfg.metrics.gpu!r}")
    require(cfg.metrics.peak_tflops >= 0, "metrics.peak_tflops",
            f"must be >= 0 (0: the card's datasheet peak), got {cfg.metrics.peak_tflops}")


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
    require(k.termination_grace_s >= 30, "k8s.termination_grace_s",
            f"must be >= 30 seconds (a training step and a checkpoint must fit), got {k.termination_grace_s}")
    require(k.queue == "" or (re.fullmatch(DNS_LABEL, k.queue) is not None and len(k.queue) <= 63), "k8s.queue",
            f"must be empty or name a Kueue LocalQueue (DNS label), got {k.queue!r}")


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
