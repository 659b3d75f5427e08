"""Prometheus metrics of one training process (one rank), in a registry the trainer owns, served over HTTP.

Names as DESIGN.md "Operations" fixes them (base units, `vincie_` prefix); labels only `task` and `reason` here,
`rank` added when served (RankLabelled) and `job` by the scraper (the PodMonitor's jobLabel). Updating costs no
device synchronisation: the trainer passes Python numbers it already holds (the step's loss and gradient norm
are read back for the log anyway).

    vincie_train_steps_total                 optimizer steps this process ran (a restarted process starts at 0)
    vincie_train_step_seconds                histogram of step wall time (data wait included)
    vincie_train_loss{task}                  mean loss of the last log window, global batch; task nip|csp|nsp|all
    vincie_train_samples_total               sessions trained on (one rank per model replica counts)
    vincie_train_tokens_total                sequence tokens trained on (the same ranks)
    vincie_train_model_tflops                analytic model TFLOP/s of this GPU over the last log window
    vincie_train_mfu_ratio                   model_tflops over the GPU card's datasheet dense peak at train.precision
                                             (vincie.gpus.mfu; bf16 for FP8 runs too); absent without a known card
    vincie_train_grad_norm, vincie_train_lr  of the last step
    vincie_nonfinite_steps_total             steps skipped for a non-finite gradient norm
    vincie_data_wait_seconds                 histogram of the time a step waited for its sessions
    vincie_data_skipped_total{reason}        sessions skipped as bad or unreadable
    vincie_checkpoint_seconds                histogram of checkpoint save time
    vincie_checkpoint_last_step              step of the newest complete checkpoint
    vincie_checkpoint_last_timestamp_seconds Unix time it was completed (alerts compute its age)
    vincie_val_loss{task,turn}               validation loss at the last validation (train.eval_every), per task
                                             and edit turn, at fixed timesteps and noise
    vincie_val_success{turn}                 validation success at turn k (synthetic judge, cumulative; rank 0)
    vincie_val_seconds                       wall time of the last validation
"""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.registry import Collector

from vincie.config import Config
from vincie.data.order import SKIP_REASONS
from vincie.errors import VincieError
from vincie.gpus import CARDS, Card, resolve
from vincie.model.sequence import TASKS

