"""Training checkpoints: one directory per step, published atomically, and a `latest` pointer moved after.

    OUT/checkpoints/step-000200/            one complete checkpoint
    OUT/checkpoints/latest                  "step-000200"

A checkpoint is written to `step-000200.tmp-*` and renamed when complete; `latest` is rewritten (temp file,
rename) only after that, so a run killed mid-save resumes from the previous complete checkpoint.

Two formats, one per training runtime (see vincie.training.trainer.Trainer):
- megatron: a megatron-core `dist_checkpointing` directory (torch_dist). Every parameter, EMA weight and
  optimizer moment is a ShardedTensor keyed by its parameter name (`model.dit.layers.3.latent.linear_qkv.weight`,
  `ema....`); tensor-parallel weights carry their TP offset, replicated ones a replica id, and layers are named by
  global index, so a checkpoint saved under one TP/PP/DP layout loads under any other. Step, data position, RNG
  and config are common state.
- plain: `state.pt`, one torch.save of the same content (a CPU run without megatron's runtime).
`load_weights` reads the model or EMA weights of either as one flat state dict (for `vincie edit/eval`).
"""

from __future__ import annotations

import os
import shutil
import warnings

import torch
import torch.distributed as dist

from vincie import storage

LATEST = "latest"
STATE = "state.pt"
# megatron's optimizer state in a layout that reshards across TP, PP and DP
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def checkpoint_dir(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def step_of(path: str) -> int:
    """A checkpoint directory (step_name) -> its step."""
    return int(os.path.basename(path.rstrip("/")).removeprefix("step-"))


def publish(root: str, tmp: str, final: str, keep: int) -> str:
    """A complete checkpoint in `tmp` -> `final`, then the `latest` pointer, then old checkpoints pruned."""
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    storage.write_bytes_atomic(os.path.join(root, LATEST), os.path.basename(final).encode())
    steps = sorted(n for n in os.listdir(root) if n.startswith("step-") and not storage.is_temp_name(n))
    for old in steps[:-keep]:
        shutil.rmtree(os.path.join(root, old))
    for name in os.listdir(root):  # temp directories of saves that were killed
        if storage.is_temp_name(name) and os.path.isdir(os.path.join(root, name)) and name != os.path.basename(tmp):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return final


def save(out_dir: str, step: int, state: dict, keep: int) -> str:
    root = checkpoint_dir(out_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, step_name(step))
    tmp = storage.temp_name(final)
    os.makedirs(tmp)
    torch.save(state, os.path.join(tmp, STATE))
    return publish(root, tmp, final, keep)


def latest(out_dir: str) -> str | None:
    """The directory of the newest complete checkpoint, or None."""
    pointer = os.path.join(checkpoint_dir(out_dir), LATEST)
    if not os.path.exists(pointer):
        return None
    path = os.path.join(checkpoint_dir(out_dir), open(pointer).read().strip())
    return path if os.path.isdir(path) else None


def load(path: str) -> dict:
    return torch.load(os.path.join(path, STATE), map_location="cpu", weights_only=False)


def load_weights(path: str, use_ema: bool) -> dict[str, torch.Tensor]:
    """The full model (or EMA) weights of a checkpoint of either format as one state dict, by parameter name.
    Sharded checkpoints are read with torch.distributed.checkpoint directly (no process group, no megatron
    runtime): each key holds the global tensor, whatever layout saved it."""
    if os.path.exists(os.path.join(path, STATE)):
        state = load(path)
        return state["ema"]["weights"] if use_ema else state["model"]
    import torch.distributed.checkpoint as dcp

    prefix = "ema." if use_ema else "model."
    metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    weights = {key: torch.empty(m.size, dtype=m.properties.dtype) for key, m in metadata.items()
               if key.startswith(prefix)}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*load in a single process.*")
        dcp.load(weights, checkpoint_id=path, no_dist=True)
    return {key[len(prefix):]: tensor for key, tensor in weights.items()}


# ---------------------------------------------------------------------------------------------------------------
# Sharded (megatron runtime)


# model fields that do not change the weights (how layers run, not what they hold)
RUNTIME_MODEL_FIELDS = ("spec", "fp8", "fp8_recipe", "attention_backend")


def model_dir_weights(model_dir: str, cfg, text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """train.init_from: a model directory's weights (training names, fp32), after checking that its model is this
    config's (every field but RUNTIME_MODEL_FIELDS) and that it holds every parameter (of the whole model and of the
    run's `text_encoder` when trainable) with its full shape."""
    from dataclasses import asdict

    from safetensors.torch import load_file

    from vincie.errors import VincieError
    from vincie.model.mmdit import build_on_meta
    from vincie.model.model_dir import WEIGHTS, check_weights, read_config

    theirs, _ = read_config(model_dir)
    ours, other = asdict(cfg.model), asdict(theirs.model)
    differ = [k for k in ours if k not in RUNTIME_MODEL_FIELDS and ours[k] != other[k]]
    if differ:
        raise VincieError(f"train.init_from {model_dir}: its model.{differ[0]} is {other[differ[0]]!r}, this config's "
                          f"is {ours[differ[0]]!r} ({len(differ)} model field(s) differ; the model section must "
                          "equal the model directory's config.json)")
    weights = load_file(os.path.join(model_dir, WEIGHTS))
    check_weights(build_on_meta(cfg.model), text_encoder, weights, f"train.init_from {model_dir}")
    return {name: tensor.float() for name, tensor in weights.items()}


def sharded_tensors(chunks: list[torch.nn.Module], prefix: str, tensors: list[dict] | None = None) -> dict:
    """{chunkV: {name: ShardedTensor}} over this rank's model chunks: the parameters themselves, or `tensors`
    (per chunk, by parameter name and of the same shape, e.g. EMA weights). TP-split parameters (megatron's
    `tensor_model_parallel` / `partition_dim`) are stored as their slice of the global tensor; replicated ones
    once, by the replica with TP rank 0, data-parallel rank 0 and, for the conditioning embedders present on
    every pipeline stage, the first stage's first chunk."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing import ShardedTensor

    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
    first_chunk = ps.get_pipeline_model_parallel_rank() * len(chunks)
    out = {}
    for v, chunk in enumerate(chunks):
        part = {}
        for name, param in chunk.named_parameters():
            data = param if tensors is None else tensors[v][name]
            if getattr(param, "tensor_model_parallel", False):
                part[name] = ShardedTensor.from_rank_offsets(prefix + name, data, (param.partition_dim, tp_rank, tp),
                                                             replica_id=dp_rank)
            else:
                stage_replica = first_chunk + v if getattr(param, "pipeline_parallel", False) else 0
                part[name] = ShardedTensor.from_rank_offsets(prefix + name, data,
                                                             replica_id=(tp_rank, stage_replica, dp_rank))
        out[f"chunk{v}"] = part
    return out


def sharded_state(trainer, step: int, is_loading: bool = False) -> dict:
    """Model, EMA and (after the first step: before it the optimizer holds no state) optimizer shards."""
    model = sharded_tensors(trainer.chunks, "model.")
    state = {"model": model, "ema": sharded_tensors(trainer.chunks, "ema.", trainer.ema.shadow)}
    if step > 0:
        state["optimizer"] = trainer.optimizer.sharded_state_dict(model, is_loading=is_loading,
                                                                  metadata=OPTIMIZER_METADATA)
    return state


def save_sharded(trainer) -> str | None:
    """Collective: every rank writes its shards into one temp directory; rank 0 publishes it. Scripts that call
    this must run under `if __name__ == "__main__":` (dist_checkpointing's writers may start processes)."""
    from megatron.core import dist_checkpointing

    root = checkpoint_dir(trainer.cfg.run.out_dir)
    final = os.path.join(root, step_name(trainer.step))
    tmp = f"{final}.tmp-save"  # the same name on every rank
    if trainer.info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    state = sharded_state(trainer, trainer.step) | {"common": trainer.common_state(),
                                                     "ema_updates": trainer.ema.updates}
    dist_checkpointing.save(state, tmp)
    dist.barrier()
    if trainer.info.is_main:
        return publish(root, tmp, final, trainer.cfg.train.keep_checkpoints)
    return None


@torch.no_grad()
def load_sharded(trainer, path: str) -> None:
    """A sharded checkpoint saved under any layout -> this rank's parameters, EMA, optimizer state and common
    state (step, data position, RNG)."""
    from megatron.core import dist_checkpointing

    step = dist_checkpointing.load_common_state_dict(path)["common"]["step"]
    loaded = dist_checkpointing.load(sharded_state(trainer, step, is_loading=True), path)
    for v, chunk in enumerate(trainer.chunks):
        for name, param in chunk.named_parameters():
            param.copy_(loaded["model"][f"chunk{v}"][name])
            trainer.ema.shadow[v][name].copy_(loaded["ema"][f"chunk{v}"][name])
    if step > 0:
        optimizer = loaded["optimizer"]
        # the param groups are common state written by rank 0 of the saving layout: their member lists only fit
        # that layout, so each group takes this rank's members (groups come in the same order in every layout)
        for saved, own in zip(optimizer["param_groups"], trainer.optimizer.state_dict()["param_groups"]):
            saved["params"] = own["params"]
        trainer.optimizer.load_state_dict(optimizer)
    trainer.ema.updates = loaded["ema_updates"]
    trainer.load_common(loaded["common"])
