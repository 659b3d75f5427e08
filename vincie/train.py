"""`vincie train`: the training loop (single process, or data parallel under torchrun).

Each step: the sampler hands this rank its sessions -> SessionEncoder builds block-causal sequences (context
dropout, logit-normal timesteps, noise) -> the MM-DiT predicts velocities -> per-task weighted flow loss ->
AdamW with warmup + cosine, gradient clipping, EMA. Every random draw of step s comes from generators seeded by
(seed, s, rank), so a resumed run repeats the uninterrupted one exactly.

Outputs under run.out_dir: config.yaml (resolved), metrics.jsonl (one line per log step), checkpoints/.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from vincie import checkpoint, storage
from vincie.batch import Batch, SessionEncoder, collate
from vincie.components import build_components
from vincie.config import Config, ConfigError, DataConfig, to_dict, to_yaml
from vincie.data import EpochSampler, SamplerState, SessionDataset, sub_session, truncate
from vincie.diffusion import output_to_velocity
from vincie.errors import VincieError
from vincie.parallel import DistInfo, init_distributed
from vincie.sequence import TASKS


def flow_loss_sums(output: torch.Tensor, batch: Batch, weights: dict[str, float],
                   prediction: str) -> tuple[torch.Tensor, dict]:
    """Task-weighted sum of the per-token squared velocity error over this batch's target tokens, and per task
    (sum, count) of the unweighted error. `output` is the model's output for every latent token [N_lat, P],
    read as `prediction` (diffusion.output_to_velocity). The trainer divides by the target-token count of the
    whole global batch, so the loss (and the gradient) does not depend on how the batch is split over ranks."""
    velocity = output_to_velocity(output[batch.target_select].float(), batch.target_inputs, batch.target_t,
                                  prediction)
    err = ((velocity - batch.target) ** 2).mean(dim=-1)  # (N_target,)
    table = torch.tensor([weights[t] for t in TASKS], device=err.device)
    weighted_sum = (table[batch.target_task] * err).sum()
    per_task = {t: (float(err.detach()[batch.target_task == k].sum()), int((batch.target_task == k).sum()))
                for k, t in enumerate(TASKS)}
    return weighted_sum, per_task


class EMA:
    """Exponential moving average of the weights, with the usual warmup: the decay at update n is
    min(decay, (1 + n) / (10 + n)), so short runs do not average in their random initialisation."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        for n, p in model.named_parameters():
            self.shadow[n].lerp_(p.detach(), 1 - decay)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "weights": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        self.shadow = {n: t.clone() for n, t in state["weights"].items()}


def lr_factor(step: int, cfg: Config) -> float:
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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


def check_run_dir(cfg: Config) -> None:
    """A run directory holds one model: resuming it with another model shape is refused."""
    path = os.path.join(cfg.run.out_dir, "config.yaml")
    if os.path.exists(path):
        import yaml

        previous = yaml.safe_load(open(path)) or {}
        if previous.get("model") != to_dict(cfg)["model"]:
            raise VincieError(f"{cfg.run.out_dir} holds a run with another model config; choose a new "
                              "run.out_dir to start a new run")


