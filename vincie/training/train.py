"""`vincie train`: the training loop around the Trainer (vincie.training.trainer), on one process or each rank of a
TP/PP/DP layout under torchrun.

Outputs under run.out_dir: config.yaml (resolved), metrics.jsonl (one line per train.log_every steps, and one per
validation with train.eval_every), checkpoints/, validation/step-N.png (validation's sample grids), with
metrics.tensorboard tensorboard/ (the same series and grids as TensorBoard events), and with data.record_sessions
sessions/rank-NNN.jsonl (the session keys each rank consumed, per step). The same figures go to the progress
display (vincie.progress: a bar on a terminal, a plain line per log window elsewhere) and, with metrics.port, to a
Prometheus endpoint per process (vincie.training.metrics).

Validation (train.eval_every) is a hook the caller passes (`make_validator`: the Trainer -> an object whose
run(step) returns the record; `vincie train` passes vincie.evaluation.validation.Validator, which edits and
judges, a layer above training).

Stopping. SIGTERM (what Kubernetes sends before it kills a pod: preemption, eviction, node drain, a deleted job;
`kill PID`; `vincie launch local` passes it to its workers) asks the run to stop: every rank finishes the step
it is in, the ranks agree on the step to stop after (an all-reduce per step), write a checkpoint there, and
return. A restarted run resumes from it with no step and no session lost or repeated. The process that was sent
SIGTERM exits 0; a process that stops because another rank was sent it exits EXIT_PEER_STOPPED (75), so that a
job controller that sees only its pod restarts it rather than count the run as finished. SIGINT (Ctrl-C) stops at
once: the steps since the last checkpoint are lost.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from vincie import storage
from vincie.config import Config, to_dict, to_yaml
from vincie.errors import VincieError
from vincie.gpus import Card
from vincie.progress import Progress
from vincie.training.logs import (
    TensorBoardLog,
    append_line,
    cut_log,
    progress_figures,
    reduce_logs,
    validation_line,
    window_utilisation,
)
from vincie.training.metrics import mfu_card, serve
from vincie.training.parallel import DistInfo, init_distributed
from vincie.training.trainer import Trainer

EXIT_PEER_STOPPED = 75  # EX_TEMPFAIL: stopped, with a checkpoint, because another rank was asked to stop


class StopRequest:
    """SIGTERM received by this process, and the ranks' agreement to stop after a step (module docstring)."""

    def __init__(self):
        self.received = False
        self.previous = None

    def __enter__(self) -> StopRequest:
        self.previous = signal.signal(signal.SIGTERM, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self.previous)

    def handle(self, signum, frame) -> None:
        self.received = True

    def agreed(self, info: DistInfo) -> bool:
        """True on every rank when any rank received SIGTERM (a collective: every rank calls it after each step)."""
        if info.world_size == 1:
            return self.received
        flag = torch.tensor([float(self.received)], device=info.device)  # NCCL reduces device tensors only
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def check_run_dir(cfg: Config) -> None:
    """A run directory holds one model: resuming it with another model shape is refused."""
    path = os.path.join(cfg.run.out_dir, "config.yaml")
    if os.path.exists(path):
        import yaml

        previous = yaml.safe_load(open(path)) or {}
        if previous.get("model") != to_dict(cfg)["model"]:
            raise VincieError(f"{cfg.run.out_dir} holds a run with another model config; choose a new "
                              "run.out_dir to start a new run")


