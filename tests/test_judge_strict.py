"""The strict synth judge (vincie/evaluation/synth_judge.py), calibrated: over every turn of many sessions of the
synthetic world, each corruption of tools/judge_calibration.py fails and the truth, the truth with noise at the
tolerance and the truth as JPEG at quality 90 pass. Reasons name the check and the object."""

import os
import re
import sys

import numpy as np
import pytest

from data_index.synthetic.world import generate_session
from vincie.config import SynthConfig
from vincie.errors import VincieError
from vincie.evaluation.synth_judge import judge_session, judge_turn, true_turns

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
from judge_calibration import MUST_FAIL, MUST_PASS, erased_other, ghost, grey_patch  # noqa: E402

WORLDS = {  # the demo's held-out world (32x32, 5 turns), and a larger one with camera jitter
    "demo": (SynthConfig(resolution=32, min_turns=5, max_turns=5, image_format="png"), 40),
    "jittered 64": (SynthConfig(resolution=64, min_turns=2, max_turns=5, jitter_px=2, image_format="png"), 12),
}


@pytest.fixture(scope="module", params=list(WORLDS))
def sessions(request):
    cfg, count = WORLDS[request.param]
    return [generate_session(cfg, "test", 11, index).session for index in range(count)]


def outcomes(sessions, cases) -> dict[str, list[tuple[str, int, bool, str]]]:
    results = {name: [] for name in cases}
    for session in sessions:
        for k, turn in enumerate(true_turns(session)):
            for name, case in cases.items():
                for output in case(session, k, turn):
                    verdict = judge_turn(output, turn)
                    results[name].append((session.key, k, verdict.success, verdict.reason))
    return results


def test_outputs_at_the_tolerance_pass(sessions):
    for name, results in outcomes(sessions, MUST_PASS).items():
        failed = [r for r in results if not r[2]]
        assert results and not failed, (name, failed[:3])


def test_corruptions_fail(sessions):
    for name, results in outcomes(sessions, MUST_FAIL).items():
        passed = [r for r in results if r[2]]
        assert len(results) >= 20 and not passed, (name, len(results), passed[:3])


def test_reasons_name_the_check_and_the_object():
    session = generate_session(WORLDS["demo"][0], "test", 11, 0).session
    turns = true_turns(session)
    k = next(k for k, t in enumerate(turns) if len(t.names_after) >= 2)
    turn = turns[k]
    erased = judge_turn(erased_other(session, k, turn)[0], turn)
    other = next(n for j, n in enumerate(turn.names_after) if j != turn.edited_after)
    expected = rf"objects: \d+ of the \d+ pixels of the untouched {other} are off \(at most \d\)"
    assert re.fullmatch(expected, erased.reason), erased.reason
    ghosted = judge_turn(ghost(session, k, turn)[0], turn)
    assert not ghosted.success and ghosted.input_share == pytest.approx(0.3, abs=0.01)
    grey = judge_turn(grey_patch(session, k, turn)[0], turn)
    assert re.match(r"background: \d\d pixels outside the objects differ", grey.reason), grey.reason
    truth = judge_turn(turn.truth, turn)
    assert truth.success and truth.reason == "" and truth.worst_object == 1.0 and truth.input_share == 0.0
    assert judge_turn(turn.source, turn).input_share == pytest.approx(1.0)


def test_bad_inputs_get_one_line_errors():
    session = generate_session(WORLDS["demo"][0], "test", 11, 1).session
    with pytest.raises(VincieError, match=r"an output of shape \(16, 16, 3\) for a turn whose truth is \(32, 32, 3\)"):
        judge_session(session, [np.zeros((16, 16, 3), np.uint8)])
    session.meta = {k: v for k, v in session.meta.items() if k != "initial_objects"}
    with pytest.raises(VincieError, match=r"metadata does not replay as a synthetic world session \(KeyError"):
        true_turns(session)
