"""`vincie export`: a tensor- or pipeline-parallel training checkpoint -> model.safetensors + config.json that plain
PyTorch runs with the training forward's predictions, in a process where megatron-core cannot be imported and nothing
is unpickled.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vincie.training import checkpoint

from conftest import REPO, error_line, run_main, run_vincie
from helpers import make_data, make_plain_run, torchrun, write_config

LAYOUTS = {"tp2": "parallel.tensor=2", "pp2": "parallel.pipeline=2"}


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """-> run(layout): a run trained one step in a two-process layout (megatron runtime under the CPU shim) from
    random weights, its sharded checkpoint, and the training forward's velocity prediction on a fixed batch
    (reference.safetensors); made once per layout and module."""
    made = {}

    def run(layout: str):
        if layout not in made:
            root = tmp_path_factory.mktemp(layout)
            data = make_data(root / "train", sessions=8)
            config = write_config(root / "c.yaml", root / "run", data)
            torchrun(2, config, str(root / "reference.safetensors"), "reference", LAYOUTS[layout])
            made[layout] = root
        return made[layout]
    return run


@pytest.fixture
def tp2_run(two_process_runs):
    return two_process_runs("tp2")


def export(*args: str) -> subprocess.CompletedProcess:
    return run_vincie("export", *args, check=True)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_export_of_a_parallel_checkpoint_predicts_like_the_training_forward_without_megatron(tmp_path,
                                                                                            two_process_runs, layout):
    run = two_process_runs(layout)
    step = checkpoint.latest(str(run / "run"))
    assert not os.path.exists(os.path.join(step, checkpoint.STATE))  # a sharded (dist_checkpointing) checkpoint
    result = export("--checkpoint", step, "--out", str(tmp_path / "model"), "--weights", "raw")
    assert "raw weights" in result.stdout
    assert sorted(os.listdir(tmp_path / "model")) == ["README.md", "config.json", "model.safetensors"]
    check = subprocess.run([sys.executable, os.path.join(REPO, "tests", "pure_torch_forward.py"),
                            str(tmp_path / "model"), str(run / "reference.safetensors"), str(tmp_path / "v.st")],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    report = json.loads(check.stdout.strip().splitlines()[-1])
    assert report["megatron_error"] and report["megatron_error"].startswith("ModuleNotFoundError")
    assert report["megatron_modules"] == [] and report["unpickled"] == []
    expected = load_file(run / "reference.safetensors")["velocity"]
    got = load_file(tmp_path / "v.st")["velocity"]
    assert got.shape == expected.shape and expected.abs().mean() > 0.05  # a real prediction, not adaLN-Zero's zero
    assert float((got - expected).abs().max()) <= 1e-5


@pytest.mark.slow
def test_export_chooses_ema_or_raw_weights_and_bf16(tmp_path, tp2_run, capsys):
    step = checkpoint.latest(str(tp2_run / "run"))
    run_main(capsys, "export", "--checkpoint", str(tp2_run / "run"), "--out", str(tmp_path / "ema"), check=True)
    run_main(capsys, "export", "--checkpoint", step, "--out", str(tmp_path / "bf16"), "--weights", "raw", "--dtype",
             "bf16", check=True)
    ema, raw = checkpoint.load_weights(step, use_ema=True), checkpoint.load_weights(step, use_ema=False)
    exported = load_file(tmp_path / "ema" / "model.safetensors")
    assert exported.keys() == ema.keys() and len(exported) > 40
    for name, tensor in ema.items():
        assert torch.equal(exported[name], tensor), name
    assert any(not torch.equal(ema[n], raw[n]) for n in ema)  # one step after random weights: EMA lags
    halves = load_file(tmp_path / "bf16" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, raw[n].to(torch.bfloat16)) for n, t in halves.items())
    assert halves["dit.layers.0.latent.linear_qkv.weight"].shape == (3 * 64, 64)  # whole, from two TP slices
    config = json.loads((tmp_path / "ema" / "config.json").read_text())
    assert config["source"]["parallel"] == {"tensor": 2, "pipeline": 1}
    assert config["source"]["weights"] == "ema" and config["source"]["step"] == 1
    assert config["model"]["hidden_size"] == 64 and config["data"] == {"resolution": 32}
    assert config["diffusion"]["sample_steps"] == 3  # the run's sampler default (tests/helpers.write_config)
    assert config["vae"]["kind"] == "space_to_depth" and config["text_encoder"]["kind"] == "hashed_words"
    assert "text_encoder.embed.weight" in exported  # the built-in text encoder's table travels with the model
    card = (tmp_path / "ema" / "README.md").read_text()
    assert "vincie edit --model" in card and f"{config['parameters']:,}" in card


def test_export_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys):
    missing = run_main(capsys, "export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert missing.returncode == 2 and "no such directory" in error_line(missing)
    (tmp_path / "empty").mkdir()
    empty = run_main(capsys, "export", "--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert empty.returncode == 2 and "not a training run directory" in error_line(empty)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    taken = run_main(capsys, "export", "--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "taken"))
    assert taken.returncode == 2 and "--overwrite" in error_line(taken)
    assert os.listdir(tmp_path / "taken") == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["empty", "taken"]  # no output, no temporary directory


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    return make_plain_run(tmp_path_factory.mktemp("plain"))


def test_edit_on_an_export_equals_edit_on_its_run_at_any_input_size(tmp_path, plain_run, capsys):
    from PIL import Image

    run_main(capsys, "export", "--checkpoint", str(plain_run), "--out", str(tmp_path / "model"), check=True)
    # stored 48 wide x 80 high, EXIF orientation 6 (rotate): shown, and so edited, as 80 x 48
    rng = np.random.default_rng(0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rng.integers(0, 256, (80, 48, 3), dtype=np.uint8)).save(tmp_path / "in.jpg", exif=exif)
    args = ["--image", str(tmp_path / "in.jpg"), "--instruction", "add a red circle", "--instruction",
            "make it bigger", "--seed", "3", "--chain-masks"]
    result = run_vincie("edit", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "a"), *args, check=True)
    assert "2 turns" in result.stdout  # as a user runs it: its own process
    run_main(capsys, "edit", "--model", str(plain_run), "--out", str(tmp_path / "b"), *args, check=True)
    names = ["strip.png"] + [f"turn-{k:02d}{part}.png" for k in (1, 2) for part in ("", "-cur-mask", "-next-mask")]
    assert sorted(os.listdir(tmp_path / "a")) == sorted(names)
    for name in names:
        with Image.open(tmp_path / "a" / name) as a, Image.open(tmp_path / "b" / name) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b)), name  # the export holds the run's EMA weights
            if name != "strip.png":
                assert a.size == (80, 48), name  # restored to the input's size, as shown
    raw = run_main(capsys, "edit", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "c"), *args,
                   "--raw-weights")
    assert raw.returncode == 2 and "holds one set of weights" in error_line(raw)
    neither = run_main(capsys, "edit", "--model", str(tmp_path), "--out", str(tmp_path / "d"), *args)
    assert neither.returncode == 2 and "neither an exported model" in error_line(neither)
