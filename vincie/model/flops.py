"""Model FLOPs of the MM-DiT, counted analytically from a batch's block layout (for MFU, `vincie plan`, benchmarks).

What is counted: the FLOPs of the matrix products of vincie.model.mmdit (2 per multiply-add), over the real tokens of a
batch (padding is no useful work), with attention counted over the (query, key) pairs the attention rule allows
(vincie.model.attention.allowed), not over the T x T square a dense kernel computes. Element-wise work (norms, RoPE,
softmax, SwiGLU, modulation) is left out, as torch.utils.flop_counter and the usual MFU definitions (PaLM,
Megatron) leave it out. Per layer and token, with hidden H and SwiGLU width F (both streams alike):

    qkv 2*H*3A + out 2*A*H + fc1 2*H*2F + fc2 2*F*H = 2H(4A + 3F)     attention: 4A per allowed (q, k) pair

(A = heads x head width, H unless model.head_dim differs)

plus, once per token, the adaLN-single projection (2*H*6H) and the final layer (2*H*2H adaLN + 2*H*P), and the
embedders: text 2*D_text*H per text token, patches 2*P*H per latent token, the timestep MLP 2*(256*H + H*H) per
block. The block-causal pairs of a sample are sum_j n_j * (n_j + sum of n_i over earlier non-NOISY blocks i): each
block's queries see their own block and the context before it; full attention gives (tokens of the sample)^2.

Training (forward + backward) = 3 x forward: the backward of a product computes the input's and the weight's
gradient, two products of the forward's size; the embedders that read data (text, patches, timestep features)
need no input gradient, so they count 2 x forward. Activation recomputation is not counted (these are model
FLOPs, not hardware FLOPs), nor is the dense kernel's wasted work on masked pairs (`dense_attention=True` counts
that, for comparison with a flop counter or the SDPA backend).

Use per training step, on the host and without touching the device:

    work = batch.work                                    # a Workload, counted by vincie.model.batch.collate
    step_flops = training_flops(cfg.model, sum(works))   # micro-batches (and ranks) add up
    mfu = step_flops / (step_seconds * world_size * peak_flops_per_gpu)

The Workload of a micro-batch covers the whole model; under tensor / pipeline parallelism the GPUs of a model
replica share it, so per GPU it is the global step's FLOPs divided by the world size.
"""

from __future__ import annotations

from dataclasses import dataclass

from vincie.config import ModelConfig, ffn_hidden_size, head_dim, latent_input_width
from vincie.model.sequence import BlockType, Layout

TIMESTEP_FREQUENCIES = 256  # vincie.model.mmdit.TimestepEmbedder's sinusoidal features


@dataclass(frozen=True)
class Workload:
    """What a batch's FLOPs depend on, counted on the host from its layouts (plain ints; they add up)."""
    text_tokens: int = 0
    latent_tokens: int = 0
    blocks: int = 0  # conditioning blocks (one timestep embedding each)
    attention_pairs: int = 0  # (query, key) pairs the attention rule allows, summed over samples
    dense_pairs: int = 0  # pairs a dense kernel computes: rows x T^2, padding included

    @property
    def tokens(self) -> int:
        return self.text_tokens + self.latent_tokens

    def __add__(self, other: "Workload") -> "Workload":
        return Workload(*(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__))

    def __radd__(self, other):  # sum() starts from 0
        return self if other == 0 else NotImplemented


def attention_pairs(layout: Layout) -> int:
    """(query, key) pairs the attention rule allows in one row (several packed samples possible)."""
    lengths = layout.block_length.tolist()
    noisy = layout.block_noisy.tolist()
    samples = layout.token_sample[layout.block_start].tolist()
    pairs = 0
    if layout.full_attention:
        per_sample: dict[int, int] = {}
        for n, s in zip(lengths, samples):
            per_sample[s] = per_sample.get(s, 0) + n
        return sum(n * n for n in per_sample.values())
    context, sample = 0, None  # tokens of earlier non-NOISY blocks of the current sample
    for n, is_noisy, s in zip(lengths, noisy, samples):
        if s != sample:
            context, sample = 0, s
        pairs += n * (n + context)
        if not is_noisy:
            context += n
    return pairs


