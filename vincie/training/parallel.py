"""Process setup: torch.distributed and megatron-core's parallel_state from the launcher's environment.

torchrun (and JobSet) set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; Kubeflow's PyTorchJob may
set PET_* equivalents. With none of them set, vincie runs as a world of one (a local TCP store on a free port),
so the same model code, built from megatron-core's parallel layers, runs in a plain `python` process too.
The parallel sizes come from the config's `parallel` section; data parallel is what is left of the world.
"""

from __future__ import annotations

# megatron_layers is imported before megatron-core (it sets warning filters first): keep the order below
# isort: skip_file

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

import vincie.model.megatron_layers  # noqa: F401  (its warning filters must precede megatron-core's import)
from megatron.core import parallel_state

from vincie.config import Config, ParallelConfig, check_model_parallel


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    dp_rank: int
    dp_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return default


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def restart_store(world: int) -> dist.Store | None:
    """Under torchrun, the agent's store with a prefix per restart attempt; None otherwise (env:// as usual).
    torchrun shares its rendezvous store with the workers and keeps it across restarts, so without a prefix the
    workers of a restarted attempt can read the process-group keys of the attempt before (the listening addresses
    of killed processes: "Gloo connectFullMesh failed ... Connection refused")."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
    return dist.PrefixStore(f"vincie/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_distributed(parallel: ParallelConfig | None = None) -> DistInfo:
    """torch.distributed (gloo on CPU, NCCL on GPU) and megatron-core's TP/PP/DP groups."""
    parallel = parallel or ParallelConfig()
    rank = env_int("RANK", "PET_RANK", default=0)
    world = env_int("WORLD_SIZE", "PET_WORLD_SIZE", default=1)
    local_rank = env_int("LOCAL_RANK", "PET_LOCAL_RANK", default=0)
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    check_model_parallel(parallel, world)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if world == 1 and not os.environ.get("MASTER_ADDR"):
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        else:
            os.environ.setdefault("MASTER_ADDR", os.environ.get("PET_MASTER_ADDR", "127.0.0.1"))
            os.environ.setdefault("MASTER_PORT", os.environ.get("PET_MASTER_PORT", "29500"))
            dist.init_process_group(backend, rank=rank, world_size=world, store=restart_store(world))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor, pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline if parallel.virtual_pipeline > 1 else None,
        context_parallel_size=parallel.context)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank,
                    dp_rank=parallel_state.get_data_parallel_rank(), dp_size=parallel_state.get_data_parallel_world_size(),
                    device=device)


def megatron_runtime() -> bool:
    """Whether megatron-core's DDP, optimizer, pipeline schedules and dist_checkpointing can run here: they place
    some tensors on CUDA even for a CPU model (`torch.cuda.current_device()`, `device="cuda"`), so they need a
    GPU, or the tests' CPU shim (tests/megatron_cpu_shim.py) which makes those calls answer with the CPU."""
    try:
        torch.cuda.current_device()
        return True
    except (AssertionError, RuntimeError):
        return False


def model_stages(cfg: Config) -> list[dict]:
    """This rank's model chunks as MMDiT arguments: contiguous layer ranges, interleaved over the pipeline ranks
    when virtual_pipeline > 1 (chunk v of rank r holds block v * pipeline + r of the layers, as megatron-core's
    interleaved schedule expects)."""
    p = cfg.parallel
    rank, size = parallel_state.get_pipeline_model_parallel_rank(), p.pipeline
    per_chunk = cfg.model.num_layers // (size * p.virtual_pipeline)
    stages = []
    for v in range(p.virtual_pipeline):
        first = (v * size + rank) * per_chunk
        stages.append({"layers": range(first, first + per_chunk),
                       "pre_process": v == 0 and rank == 0,
                       "post_process": v == p.virtual_pipeline - 1 and rank == size - 1,
                       "sequence_parallel": p.sequence_parallel})
    return stages


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
