"""Small runs for tests: a micro model on 32x32 synthetic sessions; torchrun of the test worker."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from data_index.synthetic.synth import SynthJob, run_synth
from vincie.config import StorageConfig, SynthConfig, load_config

MICRO_MODEL = {"hidden_size": 64, "num_heads": 2, "num_layers": 2, "dual_stream_layers": 1, "patch_size": 2,
               "latent_channels": 48, "text_dim": 64, "source": "none",
               "output_head": "linear"}
# the tiny preset trains without masks and never drops I_k (docs/training.md, "The tiny preset, and why"); tests
# built on it put the paper's context composition back, so that every block type and dropout case is exercised
PAPER_SEQUENCE = {"drop_current_image": 0.2, "masks_present": 0.8}
MICRO_OVERRIDES = [f"model.{k}={v}" for k, v in MICRO_MODEL.items()] + \
    [f"sequence.{k}={v}" for k, v in PAPER_SEQUENCE.items()]


def micro_batch(n=2, seed=0, **overrides):
    """-> (config, EditModel, n training samples of synthetic 32x32 sessions): the micro model in one process
    (vincie.training.parallel.init_distributed first), `overrides` as {"section.key": value}."""
    from vincie.cli.bench import training_samples

    cfg = load_config("tiny", ["data.resolution=32", *MICRO_OVERRIDES, *[f"{k}={v}" for k, v in overrides.items()]])
    return (cfg, *training_samples(cfg, n, seed))


def make_data(root, sessions=32, split="train", turns=(2, 4), image_format="jpg"):
    job = SynthJob(out=str(root), sessions=sessions, split=split, seed=0,
                   synth=SynthConfig(resolution=32, min_turns=turns[0], max_turns=turns[1], shard_size=16,
                                     image_format=image_format))
    run_synth(job, StorageConfig(), workers=1, progress=False)
    return str(root)


def write_config(path, out_dir, train_url, eval_url="", **sections) -> str:
    config = {
        "run": {"name": "test", "out_dir": str(out_dir), "seed": 0},
        "data": {"train_url": train_url, "eval_url": eval_url, "resolution": 32, "max_turns": 4},
        "model": dict(MICRO_MODEL),
        "train": {"steps": 4, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "log_every": 1,
                  "checkpoint_every": 2},
        "diffusion": {"sample_steps": 3},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return str(path)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "parallel_worker.py")


def torchrun(nproc: int, *args: str, timeout: int = 300) -> None:
    """`torchrun --nproc_per_node=nproc tests/parallel_worker.py ARGS` (the worker installs the CPU shim)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               WORKER, *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=timeout,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])})
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if "Error" in line or "error" in line]
        raise AssertionError(f"worker {' '.join(args)} failed:\n" + "\n".join(errors[-15:]))


def make_plain_run(root) -> str:
    """A training run directory with one plain (state.pt) checkpoint of random EMA and raw weights, made without
    training: the micro model's parameters under their training names. -> the run directory."""
    import torch

    from vincie.config import load_config, to_dict, to_yaml
    from vincie.model.mmdit import MMDiT
    from vincie.model.text_encoder import build_text_encoder
    from vincie.training import checkpoint

    run = os.path.join(str(root), "run")
    cfg = load_config("tiny", ["data.resolution=32", "diffusion.sample_steps=2", f"run.out_dir={run}",
                               *MICRO_OVERRIDES])
    torch.manual_seed(0)
    model, text_encoder = MMDiT(cfg.model), build_text_encoder(cfg.text_encoder, cfg.model.text_dim)
    names = [f"dit.{n}" for n, _ in model.named_parameters()] + \
        [f"text_encoder.{n}" for n, _ in text_encoder.named_parameters()]
    shapes = [p.shape for p in [*model.parameters(), *text_encoder.parameters()]]
    raw, ema = ({n: torch.randn(s) * 0.05 for n, s in zip(names, shapes)} for _ in range(2))
    os.makedirs(run)
    with open(os.path.join(run, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))
    checkpoint.save(run, 7, {"model": raw, "ema": {"updates": 7, "weights": ema}, "optimizer": {},
                             "common": {"step": 7, "config": to_dict(cfg)}}, keep=1)
    return run


def plan_first_row(report: str, cfg, card, gpus: int, gpus_per_node: int = 8, efficiency: float = 0.5):
    """The first layout of a `vincie plan` report -> (its columns, split; the model FLOPs per second per GPU of
    its step time, from plan's own estimate of that layout, plainly or with recomputation as the row fits)."""
    from vincie.model.flops import training_flops
    from vincie.ops.plan import Layout, estimate, parameter_split, sample_workload

    row = report.split(" MFU\n")[1].splitlines()[0].split()
    sample, _ = sample_workload(cfg)
    r = estimate(cfg, Layout(*map(int, row[:5])), card, sample, parameter_split(cfg), gpus_per_node, efficiency)
    step = r.step_s if r.total_gib <= card.memory_gib else r.step_recompute_s
    return row, cfg.train.batch_size * training_flops(cfg.model, sample) / gpus / step


def overfit_losses(trainer, steps: int) -> list[float]:
    """`steps` optimizer steps on the same batch (the loader rewound each time: the same sessions, noise and
    timesteps) -> the loss before each step."""
    from vincie.data.order import SamplerState
    from vincie.training.loss import flow_loss_sums

    cfg, losses = trainer.cfg, []
    for _ in range(steps):
        trainer.loader.seek(SamplerState())
        batch = trainer.make_batch()
        total, _ = flow_loss_sums(trainer.model(batch.inputs), batch, cfg.diffusion.loss_weights,
                                  cfg.diffusion.prediction)
        loss = total / batch.target.shape[0]
        trainer.optimizer.zero_grad()
        loss.backward()
        trainer.optimizer.step()
        losses.append(loss.item())
    return losses
