"""The MM-DiT's megatron-core side: its TransformerConfig, the layer specs, and `MegatronLinears`, which makes
the model's projections as megatron-core tensor-parallel linears and splits the sequence under sequence parallel.

vincie.model.mmdit holds the math in plain PyTorch and takes a `Linears` object; training passes this one (through
vincie.model.components.EditModel), inference on exported weights uses the plain default and never imports this module.
"""

from __future__ import annotations

# megatron_layers is imported before megatron-core (it sets warning filters first): keep the order below
# isort: skip_file

import dataclasses
import warnings
from dataclasses import dataclass

# megatron-core warns at import and per layer about things that do not apply here (no TE/Apex on CPU, a config
# default it deprecates, a tp_group argument vincie leaves to parallel_state); keep users' terminals readable
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
warnings.filterwarnings("ignore", message=".*tp_group is None.*")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.fp8_utils import get_fp8_context  # noqa: E402
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from megatron.core.tensor_parallel.mappings import (  # noqa: E402
    gather_from_sequence_parallel_region, scatter_to_sequence_parallel_region)
from megatron.core.transformer import TransformerConfig  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec, build_module  # noqa: E402

from vincie.config import TE_INSTALL, ConfigError, ModelConfig, ffn_hidden_size, fp8_alignment, head_dim  # noqa: E402
from vincie.model.mmdit import Linears  # noqa: E402


def tp_world_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() \
        else 1


def pp_world_size() -> int:
    return parallel_state.get_pipeline_model_parallel_world_size() \
        if parallel_state.model_parallel_is_initialized() else 1


def megatron_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32, init: bool = True,
                    sequence_parallel: bool = False) -> TransformerConfig:
    """The model's megatron-core config. `qk_layernorm` and `sequence_parallel` tell finalize_model_grads which
    replicated parameters hold partial gradients on each TP rank (it sums them over the TP group)."""
    mcfg = TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads,
        kv_channels=head_dim(cfg),
        ffn_hidden_size=ffn_hidden_size(cfg),
        use_cpu_initialization=True,
        perform_initialization=init,
        params_dtype=dtype,
        add_bias_linear=True,
        gated_linear_unit=True,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        qk_layernorm=True,
        sequence_parallel=sequence_parallel,
        tensor_model_parallel_size=tp_world_size(),
        pipeline_model_parallel_size=pp_world_size(),
        virtual_pipeline_model_parallel_size=parallel_state.get_virtual_pipeline_model_parallel_world_size()
        if parallel_state.model_parallel_is_initialized() else None,
        pipeline_dtype=dtype,
        calculate_per_token_loss=True,  # the loss is a sum; finalize_model_grads divides by the global count
        batch_p2p_comm=False,  # batched isend/irecv over gloo gives silently wrong interleaved-PP gradients
    )
    if cfg.fp8 != "off":
        # TE casts the weights to FP8 in every micro-batch: its cache across micro-batches needs the trainer to
        # reset `is_first_microbatch` each step, which it does not do (yet)
        mcfg = dataclasses.replace(mcfg, fp8=cfg.fp8, fp8_recipe=cfg.fp8_recipe,
                                   disable_parameter_transpose_cache=True)
    mcfg.has_cond_embedder = True  # read by finalize_model_grads: conditioning embedders on every stage
    return mcfg


@dataclass
class StreamSubmodules:
    """Which linear implementation each projection of a stream uses."""
    linear_qkv: type | ModuleSpec
    linear_proj: type | ModuleSpec
    linear_fc1: type | ModuleSpec
    linear_fc2: type | ModuleSpec


