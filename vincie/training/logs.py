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


def validation_line(record: dict) -> str:
    """A validation record as one line: "val step 200: loss nip 0.0120 (turn 1 0.0100, turn 2 0.0140), success
    per turn 0.75 0.50, 3.2s (4.1% of the time since the last)"."""
    parts = []
    for task, turns in record["val_loss"].items():
        total = sum(turns.values()) / len(turns)
        per_turn = ", ".join(f"turn {k} {v:.4f}" for k, v in turns.items())
        parts.append(f"{task} {total:.4f} ({per_turn})")
    success = (", success per turn " + " ".join(f"{x:.2f}" for x in record["val_success"])
               if "val_success" in record else "")
    return (f"val step {record['step']}: loss {'; '.join(parts)}{success}, {record['val_s']:.1f}s "
            f"({record['val_share']:.1%} of the time since the last)")


class TensorBoardLog:
    """The training windows' and the validations' figures, and the validation grids, as TensorBoard events
    (metrics.tensorboard; rank 0). Tags: train/loss, train/loss_<task>, train/<figure>, val/loss_<task>/turn_<k>,
    val/success/turn_<k>, val/share_of_time (validation's share of the wall time), val/samples (the grid)."""

    TRAIN = ("loss", "lr", "grad_norm", "step_s", "samples_per_s", "tokens_per_s", "data_wait_share", "model_tflops",
             "mfu")

    def __init__(self, directory: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(directory)

    def train(self, record: dict) -> None:
        for key in self.TRAIN:
            if record.get(key) is not None:
                self.writer.add_scalar(f"train/{key}", record[key], record["step"])
        for task in TASKS:
            if record.get(f"loss_{task}") is not None:
                self.writer.add_scalar(f"train/loss_{task}", record[f"loss_{task}"], record["step"])

    def validation(self, record: dict, grid_png: bytes | None) -> None:
        step = record["step"]
        for task, turns in record["val_loss"].items():
            for turn, value in turns.items():
                self.writer.add_scalar(f"val/loss_{task}/turn_{turn}", value, step)
        for k, value in enumerate(record.get("val_success", []), start=1):
            self.writer.add_scalar(f"val/success/turn_{k}", value, step)
        self.writer.add_scalar("val/share_of_time", record["val_share"], step)
        if grid_png is not None:
            import io

            import numpy as np
            from PIL import Image

            image = np.asarray(Image.open(io.BytesIO(grid_png)).convert("RGB"))
            self.writer.add_image("val/samples", image, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


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
