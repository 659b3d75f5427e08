"""Process setup: torch.distributed and megatron-core's parallel_state from the launcher's environment.

torchrun (and JobSet) set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; Kubeflow's PyTorchJob may
set PET_* equivalents. With none of them set, vincie runs as a world of one (a local TCP store on a free port),
so the same model code, built from megatron-core's parallel layers, runs in a plain `python` process too.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

import vincie.model  # noqa: F401  (its warning filters must precede megatron-core's import)
from megatron.core import parallel_state

from vincie.errors import VincieError


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


def init_distributed(tensor_parallel: int = 1, pipeline_parallel: int = 1) -> DistInfo:
    rank = env_int("RANK", "PET_RANK", default=0)
    world = env_int("WORLD_SIZE", "PET_WORLD_SIZE", default=1)
    local_rank = env_int("LOCAL_RANK", "PET_LOCAL_RANK", default=0)
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if world == 1 and not os.environ.get("MASTER_ADDR"):
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        else:
            os.environ.setdefault("MASTER_ADDR", os.environ.get("PET_MASTER_ADDR", "127.0.0.1"))
            os.environ.setdefault("MASTER_PORT", os.environ.get("PET_MASTER_PORT", "29500"))
            dist.init_process_group(backend, rank=rank, world_size=world)
    if world % (tensor_parallel * pipeline_parallel):
        raise VincieError(f"world size {world} is not divisible by tensor_parallel x pipeline_parallel "
                          f"({tensor_parallel} x {pipeline_parallel})")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_parallel, pipeline_parallel)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank,
                    dp_rank=parallel_state.get_data_parallel_rank(), dp_size=parallel_state.get_data_parallel_world_size(),
                    device=device)


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
