"""Megatron-style parallelism on CPU: every split computes what one process computes.

Two processes over gloo (torchrun), megatron-core made CPU-capable by the test-only shim
(tests/megatron_cpu_shim.py), each run compared with the single-process run from the same weights and data:
TP=2 (with and without sequence parallel; with activation recomputation; with packed rows) and PP=2 (1F1B,
interleaved, with recomputation, with packed rows) give the same loss and gradients as one process with one
session per row;
DP=2 with the distributed optimizer trains like one process; checkpoints saved under one layout continue
identically under another; `vincie launch local ... parallel.tensor=2` trains and resumes.
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from vincie.config import ConfigError, check_world, load_config
from vincie.training import checkpoint

from conftest import REPO, run_vincie
from helpers import make_data, torchrun, write_config

TESTS = os.path.join(REPO, "tests")
SHIM_ENV = {"PYTHONPATH": os.pathsep.join([os.path.join(TESTS, "shim_site"), REPO,
                                           os.environ.get("PYTHONPATH", "")])}
RTOL = 1e-5


def metrics(out_dir) -> list[dict]:
    """The training records of a run's metrics.jsonl (the reference runs also validate every step)."""
    return [r for r in map(json.loads, open(os.path.join(out_dir, "metrics.jsonl"))) if "val_loss" not in r]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data") / "train", sessions=16)


def reference(root, data, layers: int, model: tuple[str, ...] = ()) -> tuple[str, list[str], dict]:
    """A run directory whose step-0 checkpoint holds random weights, and its single-process loss and gradients."""
    config = write_config(root / "c.yaml", root / "run", data, data={"val_url": data})
    # validation's losses (forward only, sessions over data-parallel ranks) are compared too
    overrides = [f"model.num_layers={layers}", "parallel.micro_batch_size=1", "train.eval_every=1",
                 "train.eval_sessions=3", "train.eval_success_sessions=0", *model]
    torchrun(1, config, "-", "init", *overrides)
    torchrun(1, config, str(root / "one.pt"), "grads", *overrides)
    return config, overrides, torch.load(root / "one.pt")


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory, data):
    return reference(tmp_path_factory.mktemp("two_layers"), data, layers=2)


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory, data):
    return reference(tmp_path_factory.mktemp("four_layers"), data, layers=4)


# the options that make vincie's model the released VINCIE DiT, trained as the release trains (docs/release.md)
RELEASE_OPTIONS = ("model.head_dim=24", "model.ffn_multiple=256", "model.qkv_bias=false", "model.mlp_bias=false",
                   "model.rope_axes=thirds", "model.conditioning=timestep", "model.final_modulation=shared",
                   "model.turn_token=true", "model.input_layout=release", "model.rope_time=after_text",
                   "sequence.mode=release")


@pytest.fixture(scope="module")
def release_options(tmp_path_factory, data):
    return reference(tmp_path_factory.mktemp("release_options"), data, layers=2, model=RELEASE_OPTIONS)


@pytest.fixture(scope="module")
def lora_adapters(tmp_path_factory, data):
    return reference(tmp_path_factory.mktemp("lora"), data, layers=2, model=("train.lora.rank=4",))


def assert_same_loss_and_gradients(one: dict, split: dict) -> None:
    assert abs(split["loss"] - one["loss"]) <= RTOL * abs(one["loss"]), (one["loss"], split["loss"])
    assert one["val_loss"] and split["val_loss"].keys() == one["val_loss"].keys()
    for task, turns in one["val_loss"].items():
        assert turns.keys() == split["val_loss"][task].keys(), task
        for turn, value in turns.items():
            assert abs(split["val_loss"][task][turn] - value) <= RTOL * value, (task, turn)
    assert split["grads"].keys() == one["grads"].keys()
    for name, grad in one["grads"].items():
        other = split["grads"][name]
        assert other.shape == grad.shape, name
        assert grad.norm() > 0, f"{name} has no gradient: the check would be empty"
        assert float((other - grad).norm() / grad.norm()) <= RTOL, name


@pytest.mark.parametrize("layout", [["parallel.tensor=2"],
                                    ["parallel.tensor=2", "parallel.sequence_parallel=true"],
                                    ["parallel.tensor=2", "parallel.sequence_parallel=true", "train.recompute=full"],
                                    ["parallel.tensor=2", "parallel.sequence_parallel=true", "data.pack=true"]],
                         ids=["tp2", "tp2-sp", "tp2-sp-recompute", "tp2-sp-packed"])
def test_tensor_parallel_gives_the_single_process_loss_and_gradients(tmp_path, two_layers, layout):
    config, overrides, one = two_layers
    torchrun(2, config, str(tmp_path / "two.pt"), "grads", *overrides, *layout)
    assert_same_loss_and_gradients(one, torch.load(tmp_path / "two.pt"))