class Trainer:
    def __init__(self, cfg: Config, dist_info: DistInfo, progress: bool = True):
        self.cfg, self.info, self.progress = cfg, dist_info, progress
        t = cfg.train
        if t.batch_size % dist_info.dp_size:
            raise ConfigError(f"config key 'train.batch_size' ({t.batch_size}) must be divisible by the number of "
                              f"data-parallel ranks ({dist_info.dp_size})")
        torch.manual_seed(cfg.run.seed)
        self.model, self.vae, self.text_encoder = build_components(cfg, dist_info.device)
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, find_unused_parameters=True) \
            if dist_info.world_size > 1 else None
        decay, no_decay = [], []
        for p in self.model.parameters():
            (decay if p.ndim >= 2 else no_decay).append(p)
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=tuple(t.betas))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.ema = EMA(self.model, t.ema_decay)
        self.dataset = SessionDataset(cfg.data.train_url, cfg.storage, resolution=cfg.data.resolution)
        self.sampler = EpochSampler(len(self.dataset), cfg.run.seed, t.batch_size)
        self.encoder = SessionEncoder(cfg, self.vae, self.text_encoder, dist_info.device)
        self.step = 0

    # -- state ----------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "step": self.step, "sampler": asdict(self.sampler.state), "torch_rng": torch.get_rng_state(),
                "config": to_dict(self.cfg)}

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.sampler.state = SamplerState(**state["sampler"])
        torch.set_rng_state(state["torch_rng"])

    def save(self) -> None:
        if self.info.is_main:
            checkpoint.save(self.cfg.run.out_dir, self.step, self.state(), self.cfg.train.keep_checkpoints)
        if dist.is_initialized():
            dist.barrier()

    # -- one step -------------------------------------------------------------------------------------------
    def make_batch(self) -> Batch:
        """This rank's share of the step's global batch: sample i of the global batch goes to rank i % dp_size
        and draws its randomness from (seed, step, i)."""
        rows = self.sampler.next_rows(self.info.dp_rank, self.info.dp_size)
        samples = []
        for j, row in enumerate(rows):
            rng, generator = sample_generators(self.cfg.run.seed, self.step, self.info.dp_rank + j * self.info.dp_size)
            session = truncate(self.dataset.load(row), max_turns_at(self.step, self.cfg.data))
            if self.cfg.data.mode == "pairs":
                session = sub_session(session, int(rng.integers(0, session.turns)), 1)
            samples.append(self.encoder.training_sample(session, rng, generator))
        return collate(samples, self.info.device, self.cfg.model.text_dim)

    def train_step(self) -> dict:
        cfg = self.cfg
        start = time.perf_counter()
        batch = self.make_batch()
        data_s = time.perf_counter() - start
        model = self.ddp or self.model
        with torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"):
            output = model(batch.inputs)
        weighted_sum, per_task = flow_loss_sums(output, batch, cfg.diffusion.loss_weights, cfg.diffusion.prediction)
        count = torch.tensor(float(batch.target.shape[0]))
        if dist.is_initialized() and self.info.dp_size > 1:
            dist.all_reduce(count)  # target tokens of the global batch
        # DDP averages gradients over ranks; scale so the result is the global token mean
        loss = weighted_sum * self.info.dp_size / count.clamp(min=1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
        finite = bool(torch.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
            self.ema.update(self.model)
        self.scheduler.step()
        self.step += 1
        return {"step": self.step, "loss_sum": float(weighted_sum.detach()), "count": float(count), "grad_norm": float(grad_norm),
                "finite": finite, "lr": self.scheduler.get_last_lr()[0], "samples": batch.num_samples,
                "tokens": int(batch.inputs.mask.token_block.numel()), "task_sums": per_task,
                "data_s": data_s, "step_s": time.perf_counter() - start}


def reduce_logs(logs: list[dict], info: DistInfo) -> dict:
    """Averages a window of step logs over steps and ranks (one all-reduce per log line)."""
    sums = [sum(l["loss_sum"] / l["count"] for l in logs), sum(l["samples"] for l in logs),
            sum(l["tokens"] for l in logs),
            sum(l["step_s"] for l in logs), sum(l["data_s"] for l in logs)]
    for t in TASKS:
        sums += [sum(l["task_sums"][t][0] for l in logs), sum(l["task_sums"][t][1] for l in logs)]
    values = torch.tensor(sums, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(values)
    seconds = float(values[3]) / info.world_size
    out = {"step": logs[-1]["step"], "loss": float(values[0]) / len(logs), "lr": logs[-1]["lr"],
           "grad_norm": logs[-1]["grad_norm"], "samples_per_s": float(values[1]) / seconds,
           "tokens_per_s": float(values[2]) / seconds, "step_s": seconds / len(logs),
           "data_wait_share": float(values[4]) / float(values[3]),
           "nonfinite_steps": sum(not l["finite"] for l in logs)}
    for k, t in enumerate(TASKS):
        count = float(values[6 + 2 * k])
        out[f"loss_{t}"] = float(values[5 + 2 * k]) / count if count else None
    return out


def append_metrics(path: str, record: dict, resume_step: int | None) -> None:
    if resume_step is not None and os.path.exists(path):  # drop lines past the checkpoint we resumed from
        lines = [l for l in open(path) if json.loads(l)["step"] <= resume_step]
        storage.write_bytes_atomic(path, "".join(lines).encode())
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(cfg: Config, progress: bool = True) -> dict:
    info = init_distributed()
    if info.is_main:
        check_run_dir(cfg)
        os.makedirs(cfg.run.out_dir, exist_ok=True)
        storage.write_bytes_atomic(os.path.join(cfg.run.out_dir, "config.yaml"), to_yaml(cfg).encode())
    trainer = Trainer(cfg, info, progress)
    resume_from = checkpoint.latest(cfg.run.out_dir)
    resumed_step = None
    if resume_from:
        trainer.load(checkpoint.load(resume_from))
        resumed_step = trainer.step
        if info.is_main:
            print(f"train: resuming from {resume_from} (step {trainer.step})")
    metrics_path = os.path.join(cfg.run.out_dir, "metrics.jsonl")
    bar = tqdm(total=cfg.train.steps, initial=trainer.step, unit="step", desc=f"train {cfg.run.name}",
               disable=not (progress and info.is_main))
    window, last = [], {}
    while trainer.step < cfg.train.steps:
        window.append(trainer.train_step())
        bar.update(1)
        if trainer.step % cfg.train.log_every == 0 or trainer.step == cfg.train.steps:
            last = reduce_logs(window, info)
            window = []
            if info.is_main:
                append_metrics(metrics_path, last, resumed_step)
                resumed_step = None
                bar.set_postfix({k: f"{last[k]:.3f}" for k in ("loss", "loss_nip", "loss_csp", "loss_nsp")
                                 if last.get(k) is not None} | {"samples/s": f"{last['samples_per_s']:.1f}"})
        if trainer.step % cfg.train.checkpoint_every == 0 or trainer.step == cfg.train.steps:
            trainer.save()
    bar.close()
    return last
