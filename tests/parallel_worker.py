"""TEST-ONLY worker for tests/test_parallel.py, run as `torchrun ... parallel_worker.py CONFIG OUT MODE [k=v ...]`
(one process: the single-process reference; two: a parallel layout), always under the CPU shim.

MODE grads: load the initial weights of CONFIG's run (checkpoint step 0), run one forward/backward, write the loss
    and every parameter's gradient, gathered to full tensors, to OUT (torch.save) from rank 0.
MODE train: resume CONFIG's run (train.steps, checkpoint_every from CONFIG), write the step losses to OUT.
MODE init: random weights (no zero-initialised layers) saved as the run's checkpoint step 0, from one process.
MODE reference: random weights (TP slices drawn per rank, so no two slices are alike), one training step (EMA and
    raw weights then differ), a checkpoint in this layout; then the model's forward on a fixed batch through every
    pipeline stage: the batch's model inputs and the predicted velocity of its target tokens to OUT (safetensors, no
    pickle).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import megatron_cpu_shim  # noqa: E402

megatron_cpu_shim.install()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402

from vincie.config import load_config  # noqa: E402
from vincie.evaluation.validation import Validator  # noqa: E402
from vincie.training.parallel import init_distributed, shutdown  # noqa: E402
from vincie.training.train import train  # noqa: E402
from vincie.training.trainer import Trainer  # noqa: E402


def gathered_grads(trainer: Trainer) -> dict:
    """Every parameter's gradient as a full tensor (TP slices concatenated), on rank 0."""
    local = []
    for chunk in trainer.chunks:
        for name, param in chunk.named_parameters():
            if not param.requires_grad:  # frozen (train.lora)
                continue
            split = getattr(param, "tensor_model_parallel", False)
            local.append((name, param.main_grad.detach().clone(), param.partition_dim if split else None,
                          ps.get_tensor_model_parallel_rank()))
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, local)
    parts = {}
    for rank_items in everything:
        for name, grad, dim, tp_rank in rank_items:
            parts.setdefault(name, {})[tp_rank] = (grad, dim)
    full = {}
    for name, by_rank in parts.items():
        grads = [by_rank[r][0] for r in sorted(by_rank)]
        dim = by_rank[min(by_rank)][1]
        full[name] = torch.cat(grads, dim=dim) if dim is not None else grads[0]
    return full


def random_weights(trainer: Trainer, seed: int) -> None:
    """Every parameter ~ N(0, 0.05) (off adaLN-Zero, so every layer acts), drawn from a generator seeded by the
    parameter's name and, for tensor-parallel slices, the TP rank: replicated parameters agree across ranks."""
    import zlib

    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            split = getattr(param, "tensor_model_parallel", False)
            key = zlib.crc32(name.encode()) + (1 + ps.get_tensor_model_parallel_rank() if split else 0)
            param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(seed + key)) * 0.05)
    trainer.ema.shadow = [{n: p.detach().clone() for n, p in trainer.model.named_parameters()}]


def training_forward(trainer: Trainer, batch) -> torch.Tensor | None:
    """The model's output on `batch` as training computes it in this layout (megatron-core's schedule, forward only:
    through every pipeline stage), on the last stage; None on the others."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        return model(next(data_iterator).inputs), None  # no loss function: the schedule keeps the output

    for chunk in trainer.wrapped:
        chunk.eval()
    rows, length = batch.inputs.mask.token_block.shape
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=[iter([batch]) for _ in trainer.wrapped],
            model=trainer.wrapped if len(trainer.wrapped) > 1 else trainer.wrapped[0], num_microbatches=1,
            seq_length=length, micro_batch_size=rows, forward_only=True)
    return outputs[0] if ps.is_pipeline_last_stage(ignore_virtual=True) else None


def write_reference(trainer: Trainer, out: str) -> None:
    """The forward of the model as trained on a fixed batch: its inputs and the target tokens' velocity, written by
    the last pipeline stage's first TP rank."""
    from safetensors.torch import save_file

    from vincie.model.diffusion import output_to_velocity

    trainer.step = 0
    batch = trainer.make_batch()
    output = training_forward(trainer, batch)
    # the text features the forward used: the first stage's (it embeds them; later stages' text encoders are
    # copies that never train)
    text = [None] * dist.get_world_size()
    dist.all_gather_object(text, batch.inputs.text_tokens.detach() if ps.is_pipeline_first_stage() else None)
    if output is None or ps.get_tensor_model_parallel_rank() != 0:
        return
    batch.inputs.text_tokens = text[ps.get_pipeline_model_parallel_first_rank()]
    velocity = output_to_velocity(output[batch.target_select], batch.target_inputs, batch.target_t,
                                  trainer.cfg.diffusion.prediction)
    inputs, spec = batch.inputs, batch.inputs.mask
    tensors = {name: getattr(inputs, name) for name in ("text_tokens", "latent_tokens", "text_index", "latent_index",
                                                         "positions", "block_t", "block_type", "block_turn")}
    tensors |= {"mask." + name: getattr(spec, name) for name in ("token_block", "token_sample", "block_noisy")}
    tensors |= {"target_select": batch.target_select, "target_t": batch.target_t, "velocity": velocity}
    save_file({k: v.contiguous() for k, v in tensors.items()}, out,
              metadata={"full_attention": str(spec.full_attention)})


def main() -> None:
    config, out, mode, *overrides = sys.argv[1:]
    cfg = load_config(config, overrides)
    if mode == "train":
        train(cfg, progress=False)
        shutdown()
        return
    info = init_distributed(cfg.parallel)
    trainer = Trainer(cfg, info)
    if mode == "reference":
        random_weights(trainer, seed=1)
        trainer.train_step()
        trainer.save()
        write_reference(trainer, out)
    elif mode == "init":
        torch.manual_seed(1)
        with torch.no_grad():  # leave adaLN-Zero, so every parameter gets a gradient
            for param in trainer.model.parameters():
                param.normal_(0.0, 0.05)
        trainer.ema.shadow = [{n: p.detach().clone() for n, p in trainer.model.named_parameters()}]
        trainer.save()
    else:
        trainer.resume()
        validation = Validator(trainer).losses() if cfg.train.eval_every else None  # forward-only, every rank
        batches, data = trainer.make_batches()
        sums = trainer.forward_backward(batches, data["counts"])
        losses = [None] * dist.get_world_size()
        dist.all_gather_object(losses, sums["loss_sum"] / sums["count"] if sums["reporter"] else None)
        grads = gathered_grads(trainer)
        if info.is_main:
            torch.save({"loss": sum(l for l in losses if l is not None), "grads": grads, "val_loss": validation},
                       out)
    shutdown()


if __name__ == "__main__":
    main()
