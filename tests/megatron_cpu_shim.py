"""TEST-ONLY: lets megatron-core 0.16.1 run on CPU tensors over gloo, so multi-process parallel tests run here.

Never imported by `vincie/`. megatron-core places some tensors on CUDA even when the model lives on the CPU.
Each patch below names what it replaces and the megatron-core code that needs it; the version is pinned because
these are internals:

1. `torch.cuda.current_device()` -> "cpu". Buffers and scratch tensors are allocated with
   `device=torch.cuda.current_device()`: DDP's gradient buffers (distributed/param_and_grad_buffer.py), the
   all-gather / reduce-scatter outputs of tensor_parallel/mappings.py (sequence parallel), p2p shape exchange
   (pipeline_parallel/p2p_communication.py), the distributed optimizer's shard buffers.
2. `torch.cuda.synchronize()` / `torch.cuda.empty_cache()` -> no-ops (p2p_communication.py after batched p2p,
   DDP buffer teardown, dist_checkpointing savers).
3. `device="cuda"` literals and `Tensor.cuda()`: a TorchFunctionMode rewrites the device of factory calls
   (`torch.zeros(..., device="cuda")` counting tokens in pipeline_parallel/schedules.py, the optimizers'
   `_scale` / `found_inf` tensors in optimizer/optimizer.py, dist_checkpointing's exchange buffers) to the CPU,
   and turns `.cuda()` into the identity.
4. `Tensor.type()` -> "torch.cuda.FloatTensor" etc. for CPU tensors: optimizer/optimizer.py and
   distrib_optimizer.py accept only `torch.cuda.*Tensor` type strings when building their fp32 main params.
5. The CUDA RNG tracker: `tensor_parallel.random._set_cuda_rng_state` / `_get_cuda_rng_state` use the CPU
   generator, so `model_parallel_cuda_manual_seed` and `get_cuda_rng_tracker().fork()` work.

`torch.cuda.is_available()` is left False on purpose: vincie keeps choosing the CPU device and gloo.
Installed by `install()`; multi-process test scripts call it first thing, and subprocesses started by tests get
it through `tests/shim_site/sitecustomize.py` (put on PYTHONPATH).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

MEGATRON_CORE_VERSION = "0.16.1"

FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.arange, torch.empty_like,
             torch.zeros_like, torch.ones_like, torch.full_like, torch.as_tensor, torch.randn, torch.rand}
CPU_TYPE_TO_CUDA = {"torch.FloatTensor": "torch.cuda.FloatTensor", "torch.HalfTensor": "torch.cuda.HalfTensor",
                    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor"}


def is_cuda(device) -> bool:
    return (isinstance(device, str) and device.startswith("cuda")) or \
        (isinstance(device, torch.device) and device.type == "cuda") or isinstance(device, int)


class CudaToCpu(TorchFunctionMode):
    """Patches 3 and 4: CUDA placements become CPU placements."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in FACTORIES and is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        elif func is torch.Tensor.cuda:
            return args[0]
        elif func is torch.Tensor.to and args[1:] and is_cuda(args[1]):
            return args[0]
        elif func is torch.Tensor.to and is_cuda(kwargs.get("device")):
            kwargs.pop("device")
            if not kwargs:
                return args[0]
        elif func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return CPU_TYPE_TO_CUDA.get(name, name)
        return func(*args, **kwargs)


installed = False


def install() -> None:
    global installed
    if installed:
        return
    from megatron.core import package_info
    from megatron.core.tensor_parallel import random as mrandom

    assert package_info.__version__ == MEGATRON_CORE_VERSION, \
        f"the CPU shim was written for megatron-core {MEGATRON_CORE_VERSION}, found {package_info.__version__}"
    torch.cuda.current_device = lambda: "cpu"  # 1
    torch.cuda.synchronize = lambda *a, **k: None  # 2
    torch.cuda.empty_cache = lambda: None  # 2
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()  # 5
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)  # 5
    torch.cuda.manual_seed = lambda seed: None  # 5: model_parallel_cuda_manual_seed seeds the (absent) GPU
    CudaToCpu().__enter__()  # 3, 4: stays active for the life of the process
    installed = True