@pytest.mark.parametrize("layout", [pytest.param(["parallel.tensor=2", "parallel.sequence_parallel=true"], id="tp2-sp"),
                                    pytest.param(["parallel.pipeline=2"], id="pp2", marks=pytest.mark.slow)])
def test_the_release_options_split_like_the_rest(tmp_path, release_options, layout):
    config, overrides, one = release_options
    torchrun(2, config, str(tmp_path / "two.pt"), "grads", *overrides, *layout)
    assert_same_loss_and_gradients(one, torch.load(tmp_path / "two.pt"))


@pytest.mark.parametrize("layout", [["parallel.tensor=2"], ["parallel.tensor=2", "parallel.sequence_parallel=true"]],
                         ids=["tp2", "tp2-sp"])
def test_lora_adapters_split_like_the_rest(tmp_path, lora_adapters, layout):
    """train.lora: the adapters (and only they) get gradients, and TP=2 gives one process's loss and gradients: B
    split with a column-parallel projection's rows, A with a row-parallel one's columns, the whole ones summed or
    not over the TP group as their partial or whole gradients need (vincie/training/lora.py)."""
    config, overrides, one = lora_adapters
    assert one["grads"] and all(name.endswith((".lora_a", ".lora_b")) for name in one["grads"])
    assert len(one["grads"]) == 2 * 4 * (2 + 1)  # A and B of 4 projections, 2 streams in layer 0, 1 in layer 1
    torchrun(2, config, str(tmp_path / "two.pt"), "grads", *overrides, *layout)
    assert_same_loss_and_gradients(one, torch.load(tmp_path / "two.pt"))


@pytest.mark.parametrize("layout", [pytest.param(["parallel.tensor=2"], id="tp2"),
                                    pytest.param(["parallel.pipeline=2"], id="pp2", marks=pytest.mark.slow)])
def test_init_from_a_model_directory_in_a_parallel_layout(tmp_path, two_layers, layout):
    """train.init_from: a model directory's whole weights, cut to this rank's TP slices or pipeline stage: the same
    loss and gradients as the run resumed from the checkpoint the directory was exported from."""
    config, overrides, one = two_layers
    model_dir = tmp_path / "model"
    exported = run_vincie("export", "--checkpoint", os.path.join(os.path.dirname(config), "run"), "--out",
                          str(model_dir), "--weights", "raw", env=SHIM_ENV)
    assert exported.returncode == 0, exported.stderr
    fresh = [f"run.out_dir={tmp_path / 'fresh'}", f"train.init_from={model_dir}"]
    torchrun(2, config, str(tmp_path / "two.pt"), "grads", *overrides, *fresh, *layout)
    assert_same_loss_and_gradients(one, torch.load(tmp_path / "two.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.pipeline=2"],
                                    ["parallel.pipeline=2", "parallel.virtual_pipeline=2"],
                                    ["parallel.pipeline=2", "train.recompute=full"],
                                    ["parallel.pipeline=2", "data.pack=true"]],
                         ids=["pp2-1f1b", "pp2-interleaved", "pp2-recompute", "pp2-packed"])
def test_pipeline_parallel_gives_the_single_process_loss_and_gradients(tmp_path, four_layers, layout):
    config, overrides, one = four_layers  # 4 micro-batches of one session
    torchrun(2, config, str(tmp_path / "two.pt"), "grads", *overrides, *layout)
    assert_same_loss_and_gradients(one, torch.load(tmp_path / "two.pt"))


@pytest.mark.slow
def test_data_parallel_with_distributed_optimizer_trains_like_one_process(tmp_path, two_layers):
    """Two steps from random weights (step 0 of the reference run): one process against two data-parallel
    processes with megatron-core DDP and the distributed optimizer (ZeRO-1), the same global batch of 4 sessions
    as micro-batches of one (4 accumulated in one process, 2 per rank in two). Losses and every parameter after
    the two steps agree."""
    config, overrides, _ = two_layers
    reference_run = os.path.join(os.path.dirname(config), "run")
    train = ["train.steps=2", "train.checkpoint_every=2", *overrides]
    for name, nproc, layout in (("one", 1, []), ("two", 2, ["parallel.distributed_optimizer=true"])):
        shutil.copytree(reference_run, tmp_path / name)
        torchrun(nproc, config, "-", "train", *train, f"run.out_dir={tmp_path / name}", *layout)
    np.testing.assert_allclose([m["loss"] for m in metrics(tmp_path / "one")],
                               [m["loss"] for m in metrics(tmp_path / "two")], rtol=RTOL)
    wa = checkpoint.load_weights(checkpoint.latest(str(tmp_path / "one")), use_ema=False)
    wb = checkpoint.load_weights(checkpoint.latest(str(tmp_path / "two")), use_ema=False)
    assert checkpoint.latest(str(tmp_path / "two")).endswith("step-000002")
    assert wa.keys() == wb.keys() and len(wa) > 40
    for name, tensor in wa.items():
        assert float((wb[name] - tensor).norm()) <= RTOL * float(tensor.norm()), name


