"""Training: a micro model overfits one batch, resume repeats the uninterrupted run exactly, data parallel over
two processes equals one process, and edit/eval run end to end on a checkpoint made here."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from vincie.config import ConfigError, load_config
from vincie.data.order import SamplerState
from vincie.gpus import CARDS, mfu
from vincie.model.batch import pack_rows
from vincie.model.diffusion import X0_MIN_T, output_to_velocity
from vincie.training import checkpoint
from vincie.training.logs import reduce_logs
from vincie.training.loss import flow_loss_sums
from vincie.training.optim import EMA
from vincie.training.parallel import init_distributed
from vincie.training.train import train
from vincie.training.trainer import Trainer, zero_terms

from conftest import REPO, run_vincie
from helpers import MICRO_OVERRIDES, make_data, overfit_losses, write_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"train": make_data(root / "train", sessions=32),
            "eval": make_data(root / "eval", sessions=4, split="test", turns=(3, 3), image_format="png")}


def metrics(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def test_overfits_one_batch(tmp_path, data):
    cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path / "run", data["train"]),
                      ["train.lr=0.005", "train.warmup_steps=1", "train.steps=1000", "train.batch_size=2",
                       "data.max_turns=1", "data.workers=0"])
    losses = overfit_losses(Trainer(cfg, init_distributed()), 100)
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_ema_warmup_sets_how_much_of_a_short_run_is_averaged():
    """A weight that is 0 for 150 updates and 1 for the last 50: the EMA is the weighted sum of the values, with
    the weight of update i = (1 - d_i) * prod_{j > i} d_j and d_n = min(decay, (1 + n) / (warmup + n)); a smaller
    warmup keeps more of the earlier zeros."""
    def shadow(warmup):
        layer = torch.nn.Linear(1, 1, bias=False)
        ema = EMA([layer], decay=0.999, warmup=warmup)
        for n in range(200):
            layer.weight.data.fill_(1.0 if n >= 150 else 0.0)
            ema.update([layer])
        return float(ema.shadow[0]["weight"])

    def expected(warmup):
        decays = [min(0.999, (1 + n) / (warmup + n)) for n in range(200)]
        return sum((1 - decays[i]) * float(np.prod(decays[i + 1:])) for i in range(150, 200))

    assert shadow(10.0) == pytest.approx(expected(10.0), rel=1e-5)
    assert shadow(5.0) == pytest.approx(expected(5.0), rel=1e-5)
    assert 0.3 < shadow(5.0) < shadow(10.0) < 1.0


def test_x0_prediction_reads_the_clean_latent_as_the_velocity_target(tmp_path, data):
    """x0 prediction: an output equal to the true clean latent of every target token must give exactly the
    velocity targets the batch was built with (a check that target_t and the noisy inputs line up)."""
    cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path / "run", data["train"]),
                      ["diffusion.prediction=x0", "train.batch_size=4"])
    batch = Trainer(cfg, init_distributed()).make_batch()
    x_t, t, velocity = batch.target_inputs, batch.target_t, batch.target
    x0 = x_t - t * velocity  # x_t = (1 - t) x0 + t noise and velocity = noise - x0
    recovered = output_to_velocity(x0, x_t, t, "x0")
    usable = t[:, 0] >= X0_MIN_T
    assert usable.sum() > 0 and len(set(t[:, 0].tolist())) > 3  # several target blocks, each with its own t
    torch.testing.assert_close(recovered[usable], velocity[usable], atol=1e-4, rtol=1e-4)
    output = torch.zeros(batch.inputs.latent_tokens.shape)
    wrong, _ = flow_loss_sums(output, batch, cfg.diffusion.loss_weights, "x0")
    output[batch.target_select] = x0
    right, _ = flow_loss_sums(output, batch, cfg.diffusion.loss_weights, "x0")
    assert right.item() < 1e-3 * wrong.item()
    assert output_to_velocity(x0, x_t, t, "velocity") is x0


def test_x0_loss_space_is_the_clean_latent_error(tmp_path, data):
    """diffusion.loss_space=x0: the loss of an arbitrary output equals the squared error of its x0 estimate
    (x_t - t v), computed here independently from the batch's noisy inputs and timesteps."""
    cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path / "run", data["train"]),
                      ["diffusion.prediction=x0", "train.batch_size=4"])
    batch = Trainer(cfg, init_distributed()).make_batch()
    x_t, t, velocity = batch.target_inputs, batch.target_t, batch.target
    x0 = x_t - t * velocity
    output = torch.randn(batch.inputs.latent_tokens.shape, generator=torch.Generator().manual_seed(0))
    weights = {"nip": 1.0, "csp": 1.0, "nsp": 1.0}
    assert bool((t[:, 0] >= X0_MIN_T).all())  # this seeded batch has no t below the clamp, where x0 error is defined
    reference = ((output[batch.target_select] - x0) ** 2).mean(dim=-1).sum()
    loss, _ = flow_loss_sums(output, batch, weights, "x0", "x0")
    torch.testing.assert_close(loss, reference, rtol=1e-4, atol=1e-6)
    velocity_loss, _ = flow_loss_sums(output, batch, weights, "x0", "velocity")
    assert velocity_loss > 1.5 * loss  # the same error in velocity units is larger by 1/t^2 > 1


