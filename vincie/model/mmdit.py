"""The block-causal MM-DiT, in plain PyTorch; the linear layers (and so tensor parallelism) come from outside.

Tokens of a batch are laid out sequence-first, [T, B, H] (megatron-core's convention), with text and latent
tokens interleaved in sequence order. `text_index` / `latent_index` are flat indices into the T*B tokens, so the
dual-stream layers can send each stream through its own weights and the joint attention sees one sequence.

    text tokens   [N_txt, D_text] --text_proj-->  \\
                                                   h [T, B, H] -- N dual-stream layers -- shared layers --
    latent tokens [N_lat, C*p*p] --patch_embed-->  /                                                   |
                                                         final layer (adaLN, zero-init) -> v [N_lat, C*p*p]

Conditioning is per block: c_b = timestep_embed(t_b) + type_embed(type_b) + turn_embed(turn_b) (clean blocks
have t = 0), gathered per token and projected once into adaLN shift/scale/gate (adaLN-single, as PixArt-alpha);
each layer adds its own learned offsets per stream. Modulations and the final layer are zero-initialised
(adaLN-Zero, as DiT), so every layer starts as the identity.

The projections of each layer are made by a `Linears` object: the default here is plain `torch.nn.Linear` in
one process (inference, exported models, the meta-device size count); training passes
`vincie.model.megatron_layers.MegatronLinears` (megatron-core's tensor-parallel linears from a ModuleSpec). This
module never imports megatron-core, so an exported model runs where it is not installed. Heads are counted per
tensor-parallel partition, and the output layouts are per head (q, k, v of head 0, then head 1, ...) and per
unit (gate, up interleaved), so a contiguous split of the weight rows over TP ranks is a split by heads / units:
checkpoints reshard by plain slicing, and the full (gathered) weights run unchanged in one process.

Parallelism enters from outside the math: `layers` (global indices) and `pre_process` / `post_process` make a
pipeline stage; under sequence parallel, the `Linears` object's gather / scatter keep the residual stream as
this rank's 1/TP of the tokens between the attention and MLP blocks. Inference with a KV cache
(vincie.inference.kv_cache) runs one new block's tokens against the keys and values of the context, which the
cache hands each layer's attention.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vincie.config import ModelConfig, ffn_hidden_size, head_dim, latent_input_width
from vincie.model.attention import MaskSpec, attend, dense_mask, prepare_mask
from vincie.model.sequence import BlockType

NUM_BLOCK_TYPES = len(BlockType)


# ---------------------------------------------------------------------------------------------------------------
# How the projections are made


class Linear(nn.Linear):
    """nn.Linear with the calling convention of megatron-core's parallel linears: forward -> (output, bias), the
    bias already added (None)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        nn.init.xavier_uniform_(self.weight)
        if bias:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return super().forward(x), None


