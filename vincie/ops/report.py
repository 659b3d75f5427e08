"""`vincie report RUN_DIR`: one PNG of a run's metrics.jsonl, the figures of the Grafana dashboard (k8s/monitoring)
for a run without Grafana: loss per task, step time, samples/s and tokens/s, model TFLOP/s and MFU, gradient norm,
learning rate, data wait and skipped sessions by reason; with validation records (train.eval_every) a third row:
the validation loss per task, per turn, and the success per turn."""

from __future__ import annotations

import io
import json
import os

from vincie import storage
from vincie.data.order import SKIP_REASONS
from vincie.errors import VincieError
from vincie.model.sequence import TASKS


def read_log(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise VincieError(f"{path} does not exist (expected the metrics.jsonl of a training run directory)")
    records = []
    for number, line in enumerate(open(path), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise VincieError(f"{path} line {number} is not JSON (expected one metrics record per line)") from None
    if not records:
        raise VincieError(f"{path} holds no records yet (the run logs every train.log_every steps)")
    return records


def write_report(run_dir: str, out: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logged = read_log(os.path.join(run_dir, "metrics.jsonl"))
    records = [r for r in logged if "val_loss" not in r]
    validations = [r for r in logged if "val_loss" in r]
    if not records:
        raise VincieError(f"{run_dir}/metrics.jsonl holds no training records yet (the run logs every "
                          "train.log_every steps)")
    steps = [r["step"] for r in records]

    def series(key):
        return [r.get(key) if r.get(key) is not None else float("nan") for r in records]

    fig, axes = plt.subplots(3 if validations else 2, 4, figsize=(18, 11 if validations else 7.5))
    fig.suptitle(f"vincie run {os.path.basename(os.path.abspath(run_dir))}: {len(records)} log records, "
                 f"steps {steps[0]}..{steps[-1]}" + (f", {len(validations)} validations" if validations else ""))
    ax = axes[0, 0]
    ax.plot(steps, series("loss"), label="all (weighted)", color="black")
    for task in TASKS:
        ax.plot(steps, series(f"loss_{task}"), label=task)
    ax.set(title="loss per task", yscale="log")
    ax.legend(fontsize=8)
    axes[0, 1].plot(steps, series("step_s"))
    axes[0, 1].set(title="step time (s)")
    ax = axes[0, 2]
    ax.plot(steps, series("samples_per_s"), color="tab:blue")
    ax.set_title("samples/s (blue), tokens/s (orange)")
    ax.twinx().plot(steps, series("tokens_per_s"), color="tab:orange")
    ax = axes[0, 3]
    if any("mfu" in r for r in records):
        ax.plot(steps, series("model_tflops"), color="tab:blue")
        ax.set_title("model TFLOP/s per GPU (blue), MFU (orange)")
        ax.twinx().plot(steps, series("mfu"), color="tab:orange")
    elif any("model_tflops" in r for r in records):
        ax.plot(steps, series("model_tflops"))
        ax.set_title("model TFLOP/s per GPU\n(no MFU: no known GPU card; see metrics.gpu)", fontsize=10)
    else:
        ax.set_title("model TFLOP/s, MFU")
        ax.text(0.5, 0.5, "not logged\n(no FLOPs count in this run)", ha="center", va="center",
                transform=ax.transAxes)
    axes[1, 0].plot(steps, series("grad_norm"))
    axes[1, 0].set(title="gradient norm (before clipping)", yscale="log")
    axes[1, 1].plot(steps, series("lr"))
    axes[1, 1].set(title="learning rate")
    axes[1, 2].plot(steps, series("data_wait_share"))
    axes[1, 2].set(title="share of step time waiting for data", ylim=(0, 1))
    ax = axes[1, 3]
    for reason in SKIP_REASONS:
        counts = [r.get("data_skipped", {}).get(reason, 0) for r in records]
        if any(counts):
            ax.plot(steps, counts, label=reason)
    ax.plot(steps, [r.get("data_sessions", 0) for r in records], label="sessions read", color="grey", ls="--")
    ax.set(title="sessions read, skipped by reason (cumulative)", yscale="symlog")
    ax.legend(fontsize=8)
    if validations:
        plot_validation(axes[2], validations)
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    out = out or os.path.join(run_dir, "report.png")
    storage.write_bytes_atomic(out, buffer.getvalue())
    return out


def plot_validation(axes, records: list[dict]) -> None:
    """The validation row: loss per task (mean over turns), loss per turn (the first task's), success per turn."""
    steps = [r["step"] for r in records]
    tasks = [t for t in TASKS if any(t in r["val_loss"] for r in records)]
    ax = axes[0]
    for task in tasks:
        ax.plot(steps, [sum(r["val_loss"][task].values()) / len(r["val_loss"][task]) if task in r["val_loss"]
                        else float("nan") for r in records], marker=".", label=task)
    ax.set(title="validation loss per task (fixed t, noise)", yscale="log")
    ax.legend(fontsize=8)
    ax = axes[1]
    turns = sorted({int(k) for r in records for k in r["val_loss"].get(tasks[0], {})}) if tasks else []
    for turn in turns:
        ax.plot(steps, [r["val_loss"][tasks[0]].get(str(turn), float("nan")) for r in records], marker=".",
                label=f"turn {turn}")
    ax.set(title=f"validation loss per turn ({tasks[0] if tasks else '-'})", yscale="log")
    ax.legend(fontsize=8)
    ax = axes[2]
    judged = [r for r in records if "val_success" in r]
    for k in range(max((len(r["val_success"]) for r in judged), default=0)):
        ax.plot([r["step"] for r in judged], [r["val_success"][k] if len(r["val_success"]) > k else float("nan")
                                             for r in judged], marker=".", label=f"turn {k + 1}")
    ax.set(title="validation success per turn (synthetic judge)", ylim=(-0.05, 1.05))
    if judged:
        ax.legend(fontsize=8)
    axes[3].axis("off")