def test_changed_region_weight_weights_the_tokens_an_edit_touches(tmp_path, data):
    """diffusion.changed_region_weight=w: a next-image target token gets weight w when any pixel of its patch is in
    the turn's C | N region (checked against a max-pool of the masks), mask targets and other tokens get 1, and
    the loss is the weighted sum of the per-token errors."""
    import torch.nn.functional as F

    from data_index.synthetic.world import generate_session
    from vincie.config import SynthConfig
    from vincie.model.batch import SessionEncoder, collate
    from vincie.model.sequence import BlockType, Role
    from vincie.sessions.loaded import from_session

    cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path / "run", data["train"]),
                      ["diffusion.changed_region_weight=4", "sequence.drop_current_image=0"])
    trainer = Trainer(cfg, init_distributed())
    session = from_session(generate_session(SynthConfig(resolution=32, min_turns=3, max_turns=3), "train", 0, 0).session)
    sample = SessionEncoder(cfg, trainer.vae, trainer.text_encoder, torch.device("cpu")).training_sample(
        session, np.random.default_rng(0), torch.Generator().manual_seed(0))
    patch = trainer.vae.factor * cfg.model.patch_size
    expected = []
    latent_blocks = [b for b in sample.blocks if b.type != BlockType.TEXT]
    for block in latent_blocks:
        if block.role != Role.NOISY:
            continue
        if block.type == BlockType.IMAGE:
            region = session.cur_masks[block.source - 1] | session.next_masks[block.source - 1]
            touched = F.max_pool2d(region.float()[None, None], patch).reshape(-1)
            expected.append(1 + 3 * touched)
        else:
            expected.append(torch.ones(len(sample.latents[0])))
    batch = collate([sample], torch.device("cpu"), cfg.model.text_dim)
    assert (batch.target_weight == 4).any() and (batch.target_weight == 1).any()
    torch.testing.assert_close(batch.target_weight, torch.cat(expected))
    output = torch.randn(batch.inputs.latent_tokens.shape, generator=torch.Generator().manual_seed(1))
    ones = {"nip": 1.0, "csp": 1.0, "nsp": 1.0}
    loss, _ = flow_loss_sums(output, batch, ones, cfg.diffusion.prediction)
    velocity = output_to_velocity(output[batch.target_select], batch.target_inputs, batch.target_t,
                                  cfg.diffusion.prediction)
    reference = (torch.cat(expected) * ((velocity - batch.target) ** 2).mean(dim=-1)).sum()
    torch.testing.assert_close(loss, reference)