class Linears:
    """Makes each layer's projections and splits the token sequence over tensor-parallel ranks. This default is
    one process with plain linears; vincie.model.megatron_layers.MegatronLinears is the tensor-parallel one."""
    tensor_parallel = 1  # heads and MLP units are split over this many ranks

    def make(self, name: str, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        """`name`: linear_qkv, linear_proj, linear_fc1 or linear_fc2 (per stream and layer); the module's forward
        returns (output, None)."""
        return Linear(in_features, out_features, bias)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Sequence parallel: this rank's tokens [T/tp, B, H] -> all tokens [T, B, H]."""
        return x

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """Sequence parallel: all tokens [T, B, H] -> this rank's [T/tp, B, H]."""
        return x

    def layer_context(self, layer: int):
        """A context around layer `layer` (global index): megatron-core's FP8 context under the TE spec."""
        return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------------
# Embeddings


def timestep_frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """t in [0, 1] (any shape) -> sinusoidal features (..., dim) of 1000 t (as DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (1000.0 * t.float())[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_frequencies(t, self.freq_dim).to(self.mlp[0].weight.dtype))


def rope_axes(head_dim: int, split: str = "time_first") -> list[tuple[int, int]]:
    """3D RoPE over (time, row, col): per axis (rotated pairs, the frequency exponent's denominator).
    "time_first": rows and columns a third of the head dimension each (even), time the rest (all rotated);
    "thirds" (the release): each axis d = head_dim // 3 dimensions, floor(d / 2) pairs with frequencies
    theta^(-2i / d), the remaining dimensions not rotated."""
    if split == "thirds":
        third = head_dim // 3
        return [(third // 2, third)] * 3
    spatial = (head_dim // 3) // 2 * 2
    time = head_dim - 2 * spatial
    return [(time // 2, time), (spatial // 2, spatial), (spatial // 2, spatial)]


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float, split: str = "time_first") -> torch.Tensor:
    """positions (..., 3) int -> angles (..., R) with R <= head_dim // 2 rotated pairs, axis after axis. Text
    tokens carry (p, p, p): 1D RoPE."""
    parts = []
    for axis, (pairs, denominator) in enumerate(rope_axes(head_dim, split)):
        exponent = torch.arange(0, 2 * pairs, 2, dtype=torch.float32, device=positions.device) / denominator
        parts.append(positions[..., axis:axis + 1].float() * (1.0 / theta ** exponent))
    return torch.cat(parts, dim=-1)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x (T, B, heads, D), rope = (cos, sin) of the angles, each (T, B, 1, R): rotate pairs (x[2i], x[2i+1]) for
    i < R, in at least fp32; dimensions from 2R on pass unrotated."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    cos, sin = rope
    rotated = 2 * cos.shape[-1]
    x1, x2 = wide[..., 0:rotated:2], wide[..., 1:rotated:2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return torch.cat([out, wide[..., rotated:]], dim=-1).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Layers


class StreamWeights(nn.Module):
    """One stream's projections in a layer: attention qkv/out, SwiGLU MLP, QK-RMSNorm, adaLN modulation."""

    def __init__(self, cfg: ModelConfig, linears: Linears):
        super().__init__()
        h, f, d = cfg.hidden_size, ffn_hidden_size(cfg), head_dim(cfg)
        inner = cfg.num_heads * d  # attention width (the hidden size unless model.head_dim says otherwise)
        self.linear_qkv = linears.make("linear_qkv", h, 3 * inner, cfg.qkv_bias)  # column-parallel: split by heads
        self.linear_proj = linears.make("linear_proj", inner, h)  # row-parallel
        self.linear_fc1 = linears.make("linear_fc1", h, 2 * f, cfg.mlp_bias)  # column-parallel: split by units
        self.linear_fc2 = linears.make("linear_fc2", f, h, cfg.mlp_bias)  # row-parallel
        # shared by all heads, and each TP rank sees only its own heads: finalize_model_grads sums their
        # gradients over the TP group (it finds them by these names, with config.qk_layernorm)
        self.q_layernorm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.k_layernorm = nn.RMSNorm(d, eps=cfg.norm_eps)
        # this layer's offsets to the shared adaLN modulation (shift, scale, gate for attention and MLP); under
        # sequence parallel each TP rank applies them to its own tokens: gradients summed over the TP group
        self.modulation = nn.Parameter(torch.zeros(6, h))
        self.modulation.sequence_parallel = True


def run_linear(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out, _ = linear(x)
    return out


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class Streams:
    """Routes flat tokens through per-stream weights: text tokens to one module, latent tokens to another
    (dual-stream layers), or all tokens through one (shared layers)."""

    def __init__(self, text_index: torch.Tensor, latent_index: torch.Tensor, num_tokens: int):
        self.text_index, self.latent_index, self.num_tokens = text_index, latent_index, num_tokens

    def apply(self, fn_text, fn_latent, x: torch.Tensor) -> torch.Tensor:
        """x [N, ...] flat over T*B -> fn(x) per stream, reassembled [N, ...]; padding tokens give zeros."""
        out_text = fn_text(x[self.text_index])
        out_latent = fn_latent(x[self.latent_index])
        out = out_text.new_zeros((self.num_tokens,) + tuple(out_text.shape[1:]))
        out[self.text_index] = out_text
        out[self.latent_index] = out_latent
        return out


class MMDiTLayer(nn.Module):
    """Pre-norm transformer layer with adaLN-Zero modulation per token. `dual`: separate text and latent
    weights (joint attention over both); otherwise one set of weights for all tokens."""

    def __init__(self, cfg: ModelConfig, linears: Linears, dual: bool):
        super().__init__()
        self.dual = dual
        self.linears = linears  # also gathers / scatters the sequence under sequence parallel
        self.hidden = cfg.hidden_size
        self.heads_local = cfg.num_heads // linears.tensor_parallel
        self.head_dim = head_dim(cfg)
        self.eps = cfg.norm_eps
        self.latent = StreamWeights(cfg, linears)
        self.text = StreamWeights(cfg, linears) if dual else None

    def per_stream(self, streams: Streams, x: torch.Tensor, fn) -> torch.Tensor:
        """x [T, B, ...] -> fn applied with each stream's weights -> [T, B, ...]."""
        T, B = x.shape[:2]
        flat = x.reshape(T * B, *x.shape[2:])
        if self.dual:
            out = streams.apply(lambda t: fn(self.text, t), lambda l: fn(self.latent, l), flat)
        else:
            out = fn(self.latent, flat)
        return out.reshape(T, B, *out.shape[1:])

    def modulation(self, shared: torch.Tensor, token_is_text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """shared [T, B, 6H] + this layer's offsets (per stream) -> 6 tensors [T, B, H]."""
        offsets = self.latent.modulation.flatten()
        if self.dual:
            offsets = torch.where(token_is_text[..., None], self.text.modulation.flatten(), offsets)
        return (shared + offsets).chunk(6, dim=-1)

    def forward(self, h: torch.Tensor, shared_mod: torch.Tensor, token_is_text: torch.Tensor, rope: tuple,
                mask, backend: str, streams: Streams, cache=None) -> torch.Tensor:
        """h, shared_mod, token_is_text: [T', B, ...] with T' = T / tp under sequence parallel, else T.
        `cache` (vincie.inference.kv_cache.LayerCache): this layer's context keys and values, placed before the
        tokens' own; `mask` then covers [context, own tokens]."""
        H = h.shape[-1]
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(shared_mod, token_is_text)
        x = self.linears.gather(modulate(F.rms_norm(h, (H,), eps=self.eps), shift_a, scale_a))  # [T, B, H]
        T, B = x.shape[:2]

        def qkv(w: StreamWeights, t: torch.Tensor) -> torch.Tensor:
            q, k, v = run_linear(w.linear_qkv, t).view(t.shape[0], self.heads_local, 3, self.head_dim).unbind(2)
            return torch.stack([w.q_layernorm(q), w.k_layernorm(k), v], dim=1)

        q, k, v = self.per_stream(streams, x, qkv).unbind(2)  # each [T, B, heads/tp, D]
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # each (B, heads/tp, T, D)
        if cache is not None:
            k, v = cache.extend(k, v)  # (B, heads/tp, L + T, D): the context's, then these tokens'
        out = attend(q, k, v, mask, backend)  # (B, heads/tp, T, D)
        out = out.permute(2, 0, 1, 3).reshape(T, B, self.heads_local * self.head_dim)
        h = h + gate_a * self.linears.scatter(
            self.per_stream(streams, out, lambda w, t: run_linear(w.linear_proj, t)))

        x = self.linears.gather(modulate(F.rms_norm(h, (H,), eps=self.eps), shift_m, scale_m))  # [T, B, H]

        def mlp(w: StreamWeights, t: torch.Tensor) -> torch.Tensor:
            gate, up = run_linear(w.linear_fc1, t).unflatten(-1, (-1, 2)).unbind(-1)  # [N, ffn/tp] each
            return run_linear(w.linear_fc2, F.silu(gate) * up)

        return h + gate_m * self.linears.scatter(self.per_stream(streams, x, mlp))


class FinalLayer(nn.Module):
    """RMSNorm, shift and scale, linear (zero-initialised). model.final_modulation: "own": shift and scale are a
    projection of the conditioning (DiT); "shared": the shared adaLN projection's attention shift and scale plus
    learned offsets, and the norm has a weight (the release)."""

    def __init__(self, hidden: int, out_dim: int, eps: float, modulation: str = "own"):
        super().__init__()
        self.eps, self.shared = eps, modulation == "shared"
        if self.shared:
            self.norm_weight = nn.Parameter(torch.ones(hidden))
            self.modulation = nn.Parameter(torch.zeros(2, hidden))  # shift, scale offsets
        else:
            self.adaln = nn.Linear(hidden, 2 * hidden)
            nn.init.zeros_(self.adaln.weight)
            nn.init.zeros_(self.adaln.bias)
        self.linear = nn.Linear(hidden, out_dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor, cond_token: torch.Tensor, shared_mod: torch.Tensor) -> torch.Tensor:
        """h, cond_token [T, B, H]; shared_mod [T, B, 6H] (the layers' adaLN projection, before their offsets)."""
        H = h.shape[-1]
        if self.shared:
            shift, scale = (shared_mod[..., :2 * H] + self.modulation.flatten()).chunk(2, dim=-1)
            normed = F.rms_norm(h, (H,), self.norm_weight, eps=self.eps)
        else:
            shift, scale = self.adaln(F.silu(cond_token)).chunk(2, dim=-1)
            normed = F.rms_norm(h, (H,), eps=self.eps)
        return self.linear(modulate(normed, shift, scale))


class PointwiseHead(nn.Module):
    """model.output_head=pointwise: a token's P points (groups of G values; the token's C*p*p values are
    channel-major, so point j holds values j, P + j, ...) each get F features from the final layer, and one MLP
    shared by every point maps [features, source values, noisy values] (F + 2G) -> G output values. The last layer
    is zero-initialised, so the untrained head outputs zeros (with model.source=residual: the source)."""

    def __init__(self, channels: int, features: int, hidden: int):
        super().__init__()
        self.channels, self.features = channels, features
        self.mlp = nn.Sequential(nn.Linear(features + 2 * channels, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, channels))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, features: torch.Tensor, source: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        """features [N, P*F], source and noisy [N, G*P] -> [N, G*P]."""
        n, G = source.shape[0], self.channels
        P = source.shape[1] // G
        points = lambda x: x.reshape(n, G, P).transpose(1, 2)  # [N, G*P] -> [N, P, G]
        x = torch.cat([features.reshape(n, P, self.features), points(source), points(noisy)], dim=-1)
        return self.mlp(x).transpose(1, 2).reshape(n, G * P)  # [N, P, G] -> [N, G*P]


# ---------------------------------------------------------------------------------------------------------------
# The model


@dataclass
class ModelInputs:
    """One batch as the model sees it (see the module docstring). T tokens per row, B rows, NB blocks per row."""
    text_tokens: torch.Tensor  # [N_txt, D_text]
    latent_tokens: torch.Tensor  # [N_lat, C*p*p]: noisy for NOISY blocks, clean otherwise
    text_index: torch.Tensor  # [N_txt] flat index into T*B (t * B + b)
    latent_index: torch.Tensor  # [N_lat]
    positions: torch.Tensor  # [T, B, 3] RoPE coordinates
    block_t: torch.Tensor  # (B, NB) float: timestep per block (0 for clean and text blocks)
    block_type: torch.Tensor  # (B, NB) int
    block_turn: torch.Tensor  # (B, NB) int
    mask: MaskSpec  # token_block (B, T) and the attention rule's other inputs
    # [N_txt] int with model.turn_token: the turn whose learned token takes this text slot, -1 for a word's features
    text_turn: torch.Tensor | None = None
    # [N_lat, C*p*p] with model.source: per NOISY token, the same position of the image its turn edits
    # (zeros for clean blocks and where that image is not in the context)
    latent_source: torch.Tensor | None = None
    # (B, NB, D_text) with model.pooled_text: per NOISY block, the mean of its turn's instruction features (zeros for
    # other blocks and where the instruction is not in the context)
    block_text: torch.Tensor | None = None

    def to(self, device) -> "ModelInputs":
        fields = {k: (v.to(device) if isinstance(v, (torch.Tensor, MaskSpec)) else v) for k, v in self.__dict__.items()}
        return ModelInputs(**fields)


class MMDiT(nn.Module):
    """The MM-DiT, or one pipeline stage of it: `layers` are the global indices of the layers it holds;
    `pre_process` (the first stage) embeds the tokens, the other stages take the previous stage's hidden states
    through `set_input_tensor`; `post_process` (the last stage) applies the final layer. The conditioning
    (timestep, type and turn embeddings, adaLN projection, RoPE angles, attention mask) is computed on every
    stage from the batch; its embedders are replicated per stage and their gradients summed over the pipeline
    group by finalize_model_grads (the `pipeline_parallel` tag, as megatron-core's DiT models do).
    `linears` makes the projections (default: plain nn.Linear, one process; see Linears)."""

    def __init__(self, cfg: ModelConfig, linears: Linears | None = None, layers: range | None = None,
                 pre_process: bool = True, post_process: bool = True):
        super().__init__()
        self.cfg = cfg
        self.linears = linears = linears or Linears()
        self.pre_process, self.post_process = pre_process, post_process
        self.input_tensor = None
        self.recompute = False  # set by the trainer (train.recompute): checkpoint every layer, rerun it in backward
        h = cfg.hidden_size
        self.patch_dim = cfg.latent_channels * cfg.patch_size ** 2  # a latent token's values (the output's)
        if pre_process:
            self.patch_embed = nn.Linear(latent_input_width(cfg), h)
            if cfg.source != "none":
                self.source_embed = nn.Linear(self.patch_dim, h)
            self.text_proj = nn.Linear(cfg.text_dim, h) if cfg.text_projector == "linear" else nn.Sequential(
                nn.Linear(cfg.text_dim, cfg.text_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.text_dim, h),
                nn.RMSNorm(h, eps=cfg.norm_eps))
            if cfg.turn_token:
                self.turn_tokens = nn.Embedding(cfg.max_turns, cfg.text_dim)
                nn.init.normal_(self.turn_tokens.weight, std=0.02)
        self.t_embedder = TimestepEmbedder(h)
        block_embeddings = cfg.conditioning == "block"
        if block_embeddings:
            self.type_embed = nn.Embedding(NUM_BLOCK_TYPES, h)
            self.turn_embed = nn.Embedding(cfg.max_turns, h)
        # adaLN-single (as PixArt-alpha): one projection of the block conditioning serves every layer, each layer
        # adds its own learned offsets; zero-initialised, so every layer starts as the identity
        if cfg.pooled_text:
            self.text_pool = nn.Linear(cfg.text_dim, h)
        self.adaln = nn.Linear(h, 6 * h)
        nn.init.zeros_(self.adaln.weight)
        nn.init.zeros_(self.adaln.bias)
        for module in (self.t_embedder, self.adaln, *([self.type_embed, self.turn_embed] if block_embeddings else []),
                       *([self.text_pool] if cfg.pooled_text else [])):
            for p in module.parameters():
                p.pipeline_parallel = True
        layers = range(cfg.num_layers) if layers is None else layers
        # keyed by global layer index, so parameter names are the same in every pipeline layout
        self.layers = nn.ModuleDict({str(i): MMDiTLayer(cfg, linears, dual=i < cfg.dual_stream_layers)
                                     for i in layers})
        if post_process:
            pointwise = cfg.output_head == "pointwise"
            points = self.patch_dim // cfg.head_channels
            self.final = FinalLayer(h, points * cfg.head_features if pointwise else self.patch_dim, cfg.norm_eps,
                                    cfg.final_modulation)
            if pointwise:
                self.head = PointwiseHead(cfg.head_channels, cfg.head_features, cfg.head_hidden)
        if block_embeddings:
            nn.init.normal_(self.type_embed.weight, std=0.02)
            nn.init.normal_(self.turn_embed.weight, std=0.02)
        for m in self.t_embedder.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)

    def set_input_tensor(self, input_tensor) -> None:
        """Called by megatron-core's pipeline schedules with the previous stage's output (a list of one)."""
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

    def attention_backend(self, device: torch.device) -> str:
        if self.cfg.attention_backend != "auto":
            return self.cfg.attention_backend
        return "flex" if device.type == "cuda" else "sdpa"

    def embed(self, inputs: ModelInputs, T: int, B: int) -> torch.Tensor:
        """-> h [T, B, H]: text and latent tokens projected and placed in sequence order."""
        h = self.patch_embed.weight.new_zeros(T * B, self.cfg.hidden_size)
        text = inputs.text_tokens
        if self.cfg.turn_token:
            if inputs.text_turn is None:
                raise ValueError("model.turn_token is on but the batch has no text_turn")
            turn = self.turn_tokens(inputs.text_turn.clamp(min=0)).to(text.dtype)
            text = torch.where((inputs.text_turn >= 0)[:, None], turn, text)
        h[inputs.text_index] = self.text_proj(text).to(h.dtype)
        latent = self.patch_embed(inputs.latent_tokens)  # [N_lat, H]
        if self.cfg.source != "none":
            if inputs.latent_source is None:
                raise ValueError("model.source is on but the batch has no latent_source")
            latent = latent + self.source_embed(inputs.latent_source)
        h[inputs.latent_index] = latent.to(h.dtype)
        return h.view(T, B, -1)

    def forward(self, inputs: ModelInputs, cache=None) -> torch.Tensor:
        """-> the last stage: predicted velocity for every latent token [N_lat, C*p*p] (the loss uses the NOISY
        ones); other stages: hidden states [T', B, H] for the next stage (T' = T/tp under sequence parallel).

        `cache` (vincie.inference.kv_cache.KVCache, one process): `inputs` hold only new tokens (one block per
        row), which attend to the cached context's keys and values and to each other (the block-causal rule within
        the block); RoPE positions, block timestep, type and turn come from `inputs` as in the whole sequence."""
        spec = inputs.mask
        B, T = spec.token_block.shape
        H = self.cfg.hidden_size
        streams = Streams(inputs.text_index, inputs.latent_index, T * B)
        split = self.linears.scatter
        h = split(self.embed(inputs, T, B)) if self.pre_process else self.input_tensor
        cond_block = self.t_embedder(inputs.block_t)  # (B, NB, H)
        if self.cfg.conditioning == "block":
            cond_block = cond_block + self.type_embed(inputs.block_type) + self.turn_embed(inputs.block_turn)
        if self.cfg.pooled_text:
            if inputs.block_text is None:
                raise ValueError("model.pooled_text is on but the batch has no block_text")
            cond_block = cond_block + self.text_pool(inputs.block_text)
        cond_token = torch.gather(cond_block, 1, spec.token_block[..., None].expand(-1, -1, H)).transpose(0, 1)
        shared_full = self.adaln(F.silu(cond_token))  # [T, B, 6H]
        shared_mod = split(shared_full)  # [T', B, 6H]
        token_is_text = torch.gather(inputs.block_type == int(BlockType.TEXT), 1, spec.token_block).transpose(0, 1)
        token_is_text = split(token_is_text)  # [T', B]
        angles = rope_angles(inputs.positions, self.cfg.rope_dim or head_dim(self.cfg), self.cfg.rope_theta,
                             self.cfg.rope_axes)[:, :, None, :]  # [T, B, 1, R]
        rope = (torch.cos(angles), torch.sin(angles))
        if cache is None:
            backend = self.attention_backend(h.device)
            mask = prepare_mask(spec, backend)
        else:
            backend = "sdpa"
            mask = cache.attention_mask(dense_mask(spec))  # (B, 1, T, L + T)

        def run_layer(index: int, layer: MMDiTLayer, h: torch.Tensor) -> torch.Tensor:
            with self.linears.layer_context(index):  # inside: a recomputation runs in the same FP8 context
                return layer(h, shared_mod, token_is_text, rope, mask, backend, streams,
                             cache.layer(index) if cache is not None else None)

        for index, layer in self.layers.items():
            if self.recompute and torch.is_grad_enabled():
                # keeps h only; the layer draws no random numbers, so there is no RNG state to replay
                h = checkpoint(run_layer, int(index), layer, h, use_reentrant=False, preserve_rng_state=False)
            else:
                h = run_layer(int(index), layer, h)
        if not self.post_process:
            return h
        # the final layer and the loss run on all tokens, the same on every TP rank
        out = self.final(self.linears.gather(h), cond_token, shared_full)  # [T, B, C*p*p] (pointwise: [T, B, P*F])
        out = out.reshape(T * B, -1)[inputs.latent_index]  # [N_lat, C*p*p] (pointwise: [N_lat, P*F])
        if self.cfg.output_head == "pointwise":
            out = self.head(out, inputs.latent_source.to(out.dtype), inputs.latent_tokens.to(out.dtype))
        if self.cfg.source == "residual":  # a next-image target = the image it edits + the network's output
            token_type = torch.gather(inputs.block_type, 1, spec.token_block).transpose(0, 1).reshape(-1)
            is_image = (token_type[inputs.latent_index] == int(BlockType.IMAGE))[:, None]
            out = out + torch.where(is_image, inputs.latent_source, 0.0).to(out.dtype)
        return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_on_meta(cfg: ModelConfig) -> MMDiT:
    """The model without memory: for sizes and FLOPs of the 3b/7b presets on a CPU."""
    with torch.device("meta"):
        return MMDiT(cfg)