LAYOUTS = {"tp1": (1, []), "tp2": (2, ["parallel.tensor=2"]), "pp2": (2, ["parallel.pipeline=2"])}  # processes, keys


FIVE_STEPS = ["train.steps=5", "train.checkpoint_every=2", "train.keep_checkpoints=5"]


def train_in(layout: str, out_dir, two_layers) -> None:
    """Trains (or resumes) the run in `out_dir` to step 5 in `layout` (megatron runtime), checkpoints every 2 steps,
    all kept."""
    config, overrides, _ = two_layers
    processes, keys = LAYOUTS[layout]
    torchrun(processes, config, "-", "train", *FIVE_STEPS, *overrides, f"run.out_dir={out_dir}", *keys)


@pytest.fixture(scope="module")
def trained_in(tmp_path_factory, two_layers):
    """-> run(layout): the reference run's random weights (its step 0) trained 5 steps in `layout`, checkpoints at
    steps 2 and 4; made once per layout and module."""
    made = {}

    def run(layout: str):
        if layout not in made:
            made[layout] = tmp_path_factory.mktemp(f"trained-{layout}") / "run"
            shutil.copytree(os.path.join(os.path.dirname(two_layers[0]), "run"), made[layout])
            train_in(layout, made[layout], two_layers)
        return made[layout]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("saved, loaded", [("tp1", "tp2"), ("tp2", "tp1"), ("tp1", "pp2"), ("pp2", "tp1"),
                                           ("tp2", "pp2")],
                         ids=["tp1-tp2", "tp2-tp1", "pp1-pp2", "pp2-pp1", "tp2pp1-tp1pp2"])
def test_checkpoint_saved_in_one_layout_continues_in_another(tmp_path, two_layers, trained_in, saved, loaded):
    """From random weights (step 0 of the reference run), train 5 steps with a checkpoint at step 2; resume a
    copy of the run from step 2 in the other layout: steps 3-5 give the losses of the run continued in the saved
    layout (weights, EMA, Adam moments and data position carried over). Random weights, not the adaLN-Zero init:
    from zero-initialised layers, Adam's first updates are lr x sign(gradient) on gradients that are zero up to
    rounding, so any two summation orders (two layouts) part at the first step, checkpoint or not. Otherwise the
    layouts differ only in fp32 summation order (TP splits the GEMMs' reductions and sums the parts, PP sums the
    micro-batches' gradients per stage): relative differences of ~1e-7 per step, well inside RTOL (1e-5) after
    three steps, while a weight, moment or data position not carried over moves the loss by far more."""
    original = trained_in(saved)
    shutil.copytree(original, tmp_path / "b")
    for name in ("step-000004", "step-000005"):
        shutil.rmtree(tmp_path / "b" / "checkpoints" / name)
    (tmp_path / "b" / "checkpoints" / "latest").write_text("step-000002")
    train_in(loaded, tmp_path / "b", two_layers)
    a, b = metrics(original), metrics(tmp_path / "b")
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([m["loss"] for m in b[2:]], [m["loss"] for m in a[2:]], rtol=RTOL)


