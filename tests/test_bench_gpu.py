"""bench/gpu/run.sh --dry-run: the GPU benchmark's code on the CPU with a tiny shape (no GPU numbers)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_benchmark_dry_run(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu", "run.sh"), "--dry-run"], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout.strip().splitlines()
    assert table[-1].startswith("TE layer FP8 vs bf16") and "skipped" in table[-1]
    layer_line = next(line for line in table if line.startswith("3b layer shared_bf16 fwd+bwd"))
    assert "MFU n/a, matmul-peak ratio " in layer_line
    details = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert details["device"] == "cpu (dry run)" and details["matmul_bf16_tflops"] > 0 and details["card"] is None
    for layer in details["layer"].values():  # the CPU is no card: model TFLOP/s and the matmul-peak ratio, no MFU
        assert layer["seconds"] > 0 and layer["mfu"] is None
        assert layer["matmul_peak_ratio"] == pytest.approx(layer["tflops"] / details["matmul_bf16_tflops"])
    assert len(details["attention"]) == 2
    for attention in details["attention"].values():
        assert attention["ratio"] == pytest.approx(attention["flex_s"] / attention["sdpa_s"])
        assert 0 < attention["allowed"] < 1  # block-causal: part of the square
    assert set(details["fp8_gemm"]) == {"linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"}
    assert details["layer"]["shared_recompute"]["tokens"] == details["layer"]["shared_autocast"]["tokens"]
    packing = details["packing"]
    assert packing["packed"]["tokens"] == packing["one_per_row"]["tokens"]  # the same sessions, other rows
    assert 0 <= packing["packed"]["padding_share"] < packing["one_per_row"]["padding_share"]
    assert any(line.startswith("packed / one-per-row layer time") for line in table)
