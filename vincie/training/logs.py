"""A training run's log: step figures reduced over a window and over data-parallel replicas into one metrics.jsonl
record (the figures metrics, the progress display and `vincie report` show), and the JSONL files a resumed run
cuts back to its checkpoint."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from vincie import storage
from vincie.config import Config
from vincie.gpus import Card, mfu
from vincie.model.sequence import TASKS
from vincie.training.parallel import DistInfo


def reduce_logs(logs: list[dict], info: DistInfo) -> dict:
    """Averages a window of step logs over steps and data-parallel replicas (one all-reduce per log line). One
    rank per replica reports (the last pipeline stage's TP rank 0: it holds the loss); the others add zeros."""
    sums = [sum(l["loss_sum"] / l["count"] for l in logs), sum(l["samples"] for l in logs),
            sum(l["tokens"] for l in logs),
            sum(l["step_s"] for l in logs), sum(l["data_s"] for l in logs), 1.0, sum(l["real_tokens"] for l in logs)]
    for t in TASKS:
        sums += [sum(l["task_sums"][t][0] for l in logs), sum(l["task_sums"][t][1] for l in logs)]
    values = torch.tensor(sums, dtype=torch.float64, device=info.device) * float(logs[-1]["reporter"])
    if dist.is_initialized():
        dist.all_reduce(values)  # on the device: NCCL reduces device tensors only
    values = values.cpu()
    seconds = float(values[3]) / float(values[5])
    out = {"step": logs[-1]["step"], "loss": float(values[0]) / len(logs), "lr": logs[-1]["lr"],
           "grad_norm": logs[-1]["grad_norm"], "samples_per_s": float(values[1]) / seconds,
           "tokens_per_s": float(values[2]) / seconds, "step_s": seconds / len(logs),
           "data_wait_share": float(values[4]) / float(values[3]),
           "padding_share": 1 - float(values[6]) / float(values[2]),  # token slots computed for padding
           "nonfinite_steps": sum(not l["finite"] for l in logs)}
    for k, t in enumerate(TASKS):
        count = float(values[8 + 2 * k])
        out[f"loss_{t}"] = float(values[7 + 2 * k]) / count if count else None
    return out


def window_utilisation(window: list[dict], cfg: Config, card: Card | None) -> dict:
    """Model TFLOP/s of this GPU over a log window (its share of the replica's FLOPs: 1 / (TP x PP)) and, with a
    card (training.metrics.mfu_card), MFU as vincie.gpus.mfu defines it."""
    p = cfg.parallel
    tflops = sum(l["flops"] for l in window) / (p.tensor * p.pipeline) / sum(l["step_s"] for l in window) / 1e12
    return {"model_tflops": tflops} | ({"mfu": mfu(tflops * 1e12, card, cfg.train.precision)} if card else {})


def progress_figures(record: dict) -> dict:
    """The progress bar's postfix: the log record's losses, throughput and utilisation."""
    figures = {k: f"{record[k]:.3f}" for k in ("loss", "loss_nip", "loss_csp", "loss_nsp")
               if record.get(k) is not None}
    figures |= {"step_s": f"{record['step_s']:.3f}", "samples/s": f"{record['samples_per_s']:.1f}",
                "tokens/s": f"{record['tokens_per_s']:.0f}", "grad_norm": f"{record['grad_norm']:.3f}"}
    if "model_tflops" in record:
        figures["TFLOP/s"] = f"{record['model_tflops']:.3g}"
    if "mfu" in record:
        figures["MFU"] = f"{record['mfu']:.1%}"
    return figures


def cut_log(path: str, step: int) -> None:
    """Drops the lines of a JSONL log past `step` (the checkpoint a run resumes from; 0 for a fresh start) and a
    torn last line, so the log holds what the resumed run committed and the steps it repeats appear once."""
    if not os.path.exists(path):
        return
    kept = []
    for line in open(path):
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):  # a line cut short by a killed process
            pass
    storage.write_bytes_atomic(path, "".join(kept).encode())


def append_line(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