@pytest.mark.slow
def test_the_plain_runtime_trains_like_the_megatron_runtime(tmp_path, two_layers, trained_in):
    """`make demo`'s runtime (torch DDP over two processes, torch AdamW, state.pt checkpoints; no shim, so
    megatron_runtime() is false) against megatron-core's (its DDP, optimizer and schedule; one process under the
    shim) from the same random weights (the reference run's step 0, copied into a plain checkpoint) on the same data,
    two micro-batches of one session per rank: the same losses for 5 steps and the same weights after them. They
    differ in fp32 summation order only (per-rank sums averaged by DDP against one process's accumulation; the two
    optimizers' clipping and Adam arithmetic): measured, losses within 1e-7 and weights within 1e-6 relative;
    checked against 1e-5 (RTOL), which weight decay on the biases alone exceeds."""
    from vincie.training.parallel import init_distributed
    from vincie.training.trainer import Trainer

    config, overrides, _ = two_layers
    megatron = trained_in("tp1")
    step0 = checkpoint.latest(os.path.join(os.path.dirname(config), "run"))
    assert step0.endswith("step-000000") and not os.path.exists(os.path.join(step0, checkpoint.STATE))
    plain_dir = tmp_path / "plain"
    trainer = Trainer(load_config(config, [*overrides, f"run.out_dir={plain_dir}"]), init_distributed())
    assert not trainer.megatron
    raw, ema = (checkpoint.load_weights(step0, use_ema=use_ema) for use_ema in (False, True))
    assert raw.keys() == dict(trainer.model.named_parameters()).keys()
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            param.copy_(raw[name])
    trainer.ema.shadow = [ema]
    trainer.save()
    run_vincie("launch", "local", "--nproc", "2", "--config", config, "--no-progress", *FIVE_STEPS, *overrides,
               f"run.out_dir={plain_dir}", check=True)
    assert [m["step"] for m in metrics(plain_dir)] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([m["loss"] for m in metrics(plain_dir)], [m["loss"] for m in metrics(megatron)],
                               rtol=RTOL)
    plain_weights = checkpoint.load(checkpoint.latest(str(plain_dir)))["model"]
    megatron_weights = checkpoint.load_weights(checkpoint.latest(str(megatron)), use_ema=False)
    assert checkpoint.latest(str(plain_dir)).endswith("step-000005") and len(megatron_weights) > 40
    for name, tensor in megatron_weights.items():
        assert float((plain_weights[name] - tensor).norm()) <= RTOL * float(tensor.norm()), name


@pytest.mark.slow
def test_launch_local_with_tensor_parallel_trains_and_resumes(tmp_path, data):
    config = write_config(tmp_path / "c.yaml", tmp_path / "run", data, train={"steps": 2, "checkpoint_every": 2})
    launch = ("launch", "local", "--nproc", "2", "--config", config, "--no-progress", "parallel.tensor=2")
    first = run_vincie(*launch, check=True, env=SHIM_ENV)
    assert "nproc_per_node=2" in first.stdout
    second = run_vincie(*launch, "train.steps=4", check=True, env=SHIM_ENV)
    assert "resuming from" in second.stdout and "(step 2)" in second.stdout
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1, 2, 3, 4]
    assert checkpoint.latest(str(tmp_path / "run")).endswith("step-000004")
    weights = checkpoint.load_weights(checkpoint.latest(str(tmp_path / "run")), use_ema=True)
    assert weights["dit.layers.0.latent.linear_qkv.weight"].shape == (3 * 64, 64)  # saved whole, from 2 slices


def test_parallel_sizes_are_checked_with_one_line_errors():
    tiny = load_config("tiny")  # 4 heads, 6 layers
    cases = [(["parallel.tensor=3"], "parallel.tensor' must divide model.num_heads (4)"),
             (["parallel.pipeline=4"], "must divide model.num_layers (6)"),
             (["parallel.virtual_pipeline=2"], "needs parallel.pipeline > 1"),
             (["parallel.sequence_parallel=true"], "needs parallel.tensor > 1"),
             (["parallel.context=2"], "context parallel is not supported"),
             (["model.pooled_text=true", "parallel.pipeline=2"], "'model.pooled_text' is not supported with"),
             (["data.pack=true", "parallel.pipeline=2", "parallel.micro_batch_size=2"],
              "must be 0 or 1 with data.pack and parallel.pipeline > 1")]
    for overrides, message in cases:
        with pytest.raises(ConfigError) as info:
            load_config("tiny", overrides)
        assert message in str(info.value) and "\n" not in str(info.value), (overrides, str(info.value))
    assert check_world(tiny, 4) == 4
    with pytest.raises(ConfigError, match="must divide the world size"):
        check_world(load_config("tiny", ["parallel.pipeline=2"]), 3)
    with pytest.raises(ConfigError, match="data-parallel ranks"):
        check_world(load_config("tiny", ["train.batch_size=6"]), 4)
    with pytest.raises(ConfigError, match="micro_batch_size"):
        check_world(load_config("tiny", ["parallel.micro_batch_size=3"]), 2)


def test_the_cpu_shim_is_never_imported_by_vincie():
    for root, _, files in os.walk(os.path.join(REPO, "vincie")):
        for name in files:
            if name.endswith(".py"):
                assert "megatron_cpu_shim" not in open(os.path.join(root, name)).read().replace(
                    "tests/megatron_cpu_shim.py", ""), name


def test_parallel_needs_megatron_runtime_on_a_cpu_machine(tmp_path, data):
    """Without CUDA (and without the tests' shim), a parallel layout is refused with one line."""
    config = write_config(tmp_path / "c.yaml", tmp_path / "run", data)
    result = run_vincie("train", "--config", config, "--no-progress", "parallel.distributed_optimizer=true")
    assert result.returncode == 2
    assert "need megatron-core's runtime" in result.stderr.strip().splitlines()[-1]
