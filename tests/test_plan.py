"""`vincie plan`: a recommendation the config accepts, memory terms against independent counts (the activation
constants against a measured forward), and the edge cases (recompute only, fits nowhere, GPU counts that do not
divide)."""

import json

import pytest

from vincie.cli.bench import activation_memory
from vincie.config import ConfigError, check_world, load_config
from vincie.gpus import CARDS, mfu
from vincie.model.mmdit import build_on_meta, count_parameters
from vincie.ops.plan import (
    ACT_BYTES_PER_H,
    GIB,
    RECOMPUTE_BYTES_PER_H,
    STAGE_BYTES_PER_H,
    Layout,
    candidate_layouts,
    estimate,
    parameter_split,
    plan,
    sample_workload,
)
from vincie.training.parallel import init_distributed

from conftest import error_line, run_main
from helpers import MICRO_OVERRIDES, plan_first_row


def test_3b_on_256_h100_recommends_a_layout_the_config_accepts():
    cfg = load_config("3b")
    report, status = plan(cfg, 256, CARDS["h100"], 8, 0.5)
    assert status == 0
    assert "assumptions:" in report and "989.5 TFLOP/s dense bf16" in report and "79.6 GiB" in report
    recommended = next(line for line in report.splitlines() if line.startswith("recommended: "))
    overrides = recommended.removeprefix("recommended: ").split()
    chosen = load_config("3b", overrides)  # validates
    assert check_world(chosen, 256) * chosen.parallel.tensor * chosen.parallel.pipeline == 256
    summary = report.split("recommended: ")[1].splitlines()
    total, step = float(summary[1].split()[0]), float(summary[1].split("about ")[1].split()[0])
    assert 0 < total <= 79.6
    hours = float(summary[2].split("about ")[1].split()[0])
    assert summary[2].startswith("  train.steps 15000:") and hours == pytest.approx(15000 * step / 3600, rel=0.01)


def test_the_3b_preset_plans_the_papers_data_shape():
    """The preset's sessions as the planner sees them, counted by hand: 256 x 256 in the 9:16 bucket is 192 x 336
    pixels, 12 x 21 = 252 tokens per image (8x VAE, patch 2); 6 turns of 150 text tokens (the encoder's limit),
    each after its turn token, and the release's sequence of 7 images fit in 16384 tokens."""
    cfg = load_config("3b")
    sample, turns = sample_workload(cfg)
    assert turns == 6 and sample.text_tokens == 6 * 151
    assert sample.latent_tokens == 7 * 252 and sample.blocks == 7 + 6


def test_memory_terms_against_the_parameter_count_and_each_other():
    cfg = load_config("3b")
    params = parameter_split(cfg)
    assert sum(params) == count_parameters(build_on_meta(cfg.model))
    sample, turns = sample_workload(cfg)
    assert sample.tokens <= cfg.data.max_tokens and turns >= 1
    one = estimate(cfg, Layout(1, 1, 8, 1, 64), CARDS["h100"], sample, params, 8, 0.5)
    assert one.weights_gib == pytest.approx(sum(params) * 12 / GIB)  # fp32 weights, gradients, EMA
    assert one.optimizer_gib == pytest.approx(sum(params) * 8 / 8 / GIB)  # Adam, sharded over 8 DP ranks
    tp4 = estimate(cfg, Layout(4, 1, 2, 1, 256), CARDS["h100"], sample, params, 8, 0.5)
    assert tp4.activations_gib == pytest.approx(one.activations_gib / 4)
    assert one.activations_recompute_gib < one.activations_gib / 10
    assert one.step_recompute_s > one.step_s
    assert tp4.tensor_s > 0 == one.tensor_s


def test_activation_constants_against_a_measured_forward():
    """`vincie bench memory`'s measurement at the 3b's proportions (hidden 384: heads of 128, SwiGLU width 1024 =
    2.67 x hidden), on the micro model's 32x32 sessions, against the constants the plan uses."""
    init_distributed()
    cfg = load_config("tiny", ["data.resolution=32", *MICRO_OVERRIDES, "model.hidden_size=384", "model.num_heads=3",
                               "model.text_dim=384", "train.precision=bf16"])
    measured = activation_memory(cfg)
    assert measured["per_layer_shared"] == pytest.approx(ACT_BYTES_PER_H, rel=0.05)
    assert measured["per_layer_dual"] == pytest.approx(ACT_BYTES_PER_H, rel=0.05)
    assert measured["per_layer_recompute"] == pytest.approx(RECOMPUTE_BYTES_PER_H, rel=1e-6)  # the fp32 input
    assert measured["per_stage_recompute"] == pytest.approx(STAGE_BYTES_PER_H, rel=0.05)
    assert 0 < measured["per_stage"] <= STAGE_BYTES_PER_H


