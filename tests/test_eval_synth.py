"""`vincie eval --bench synth`: saved edits scored without a model (--predictions), a model's edits written in that
layout (--save-predictions), the JSON line for scripts (--json), and one-line errors for bad predictions."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import error_line, run_main
from helpers import make_data, make_plain_run
from vincie.evaluation.evaluate import format_table, held_out_sessions

TURNS = 3


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("synth") / "eval", sessions=6, split="test", turns=(TURNS, TURNS),
                     image_format="png")


def write_predictions(directory, sessions, pick) -> str:
    """pick(session, turn) -> the image saved as DIR/<key>/turn-NN.png (turn 1-based)."""
    for session in sessions:
        os.makedirs(directory / session.key, exist_ok=True)
        for turn in range(1, session.turns + 1):
            Image.fromarray(pick(session, turn)).save(directory / session.key / f"turn-{turn:02d}.png")
    return str(directory)


def scored(capsys, held_out, predictions, out, *extra) -> dict:
    result = run_main(capsys, "eval", "--bench", "synth", "--predictions", predictions, "--data", held_out,
                      "--turns", str(TURNS), "--out", str(out), "--json", *extra, check=True)
    return json.loads(result.stdout)


def test_predictions_are_scored_without_a_model(tmp_path, held_out, capsys):
    sessions = held_out_sessions(held_out, TURNS, 32)
    truth = write_predictions(tmp_path / "truth", sessions, lambda s, k: s.images[k])
    assert scored(capsys, held_out, truth, tmp_path / "a")["success"] == [1.0] * TURNS
    unchanged = write_predictions(tmp_path / "copy", sessions, lambda s, k: s.images[0])
    assert scored(capsys, held_out, unchanged, tmp_path / "b")["success"] == [0.0] * TURNS

    # the first session fails at turn 2 (its input kept), the second at turn 3: cumulative 1, 5/6, 4/6
    def pick(session, turn):
        wrong = {sessions[0].key: 2, sessions[1].key: 3}.get(session.key)
        return session.images[turn - 1] if turn == wrong else session.images[turn]

    mixed = write_predictions(tmp_path / "mixed", sessions, pick)
    result = scored(capsys, held_out, mixed, tmp_path / "c")
    assert result["success"] == pytest.approx([1.0, 5 / 6, 4 / 6]) and result["sessions"] == 6
    assert result["ground_truth"] == [1.0] * TURNS and result["copy_input"] == [0.0] * TURNS
    # 95 % Wilson intervals over the 6 sessions: 6/6 -> [0.61, 1], 5/6 -> [0.44, 0.97], 4/6 -> [0.30, 0.90]
    assert result["interval"] == [[0.61, 1.0], [0.436, 0.97], [0.3, 0.903]]
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["predictions"] == mixed and "denoising" not in report
    first = report["session_results"][0]["turns"]
    assert [t["success"] for t in first] == [True, False, True] and first[1]["reason"]  # each turn on its own
    table = run_main(capsys, "eval", "--bench", "synth", "--predictions", mixed, "--data", held_out, "--turns",
                     str(TURNS), "--out", str(tmp_path / "d"), check=True).stdout
    model_row = next(line for line in table.splitlines() if line.startswith("model "))
    assert [float(v) for v in model_row.split()[1:]] == pytest.approx(result["success"], abs=0.005)
    assert format_table(report).splitlines()[1] == model_row
    assert "model, 95 % Wilson score interval over sessions (6): turn 1 0.61-1.00, turn 2 0.44-0.97" in table
    failures = next(line for line in table.splitlines() if line.startswith("failed turns by first failed check: "))
    assert sum(int(part.split()[-1]) for part in failures.split(": ", 1)[1].split(", ")) == 2  # the two wrong turns


def test_the_ceiling_without_a_kind_is_what_an_editor_failing_only_that_kind_scores(tmp_path, held_out, capsys):
    """An editor that passes every turn but those of one kind (there it returns its input) scores, turn by turn,
    exactly the report's ceiling for that kind, which is computed from the sessions' metadata alone."""
    sessions = held_out_sessions(held_out, TURNS, 32)
    kinds = [t["kind"] for s in sessions for t in s.meta["transitions"][:TURNS]]
    kind = max(set(kinds), key=kinds.count)

    def pick(session, turn):
        return session.images[turn - (session.meta["transitions"][turn - 1]["kind"] == kind)]

    predictions = write_predictions(tmp_path / "one-kind-fails", sessions, pick)
    result = scored(capsys, held_out, predictions, tmp_path / "a")
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["ceiling_without"][kind] == pytest.approx(result["success"])
    assert result["success"][-1] < 1.0 and report["by_kind"]["model"][kind]["success"] == 0.0
    assert all(row["success"] == 1.0 for other, row in report["by_kind"]["model"].items() if other != kind)
    assert (f"with no {kind} passing (the weakest kind), success per turn is at most: "
            + " ".join(f"{v:.2f}" for v in result["success"])) in format_table(report)


def test_bad_predictions_get_one_line_errors(tmp_path, held_out, capsys):
    sessions = held_out_sessions(held_out, TURNS, 32)
    args = ["eval", "--bench", "synth", "--data", held_out, "--turns", str(TURNS), "--out", str(tmp_path / "out")]
    missing = run_main(capsys, *args, "--predictions", str(tmp_path / "nowhere"))
    assert missing.returncode != 0 and error_line(missing).endswith(f"--predictions {tmp_path / 'nowhere'}: "
                                                                    "no such directory")
    partial = write_predictions(tmp_path / "partial", sessions, lambda s, k: s.images[k])
    os.remove(tmp_path / "partial" / sessions[2].key / "turn-03.png")
    result = run_main(capsys, *args, "--predictions", partial)
    assert error_line(result).endswith(f"{partial}/{sessions[2].key}/turn-03.png: missing (expected turn-01.png .. "
                                       f"turn-03.png in {partial}/<session key>/ for each of the 6 sessions)")
    small = write_predictions(tmp_path / "small", sessions, lambda s, k: s.images[k][:16, :16])
    result = run_main(capsys, *args, "--predictions", small)
    assert error_line(result).endswith(f"{small}/{sessions[0].key}/turn-01.png: 16x16, expected 32x32 "
                                       "(the session's resolution)")
    (tmp_path / "small" / sessions[0].key / "turn-01.png").write_bytes(b"not a png")
    result = run_main(capsys, *args, "--predictions", small)
    assert "turn-01.png: not a readable image" in error_line(result)
    assert not (tmp_path / "out" / "report.json").exists()  # nothing written by a failed run


@pytest.mark.parametrize("extra, message", [
    ([], "give exactly one"),
    (["--model", "M", "--predictions", "P"], "give exactly one"),
    (["--predictions", "P", "--given-truth"], "--given-truth need --model; --predictions scores saved edits"),
    (["--predictions", "P", "--save-predictions", "Q"], "--save-predictions need --model"),
    (["--predictions", "P"], "--predictions needs --data URL"),
    (["--bench", "magicbrush", "--model", "M", "--data", "D", "--json"], "apply to --bench synth only"),
])
def test_eval_option_errors(tmp_path, capsys, extra, message):
    result = run_main(capsys, "eval", "--out", str(tmp_path / "out"), *extra)
    assert result.returncode != 0 and message in error_line(result)


def test_save_predictions_writes_the_layout_predictions_reads(tmp_path, held_out, capsys):
    run = make_plain_run(tmp_path)
    saved = tmp_path / "saved"
    result = run_main(capsys, "eval", "--model", run, "--bench", "synth", "--data", held_out, "--sessions", "2",
                      "--turns", "2", "--steps", "2", "--save-predictions", str(saved), "--out", str(tmp_path / "m"),
                      "--json", check=True)
    by_model = json.loads(result.stdout)
    keys = sorted(os.listdir(saved))
    assert len(keys) == 2 and all(sorted(os.listdir(saved / k)) == ["turn-01.png", "turn-02.png"] for k in keys)
    assert np.asarray(Image.open(saved / keys[0] / "turn-01.png")).shape == (32, 32, 3)
    from_files = json.loads(run_main(capsys, "eval", "--predictions", str(saved), "--bench", "synth", "--data",
                                     held_out, "--sessions", "2", "--turns", "2", "--out", str(tmp_path / "p"),
                                     "--json", check=True).stdout)
    assert from_files["success"] == by_model["success"] and len(by_model["success"]) == 2
    model_report = json.loads((tmp_path / "m" / "report.json").read_text())
    files_report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert model_report["session_results"] == files_report["session_results"]
    assert set(model_report["denoising"]["x0_mse"]) == {"0.9", "0.5", "0.2", "0.05"}


def test_current_image_context_edits_each_turn_as_a_session_of_its_own(tmp_path, held_out):
    """--context current (the paper's context ablation): turn k sees the current image and instruction k only. With
    the true previous images given, another first instruction leaves turn 2's edit unchanged in that mode, and
    changes it with the whole session as context (the model reads instruction 1 there)."""
    import dataclasses

    from vincie.evaluation.evaluate import edit_synth
    from vincie.inference.editor import Editor

    editor = Editor.load(make_plain_run(tmp_path))
    sessions = held_out_sessions(held_out, 2, 2)
    other = [dataclasses.replace(s, instructions=["paint everything purple", *s.instructions[1:]])
             for s in sessions]

    def turn_two(chosen, context):
        outputs = edit_synth(editor, chosen, True, 2, None, 0, 2, False, False, context)
        return [turns[1] for turns in outputs]

    assert all(np.array_equal(a, b) for a, b in zip(turn_two(sessions, "current"), turn_two(other, "current")))
    assert not all(np.array_equal(a, b) for a, b in zip(turn_two(sessions, "session"), turn_two(other, "session")))


def test_given_truth_per_kind_counts_the_teacher_forced_verdicts(tmp_path, held_out, monkeypatch):
    """The per-kind table of --given-truth counts the verdicts of the turns edited from the truth, not those of the
    model's own path. The editing is stood in for (a test double of edit_synth: the true next image when a turn
    starts from the truth, the input unchanged on the model's own path), so every kind passes given the truth and
    none on the own path; the model itself only runs the denoising probe."""
    from vincie.evaluation import evaluate
    from vincie.inference.editor import Editor

    def edits(editor, chosen, given, *args):
        return [list(s.images[1:]) if given else [s.images[0]] * (len(s.images) - 1) for s in chosen]

    monkeypatch.setattr(evaluate, "edit_synth", edits)
    report = evaluate.evaluate_synth(Editor.load(make_plain_run(tmp_path)), held_out, str(tmp_path / "eval"),
                                     sessions=6, turns=TURNS, progress=False, given_truth=True)
    assert report["success_given_truth"] == [1.0] * TURNS and report["success"]["model"] == [0.0] * TURNS
    given, own = report["by_kind_given_truth"], report["by_kind"]["model"]
    assert set(given) == set(own) and sum(row["turns"] for row in given.values()) == 6 * TURNS
    assert all(row["success"] == 1.0 for row in given.values()) and all(row["success"] == 0.0 for row in own.values())
    assert "given truth, per edit kind (turns): " + evaluate.kinds_line(given) in evaluate.format_table(report)
