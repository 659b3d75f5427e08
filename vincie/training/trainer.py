"""The Trainer: one optimizer step of the MM-DiT (single process, or one rank of a TP/PP/DP layout under torchrun),
and the state a checkpoint holds. The loop around it is vincie.training.train.

Each step: the loader hands this data-parallel rank its sessions -> SessionEncoder builds block-causal
sequences (context dropout, logit-normal timesteps, noise), in micro-batches -> the MM-DiT (or this rank's
pipeline stage of it) predicts velocities -> per-task weighted flow loss (loss.py) -> AdamW with warmup + cosine,
gradient clipping, EMA (optim.py). Every random draw of step s comes from generators seeded by (seed, s, sample
index), so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

from vincie.config import Config, ConfigError, DataConfig, check_world, to_dict
from vincie.data.loader import Loader, Skipped
from vincie.data.order import SKIP_REASONS, SamplerState
from vincie.errors import VincieError
from vincie.model.batch import Batch, SampleTokens, SessionEncoder, collate, num_tokens, pack_rows
from vincie.model.components import build_components
from vincie.model.flops import training_flops
from vincie.model.sequence import TASKS
from vincie.sessions.loaded import sub_session, truncate
from vincie.training import checkpoint, lora
from vincie.training.loss import flow_loss_sums
from vincie.training.metrics import Metrics
from vincie.training.optim import EMA, lr_factor
from vincie.training.parallel import DistInfo, megatron_runtime, model_stages


def max_turns_at(step: int, data: DataConfig) -> int:
    """The session length cap in effect at `step` (data.turn_curriculum, else data.max_turns)."""
    started = [k for k in data.turn_curriculum if k <= step]
    return data.turn_curriculum[max(started)] if started else data.max_turns


def sample_generators(seed: int, step: int, index: int) -> tuple[np.random.Generator, torch.Generator]:
    """The random streams of sample `index` (its position in the global batch) of step `step`: the same on
    any number of data-parallel ranks."""
    sequence = np.random.SeedSequence([seed, step, index])
    torch_seed = int(sequence.generate_state(1, dtype=np.uint64)[0] % (2 ** 63))
    return np.random.default_rng(sequence), torch.Generator().manual_seed(torch_seed)


def needs_megatron(cfg: Config) -> bool:
    p = cfg.parallel
    return p.tensor > 1 or p.pipeline > 1 or p.distributed_optimizer


class Trainer:
    """One optimizer step = the step's global batch, split over data-parallel ranks and, on each, into
    micro-batches whose gradients accumulate.

    Two runtimes, one loss. **megatron** (GPUs; on CPU only under the tests' shim, see parallel.megatron_runtime):
    megatron-core DDP (+ distributed optimizer), its optimizer, and `get_forward_backward_func` (no pipelining,
    1F1B or interleaved 1F1B), checkpoints through dist_checkpointing. **plain** (a CPU machine without CUDA:
    `make demo`, tests): torch DDP and torch AdamW, data parallel only, checkpoints as one state.pt. Both divide
    the summed loss by the target-token count of the global batch, so results do not depend on the split.
    """

    def __init__(self, cfg: Config, dist_info: DistInfo):
        self.cfg, self.info = cfg, dist_info
        t = cfg.train
        check_world(cfg, dist_info.world_size)
        self.megatron = megatron_runtime()
        if needs_megatron(cfg) and not self.megatron:
            raise ConfigError("config keys parallel.tensor, parallel.pipeline and parallel.distributed_optimizer "
                              "need megatron-core's runtime, which needs CUDA; this machine has no GPU")
        torch.manual_seed(cfg.run.seed)
        stages = model_stages(cfg) if self.megatron else None
        model, self.vae, self.text_encoder = build_components(cfg, dist_info.device, stages)
        self.chunks = model if stages is not None else [model]
        self.model = self.chunks[0]  # the whole model, except under pipeline parallel
        if t.lora.rank:  # adapters on the projections, everything else frozen
            tp_rank, tp = self.tensor_parallel_rank()
            lora.apply(self.chunks, t.lora, cfg.run.seed, tp_rank, tp)
        if self.megatron:
            self.wrapped, self.optimizer = self.megatron_setup()
        else:
            # every parameter gets a gradient in every backward (zero_terms), so DDP needs no search of the graph
            self.wrapped = [torch.nn.parallel.DistributedDataParallel(self.model, find_unused_parameters=False)
                            if dist_info.world_size > 1 else self.model]
            decay, no_decay = [], []
            for param in self.model.parameters():
                if param.requires_grad:
                    (decay if param.ndim >= 2 else no_decay).append(param)
            self.optimizer = torch.optim.AdamW([{"params": decay, "wd_mult": 1.0},
                                                {"params": no_decay, "wd_mult": 0.0}], lr=t.lr,
                                               betas=tuple(t.betas), fused=True)  # one kernel, not a loop per tensor
        self.ema = EMA(self.chunks, t.ema_decay, t.ema_warmup)
        self.metrics = Metrics()
        self.loader = Loader(cfg, dist_info.dp_rank, dist_info.dp_size, dist_info.device,
                             on_skip=lambda reason: self.metrics.data_skipped.labels(reason).inc())
        self.encoder = SessionEncoder(cfg, self.vae, self.text_encoder, dist_info.device)
        self.step = 0
        # over all ranks and the whole run (restored on resume): sessions read, and skipped by reason
        self.data_totals = {"sessions": 0, "skipped": dict.fromkeys(SKIP_REASONS, 0)}

    def megatron_setup(self):
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        t, p = self.cfg.train, self.cfg.parallel
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=p.distributed_optimizer)
        wrapped = [DistributedDataParallel(chunk.config, ddp_config, chunk) for chunk in self.chunks]
        config = self.chunks[0].config  # the schedules read the first chunk's config
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = [w.no_sync for w in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=t.lr, weight_decay=t.weight_decay, adam_beta1=t.betas[0],
                            adam_beta2=t.betas[1], clip_grad=t.grad_clip,
                            use_distributed_optimizer=p.distributed_optimizer), wrapped)
        return wrapped, optimizer

    # -- state (the plain runtime's checkpoint; the megatron runtime's is in checkpoint.py) -------------------
    def state(self) -> dict:
        return {"model": self.model.state_dict(), "ema": {"updates": self.ema.updates, "weights": self.ema.shadow[0]},
                "optimizer": self.optimizer.state_dict(), "common": self.common_state()}

    def common_state(self) -> dict:
        """What every rank holds the same: step, data position and totals, RNG, config."""
        return {"step": self.step, "sampler": asdict(self.loader.state),
                "sessions_per_epoch": len(self.loader.order), "data_totals": self.data_totals,
                "torch_rng": torch.get_rng_state(), "config": to_dict(self.cfg)}

    def load_common(self, common: dict) -> None:
        # checkpoints from before the loader lack the epoch length and totals; their (epoch, cursor) means the same
        saved_length = common.get("sessions_per_epoch", len(self.loader.order))
        if saved_length != len(self.loader.order):
            raise VincieError(f"the checkpoint's data position counts {saved_length} sessions per "
                              f"epoch, {self.cfg.data.train_url} now gives {len(self.loader.order)} (the index or "
                              "the data.* filters changed), so it cannot be restored exactly; restore them, or "
                              "train into a new run.out_dir")
        self.step = common["step"]
        self.loader.seek(SamplerState(**common["sampler"]))
        self.data_totals = common.get("data_totals", self.data_totals)
        torch.set_rng_state(common["torch_rng"])

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.updates = state["ema"]["updates"]
        self.ema.shadow = [{n: t.clone() for n, t in state["ema"]["weights"].items()}]
        self.optimizer.load_state_dict(state["optimizer"])
        self.load_common(state["common"])

    def save(self) -> None:
        start = time.perf_counter()
        if self.megatron:
            checkpoint.save_sharded(self)
        elif self.info.is_main:
            checkpoint.save(self.cfg.run.out_dir, self.step, self.state(), self.cfg.train.keep_checkpoints)
        if dist.is_initialized():
            dist.barrier()
        self.metrics.checkpoint(self.step, time.perf_counter() - start, time.time())

    def resume(self) -> str | None:
        """The run's latest checkpoint, else train.init_from's weights, else the random init. -> what was loaded."""
        path = checkpoint.latest(self.cfg.run.out_dir)
        if path:
            if self.megatron:
                checkpoint.load_sharded(self, path)
            else:
                self.load(checkpoint.load(path))
            self.metrics.checkpoint(self.step, None, os.path.getmtime(path))
        elif self.cfg.train.init_from:
            self.init_from(self.cfg.train.init_from)
            return self.cfg.train.init_from
        return path

    def tensor_parallel_rank(self) -> tuple[int, int]:
        """(this rank's index in its TP group, the group's size)."""
        if not self.megatron:
            return 0, 1
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_rank(), self.cfg.parallel.tensor

    @torch.no_grad()
    def init_from(self, model_dir: str) -> None:
        """A model directory's full weights -> this rank's parameters (its pipeline stage's, tensor-parallel ones
        cut to its slice) and the EMA."""
        weights = checkpoint.model_dir_weights(model_dir, self.cfg, self.text_encoder)
        tp_rank, tp = self.tensor_parallel_rank()
        for chunk in self.chunks:
            for name, param in chunk.named_parameters():
                if name.endswith((".lora_a", ".lora_b")):
                    continue  # train.lora's adapters start as they were made (B = 0: the model directory's model)
                full = weights[name]
                if getattr(param, "tensor_model_parallel", False):
                    full = full.chunk(tp, dim=param.partition_dim)[tp_rank]
                param.copy_(full)
        self.ema.shadow = [{n: p.detach().clone() for n, p in chunk.named_parameters()} for chunk in self.chunks]

    # -- one step -------------------------------------------------------------------------------------------
    def make_batches(self) -> tuple[list[Batch], dict]:
        """This rank's share of the step's global batch, as micro-batches, and what reading it took: sample i of
        the global batch goes to data-parallel rank i % dp_size and draws its randomness from (seed, step, i). A
        skipped (bad) session leaves its place empty (micro_batches). Every TP/PP rank of one data-parallel replica
        builds the same micro-batches."""
        dp = self.info.dp_size
        start = time.perf_counter()
        items = self.loader.next(self.cfg.train.batch_size // dp)
        wait_s = time.perf_counter() - start
        self.metrics.data_wait.observe(wait_s)
        samples = []
        for j, item in enumerate(items):
            if isinstance(item, Skipped):
                continue
            rng, generator = sample_generators(self.cfg.run.seed, self.step, self.info.dp_rank + j * dp)
            session = truncate(item, max_turns_at(self.step, self.cfg.data))
            if self.cfg.data.mode == "pairs":
                session = sub_session(session, int(rng.integers(0, session.turns)), 1)
            samples.append(self.encoder.training_sample(session, rng, generator))
        batches = self.micro_batches(samples)
        skipped = [sum(isinstance(x, Skipped) and x.reason == r for x in items) for r in SKIP_REASONS]
        return batches, {"wait_s": wait_s, "counts": [len(items), *skipped], "keys": [x.key for x in items]}

    def micro_batches(self, samples: list[SampleTokens]) -> list[Batch]:
        """This rank's samples -> micro-batches (a rank without samples gets one without loss, so that it still
        takes part in the collectives). Samples are sorted by token count before they are split, so each
        micro-batch holds similar lengths."""
        real = len(samples)
        samples = sorted(samples, key=num_tokens) or [self.encoder.null_sample()]
        tokens = [num_tokens(s) for s in samples]
        rows = (pack_rows(tokens, self.cfg.data.max_tokens) if self.cfg.data.pack
                else [[i] for i in range(len(samples))])
        size = self.cfg.parallel.micro_batch_size or len(rows)  # rows per micro-batch; 0: all in one
        parts = [rows[k:k + size] for k in range(0, len(rows), size)]
        # under pipeline parallel one length for all micro-batches (the schedules send fixed-shape tensors); a
        # multiple of TP under sequence parallel (the tokens split evenly over TP ranks) and of data.pad_multiple
        multiple = math.lcm(self.cfg.parallel.tensor if self.cfg.parallel.sequence_parallel else 1,
                            self.cfg.data.pad_multiple)
        lengths = [max(sum(tokens[i] for i in row) for row in (rows if self.cfg.parallel.pipeline > 1 else part))
                   for part in parts]
        batches = [collate(samples, self.info.device, self.cfg.model.text_dim, -(-n // multiple) * multiple,
                           rows=part) for part, n in zip(parts, lengths)]
        if not real:
            batches = [dataclasses.replace(batches[0], num_samples=0)]
        return batches

    def make_batch(self) -> Batch:
        """The local batch as one batch (with parallel.micro_batch_size 0)."""
        (batch,), _ = self.make_batches()
        return batch

    def set_lr(self) -> float:
        """This step's learning rate, and weight decay per group (`wd_mult`: 0 for biases and vectors, as
        megatron-core's optimizer groups them; its param scheduler is not used)."""
        lr = self.cfg.train.lr * lr_factor(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = self.cfg.train.weight_decay * group["wd_mult"]
        return lr

    def train_step(self) -> dict:
        start = time.perf_counter()
        batches, data = self.make_batches()
        sums = self.forward_backward(batches, data["counts"])
        self.add_data_totals(sums["data_counts"])
        lr = self.set_lr()
        grad_norm, finite = self.optimizer_step()
        if finite:
            self.ema.update(self.chunks)
        self.step += 1
        return {"step": self.step, "loss_sum": sums["loss_sum"], "count": sums["count"], "grad_norm": grad_norm,
                "finite": finite, "lr": lr, "samples": sum(b.num_samples for b in batches),
                "tokens": sum(int(b.inputs.mask.token_block.numel()) for b in batches),
                "real_tokens": sum(b.work.tokens for b in batches if b.num_samples),
                "task_sums": sums["task_sums"], "reporter": sums["reporter"], "keys": data["keys"],
                "flops": model_flops(self.cfg, batches), "data_s": data["wait_s"],
                "step_s": time.perf_counter() - start}

    def add_data_totals(self, counts: list[float]) -> None:
        """Adds the step's global [sessions, skipped per reason] and stops the run, on every rank at once, when
        more than data.max_bad_share of the sessions read were bad."""
        self.data_totals["sessions"] += int(counts[0])
        for reason, n in zip(SKIP_REASONS, counts[1:]):
            self.data_totals["skipped"][reason] += int(n)
        d, sessions = self.cfg.data, self.data_totals["sessions"]
        bad = sum(self.data_totals["skipped"].values())
        if sessions >= d.bad_min_sessions and bad > d.max_bad_share * sessions:
            reasons = ", ".join(f"{r} {n}" for r, n in self.data_totals["skipped"].items() if n)
            raise VincieError(f"data: {bad} of the {sessions} sessions read so far were bad ({bad / sessions:.1%}, "
                              f"more than data.max_bad_share {d.max_bad_share:.1%}; {reasons}); the 'data: skipped' "
                              f"lines name them (check: vincie data index verify {d.train_url})")

    def forward_backward(self, batches: list[Batch], data_counts: list[int]) -> dict:
        """Gradients of the step's loss (summed over micro-batches, divided by the global target-token count)
        -> {loss_sum, count, task_sums, reporter, data_counts}; loss_sum is this rank's (zero where it holds no
        loss). `data_counts` (sessions read, skipped by reason) are summed over data-parallel ranks in the same
        all-reduce as the target-token count."""
        counts = torch.tensor([float(sum(b.target.shape[0] for b in batches)), *map(float, data_counts)],
                              dtype=torch.float64, device=self.info.device)  # NCCL reduces device tensors only
        if self.info.dp_size > 1:
            dist.all_reduce(counts, group=data_parallel_group())  # over the global batch
        counts = counts.cpu()
        count = counts[0].float()
        loss_sum, per_task, reporter = (self.forward_backward_megatron(batches) if self.megatron
                                        else self.forward_backward_plain(batches, count))
        values = torch.cat([loss_sum.reshape(1), per_task.reshape(-1)]).tolist()  # the step's one device read
        task_sums = {t: (values[1 + 2 * k], values[2 + 2 * k]) for k, t in enumerate(TASKS)}
        return {"loss_sum": values[0], "task_sums": task_sums, "reporter": reporter, "count": float(count),
                "data_counts": counts[1:].tolist()}

    def forward_backward_plain(self, batches: list[Batch], count: torch.Tensor) -> tuple:
        """torch DDP averages gradients over ranks; scaling by dp_size / count makes that the global token mean.
        -> (loss sum, per-task table, reporter), the sums as device tensors."""
        model = self.wrapped[0]
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64, device=self.info.device)
        task_table = torch.zeros(len(TASKS), 2, dtype=torch.float64, device=self.info.device)
        for k, batch in enumerate(batches):
            sync = contextlib.nullcontext() if k == len(batches) - 1 or model is self.model else model.no_sync()
            with sync, self.autocast():
                weighted_sum, per_task = flow_loss_sums(model(batch.inputs), batch, self.cfg.diffusion.loss_weights,
                                                        self.cfg.diffusion.prediction, self.cfg.diffusion.loss_space)
                (weighted_sum * self.info.dp_size / count.clamp(min=1) + zero_terms(self.model.text_encoder)).backward()
            total += weighted_sum.detach().double()
            task_table += per_task
        return total, task_table, True

    def forward_backward_megatron(self, batches: list[Batch]) -> tuple:
        """megatron-core's schedule for this layout; the loss function returns (sum, token count), megatron sums
        the counts over micro-batches and data-parallel ranks and divides the gradients by the total
        (calculate_per_token_loss). -> (loss sum, per-task table, reporter), the sums as device tensors (zero on
        the stages without the loss)."""
        weights = self.cfg.diffusion.loss_weights

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            with self.autocast():
                output = model(batch.inputs)

            def loss_func(pred: torch.Tensor):
                weighted_sum, per_task = flow_loss_sums(pred, batch, weights, self.cfg.diffusion.prediction,
                                                         self.cfg.diffusion.loss_space)
                count = torch.tensor(batch.target.shape[0], dtype=torch.int)
                return weighted_sum, count, {"loss_sum": weighted_sum.detach().double(), "task_table": per_task}
            return output, loss_func

        for w in self.wrapped:
            w.zero_grad_buffer()
        self.optimizer.zero_grad()
        results, reporter = self.megatron_schedule(batches, forward_step, forward_only=False)
        total = torch.zeros((), dtype=torch.float64, device=self.info.device)
        task_table = torch.zeros(len(TASKS), 2, dtype=torch.float64, device=self.info.device)
        for r in results:  # one per micro-batch, on the last stage only
            total += r["loss_sum"]
            task_table += r["task_table"]
        return total, task_table, reporter

    @torch.no_grad()
    def forward_only(self, batches: list[Batch], table) -> tuple[torch.Tensor | None, bool]:
        """The model's outputs on `batches` without gradients (validation), each turned into a tensor by
        table(output, batch) and summed over micro-batches -> (the sum, or None on the ranks without the output;
        whether this rank reports it: the last pipeline stage's TP rank 0). Every rank of the layout must call it
        (megatron-core's forward-only schedule under TP/PP)."""
        if not self.megatron:
            total = None
            for batch in batches:
                with self.autocast():
                    result = table(self.model(batch.inputs), batch)
                total = result if total is None else total + result
            return total, True

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            with self.autocast():
                output = model(batch.inputs)

            def loss_func(pred: torch.Tensor):
                return torch.zeros((), device=pred.device), torch.tensor(1, dtype=torch.int), \
                    {"table": table(pred, batch)}
            return output, loss_func

        pipeline = self.cfg.parallel.pipeline
        if self.cfg.parallel.virtual_pipeline > 1 and len(batches) % pipeline:
            # the interleaved schedule runs micro-batches in groups of the pipeline size: pad with ones that
            # carry no target (their table is zero)
            batches = batches + [batches[-1].without_targets()] * (pipeline - len(batches) % pipeline)
        results, reporter = self.megatron_schedule(batches, forward_step, forward_only=True)
        return (sum(r["table"] for r in results) if results else None), reporter

    def autocast(self):
        """The forward's autocast: bf16 with train.precision bf16, off otherwise."""
        return torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.precision == "bf16")

    def megatron_schedule(self, batches: list[Batch], forward_step, forward_only: bool) -> tuple[list, bool]:
        """megatron-core's schedule for this layout over `batches` -> (the loss functions' dicts, one per
        micro-batch on the last stage; whether this rank reports them: the last stage's TP rank 0)."""
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        first = batches[0].inputs.mask.token_block.shape
        results = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=[iter(batches) for _ in self.wrapped],
            model=self.wrapped if len(self.wrapped) > 1 else self.wrapped[0], num_microbatches=len(batches),
            seq_length=first[1], micro_batch_size=first[0], forward_only=forward_only)
        reporter = parallel_state.is_pipeline_last_stage(ignore_virtual=True) and \
            parallel_state.get_tensor_model_parallel_rank() == 0
        return results, reporter

    def optimizer_step(self) -> tuple[float, bool]:
        """Clip and step unless the gradient norm is not finite (then the step is skipped and counted)."""
        clip = self.cfg.train.grad_clip
        if self.megatron:
            from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

            self.optimizer.prepare_grads()
            grad_norm = float(self.optimizer.get_grad_norm())
            finite = math.isfinite(grad_norm)
            if finite:  # clip by the norm just computed (clip_grad_norm would compute and all-reduce it again)
                for optimizer in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
                    params = optimizer.get_parameters()
                    if params:
                        clip_grad_by_total_norm_fp32(
                            params, max_norm=clip, total_norm=grad_norm,
                            use_decoupled_grad=optimizer.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
                self.optimizer.step_with_ready_grads()
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
            finite = math.isfinite(grad_norm)
            if finite:
                self.optimizer.step()
        return grad_norm, finite


def zero_terms(module: torch.nn.Module | None) -> torch.Tensor | float:
    """0 x one element of each of `module`'s parameters: added to a loss, it gives each a zero gradient in every
    backward and changes no value. The plain runtime adds it for the trainable text encoder (hashed_words), the one
    part of the model that a step can leave without a gradient: it is applied before the model's forward, and a
    micro-batch whose every instruction was dropped (sequence.drop_text, for guidance) does not use it. Every MM-DiT
    parameter takes part in every step whatever the model options and blocks. So torch DDP can run without its
    search for unused parameters (whose extra graph traversal every step made it warn), and without that search a
    parameter left without a gradient would stop the run."""
    if module is None:
        return 0.0
    return sum(param.reshape(-1)[0] * 0.0 for param in module.parameters())


def model_flops(cfg: Config, batches: list[Batch]) -> float:
    """The one call site of the analytic FLOPs count that model TFLOP/s and MFU come from: forward + backward of
    this rank's micro-batches (vincie.model.flops, block-causal pairs counted; the Workloads were counted on the host by
    collate, so this touches no device). A rank without a real sample (a null batch) did no useful work."""
    return float(sum(training_flops(cfg.model, b.work) for b in batches if b.num_samples))


def data_parallel_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()