def test_compute_and_mfu_take_the_cards_peak_at_train_precision(capsys):
    """The peak behind compute time and the MFU column is the card's dense peak at train.precision (vincie.gpus):
    in fp32 the H100's 67 TFLOP/s, not its bf16 989.5; --peak-tflops replaces it."""
    rows = {}
    for name, args, overrides, card in (
            ("bf16", [], [], CARDS["h100"]), ("fp32", [], ["train.precision=fp32"], CARDS["h100"]),
            ("override", ["--peak-tflops", "500"], [], CARDS["h100"].with_peak("bf16", 500))):
        report = run_main(capsys, "plan", "--preset", "3b", "--gpus", "256", *args, *overrides, check=True).stdout
        cfg = load_config("3b", overrides)
        precision = cfg.train.precision
        assert f"({card.dense_tflops[precision]:g} TFLOP/s dense {precision}," in report
        rows[name], flops_per_s = plan_first_row(report, cfg, card, 256)
        assert rows[name][21] == f"{mfu(flops_per_s, card, precision):.0%}"
    compute = {name: float(row[14]) for name, row in rows.items()}  # the same on every layout
    assert compute["fp32"] == pytest.approx(compute["bf16"] * 989.5 / 67, rel=0.01)
    assert compute["override"] == pytest.approx(compute["bf16"] * 989.5 / 500, rel=0.01)


def test_bench_memory_command(capsys):
    result = run_main(capsys, "bench", "memory", "--hidden", "128", "--json", check=True)
    report = json.loads(result.stdout)
    assert report["plan"]["per_layer_recompute"] == RECOMPUTE_BYTES_PER_H and report["mlp_width"] == 384
    assert report["measured"]["per_layer_recompute"] == pytest.approx(4.0)
    assert report["measured"]["per_layer_shared"] > 20 * report["measured"]["per_layer_recompute"]
    result = run_main(capsys, "bench", "memory", "--hidden", "100")
    assert result.returncode == 2 and "--hidden (100) must be a positive multiple of --head-dim (128)" in \
        error_line(result)


def test_where_only_recomputation_fits_it_is_recommended(capsys):
    result = run_main(capsys, "plan", "--preset", "7b", "--gpus", "8", "--gpu", "h100", check=True)
    recommended = next(line for line in result.stdout.splitlines() if line.startswith("recommended: "))
    overrides = recommended.removeprefix("recommended: ").split()
    assert "train.recompute=full" in overrides and "(with activation recomputation)" in result.stdout
    chosen = load_config("7b", overrides)  # validates
    assert chosen.train.recompute == "full"
    first_row = result.stdout.split(" MFU\n")[1].splitlines()[0].split()
    assert [f"parallel.tensor={first_row[0]}", f"parallel.pipeline={first_row[1]}"] == overrides[:2]  # ranked first


def test_a_model_that_fits_nowhere_says_so_and_exits_non_zero(capsys):
    result = run_main(capsys, "plan", "--preset", "7b", "--gpus", "1", "--gpu", "a100")
    assert result.returncode == 1
    assert "the model fits nowhere" in result.stdout and "80 GiB of one a100" in result.stdout


def test_gpu_counts_that_do_not_divide(capsys):
    result = run_main(capsys, "plan", "--preset", "3b", "--gpus", "12")
    assert result.returncode == 2 and "--gpus (12) must be a multiple of --gpus-per-node (8)" in error_line(result)
    result = run_main(capsys, "plan", "--preset", "3b", "--gpus", "7")  # DP 7 cannot split the preset's batch
    assert result.returncode == 2
    assert "no TP x PP x DP layout of 7 GPUs" in error_line(result) and "not divisible by DP 7" in error_line(result)
    result = run_main(capsys, "plan", "--preset", "3b", "--gpus", "0")
    assert result.returncode == 2 and "--gpus must be >= 1" in error_line(result)


def test_layouts_follow_the_config_rules():
    cfg = load_config("3b")
    layouts, _ = candidate_layouts(cfg, 256, 8)
    assert layouts and all(20 % l.tensor == 0 and 32 % l.pipeline == 0 for l in layouts)
    assert all(l.tensor * l.pipeline * l.data == 256
               and l.micro_batch * l.micro_batches * l.data == cfg.train.batch_size
               for l in layouts)
    with pytest.raises(ConfigError, match="--efficiency"):
        plan(cfg, 256, CARDS["h100"], 8, 1.5)


def test_packed_rows_make_micro_batches_of_several_sessions():
    cfg = load_config("tiny", ["data.pack=true", "data.max_tokens=8192", "train.batch_size=64"])
    sample, _ = sample_workload(cfg)
    assert 8192 // sample.tokens == 3  # 6 turns with masks at 32x32: 2496 tokens
    layouts, _ = candidate_layouts(cfg, 8, 8, per_row=3)
    dp8 = next(l for l in layouts if l.data == 8)  # 8 sessions per rank: rows of 3, 3 and 2
    assert (dp8.micro_batch, dp8.micro_batches) == (3, 3)
    report, status = plan(cfg, 8, CARDS["h100"], 8, 0.5)
    assert status == 0 and "packed (data.pack): 3 per row of 8192 tokens" in report
    assert "parallel.micro_batch_size=1" in report  # one row, not 3 sessions


def test_padding_to_a_multiple_counts_in_the_activation_memory():
    plain, padded = load_config("tiny"), load_config("tiny", ["data.pad_multiple=4096"])
    sample, _ = sample_workload(plain)
    assert sample.tokens == 2496  # padded to 4096 by the trainer
    layout = Layout(1, 1, 1, 1, 8)
    a, b = (estimate(c, layout, CARDS["h100"], sample, parameter_split(c), 8, 0.5) for c in (plain, padded))
    assert b.activations_gib == pytest.approx(a.activations_gib * 4096 / 2496)
    assert b.compute_s == a.compute_s  # model FLOPs: padding is not useful work