def test_turn_curriculum_cuts_sessions_until_its_step(tmp_path, data):
    cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path / "run", data["train"]),
                      ["data.turn_curriculum={0: 1, 3: 4}", "data.max_turns=4", "train.batch_size=4"])
    trainer = Trainer(cfg, init_distributed())
    turns_in = lambda batch: int(batch.inputs.block_turn.max()) + 1  # noqa: E731
    assert turns_in(trainer.make_batch()) == 1
    trainer.step = 3
    assert turns_in(trainer.make_batch()) > 1  # make_data sessions have 2-4 turns


def test_resume_repeats_the_uninterrupted_run(tmp_path, data):
    train_cfg = {"steps": 16, "checkpoint_every": 4}
    full = write_config(tmp_path / "full.yaml", tmp_path / "full", data["train"], train=train_cfg)
    run_vincie("train", "--config", full, "--no-progress", check=True)
    part = write_config(tmp_path / "part.yaml", tmp_path / "part", data["train"], train=train_cfg)
    # kill a run right after its first checkpoint, then run the same command again
    proc = subprocess.Popen([sys.executable, "-m", "vincie", "train", "--config", part, "--no-progress"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "part/checkpoints/latest").exists() and time.time() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = checkpoint.latest(str(tmp_path / "part"))
    assert killed_at is not None and not killed_at.endswith("step-000016")
    result = run_vincie("train", "--config", part, "--no-progress", check=True)
    assert "resuming from" in result.stdout
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    assert [m["step"] for m in b] == list(range(1, 17))
    assert [m["loss"] for m in a] == [m["loss"] for m in b]  # exactly, not approximately
    state_a = torch.load(tmp_path / "full/checkpoints/step-000016/state.pt", weights_only=False)
    state_b = torch.load(tmp_path / "part/checkpoints/step-000016/state.pt", weights_only=False)
    for name, tensor in state_a["model"].items():
        if isinstance(tensor, torch.Tensor):  # megatron-core's _extra_state entries are None
            assert torch.equal(tensor, state_b["model"][name]), name
    assert state_a["common"]["sampler"] == state_b["common"]["sampler"]


def one_and_two_processes_train_alike(tmp_path, data, steps: int, **sections) -> None:
    """`vincie train` (one process) and `vincie launch local --nproc 2` (torch DDP) on one config: the same losses
    and weights after `steps` steps, and no DDP warning (it runs without its unused-parameter search)."""
    configs = {n: write_config(tmp_path / f"{n}.yaml", tmp_path / n, data["train"], train={"steps": steps},
                               **sections) for n in ("one", "two")}
    run_vincie("train", "--config", configs["one"], "--no-progress", check=True)
    result = run_vincie("launch", "local", "--nproc", "2", "--config", configs["two"], "--no-progress", check=True)
    assert "nproc_per_node=2" in result.stdout and "find_unused_parameters" not in result.stderr
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    np.testing.assert_allclose([m["loss"] for m in a], [m["loss"] for m in b], rtol=1e-4)
    wa = torch.load(tmp_path / f"one/checkpoints/step-{steps:06d}/state.pt", weights_only=False)["model"]
    wb = torch.load(tmp_path / f"two/checkpoints/step-{steps:06d}/state.pt", weights_only=False)["model"]
    for name in wa:
        if isinstance(wa[name], torch.Tensor):
            torch.testing.assert_close(wa[name], wb[name], atol=2e-5, rtol=1e-4)


def test_two_data_parallel_processes_equal_one(tmp_path, data):
    one_and_two_processes_train_alike(tmp_path, data, steps=3)


@pytest.mark.parametrize("overrides", [[], MICRO_OVERRIDES,
                                       [*MICRO_OVERRIDES, "model.source=channels", "model.pooled_text=true",
                                        "sequence.mode=full"],
                                       [*MICRO_OVERRIDES, "sequence.drop_text=0"]],
                         ids=["tiny", "micro-masks", "micro-channels-pooled-full", "micro-no-text-dropout"])
def test_only_the_text_table_can_go_without_a_gradient_and_zero_terms_keep_it(overrides):
    """Why the plain runtime adds zero_terms: a batch of two sessions with instructions gives every parameter a
    gradient; a session whose every instruction the context dropout removed (searched for among 500 draws: with
    sequence.drop_text > 0 a 2-turn session loses both with probability drop_text^2) leaves exactly the text
    encoder's table without one, and the zero terms give it one (zero) without changing any other gradient."""
    import dataclasses

    from data_index.synthetic.world import generate_session
    from vincie.model.batch import SessionEncoder, collate
    from vincie.model.components import build_components
    from vincie.model.sequence import BlockType
    from vincie.sessions.loaded import from_session

    init_distributed()
    cfg = load_config("tiny", ["data.resolution=32", *overrides])
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model, vae, text_encoder = build_components(cfg, cpu)
    encoder = SessionEncoder(cfg, vae, text_encoder, cpu)
    synth = dataclasses.replace(cfg.synth, resolution=32, min_turns=2, max_turns=2)
    sessions = [from_session(generate_session(synth, "train", 0, i).session) for i in range(2)]

    def sample(session, seed):
        return encoder.training_sample(session, np.random.default_rng(seed), torch.Generator().manual_seed(seed))

    def gradients(make_samples, zero: bool) -> dict[str, torch.Tensor | None]:
        model.zero_grad(set_to_none=True)
        batch = collate(make_samples(), cpu, cfg.model.text_dim)  # samples anew: their text features hold a graph
        loss, _ = flow_loss_sums(model(batch.inputs), batch, cfg.diffusion.loss_weights, cfg.diffusion.prediction)
        (loss + (zero_terms(model.text_encoder) if zero else 0.0)).backward()
        return {name: None if param.grad is None else param.grad.clone() for name, param in model.named_parameters()}

    def without_gradient(make_samples) -> set[str]:
        plain, zero = gradients(make_samples, False), gradients(make_samples, True)
        assert all(g is not None for g in zero.values())
        for name, grad in plain.items():
            expected = torch.zeros_like(zero[name]) if grad is None else grad
            assert torch.equal(zero[name], expected), name
        return {name for name, grad in plain.items() if grad is None}

    assert all(sample(session, seed=0).text for session in sessions)
    assert without_gradient(lambda: [sample(session, seed=0) for session in sessions]) == set()
    # the context dropout's draws alone (the sample's first draws from its generator), then that sample
    dropped = [seed for seed in range(500) if all(block.type != BlockType.TEXT for block in encoder.fit_blocks(
        sessions[0], np.random.default_rng(seed), text_lengths=[1, 1], tokens_per_element=1))]
    if not dropped:
        assert cfg.sequence.drop_text == 0
    else:
        assert not sample(sessions[0], dropped[0]).text
        assert without_gradient(lambda: [sample(sessions[0], dropped[0])]) == {"text_encoder.embed.weight"}


@pytest.mark.slow
@pytest.mark.parametrize("drop_text", [0.0, 1.0])
def test_ddp_trains_like_one_process_without_searching_for_unused_parameters(tmp_path, data, drop_text):
    """Two plain-runtime processes (torch DDP, find_unused_parameters=False) train like one process, and DDP does
    not warn. sequence.drop_text=1: no step uses the text table, which only the zero terms keep in the backward
    (without them DDP stops at the second step); 0: every step uses it."""
    one_and_two_processes_train_alike(tmp_path, data, steps=2, sequence={"drop_text": drop_text})


def test_packed_rows_train_like_one_session_per_row(tmp_path, data):
    """data.pack: the step's sessions share rows (no attention between them), and the steps' losses and the
    weights after them are those of one session per row (floating-point order aside)."""
    runs = {}
    for pack in ("false", "true"):
        cfg = load_config(write_config(tmp_path / f"{pack}.yaml", tmp_path / pack, data["train"]),
                          [f"data.pack={pack}", "train.batch_size=6", "data.workers=0"])
        trainer = Trainer(cfg, init_distributed())
        rows = trainer.make_batch().inputs.mask.token_block.shape[0]
        trainer.loader.seek(SamplerState())
        logs = [trainer.train_step() for _ in range(3)]
        losses = [log["loss_sum"] / log["count"] for log in logs]
        padding = reduce_logs(logs, trainer.info)["padding_share"]
        runs[pack] = rows, losses, padding, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    (rows_one, losses_one, padding_one, weights_one) = runs["false"]
    (rows_packed, losses_packed, padding_packed, weights_packed) = runs["true"]
    assert rows_one == 6 and rows_packed < rows_one  # sessions of 2-4 turns at 32x32: several fit in 4096 tokens
    assert 0 <= padding_packed < padding_one < 1  # the log's share of token slots spent on padding
    np.testing.assert_allclose(losses_packed, losses_one, rtol=1e-5)
    for name, weight in weights_one.items():
        torch.testing.assert_close(weights_packed[name], weight, atol=1e-6, rtol=1e-5)


def test_pad_multiple_bounds_the_sequence_lengths(tmp_path, data):
    """data.pad_multiple: every micro-batch's length is a multiple of it (compiled flex attention builds one kernel
    per length); with data.pack and the multiple at data.max_tokens every row has that one length."""
    base = ["train.batch_size=6", "data.workers=0", "parallel.micro_batch_size=2"]
    for overrides, check in ((["data.pad_multiple=96"], lambda T: T % 96 == 0),
                             (["data.pack=true", "data.max_tokens=1024", "data.pad_multiple=1024"],
                              lambda T: T == 1024)):
        cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path / "run", data["train"]), [*base, *overrides])
        trainer = Trainer(cfg, init_distributed())
        for _ in range(3):
            batches, _ = trainer.make_batches()
            lengths = [b.inputs.mask.token_block.shape[1] for b in batches]
            assert all(check(T) for T in lengths), (overrides, lengths)
    with pytest.raises(ConfigError, match="data.pad_multiple"):
        load_config("tiny", ["data.pad_multiple=0"])