def local_spec() -> StreamSubmodules:
    return StreamSubmodules(linear_qkv=ColumnParallelLinear, linear_proj=RowParallelLinear,
                            linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


def rows_aligned(cls: type, align: int) -> type:
    """`cls` (a TE linear) with its token rows zero-padded to a multiple of `align` and the padding cut from the
    output: FP8 GEMMs need every dimension aligned, and a stream's token count (text tokens above all) is
    arbitrary. Zero rows change neither the amax nor the weight gradient. A subclass, so parameter names stay."""

    class RowsAligned(cls):
        def forward(self, x: torch.Tensor):
            n = x.shape[0]  # x [N, in]: one stream's tokens
            pad = -n % align
            out, bias = super().forward(torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x)
            return out[:n], bias

    RowsAligned.__name__ = RowsAligned.__qualname__ = f"RowsAligned{cls.__name__}"
    return RowsAligned


def te_spec(align: int) -> StreamSubmodules:
    """Transformer Engine linears (FP8 under megatron-core's FP8 context). The layer's norm is not fused into the
    linear (TELayerNormColumnParallelLinear): the adaLN modulation sits between the RMSNorm and the projection,
    and the norm has no weight of its own."""
    from megatron.core.extensions.transformer_engine import HAVE_TE, TEColumnParallelLinear, TERowParallelLinear
    if not HAVE_TE:
        raise ConfigError(f"config key 'model.spec' is 'te' but Transformer Engine is not installed: {TE_INSTALL}")
    column, row = rows_aligned(TEColumnParallelLinear, align), rows_aligned(TERowParallelLinear, align)
    return StreamSubmodules(linear_qkv=column, linear_proj=row, linear_fc1=column, linear_fc2=row)


def layer_spec(cfg: ModelConfig) -> StreamSubmodules:
    """The config's layer implementation: the only difference between the CPU and the GPU model code."""
    if cfg.spec == "local":
        return local_spec()
    if cfg.spec == "te":
        return te_spec(fp8_alignment(cfg.fp8_recipe))
    raise ConfigError(f"config key 'model.spec' must be 'local' or 'te', got {cfg.spec!r}")


# lowest CUDA compute capability of each FP8 recipe: FP8 tensor cores from Ada/Hopper; 1x128 / 128x128 block
# scales on Hopper; MXFP8 (32-value blocks, E8M0 scales) only in Blackwell's tensor cores
FP8_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)}


def check_fp8_hardware(recipe: str, capability: tuple[int, int]) -> None:
    """One line when this GPU (compute capability `capability`) has no FP8 GEMMs for `recipe`."""
    need = FP8_CAPABILITY[recipe]
    if capability < need:
        usable = [r for r, c in FP8_CAPABILITY.items() if c <= capability]
        instead = f"model.fp8_recipe={' or '.join(usable)}, or model.fp8=off" if usable else "model.fp8=off"
        raise ConfigError(f"config key 'model.fp8_recipe' is {recipe!r}, which needs a GPU of compute capability "
                          f"{need[0]}.{need[1]} or newer; this one is {capability[0]}.{capability[1]} "
                          f"(use {instead})")


COLUMN_PARALLEL = {"linear_qkv", "linear_fc1"}  # output split over TP ranks; the others split their input


class MegatronLinears(Linears):
    """megatron-core tensor-parallel linears from the config's spec, split over this process's TP group.

    The layer gathers and scatters the sequence itself (`gather` / `scatter`), so its linears run without
    megatron's own sequence-parallel communication: each stream's token count differs between ranks."""

    def __init__(self, cfg: ModelConfig, sequence_parallel: bool = False):
        self.config = megatron_config(cfg, sequence_parallel=sequence_parallel)
        self.linear_config = dataclasses.replace(self.config, sequence_parallel=False)
        self.spec = layer_spec(cfg)
        if cfg.fp8 != "off" and torch.cuda.is_available():
            check_fp8_hardware(cfg.fp8_recipe, torch.cuda.get_device_capability())
        self.tensor_parallel = tp_world_size()
        self.sequence_parallel = sequence_parallel

    def make(self, name: str, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        split = {"gather_output": False} if name in COLUMN_PARALLEL else {"input_is_parallel": True}
        return build_module(getattr(self.spec, name), in_features, out_features, config=self.linear_config,
                            init_method=nn.init.xavier_uniform_, bias=bias, skip_bias_add=False, is_expert=False,
                            **split)

    def layer_context(self, layer: int):
        """megatron-core's FP8 context (fp8_autocast with the config's recipe) around layer `layer` (global index);
        a null context without FP8. Only TE modules read it: norms, attention and the small layers stay bf16."""
        return get_fp8_context(self.config, layer)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Sequence parallel: this rank's tokens [T/tp, B, H] -> all tokens [T, B, H] for the per-stream linears.
        The column-parallel linear after it already all-reduces the input gradient, so the backward only keeps
        this rank's part (tensor_parallel_output_grad=False)."""
        return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False) \
            if self.sequence_parallel else x

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """Sequence parallel: [T, B, ...] (e.g. the row-parallel output, already all-reduced) -> this rank's
        tokens [T/tp, B, ...] (backward: all-gather)."""
        return scatter_to_sequence_parallel_region(x) if self.sequence_parallel else x
