"""vincie.gpus: the datasheet table, the one MFU definition (the same in training, `vincie plan` and bench/gpu),
and which card a CUDA device name is."""

import importlib.util
import os
from dataclasses import replace

import pytest
import torch

from vincie.config import load_config
from vincie.gpus import CARDS, detect, mfu, resolve
from vincie.ops.plan import plan
from vincie.training.logs import window_utilisation
from vincie.training.metrics import mfu_card

from conftest import REPO
from helpers import plan_first_row


def test_mfu_is_model_flops_over_the_datasheet_dense_peak():
    # half of the H100 SXM datasheet's 1,979 TFLOP/s bf16 "with sparsity": 989.5 dense
    assert mfu(494.75e12, CARDS["h100"], "bf16") == pytest.approx(0.5)
    assert mfu(33.5e12, CARDS["h100"], "fp32") == pytest.approx(0.5)  # 67 TFLOP/s, no tensor cores
    assert mfu(156e12, CARDS["a100"], "bf16") == pytest.approx(0.5)  # 312, stated dense by the datasheet
    assert mfu(1125e12, CARDS["b200"], "bf16") == pytest.approx(0.5)  # 4.5 PFLOP/s sparse per GPU
    assert "fp8" not in CARDS["a100"].dense_tflops  # Ampere has no FP8 tensor cores


@pytest.mark.parametrize("device_name, card", [
    ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA A100 80GB PCIe", "a100"),  # the same peaks
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA B200", "b200"),
    ("NVIDIA H100 PCIe", None), ("NVIDIA H100 NVL", None), ("NVIDIA H200 NVL", None),  # lower peaks
    ("NVIDIA GH200 480GB", None), ("NVIDIA GB200", None), ("NVIDIA L40S", None)])
def test_a_device_name_is_the_card_whose_peaks_it_has(device_name, card):
    found = detect(device_name)
    assert (found.name if found else None) == card


def test_resolve_names_detects_or_overrides_the_card():
    assert resolve("auto", 0.0, "bf16", None) is None  # the CPU: no MFU
    assert resolve("auto", 0.0, "bf16", "NVIDIA L40S") is None  # an unlisted card: no MFU
    assert resolve("auto", 0.0, "bf16", "NVIDIA H200") is CARDS["h200"]
    assert resolve("a100", 0.0, "bf16", "NVIDIA H200") is CARDS["a100"]  # named beats detected
    unlisted = resolve("auto", 362.0, "bf16", "NVIDIA L40S")
    assert unlisted.name == "NVIDIA L40S" and mfu(181e12, unlisted, "bf16") == pytest.approx(0.5)
    capped = resolve("h100", 800.0, "bf16", None)
    assert capped.dense_tflops == {**CARDS["h100"].dense_tflops, "bf16": 800.0}
    assert CARDS["h100"].dense_tflops["bf16"] == 989.5  # the table is left as it was


@pytest.mark.parametrize("device_name, card, line", [
    ("NVIDIA H200", "h200", "MFU against the h200's dense bf16 peak, 989.5 TFLOP/s"),
    ("NVIDIA L40S", None, "model TFLOP/s without MFU: 'NVIDIA L40S' is not a known card (a100, h100, h200, b200); "
                          "metrics.peak_tflops states its dense bf16 peak")])
def test_training_on_a_gpu_detects_its_card_or_says_why_not(monkeypatch, device_name, card, line):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: device_name)
    found, said = mfu_card(load_config("tiny", ["train.precision=bf16"]), torch.device("cuda"))
    assert (found.name if found else None, said) == (card, line)


def gpu_bench():
    """bench/gpu/bench.py as a module (it is a script, run by bench/gpu/run.sh)."""
    spec = importlib.util.spec_from_file_location("gpu_bench", os.path.join(REPO, "bench", "gpu", "bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_plan_and_bench_state_one_mfu():
    """One model FLOP/s figure per GPU, that of `vincie plan`'s first 3b layout on 256 H100s, through plan's table,
    training's log window (under that layout's TP x PP) and bench/gpu's layer figures: one MFU, over the H100's
    datasheet bf16 dense peak; bench's matmul-peak ratio is over its measured matmul rate instead."""
    card, cfg = CARDS["h100"], load_config("3b")  # bf16, as bench/gpu runs its layers
    row, flops_per_s = plan_first_row(plan(cfg, 256, card, 8, 0.5)[0], cfg, card, 256)
    expected = flops_per_s / 989.5e12
    assert row[21] == f"{expected:.0%}"
    tensor, pipeline = int(row[0]), int(row[1])
    layout = replace(cfg, parallel=replace(cfg.parallel, tensor=tensor, pipeline=pipeline))
    window = [{"flops": flops_per_s * tensor * pipeline * s, "step_s": s} for s in (0.5, 1.5)]  # a replica's FLOPs
    training = window_utilisation(window, layout, card)
    assert training == {"model_tflops": pytest.approx(flops_per_s / 1e12), "mfu": pytest.approx(expected)}
    bench = gpu_bench().utilisation(flops_per_s / 1e12, card, matmul_tflops=flops_per_s / 1e12 / 0.8)
    assert bench == {"mfu": pytest.approx(expected), "matmul_peak_ratio": pytest.approx(0.8)}
