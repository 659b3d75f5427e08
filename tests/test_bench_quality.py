"""bench/gpu/quality.py on the CPU: arms train side by side (PIL decoding, SDPA) to their steps, are scored by the
strict judge, and the table and quality.json say what each reached (no meaningful figures: two steps)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quality_probe_trains_its_arms_side_by_side_and_scores_them(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "gpu", "quality.py"), "--out",
                             str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--arms", "h64,h64-b32-c800",
                             "--max-steps", "2", "--sessions", "16", "--test-sessions", "2",
                             "--budget-s", "3000"],  # the runs end by their steps, never by the clock
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert results["device"] == "cpu" and list(results["arms"]) == ["h64", "h64-b32-c800"]
    assert results["arms"]["h64"]["samples"] == 2 * 8 and results["arms"]["h64-b32-c800"]["samples"] == 2 * 32
    for arm in results["arms"].values():
        assert arm["steps"] == 2 and len(arm["success"]) == 5 and len(arm["interval"]) == 5
    assert "decoder: pil" in (tmp_path / "work" / "runs" / "h64" / "config.yaml").read_text()
    assert result.stdout.splitlines()[-1].startswith("h64-b32-c800")