def test_a_cpu_run_reports_model_tflops_and_mfu_only_against_a_named_card(tmp_path, data, capsys):
    """On the CPU (metrics.gpu auto) a run logs model TFLOP/s and no MFU, and says why at the start; a named card
    gives MFU against its dense peak at train.precision (the test config's fp32: the H100's 67 TFLOP/s)."""
    records = {}
    for gpu in ("auto", "h100"):
        cfg = load_config(write_config(tmp_path / f"{gpu}.yaml", tmp_path / gpu, data["train"], metrics={"gpu": gpu},
                                       train={"steps": 1}), ["data.workers=0"])
        records[gpu] = train(cfg, progress=False), capsys.readouterr().out
    (auto, auto_out), (h100, h100_out) = records["auto"], records["h100"]
    assert auto["model_tflops"] > 0 and "mfu" not in auto
    assert "train: model TFLOP/s without MFU (not on a GPU)" in auto_out
    assert h100["mfu"] == pytest.approx(mfu(h100["model_tflops"] * 1e12, CARDS["h100"], "fp32"))
    assert "train: MFU against the h100's dense fp32 peak, 67 TFLOP/s" in h100_out


def test_pack_rows_balances_rows():
    """By hand, capacity 10: the 30 tokens that fit open 3 rows; longest first into the least-filled row with room:
    9, 7, 5 one each; 4 fits only beside the 5; 3 beside the 7; 2 fits nowhere and opens a row; 12 (longer than a
    row) has its own. Rows come shortest first."""
    lengths = [5, 9, 3, 7, 2, 12, 4]
    assert pack_rows(lengths, capacity=10) == [[4], [0, 6], [1], [3, 2], [5]]
    assert pack_rows([700] * 8, capacity=4096) == [[0, 2, 4, 6], [1, 3, 5, 7]]  # two even rows, not 5 + 3
    assert pack_rows([3, 3, 3], capacity=9) == [[0, 1, 2]] and pack_rows([], capacity=9) == []


