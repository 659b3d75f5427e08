"""`vincie plan`: per-GPU memory and step time of the TP x PP x DP layouts of a config on N GPUs, before
submitting a run. Everything here is an estimate from a stated model (printed with the table):

- Work per session: the config's longest sequence (data.max_turns turns with masks, no context dropout, whole
  trailing turns dropped to fit data.max_tokens, text.max_tokens per instruction), counted by vincie.model.flops.
  With data.pack a row holds as many of them as fit in data.max_tokens, and a micro-batch is rows; for memory a
  row counts as full (shorter sessions can fill it), rounded up to data.pad_multiple as the trainer pads it.
- Memory per GPU, as vincie.training.trainer runs megatron-core: fp32 weights (4 B/param) and fp32 gradient
  buffers (4 B), Adam moments (8 B, sharded over data-parallel ranks with parallel.distributed_optimizer), the EMA
  copy (4 B); layer parameters split over TP x PP, the embedders and adaLN on every stage. Activations:
  ACT_BYTES_PER_H bytes per token, layer and hidden unit (measured, see below), for the layers of one stage, plus
  STAGE_BYTES_PER_H per token for the stage's embeddings and conditioning, times the micro-batches in flight
  (1F1B keeps PP of them on the first stage, so the first stage holds all layers' worth of one micro-batch),
  divided by TP (sequence parallel); with full recomputation (train.recompute=full) only each layer's fp32 input
  (4 B per unit) stays, plus one layer's activations while it is recomputed. A fixed reserve for the CUDA
  context, NCCL and fragmentation.
- Step time: compute = the step's model FLOPs per GPU / (peak x efficiency), x 4/3 with recomputation (peak: the
  card's datasheet dense peak at train.precision, vincie.gpus, which MFU is also stated against); tensor
  parallel: 8 collectives per layer per micro-batch (gather and reduce-scatter around attention and MLP, forward
  and backward) over NVLink inside a node; pipeline: the 1F1B bubble (PP-1)/micro-batches and the activations sent
  between stages; data parallel: the fp32 gradient all-reduce, not overlapped with the backward
  (vincie.training.trainer sets overlap_grad_reduce=False). Links reach COMM_EFFICIENCY of their peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vincie.config import Config, ConfigError, bucket_shapes, ffn_hidden_size
from vincie.gpus import Card, mfu
from vincie.model.flops import Workload, layout_workload, training_flops
from vincie.model.sequence import Role, build_blocks, layout, release_blocks

# Memory a forward holds for the backward under bf16 autocast, in bytes per token per hidden unit, measured on the
# CPU as the allocations a forward leaves behind (tests/test_plan.py measures them again) on a model of the 3b's
# proportions (heads of 128, SwiGLU width 2.67 x hidden, shared and dual-stream layers alike):
# - per layer: 137. A half-precision GPT layer with flash attention keeps 34 (Korthikanti et al. 2022); here the
#   residual stream, norms, modulation and RoPE run in fp32 under autocast.
# - per layer with full recomputation: 4, the layer's fp32 input, exactly.
# - per micro-batch on each stage, whatever the layer count: 48 with recomputation (32 without), the embeddings,
#   the conditioning every layer reads (adaLN input, RoPE angles, mask) and the final layer's output.
ACT_BYTES_PER_H = 137
RECOMPUTE_BYTES_PER_H = 4
STAGE_BYTES_PER_H = 48
COMM_EFFICIENCY = 0.8  # share of a link's peak bandwidth a collective reaches
RESERVE_GIB = 4.0  # CUDA context, NCCL buffers, allocator fragmentation
GIB = 2 ** 30


@dataclass(frozen=True)
class Layout:
    tensor: int
    pipeline: int
    data: int
    micro_batch: int  # sessions per micro-batch (parallel.micro_batch_size, times the sessions per row with packing)
    micro_batches: int  # per data-parallel rank and step


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    weights_gib: float  # weights, gradients and EMA
    optimizer_gib: float
    activations_gib: float
    activations_recompute_gib: float
    total_gib: float
    total_recompute_gib: float
    compute_s: float
    tensor_s: float
    pipeline_s: float  # bubble and activation transfers
    data_s: float
    step_s: float
    step_recompute_s: float


def sample_workload(cfg: Config) -> tuple[Workload, int]:
    """The config's longest session as the model sees it -> (its Workload, its turns)."""
    h, w = bucket_shapes(cfg)[0]
    cell = cfg.vae.factor * cfg.model.patch_size
    grid, text = (h // cell, w // cell), cfg.text_encoder.max_tokens
    for turns in range(cfg.data.max_turns, 0, -1):
        if cfg.sequence.mode == "release":  # the session's images and instructions, all attending to all
            blocks = release_blocks(turns, cfg.sequence, None)
        else:
            blocks = build_blocks(turns, True, cfg.sequence, None)
        if cfg.sequence.mode == "full":  # the last target, with all the context before it
            last = max(j for j, b in enumerate(blocks) if b.role == Role.NOISY)
            blocks = [b for b in blocks[:last] if b.role == Role.CLEAN] + [blocks[last]]
        text_tokens = text + (1 if cfg.model.turn_token else 0)
        row = layout(blocks, [text_tokens] * turns, grid, full_attention=cfg.sequence.mode != "block_causal",
                     rope_time=cfg.model.rope_time)
        if row.num_tokens <= cfg.data.max_tokens:
            return layout_workload(row), turns
    raise ConfigError(f"config key 'data.max_tokens' ({cfg.data.max_tokens}) is less than one turn of "
                      f"{grid[0]} x {grid[1]} tokens per image")


def parameter_split(cfg: Config) -> tuple[int, int]:
    """-> (parameters of all layers, parameters outside the layers), from the model built on the meta device."""
    from vincie.model.mmdit import build_on_meta

    model = build_on_meta(cfg.model)
    layers = sum(p.numel() for p in model.layers.parameters())
    return layers, sum(p.numel() for p in model.parameters()) - layers


def candidate_layouts(cfg: Config, gpus: int, gpus_per_node: int,
                      per_row: int = 1) -> tuple[list[Layout], list[str]]:
    """Every TP x PP x DP layout the config's rules allow on `gpus` GPUs -> (layouts, why others were left out).
    With data.pack a micro-batch is parallel.micro_batch_size rows of `per_row` sessions each."""
    m, batch = cfg.model, cfg.train.batch_size
    layouts, rejected = [], []
    for tp in (t for t in range(1, gpus_per_node + 1) if gpus_per_node % t == 0):
        if m.num_heads % tp or m.hidden_size % tp or ffn_hidden_size(m) % tp:
            continue
        for pp in (p for p in range(1, m.num_layers + 1) if m.num_layers % p == 0):
            if gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            if batch % dp:
                rejected.append(f"TP{tp} PP{pp} DP{dp}: train.batch_size {batch} not divisible by DP {dp}")
                continue
            local = batch // dp
            micro = cfg.parallel.micro_batch_size or 1
            if cfg.data.pack:
                sessions = micro * per_row
                layouts.append(Layout(tp, pp, dp, sessions, -(-local // sessions)))
                continue
            if local % micro:
                rejected.append(f"TP{tp} PP{pp} DP{dp}: {local} sessions per DP rank, not a multiple of "
                                f"parallel.micro_batch_size {micro}")
                continue
            layouts.append(Layout(tp, pp, dp, micro, local // micro))
    return layouts, rejected


def estimate(cfg: Config, lay: Layout, gpu: Card, sample: Workload, params: tuple[int, int],
             gpus_per_node: int, efficiency: float) -> Estimate:
    m = cfg.model
    h, layers = m.hidden_size, m.num_layers
    tp, pp, dp = lay.tensor, lay.pipeline, lay.data
    layer_params, other_params = params
    per_gpu = layer_params / (tp * pp) + other_params
    weights = per_gpu * (4 + 4 + 4)  # fp32 weights, fp32 gradient buffer, EMA
    optimizer = per_gpu * 8 / dp  # the distributed optimizer, which the recommendation turns on
    tokens_micro = sample.tokens * lay.micro_batch
    # memory's worst case: with packing a row may fill up to data.max_tokens with shorter sessions; rows are
    # padded to a multiple of data.pad_multiple
    pad = cfg.data.pad_multiple
    rows = [cfg.data.max_tokens] * (cfg.parallel.micro_batch_size or 1) if cfg.data.pack else [tokens_micro]
    held = sum(-(-n // pad) * pad for n in rows)
    # 1F1B: the first stage keeps min(PP, micro-batches) micro-batches of its L/PP layers
    in_flight = min(pp, lay.micro_batches)
    stage_layers = layers // pp
    stage = in_flight * held * STAGE_BYTES_PER_H * h / tp
    activations = in_flight * stage_layers * held * ACT_BYTES_PER_H * h / tp + stage
    # with recomputation one layer's activations live again while its backward runs
    recompute = in_flight * stage_layers * held * RECOMPUTE_BYTES_PER_H * h / tp + stage \
        + held * ACT_BYTES_PER_H * h / tp
    fixed = weights + optimizer + RESERVE_GIB * GIB
    total = (fixed + activations) / GIB
    total_rc = (fixed + recompute) / GIB

    gpus = tp * pp * dp
    step_flops = cfg.train.batch_size * training_flops(m, sample)
    compute = step_flops / gpus / (gpu.dense_tflops[cfg.train.precision] * 1e12 * efficiency)
    tokens_local = tokens_micro * lay.micro_batches  # per DP rank and step
    nvlink = gpu.nvlink_gbs * 1e9 * COMM_EFFICIENCY
    network = gpu.network_gbs * 1e9 * COMM_EFFICIENCY
    tensor = 0.0
    if tp > 1:
        tensor = stage_layers * 8 * (tp - 1) / tp * tokens_local * h * 2 / (nvlink if tp <= gpus_per_node else network)
    pipeline = 0.0
    if pp > 1:
        link = nvlink if tp * pp <= gpus_per_node else network
        pipeline = 2 * lay.micro_batches * tokens_micro * h * 4 / tp / link  # fp32 activations and their gradients
    data = 0.0
    if dp > 1:
        link = nvlink if gpus <= gpus_per_node else network
        data = 2 * (dp - 1) / dp * per_gpu * 4 / link  # fp32 gradients, ring all-reduce (or RS + AG)
    bubble = (pp - 1) / lay.micro_batches
    step = (compute + tensor) * (1 + bubble) + pipeline + data
    step_rc = (compute * 4 / 3 + tensor * 4 / 3) * (1 + bubble) + pipeline + data
    return Estimate(lay, weights / GIB, optimizer / GIB, activations / GIB, recompute / GIB, total, total_rc,
                    compute, tensor, (compute + tensor) * bubble + pipeline, data, step, step_rc)


def overrides(lay: Layout, cfg: Config, recompute: bool) -> list[str]:
    """The config overrides that select a layout (what `vincie train` and `vincie k8s render` take)."""
    out = [f"parallel.tensor={lay.tensor}", f"parallel.pipeline={lay.pipeline}",
           f"parallel.micro_batch_size={cfg.parallel.micro_batch_size or 1}"]
    if lay.tensor > 1:
        out.append("parallel.sequence_parallel=true")
    if lay.data > 1 and not cfg.parallel.distributed_optimizer:
        out.append("parallel.distributed_optimizer=true")
    out.append(f"train.recompute={'full' if recompute else 'none'}")
    return out


def plan(cfg: Config, gpus: int, gpu: Card, gpus_per_node: int, efficiency: float,
         top: int = 12) -> tuple[str, int]:
    """-> (the report, the exit status: 0 when some layout fits, 1 when none does)."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    if gpus_per_node < 1 or (gpus > gpus_per_node and gpus % gpus_per_node):
        raise ConfigError(f"--gpus ({gpus}) must be a multiple of --gpus-per-node ({gpus_per_node}) "
                          "when it spans nodes")
    if not 0 < efficiency <= 1:
        raise ConfigError(f"--efficiency must be in (0, 1], got {efficiency}")
    sample, turns = sample_workload(cfg)
    params = parameter_split(cfg)
    per_row = max(1, cfg.data.max_tokens // sample.tokens) if cfg.data.pack else 1
    layouts, rejected = candidate_layouts(cfg, gpus, min(gpus_per_node, gpus), per_row)
    if not layouts:
        reason = rejected[0] if rejected else "no tensor-parallel size divides the heads and fits a node"
        raise ConfigError(f"no TP x PP x DP layout of {gpus} GPUs fits the config's rules ({reason}); "
                          "change --gpus or train.batch_size")
    rows = [estimate(cfg, lay, gpu, sample, params, gpus_per_node, efficiency) for lay in layouts]
    usable = gpu.memory_gib

    def way(r: Estimate) -> tuple[float, bool]:
        """(step time, recompute?) of the way a layout fits: plainly, else with recomputation (always slower for
        the same layout), else (inf, True): it does not fit."""
        if r.total_gib <= usable:
            return r.step_s, False
        return (r.step_recompute_s if r.total_recompute_gib <= usable else math.inf), True

    ranked = sorted(rows, key=lambda r: (way(r), r.step_recompute_s))  # the recommendation is the first, if it fits
    step_flops = cfg.train.batch_size * training_flops(cfg.model, sample)
    precision = cfg.train.precision

    lines = [
        f"plan: {cfg.run.name}, {sum(params) / 1e9:.2f} B parameters, {gpus} x {gpu.name} "
        f"({gpu.dense_tflops[precision]:g} TFLOP/s dense {precision}, {gpu.memory_gib:g} GiB, NVLink "
        f"{gpu.nvlink_gbs:g} GB/s, network "
        f"{gpu.network_gbs:g} GB/s per GPU; {gpus_per_node} per node)",
        f"work: {cfg.train.batch_size} sessions per step, each the longest sequence of the config: {turns} turns, "
        f"{sample.tokens} tokens ({sample.latent_tokens} latent, {sample.text_tokens} text), "
        f"{sample.attention_pairs / sample.tokens ** 2:.0%} of the attention square allowed "
        f"({cfg.sequence.mode}); {step_flops / 1e15:.2f} PFLOP per step (model FLOPs, vincie.model.flops)"
        + (f"; packed (data.pack): {per_row} per row of {cfg.data.max_tokens} tokens"
           if cfg.data.pack else ""),
        "assumptions: " + "; ".join([
            f"GEMMs at {efficiency:.0%} of peak (--efficiency); MFU: model FLOPs over that peak (vincie.gpus)",
            f"links at {COMM_EFFICIENCY:.0%} of peak, no overlap of communication with compute",
            "fp32 weights + gradients + EMA (12 B/param), Adam 8 B/param sharded over DP (distributed optimizer)",
            f"activations per token x hidden: {ACT_BYTES_PER_H} B per layer, {RECOMPUTE_BYTES_PER_H} B with "
            f"recomputation, {STAGE_BYTES_PER_H} B per stage (measured on CPU, bf16 autocast), 1F1B in flight, "
            "/TP (sequence parallel)",
            f"{RESERVE_GIB:g} GiB reserve per GPU",
            "recomputation: full, per layer (+1 forward)",
            "the step only: building its batch (decoding, VAE and text encoders, on every TP/PP rank of a replica) "
            "is not counted; precompute the latents for large runs (vincie data precompute)"]),
        "",
        f"{'TP':>3} {'PP':>3} {'DP':>4} {'mb':>3} {'m':>4} | {'weights':>8} {'optim':>6} {'act':>7} "
        f"{'act-rc':>7} | {'total':>7} {'tot-rc':>7} | {'compute':>8} {'TP-comm':>8} {'PP':>7} {'DP':>7} | "
        f"{'step':>7} {'step-rc':>7} {'MFU':>5}",
    ]
    shown = ranked[:top]
    for r in shown:
        lay = r.layout
        step, recompute = way(r)
        fits = math.isfinite(step)
        utilisation = mfu(step_flops / gpus / (step if fits else r.step_recompute_s), gpu, precision)
        mark = "" if not recompute else "  needs recompute" if fits else "  does not fit"
        lines.append(
            f"{lay.tensor:>3} {lay.pipeline:>3} {lay.data:>4} {lay.micro_batch:>3} {lay.micro_batches:>4} | "
            f"{r.weights_gib:>8.1f} {r.optimizer_gib:>6.1f} {r.activations_gib:>7.1f} "
            f"{r.activations_recompute_gib:>7.1f} | {r.total_gib:>7.1f} {r.total_recompute_gib:>7.1f} | "
            f"{r.compute_s:>8.2f} {r.tensor_s:>8.2f} {r.pipeline_s:>7.2f} {r.data_s:>7.2f} | {r.step_s:>7.2f} "
            f"{r.step_recompute_s:>7.2f} {utilisation:>5.0%}{mark}")
    lines.append(f"(memory in GiB per GPU; times in s per step; {len(rows)} layouts, best {len(shown)} shown"
                 + (f"; {len(rejected)} left out, e.g. {rejected[0]}" if rejected else "") + ")")
    lines.append("")
    step, recompute = way(ranked[0])
    if math.isfinite(step):
        best = ranked[0]
        memory = best.total_recompute_gib if recompute else best.total_gib
        lines.append(f"recommended: {' '.join(overrides(best.layout, cfg, recompute))}")
        lines.append(f"  {memory:.1f} of {usable:g} GiB per GPU, about {step:.2f} s per step, "
                     f"{step_flops / gpus / step / 1e12:.0f} TFLOP/s per GPU "
                     f"(MFU {mfu(step_flops / gpus / step, gpu, precision):.0%})"
                     + (" (with activation recomputation)" if recompute else ""))
        hours = cfg.train.steps * step / 3600
        lines.append(f"  train.steps {cfg.train.steps}: about {hours:.1f} h on {gpus} GPU{'s' if gpus > 1 else ''} "
                     f"({hours * gpus:,.0f} GPU-hours)")
        return "\n".join(lines), 0
    least = min(rows, key=lambda r: r.total_recompute_gib)
    lines.append(f"the model fits nowhere: the smallest need is {least.total_recompute_gib:.1f} GiB per GPU "
                 f"(TP{least.layout.tensor} PP{least.layout.pipeline} DP{least.layout.data} with recomputation), "
                 f"more than the {usable:g} GiB of one {gpu.name}; use more GPUs, a larger GPU or shorter sequences "
                 "(data.max_tokens)")
    return "\n".join(lines), 1
