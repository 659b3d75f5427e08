"""Validation during training (train.eval_every, vincie/evaluation/validation.py): its records, its determinism, that
it leaves the training unchanged, its TensorBoard events and its report row. Its TP/PP equality with one process is
in tests/test_parallel.py (every reference run there validates); its Prometheus series in tests/test_operations.py."""

from __future__ import annotations

import json
import os

import pytest
import torch

from vincie.config import ConfigError, load_config
from vincie.evaluation.validation import Validator
from vincie.model.sequence import TASKS
from vincie.training import checkpoint
from vincie.training.train import train

from helpers import make_data, write_config

VALIDATION = {"eval_every": 2, "eval_sessions": 3, "eval_success_sessions": 2, "eval_sample_steps": 2,
              "eval_timesteps": [0.3, 0.7]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_data(root / "train", sessions=16), make_data(root / "val", sessions=4, split="val", turns=(3, 3))


def run(tmp_path, data, name: str, validate: bool, **metrics) -> tuple[list[dict], str]:
    train_url, val_url = data
    train_section = {"steps": 4, "log_every": 1, "checkpoint_every": 4, **(VALIDATION if validate else {})}
    path = write_config(tmp_path / f"{name}.yaml", tmp_path / name, train_url, train=train_section,
                        data={"val_url": val_url}, sequence={"masks_present": 0.8}, metrics=metrics)
    train(load_config(path), progress=False, make_validator=Validator)
    out = str(tmp_path / name)
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))], out


def test_validation_leaves_the_training_unchanged_and_repeats_itself(tmp_path, data):
    """The training's losses and final weights are the same with validation as without (it draws from none of the
    training's random streams); validation at fixed timesteps and noise gives the same losses in a second run."""
    plain, plain_dir = run(tmp_path, data, "plain", validate=False)
    first, first_dir = run(tmp_path, data, "first", validate=True)
    second, _ = run(tmp_path, data, "second", validate=True)
    trained = [r for r in first if "val_loss" not in r]
    assert [r["loss"] for r in trained] == [r["loss"] for r in plain]
    weights = [checkpoint.load_weights(checkpoint.latest(d), use_ema=False) for d in (plain_dir, first_dir)]
    assert weights[0].keys() == weights[1].keys()
    tensors = [k for k, v in weights[0].items() if isinstance(v, torch.Tensor)]
    assert tensors and all(torch.equal(weights[0][k], weights[1][k]) for k in tensors)

    validations = [r for r in first if "val_loss" in r]
    assert [r["step"] for r in validations] == [2, 4]
    for record in validations:
        assert set(record["val_loss"]) <= set(TASKS) and "nip" in record["val_loss"]
        assert set(record["val_loss"]["nip"]) == {"1", "2", "3"}  # the held-out sessions have 3 turns
        assert all(v > 0 for turns in record["val_loss"].values() for v in turns.values())
        assert len(record["val_success"]) == 3 and all(0 <= x <= 1 for x in record["val_success"])
        assert record["val_s"] > 0
    assert validations[0]["val_loss"] != validations[1]["val_loss"]  # the model changed between them
    again = [r for r in second if "val_loss" in r]
    assert [r["val_loss"] for r in again] == [r["val_loss"] for r in validations]
    assert [r["val_success"] for r in again] == [r["val_success"] for r in validations]
    assert sorted(os.listdir(os.path.join(first_dir, "validation"))) == ["step-0000002.png", "step-0000004.png"]


def test_tensorboard_events_hold_the_training_and_validation_series_and_grids(tmp_path, data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records, out = run(tmp_path, data, "board", validate=True, tensorboard=True)
    events = EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    trained = [r for r in records if "val_loss" not in r]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in trained])
    validations = [r for r in records if "val_loss" in r]
    for turn in ("1", "2", "3"):
        got = events.Scalars(f"val/loss_nip/turn_{turn}")
        assert [e.step for e in got] == [2, 4]
        assert [e.value for e in got] == pytest.approx([r["val_loss"]["nip"][turn] for r in validations])
    assert [e.value for e in events.Scalars("val/success/turn_1")] == [r["val_success"][0] for r in validations]
    assert "val/samples" in tags["images"]
    images = events.Images("val/samples")
    assert [i.step for i in images] == [2, 4] and images[0].width > 0 and images[0].height > 0


def test_the_report_draws_a_validation_row(tmp_path, data):
    from PIL import Image

    from vincie.ops.report import write_report

    _, out = run(tmp_path, data, "report", validate=True)
    with_validation = Image.open(write_report(out, str(tmp_path / "with.png")))
    _, plain = run(tmp_path, data, "report-plain", validate=False)
    without = Image.open(write_report(plain, str(tmp_path / "without.png")))
    assert with_validation.size[1] > without.size[1]  # a third row of panels


def test_validation_settings_are_checked():
    base = ["data.val_url=/data/val", "train.eval_every=10"]
    for overrides, message in [
        (["train.eval_every=-1"], "train.eval_every"),
        (["train.eval_every=10"], "data.val_url"),
        (["train.eval_every=10", "data.val_url=/data/test", "data.eval_url=/data/test"], "data.val_url"),
        ([*base, "train.eval_timesteps=[0.0, 0.5]"], "train.eval_timesteps"),
        ([*base, "train.eval_sessions=2", "train.eval_success_sessions=3"], "train.eval_success_sessions"),
        ([*base, "parallel.tensor=2"], "train.eval_success_sessions"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config("tiny", overrides)
    load_config("tiny", [*base, "parallel.tensor=2", "train.eval_success_sessions=0"])
