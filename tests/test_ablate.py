"""`vincie ablate` (vincie/ops/ablate.py): arms trained and evaluated, kept, resumed; the table, the plot, the
orderings; the arms' configs. Real trainings of the micro model, a few steps each."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import run_vincie
from helpers import write_config
from vincie.config import load_config
from vincie.ops.ablate import ABLATIONS, ordering


def test_an_ablation_trains_evaluates_keeps_its_arms_and_resumes(tmp_path):
    config = write_config(tmp_path / "micro.yaml", tmp_path / "unused", "unused", train={"steps": 2})
    out = tmp_path / "ablate"
    args = ["ablate", "pairs", "diffusion.sample_steps=2", "--out", str(out), "--config", config, "--seeds", "1",
            "--sessions", "16", "--nproc", "1", "--test-sessions", "2", "--turns", "2", "--parallel", "2"]
    first = run_vincie(*args)  # its two runs side by side
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "evals" / "n16-modepairs-s0-step2.log").exists()  # each evaluation's log beside its report
    assert "training n16-s0" in first.stdout and "training n16-modepairs-s0" in first.stdout
    table = first.stdout
    assert "ablation pairs: multi-turn sessions against" in table
    assert "sessions - pairs: " in table and "the paper's order" in table
    assert "each edit kind: the share of its turns whose own verdict passed" in table
    assert "turn-1 x0 error on the test sessions by noise level t" in table
    assert "each turn alone from the true earlier images (teacher forcing" in table
    results = json.loads((out / "pairs" / "results.json").read_text())
    assert list(results["arms"]) == ["sessions", "pairs"] and results["steps"] == [2]
    for arm in results["arms"].values():
        assert len(arm["success"]) == 2 and arm["outcomes"] == 2
        assert all(lo <= s <= hi for s, (lo, hi) in zip(arm["success"], arm["interval"]))
        assert set(arm["x0_error"]) == {"0.9", "0.5", "0.2", "0.05"} and set(arm["by_kind"]) <= {
            "move", "recolour", "resize", "add", "remove"}
        assert len(arm["given_truth"]) == 2  # each turn of the 2 test sessions alone from the truth
        assert sum(row["turns"] for row in arm["by_kind_given_truth"].values()) == 4
        assert sum(row["success"] * row["turns"] for row in arm["by_kind_given_truth"].values()) == \
            pytest.approx(2 * sum(arm["given_truth"]))  # the same verdicts, by kind and by turn
    assert (out / "pairs" / "ablation.png").stat().st_size > 0
    for slug in ("n16-s0", "n16-modepairs-s0"):  # each arm's whole config, which trains it anywhere
        cfg = load_config(str(out / "pairs" / "configs" / f"{slug}.yaml"))
        assert cfg.train.steps == 2 and cfg.run.out_dir == str(out / "runs" / slug)
    assert load_config(str(out / "pairs" / "configs" / "n16-modepairs-s0.yaml")).data.mode == "pairs"

    again = run_vincie(*args)  # finished arms are kept: nothing trains or evaluates again
    assert again.returncode == 0, again.stderr[-3000:]
    assert "ablate pairs: training" not in again.stdout and "ablate pairs: evaluating" not in again.stdout
    assert json.loads((out / "pairs" / "results.json").read_text()) == results

    # the context ablation shares the base recipe's run: only its pairs-trained arm trains
    context = run_vincie(*[a if a != "pairs" else "context" for a in args])
    assert context.returncode == 0, context.stderr[-3000:]
    assert "ablate context: training n16-s0" not in context.stdout
    assert "ablate context: training n16-modepairs-s0" not in context.stdout  # that run is shared too
    assert "ablate context: evaluating current-image seed 0" in context.stdout
    assert "ablate context: evaluating session seed 0" not in context.stdout  # pairs' sessions arm: the same eval


def test_compute_budgets_continue_one_run_and_are_evaluated_in_order(tmp_path, monkeypatch):
    from vincie.ops import ablate

    monkeypatch.setitem(ablate.ABLATIONS, "compute", ablate.Ablation(
        "budgets", (ablate.Arm("short", ablate.Recipe(steps=2)), ablate.Arm("long", ablate.Recipe(steps=4))),
        (("long", "short"),), "longer training edits better"))
    config = write_config(tmp_path / "micro.yaml", tmp_path / "unused", "unused",
                          train={"steps": 9, "checkpoint_every": 1, "log_every": 1})
    out = tmp_path / "ablate"
    runner = ablate.Runner("compute", str(out), config, ["diffusion.sample_steps=2"], seeds=1, steps=None,
                           sessions=16, nproc=1, test_sessions=2, turns=2)
    results = runner.run()
    assert [arm["steps"] for arm in results["arms"].values()] == [2, 4] and results["steps"] == [2, 4]
    short, long = results["arms"]["short"]["train_minutes"], results["arms"]["long"]["train_minutes"]
    assert 0 < short < long
    records = [json.loads(line) for line in (out / "runs" / "n16-s0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "step_s" in r] == [1, 2, 3, 4]  # one run, continued from step 2
    assert "short" in ablate.format_results(results) and "   2" in ablate.format_results(results)

    # a budget shorter than the run has gone is refused (its checkpoint is gone), not silently evaluated late
    import shutil

    shutil.rmtree(out / "evals" / "n16-s0-step2")
    with pytest.raises(ablate.VincieError, match="is past 2 steps .at 4."):
        runner.run()


def test_a_recipe_that_changes_nothing_trains_the_configs_own_run(tmp_path):
    from vincie.ops import ablate

    config = write_config(tmp_path / "micro.yaml", tmp_path / "unused", "unused", sequence={"masks_present": 0.0})
    no_masks = ablate.Recipe(overrides=("sequence.masks_present=0.0",))
    runner = ablate.Runner("segmentation", str(tmp_path), config, [], seeds=1, steps=None, sessions=16, nproc=1)
    assert runner.run_dir(no_masks, 0) == str(tmp_path / "runs" / "n16-s0")
    assert runner.run_dir(ablate.MASKS, 1) == str(tmp_path / "runs" / "n16-masks_present0.8-s1")
    with_masks = ablate.Runner("segmentation", str(tmp_path), config, ["sequence.masks_present=0.8"], seeds=1,
                               steps=None, sessions=16, nproc=1)
    assert with_masks.run_dir(ablate.MASKS, 0) == str(tmp_path / "runs" / "n16-s0")
    assert with_masks.run_dir(no_masks, 0) == str(tmp_path / "runs" / "n16-masks_present0.0-s0")


def test_sigterm_stops_the_running_training_with_a_checkpoint_and_starts_nothing_more(tmp_path):
    """SIGTERM to `vincie ablate` reaches its training (through `vincie launch local`), which stops after its step
    with a checkpoint; the ablation evaluates nothing of the unfinished run, starts no other, and says so."""
    from vincie.training import checkpoint

    config = write_config(tmp_path / "micro.yaml", tmp_path / "unused", "unused")
    out = tmp_path / "ablate"
    ablate = subprocess.Popen([sys.executable, "-m", "vincie", "ablate", "pairs", "--out", str(out), "--config",
                               config, "--seeds", "1", "--sessions", "16", "--nproc", "1", "--test-sessions", "2",
                               "--turns", "2", "--steps", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    metrics = out / "runs" / "n16-s0" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # the training is past its start
        assert ablate.poll() is None and time.monotonic() < deadline, ablate.communicate()
        time.sleep(0.5)
    ablate.send_signal(signal.SIGTERM)
    stdout, stderr = ablate.communicate(timeout=300)
    assert ablate.returncode != 0 and "SIGTERM: stopping the running trainings" in stdout
    assert "training n16-s0 stopped at step" in stderr and "rerunning the command resumes" in stderr, stderr
    assert "training n16-modepairs-s0" not in stdout  # the next run is not begun, even in the log
    stopped = checkpoint.step_of(checkpoint.latest(str(out / "runs" / "n16-s0")))
    assert 0 < stopped < 100000
    assert not (out / "runs" / "n16-modepairs-s0").exists() and not (out / "evals").exists()


def test_an_error_in_one_run_lets_no_other_run_start_a_subcommand(tmp_path, monkeypatch):
    from vincie.errors import VincieError
    from vincie.ops import ablate

    config = write_config(tmp_path / "micro.yaml", tmp_path / "unused", "unused")
    runner = ablate.Runner("pairs", str(tmp_path), config, [], seeds=1, steps=None, sessions=16, nproc=1)

    def train(recipe, seed):
        raise VincieError("training n16-s0 broke")

    monkeypatch.setattr(runner, "train", train)
    with pytest.raises(VincieError, match="training n16-s0 broke"):
        runner.run_chain([(runner.ablation.arms[0], 0)])  # a run's chain, as run() gives it to the pool
    with pytest.raises(VincieError, match="stopped before training n16-modepairs-s0 .rerunning the command resumes"):
        runner.subcommand(["--help"], str(tmp_path / "next.log"), "training n16-modepairs-s0")
    assert not (tmp_path / "next.log").read_text()  # nothing ran
    with pytest.raises(VincieError, match="stopped before pairs seed 0"):  # a queued run's chain begins nothing
        runner.run_chain([(runner.ablation.arms[1], 0)])


def test_the_history_ablation_trains_and_tests_on_a_world_with_undo_turns(tmp_path):
    from vincie.ops import ablate
    from vincie.sessions.shards import iter_sessions

    config = write_config(tmp_path / "micro.yaml", tmp_path / "unused", "unused")
    history = ablate.Runner("history", str(tmp_path), config, [], seeds=1, steps=None, sessions=16, nproc=1,
                            test_sessions=16)
    assert history.run_dir(ablate.BASE, 0) == str(tmp_path / "runs" / "n16-undo-s0")  # not the context ablation's
    assert history.run_dir(ablate.PAIRS, 0) == str(tmp_path / "runs" / "n16-undo-modepairs-s0")
    for data, name in ((history.make_test_data(), "test-undo"), (history.train_data(ablate.BASE, 0),
                                                                 "train-16-undo-s0")):
        assert data == str(tmp_path / "data" / name)
        assert any(t.get("undo") for s in iter_sessions(data) for t in s.meta["transitions"])
    context = ablate.Runner("context", str(tmp_path), config, [], seeds=1, steps=None, sessions=16, nproc=1)
    assert context.run_dir(ablate.BASE, 0) == str(tmp_path / "runs" / "n16-s0")
    assert context.test_data == str(tmp_path / "data" / "test")


def test_training_minutes_count_each_logged_step_once_and_skip_validation_records(tmp_path):
    from vincie.ops.ablate import training_minutes

    records = [{"step": 20, "step_s": 0.5}, {"step": 40, "step_s": 1.0}, {"step": 40, "val_loss": {}, "val_s": 99.0},
               {"step": 60, "step_s": 2.0},  # then stopped, resumed from step 40: steps 41-60 logged again
               {"step": 60, "step_s": 3.0}, {"step": 80, "step_s": 1.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert training_minutes(str(tmp_path), 80) == pytest.approx((20 * 0.5 + 20 * 1.0 + 20 * 3.0 + 20 * 1.5) / 60)
    assert training_minutes(str(tmp_path), 40) == pytest.approx((20 * 0.5 + 20 * 1.0) / 60)


def test_orderings_say_whether_the_paper_holds():
    arms = {"a": {"success": [0.9, 0.5], "interval": [[0.8, 0.95], [0.4, 0.6]]},
            "b": {"success": [0.5, 0.5], "interval": [[0.4, 0.6], [0.4, 0.6]]}}
    assert ordering(arms, "a", "b") == {"better": "a", "worse": "b", "mean_difference": pytest.approx(0.2),
                                        "difference": pytest.approx([0.4, 0.0]), "turns_apart": [1], "holds": True}
    assert not ordering(arms, "b", "a")["holds"]


def test_every_ablation_names_arms_it_has():
    for name, ablation in ABLATIONS.items():
        names = [arm.name for arm in ablation.arms]
        assert len(set(names)) == len(names) >= 2, name
        assert all(better in names and worse in names for better, worse in ablation.paper), name


def test_an_unknown_ablation_is_refused(tmp_path):
    result = run_vincie("ablate", "nonsense", "--out", str(tmp_path))
    assert result.returncode != 0 and "invalid choice: 'nonsense'" in result.stderr
    assert not os.listdir(tmp_path)