def test_pairs_mode_trains_on_one_turn(tmp_path, data):
    cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path / "run", data["train"]), ["data.mode=pairs"])
    trainer = Trainer(cfg, init_distributed())
    batch = trainer.make_batch()
    assert int(batch.inputs.block_turn.max()) == 0  # every block belongs to turn 0


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("trained")
    config = write_config(root / "c.yaml", root / "run", data["train"], data["eval"], train={"steps": 2})
    result = run_vincie("train", "--config", config, check=True)
    # stderr is a pipe: a plain progress line per train.log_every (1) steps with the bar's figures, no redrawn bar
    lines = [line for line in result.stderr.splitlines() if line.startswith("train test: ")]
    assert [line.split(",")[0] for line in lines] == ["train test: 1/2 steps (50%)", "train test: 2/2 steps (100%)"]
    assert all(" | loss " in line and " grad_norm " in line for line in lines)
    assert "\r" not in result.stdout + result.stderr
    return root / "run"


def test_edit_and_eval_end_to_end(tmp_path, trained_run):
    from PIL import Image

    Image.fromarray(np.full((48, 80, 3), 120, np.uint8)).save(tmp_path / "in.png")
    result = run_vincie("edit", "--model", str(trained_run), "--image", str(tmp_path / "in.png"),
                        "--instruction", "add a red circle in the middle", "--instruction", "make the red circle bigger",
                        "--out", str(tmp_path / "edit"), "--steps", "2", "--chain-masks", check=True)
    assert "2 turns" in result.stdout
    for name in ("turn-01.png", "turn-02.png", "turn-01-cur-mask.png", "turn-02-next-mask.png", "strip.png"):
        assert (tmp_path / "edit" / name).exists(), name
    with Image.open(tmp_path / "edit" / "turn-01.png") as im:
        assert im.size == (80, 48)  # restored to the input's size

    result = run_vincie("eval", "--model", str(trained_run), "--bench", "synth", "--out", str(tmp_path / "eval"),
                        "--turns", "3", "--sessions", "4", "--steps", "2", "--given-truth", check=True)
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert len(report["success_given_truth"]) == 3 and "given truth" in result.stdout
    given = report["by_kind_given_truth"]  # the same teacher-forced verdicts counted by kind: 4 sessions x 3 turns
    assert sum(v["turns"] for v in given.values()) == 12 and "given truth, per edit kind" in result.stdout
    passed = sum(v["success"] * v["turns"] for v in given.values())
    assert passed == pytest.approx(4 * sum(report["success_given_truth"]))
    assert report["sessions"] == 4 and report["success"]["ground_truth"] == [1.0, 1.0, 1.0]
    assert report["success"]["copy_input"] == [0.0, 0.0, 0.0]
    kinds = report["by_kind"]["copy_input"]
    assert sum(v["turns"] for v in kinds.values()) == 4 * 3 and all(v["success"] == 0.0 for v in kinds.values())
    assert (tmp_path / "eval" / "grid.png").stat().st_size > 1000
    # the denoising probe's copy-input baseline, recomputed from the pixels (the space-to-depth latent is the
    # image in [-1, 1], rearranged)
    from vincie.data.loader import load_sessions
    sessions = load_sessions(load_config("tiny"), str(report["data"]), max_turns=3, count=4)
    expected = np.mean([torch.mean((s.images[0].double() - s.images[1].double()) ** 2).item() for s in sessions])
    assert report["denoising"]["copy_input"] == pytest.approx(expected, rel=1e-4)
    assert set(report["denoising"]["x0_mse"]) == {"0.9", "0.5", "0.2", "0.05"}
    # the instruction reaches the target: swapping it moves the estimate (zero would mean a cut text path)
    assert set(report["denoising"]["text_swap_change"]) == {"0.9", "0.5", "0.2", "0.05"}
    assert all(v > 0 for v in report["denoising"]["text_swap_change"].values())
    assert "ground_truth" in result.stdout


def test_edit_names_a_missing_image(tmp_path, trained_run):
    result = run_vincie("edit", "--model", str(trained_run), "--image", str(tmp_path / "nope.png"),
                        "--instruction", "x", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "nope.png" in result.stderr.strip().splitlines()[-1]