LOSS_TASKS = (*TASKS, "all")  # "all": the task-weighted total the optimizer sees


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        # exposed as vincie_data_skipped_total{reason}
        self.data_skipped = Counter("vincie_data_skipped", "Sessions skipped as bad or unreadable, by reason",
                                    ["reason"], registry=r)
        for reason in SKIP_REASONS:  # every series exists from the start, so alerts see a 0 rather than nothing
            self.data_skipped.labels(reason)
        self.data_wait = Histogram("vincie_data_wait_seconds", "Time a training step waited for its sessions",
                                   registry=r,
                                   buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, float("inf")))
        self.steps = Counter("vincie_train_steps", "Optimizer steps run by this process", registry=r)
        self.step_seconds = Histogram("vincie_train_step_seconds", "Wall time of one training step", registry=r,
                                      buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                                               float("inf")))
        self.loss = Gauge("vincie_train_loss", "Mean loss over the last log window (global batch), by task",
                          ["task"], registry=r)
        self.samples = Counter("vincie_train_samples", "Sessions trained on", registry=r)
        self.tokens = Counter("vincie_train_tokens", "Sequence tokens trained on", registry=r)
        self.model_tflops = Gauge("vincie_train_model_tflops",
                                  "Analytic model TFLOP/s of this GPU over the last log window", registry=r)
        self.mfu = Gauge("vincie_train_mfu_ratio",
                         "Model FLOPs utilisation: model TFLOP/s over the GPU card's datasheet dense peak at "
                         "train.precision (bf16 for FP8 runs too; vincie.gpus)", registry=r)
        self.grad_norm = Gauge("vincie_train_grad_norm", "Gradient norm of the last step (before clipping)",
                               registry=r)
        self.lr = Gauge("vincie_train_lr", "Learning rate of the last step", registry=r)
        self.nonfinite = Counter("vincie_nonfinite_steps", "Steps skipped for a non-finite gradient norm",
                                 registry=r)
        self.checkpoint_seconds = Histogram("vincie_checkpoint_seconds", "Wall time of one checkpoint save",
                                            registry=r, buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600,
                                                                 float("inf")))
        self.checkpoint_step = Gauge("vincie_checkpoint_last_step", "Step of the newest complete checkpoint",
                                     registry=r)
        self.checkpoint_time = Gauge("vincie_checkpoint_last_timestamp_seconds",
                                     "Unix time the newest complete checkpoint was completed", registry=r)
        self.val_loss = Gauge("vincie_val_loss", "Validation loss per task and edit turn, at fixed timesteps and "
                              "noise (train.eval_every)", ["task", "turn"], registry=r)
        self.val_success = Gauge("vincie_val_success", "Validation success at turn k: share of the judged "
                                 "sessions whose turns 1..k all succeeded", ["turn"], registry=r)
        self.val_seconds = Gauge("vincie_val_seconds", "Wall time of the last validation", registry=r)

    def step(self, log: dict) -> None:
        """One training step's figures (Trainer.train_step's dict: Python numbers, no tensors)."""
        self.steps.inc()
        self.step_seconds.observe(log["step_s"])
        if log["reporter"]:  # one rank per model replica, so sums over ranks count each sample once
            self.samples.inc(log["samples"])
            self.tokens.inc(log["tokens"])
        self.grad_norm.set(log["grad_norm"])
        self.lr.set(log["lr"])
        if not log["finite"]:
            self.nonfinite.inc()

    def window(self, record: dict) -> None:
        """A log window's reduced figures (the metrics.jsonl record)."""
        self.loss.labels("all").set(record["loss"])
        for task in TASKS:
            if record[f"loss_{task}"] is not None:
                self.loss.labels(task).set(record[f"loss_{task}"])
        if record.get("model_tflops") is not None:
            self.model_tflops.set(record["model_tflops"])
        if record.get("mfu") is not None:
            self.mfu.set(record["mfu"])

    def validation(self, record: dict) -> None:
        """A validation record (vincie.evaluation.validation)."""
        for task, turns in record["val_loss"].items():
            for turn, value in turns.items():
                self.val_loss.labels(task, turn).set(value)
        for k, value in enumerate(record.get("val_success", []), start=1):
            self.val_success.labels(str(k)).set(value)
        self.val_seconds.set(record["val_s"])

    def checkpoint(self, step: int, seconds: float | None, when: float) -> None:
        if seconds is not None:
            self.checkpoint_seconds.observe(seconds)
        self.checkpoint_step.set(step)
        self.checkpoint_time.set(when)


def mfu_card(cfg: Config, device: torch.device) -> tuple[Card | None, str]:
    """The card this process states MFU against (vincie.gpus.resolve: metrics.gpu, or with "auto" the CUDA
    device's name; metrics.peak_tflops), and a line that names its peak or says why there is no MFU."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    precision = cfg.train.precision
    card = resolve(cfg.metrics.gpu, cfg.metrics.peak_tflops, precision, name)
    if card is None and name is None:
        return None, "model TFLOP/s without MFU (not on a GPU)"
    if card is None:
        return None, (f"model TFLOP/s without MFU: {name!r} is not a known card ({', '.join(CARDS)}); "
                      f"metrics.peak_tflops states its dense {precision} peak")
    return card, f"MFU against the {card.name}'s dense {precision} peak, {card.dense_tflops[precision]:g} TFLOP/s"


class RankLabelled(Collector):
    """`registry`'s metrics with a constant `rank` label on every sample (prometheus_client has no constant
    labels; the in-process registry stays without it, so readers look values up by their own labels)."""

    def __init__(self, registry: CollectorRegistry, rank: int):
        self.registry, self.rank = registry, str(rank)

    def collect(self):
        for family in self.registry.collect():
            family.samples = [s._replace(labels={**s.labels, "rank": self.rank}) for s in family.samples]
            yield family


def serve(metrics: Metrics, port: int, rank: int):
    """HTTP endpoint http://0.0.0.0:PORT/metrics in a daemon thread -> the server (shutdown() stops it)."""
    from prometheus_client import start_http_server

    try:
        server, _ = start_http_server(port, registry=RankLabelled(metrics.registry, rank))
    except OSError as exc:
        raise VincieError(f"metrics: cannot serve on port {port} ({exc.strerror}); set metrics.port to a free base "
                          "port (each process uses base + local rank) or 0 to turn the endpoint off") from None
    return server
