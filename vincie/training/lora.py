"""Low-rank adapters on the MM-DiT's projections (train.lora; docs/release.md, "Fine-tune").

Each targeted projection (linear_qkv, linear_proj, linear_fc1, linear_fc2 of every stream and layer) keeps its
weight W, frozen, and gains two parameters on the same module, `lora_a` (rank x in) and `lora_b` (out x rank,
zero at the start, so training starts from the base model): its output becomes W x + (alpha / rank) B A x. The
base's parameter names do not change, so checkpoints, `train.init_from` and exports read the same names; every
other parameter is frozen too. `merge` folds the adapters into W (what `vincie export` writes).

Under tensor parallelism the adapters split like their projection:

    column-parallel (qkv, fc1: output rows split)   B split by rows; A whole on every rank. A x passes through
        copy_to_tensor_model_parallel_region (identity; its gradient summed over the group), so the gradient
        reaching A x, and so A's and the input's, is the whole one on every rank, not this rank's rows' share.
    row-parallel (proj, fc2: input columns split)   A split by columns; B whole. A x is summed over the group
        (reduce_from_tensor_model_parallel_region) before B, so B's gradient is whole on every rank.

Adapters are drawn from the full-size A (seeded by their name), then cut to the rank's slice: one process and any
TP layout start alike.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F

from vincie.config import LoRAConfig


def scale(cfg: LoRAConfig) -> float:
    return (cfg.alpha or cfg.rank) / cfg.rank


def split_dim(linear: torch.nn.Module) -> int | None:
    """0: the projection's output is split over TP ranks (column-parallel); 1: its input (row-parallel); None:
    whole (one process, or the plain Linear)."""
    weight = linear.weight
    return weight.partition_dim if getattr(weight, "tensor_model_parallel", False) else None


def add_adapter(linear: torch.nn.Module, name: str, cfg: LoRAConfig, seed: int, tp_rank: int, tp: int) -> None:
    from megatron.core.tensor_parallel import (copy_to_tensor_model_parallel_region,
                                               reduce_from_tensor_model_parallel_region)

    out_local, in_local = linear.weight.shape
    dim = split_dim(linear)
    in_full = in_local * tp if dim == 1 else in_local
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    a = torch.empty(cfg.rank, in_full).uniform_(-1, 1, generator=generator) / math.sqrt(in_full)
    if dim == 1:
        a = a.chunk(tp, dim=1)[tp_rank]
    lora_a = torch.nn.Parameter(a.to(linear.weight.device, linear.weight.dtype).contiguous())
    lora_b = torch.nn.Parameter(torch.zeros(out_local, cfg.rank, device=linear.weight.device,
                                            dtype=linear.weight.dtype))
    if dim == 0:
        lora_b.tensor_model_parallel, lora_b.partition_dim, lora_b.partition_stride = True, 0, 1
    elif dim == 1:
        lora_a.tensor_model_parallel, lora_a.partition_dim, lora_a.partition_stride = True, 1, 1
    linear.register_parameter("lora_a", lora_a)
    linear.register_parameter("lora_b", lora_b)
    factor = scale(cfg)

    def forward_hook(module, args, output):
        x = args[0]
        out, bias = output
        if dim == 0:
            z = copy_to_tensor_model_parallel_region(F.linear(x, module.lora_a))
        elif dim == 1:
            z = reduce_from_tensor_model_parallel_region(F.linear(x, module.lora_a))
        else:
            z = F.linear(x, module.lora_a)
        return out + factor * F.linear(z, module.lora_b).to(out.dtype), bias

    linear.register_forward_hook(forward_hook)


def apply(chunks: list[torch.nn.Module], cfg: LoRAConfig, seed: int, tp_rank: int = 0, tp: int = 1) -> int:
    """Freezes every parameter of `chunks` and adds adapters to the targeted projections. -> adapters added."""
    for chunk in chunks:
        chunk.requires_grad_(False)
    added = 0
    for chunk in chunks:
        for name, module in list(chunk.named_modules()):
            if name.rsplit(".", 1)[-1] in cfg.targets and hasattr(module, "weight"):
                add_adapter(module, name, cfg, seed, tp_rank, tp)
                added += 1
    return added


def merge(state: dict[str, torch.Tensor], cfg: LoRAConfig) -> dict[str, torch.Tensor]:
    """Whole weights with adapters (`X.lora_a`, `X.lora_b`) -> the same weights with each adapter folded into its
    projection (`X.weight` + scale B A) and the adapter tensors gone."""
    out = {name: tensor for name, tensor in state.items() if not name.endswith((".lora_a", ".lora_b"))}
    for name in state:
        if name.endswith(".lora_a"):
            base = name[:-len(".lora_a")]
            a, b = state[name].float(), state[base + ".lora_b"].float()
            weight = out[base + ".weight"]
            out[base + ".weight"] = (weight.float() + scale(cfg) * b @ a).to(weight.dtype)
    return out