def layout_workload(layout: Layout, num_tokens: int | None = None) -> Workload:
    """One row; `num_tokens`: the row's padded length (default: its own)."""
    text = sum(int(n) for b, n in zip(layout.blocks, layout.block_length) if b.type == BlockType.TEXT)
    T = num_tokens or layout.num_tokens
    return Workload(text_tokens=text, latent_tokens=layout.num_tokens - text, blocks=len(layout.blocks),
                    attention_pairs=attention_pairs(layout), dense_pairs=T * T)


def batch_workload(layouts: list[Layout], num_tokens: int | None = None) -> Workload:
    """Rows padded to `num_tokens` (default: the longest)."""
    T = num_tokens or max(l.num_tokens for l in layouts)
    return sum(layout_workload(l, T) for l in layouts)


def attention_width(cfg: ModelConfig) -> int:
    """A = heads x head width (the hidden size H unless model.head_dim says otherwise)."""
    return cfg.num_heads * head_dim(cfg)


def layer_flops_per_token(cfg: ModelConfig) -> int:
    """Forward FLOPs of one layer's projections per token (attention products not included): qkv 2*H*3A,
    out 2*A*H, SwiGLU 2*H*2F + 2*F*H."""
    h, f, a = cfg.hidden_size, ffn_hidden_size(cfg), attention_width(cfg)
    return 2 * h * (4 * a + 3 * f)


def attention_flops_per_pair(cfg: ModelConfig) -> int:
    """Forward FLOPs of one layer's attention per (query, key) pair: q.k over all heads, then p * v."""
    return 4 * attention_width(cfg)


def embedder_flops(cfg: ModelConfig, work: Workload) -> int:
    """Forward FLOPs of the embedders that read data (no input gradient in the backward)."""
    h, patch = cfg.hidden_size, cfg.latent_channels * cfg.patch_size ** 2
    # a latent token's input values (the release's layout: noisy, clean and a context flag per cell), and the
    # source image's (model.source)
    latent_inputs = latent_input_width(cfg) + (patch if cfg.source != "none" else 0)
    # the text projection: D -> H, or the release's 7B MLP D -> D -> H
    text_mlp = 2 * work.text_tokens * cfg.text_dim * cfg.text_dim if cfg.text_projector == "mlp_norm" else 0
    return 2 * h * (work.text_tokens * cfg.text_dim + work.latent_tokens * latent_inputs
                    + work.blocks * TIMESTEP_FREQUENCIES) + text_mlp


def forward_flops(cfg: ModelConfig, work: Workload, dense_attention: bool = False) -> int:
    """Model FLOPs of one forward pass over `work`; `dense_attention`: count the T x T square of every row, as a
    dense-masked kernel computes it, instead of the allowed pairs."""
    h, patch = cfg.hidden_size, cfg.latent_channels * cfg.patch_size ** 2
    pairs = work.dense_pairs if dense_attention else work.attention_pairs
    layers = cfg.num_layers * (work.tokens * layer_flops_per_token(cfg) + pairs * attention_flops_per_pair(cfg))
    points = patch // cfg.head_channels
    final_out = points * cfg.head_features if cfg.output_head == "pointwise" else patch
    per_token = 2 * h * 6 * h + 2 * h * 2 * h + 2 * h * final_out  # adaLN-single; final layer: adaLN, projection
    timestep_second_linear = work.blocks * 2 * h * h
    head = 0
    if cfg.output_head == "pointwise":  # the shared MLP, at every point of every latent token
        head = work.latent_tokens * points * 2 * cfg.head_hidden * (
            cfg.head_features + 2 * cfg.head_channels + cfg.head_channels)
    return layers + work.tokens * per_token + timestep_second_linear + head + embedder_flops(cfg, work)


def training_flops(cfg: ModelConfig, work: Workload, dense_attention: bool = False) -> int:
    """Forward + backward: 3 x forward, less the input gradients the data embedders do not compute."""
    return 3 * forward_flops(cfg, work, dense_attention) - embedder_flops(cfg, work)