def train(cfg: Config, progress: bool = True, make_validator: Callable | None = None) -> dict:
    """-> the last log record; with `stopped_at` (the step) and `exit_code` when a stop was requested.
    `make_validator(trainer)`: validation every train.eval_every steps (none without it)."""
    with StopRequest() as stop:
        info = init_distributed(cfg.parallel)
        if info.is_main:
            check_run_dir(cfg)
            os.makedirs(cfg.run.out_dir, exist_ok=True)
            storage.write_bytes_atomic(os.path.join(cfg.run.out_dir, "config.yaml"), to_yaml(cfg).encode())
        trainer = Trainer(cfg, info)
        resume_from = trainer.resume()
        if resume_from and info.is_main:
            print(f"train: resuming from {resume_from} (step {trainer.step})", flush=True)
        card, utilisation = mfu_card(cfg, info.device)
        if info.is_main:
            print(f"train: {utilisation}", flush=True)
        server = None
        if cfg.metrics.port:
            port = cfg.metrics.port + info.local_rank
            server = serve(trainer.metrics, port, info.rank)
            print(f"train: rank {info.rank}: metrics at http://{socket.gethostname()}:{port}/metrics", flush=True)
        validator = make_validator(trainer) if make_validator is not None and cfg.train.eval_every else None
        board = TensorBoardLog(os.path.join(cfg.run.out_dir, "tensorboard")) \
            if cfg.metrics.tensorboard and info.is_main else None
        try:
            last = loop(trainer, cfg, info, card, stop, progress, validator, board)
        finally:
            if board is not None:
                board.close()
            trainer.loader.close()
            if server is not None:
                server.shutdown()
                server.server_close()
    if info.is_main:
        totals = trainer.data_totals
        skipped = ", ".join(f"{r} {n}" for r, n in totals["skipped"].items() if n) or "none"
        print(f"train: data: {totals['sessions']} sessions read, {sum(totals['skipped'].values())} skipped "
              f"({skipped}), epoch {trainer.loader.state.epoch} at {trainer.loader.state.cursor} of "
              f"{len(trainer.loader.order)}", flush=True)
    if "stopped_at" in last:
        last["exit_code"] = 0 if stop.received else EXIT_PEER_STOPPED
        cause = "SIGTERM" if stop.received else "SIGTERM to another rank"
        if info.is_main or not stop.received:
            print(f"train: rank {info.rank}: stopped by {cause} after step {trainer.step} of {cfg.train.steps}, "
                  f"checkpoint written; the same command resumes it", flush=True)
    return last


def loop(trainer: Trainer, cfg: Config, info: DistInfo, card: Card | None, stop: StopRequest, progress: bool,
         validator=None, board: TensorBoardLog | None = None) -> dict:
    metrics_path = os.path.join(cfg.run.out_dir, "metrics.jsonl")
    sessions_path = os.path.join(cfg.run.out_dir, "sessions", f"rank-{info.rank:03d}.jsonl")
    if info.is_main:
        cut_log(metrics_path, trainer.step)
    if cfg.data.record_sessions:
        os.makedirs(os.path.dirname(sessions_path), exist_ok=True)
        cut_log(sessions_path, trainer.step)
    display = Progress(cfg.train.steps, f"train {cfg.run.name}", "step", initial=trainer.step,
                       enabled=progress and info.is_main, interval_s=None)
    window, last = [], {}
    since = time.perf_counter()  # the end of the last validation (or the start)
    with display:
        while trainer.step < cfg.train.steps:
            log = trainer.train_step()
            window.append(log)
            trainer.metrics.step(log)
            if cfg.data.record_sessions:
                append_line(sessions_path, {"step": log["step"], "keys": log["keys"]})
            display.update()
            stopping = stop.agreed(info)
            end = trainer.step == cfg.train.steps
            if trainer.step % cfg.train.log_every == 0 or end or stopping:
                last = reduce_logs(window, info) | window_utilisation(window, cfg, card) | {
                    "data_sessions": trainer.data_totals["sessions"],
                    "data_skipped": dict(trainer.data_totals["skipped"])}
                window = []
                trainer.metrics.window(last)
                if info.is_main:
                    append_line(metrics_path, last)
                    display.log(progress_figures(last))
                    if board is not None:
                        board.train(last)
            if validator is not None and not stopping and (trainer.step % cfg.train.eval_every == 0 or end):
                record = validator.run(trainer.step)
                # the validation's share of the wall time since the previous one: what it costs the training
                record["val_share"] = record["val_s"] / (time.perf_counter() - since)
                since = time.perf_counter()
                trainer.metrics.validation(record)
                if info.is_main:
                    append_line(metrics_path, record)
                    display.write(validation_line(record))
                    if board is not None:
                        board.validation(record, validator.grid)
            if trainer.step % cfg.train.checkpoint_every == 0 or end or stopping:
                trainer.save()
            if stopping and not end:
                return last | {"stopped_at": trainer.step}
    return last
