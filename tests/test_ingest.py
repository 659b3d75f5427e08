"""`vincie data ingest` on videos with known answers: the synthetic world's video files (`vincie data synth
--videos`, H.264 and VP9) whose ground truth (first frame of every state, exact masks) sits beside them, plus a
corrupt, a zero-length and an unsupported-codec file; resume and idempotence; `index stats` on the result.
"""

import json
import os
import shutil

import numpy as np
import pytest

from data_index.ingest.pipeline import read_manifest, run_ingest
from data_index.synthetic.synth import SynthJob, run_synth
from data_index.synthetic.videos import encode_video
from vincie.config import SynthConfig, load_config
from vincie.sessions.shards import iter_sessions

from conftest import error_line, run_main

SESSIONS = 3


def ingest_config(*overrides: str):
    # equal intervals of half a state (states last 1 s): every state is sampled twice, the repeat is a near-duplicate
    return load_config("tiny", ["ingest.interval_s=0.5", *overrides])


def mask_iou(pred: np.ndarray, true: np.ndarray) -> float:
    return float((pred & true).sum() / max(1, (pred | true).sum()))


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """SESSIONS synthetic sessions as H.264 and VP9 files, and three files that cannot give sessions."""
    root = tmp_path_factory.mktemp("ingest")
    job = SynthJob(out=str(root / "synth"), sessions=SESSIONS, split="train", seed=3,
                   synth=SynthConfig(min_turns=2, max_turns=4), videos=str(root / "videos"),
                   video_codecs=["h264", "vp9"])
    run_synth(job, load_config("tiny").storage, progress=False)
    bad = root / "videos" / "bad"
    bad.mkdir()
    (bad / "empty.webm").write_bytes(b"")
    (bad / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    # a real AVI whose codec tag no decoder knows: MJPEG frames relabelled
    frames = [np.full((32, 32, 3), 40 * i, np.uint8) for i in range(4)]
    encode_video(frames, str(bad / "tmp.avi"), "mjpeg", 8)
    (bad / "unknown_codec.avi").write_bytes((bad / "tmp.avi").read_bytes().replace(b"MJPG", b"QQQQ"))
    (bad / "tmp.avi").unlink()
    return root


@pytest.fixture(scope="module")
def ingested(videos):
    out = videos / "out"
    summary = run_ingest(str(videos / "videos"), str(out), ingest_config(), workers=1, progress=False)
    return out, summary


def test_sessions_align_with_the_true_transitions(videos, ingested):
    out, summary = ingested
    assert summary["processed"] == 2 * SESSIONS + 3 and summary["sessions_made"] == 2 * SESSIONS
    sessions = {s.key: s for s in iter_sessions(str(out))}
    ious: dict[str, list[float]] = {}
    for gt_file in sorted((videos / "videos").glob("*.gt.json")):
        truth = json.loads(gt_file.read_text())
        masks = np.load(videos / "videos" / truth["masks"])
        for codec in ("h264", "vp9"):
            found = [s for s in sessions.values() if s.meta["video"] == truth["videos"][codec]]
            assert len(found) == 1, (codec, truth["key"], [s.key for s in found])
            session = found[0]
            # one image per state of the scene, in order: frame index -> state it lies in
            states = [f // truth["hold_frames"] for f in session.meta["frame_indices"]]
            assert states == list(range(len(truth["state_start_frames"]))), (codec, truth["key"], states)
            assert session.turns == len(truth["instructions"])
            assert session.meta["annotators"] == {"text": "offline-diff/1", "masks": "offline-diff/1"}
            assert session.meta["quality"] < 0.5  # offline text is marked low quality
            for k, transition in enumerate(truth["transitions"]):
                for pred, true in ((session.cur_masks[k], masks["cur"][k]), (session.next_masks[k], masks["next"][k])):
                    ious.setdefault(transition["kind"], []).append(mask_iou(pred, true.astype(bool)))
    report = {kind: round(float(np.mean(v)), 3) for kind, v in sorted(ious.items())}
    print(f"offline mask IoU with the true masks, mean per transition kind ({SESSIONS} scenes x 2 codecs): {report}")
    # figures over more scenes: docs/BENCHMARKS.md (vincie bench ingest); here a floor that catches a broken mask
    assert np.mean([i for v in ious.values() for i in v]) > 0.5, report


def test_bad_files_end_in_the_manifest_with_their_reason(ingested):
    out, summary = ingested
    latest = {r["video"]: r for r in read_manifest(str(out))}
    assert latest["bad/empty.webm"]["reason"] == "empty"
    assert latest["bad/corrupt.mp4"]["reason"] == "corrupt"
    assert latest["bad/unknown_codec.avi"]["reason"] == "unsupported_codec"
    assert all(latest[f"bad/{n}"]["sessions"] == 0 and latest[f"bad/{n}"]["status"] == "done"
               for n in ("empty.webm", "corrupt.mp4", "unknown_codec.avi"))
    with open(out / "manifest.jsonl") as f:
        assert len(f.read().splitlines()) == 2 * SESSIONS + 3
    assert summary["outcomes"] == {"ok": 2 * SESSIONS, "empty": 1, "corrupt": 1, "unsupported_codec": 1}


def test_rerun_skips_finished_videos_and_resume_redoes_an_unrecorded_shard(videos, ingested, tmp_path, capsys):
    out, _ = ingested
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = sorted(s.key for s in iter_sessions(str(copy)))
    again = run_main(capsys, "data", "ingest", "--videos", str(videos / "videos"), "--out", str(copy),
                     "--workers", "1", "ingest.interval_s=0.5", check=True)
    assert "0 of 9 videos processed (9 already done)" in again.stdout
    # a run killed after publishing a shard but before its manifest part: the shard is dropped and made again
    parts = sorted((copy / "manifest").glob("part-*.jsonl"))
    parts[-1].unlink()
    run_main(capsys, "data", "ingest", "--videos", str(videos / "videos"), "--out", str(copy), "--workers", "1",
             "ingest.interval_s=0.5", check=True)
    assert sorted(s.key for s in iter_sessions(str(copy))) == before  # nothing lost, nothing twice
    assert "OK" in run_main(capsys, "data", "index", "verify", str(copy), check=True).stdout
    # other settings are refused without --overwrite
    result = run_main(capsys, "data", "ingest", "--videos", str(videos / "videos"), "--out", str(copy),
                      "--workers", "1")
    assert result.returncode != 0 and "interval_s" in error_line(result)


def test_stats_per_source_with_plots(ingested, capsys):
    out, _ = ingested
    result = run_main(capsys, "data", "index", "stats", str(out), "--json", check=True)
    summary = json.loads(result.stdout[:result.stdout.rindex("}") + 1])
    video = summary["per_source"]["video"]
    assert video["sessions"] == 2 * SESSIONS and summary["text_annotator"] == {"offline-diff/1": 2 * SESSIONS}
    sessions = list(iter_sessions(str(out)))
    assert video["turns_total"] == sum(s.turns for s in sessions)
    words = np.mean([np.mean([len(t.split()) for t in s.instructions]) for s in sessions])
    assert video["instruction_words_mean"] == pytest.approx(words, rel=1e-5)
    areas = np.mean([np.mean([[c.mean(), n.mean()] for c, n in zip(s.cur_masks, s.next_masks)]) for s in sessions])
    assert video["mask_area_mean"] == pytest.approx(areas, rel=1e-4)
    assert (out / "stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class CentreSquare:
    """A mask plug-in of this test's own: a fixed square, whatever the frames."""
    name = "centre-square/1"

    def __init__(self, cfg):
        self.cfg = cfg

    def masks(self, a, b, change, instruction):
        mask = np.zeros(a.shape[:2], bool)
        mask[8:24, 8:24] = True
        return mask, mask


def test_mask_plugins_load_by_config_and_grounded_names_what_is_missing(videos, tmp_path, capsys):
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(next((videos / "videos").glob("*.webm")), one)
    cfg = ingest_config(f"ingest.masks={__name__}:CentreSquare")
    run_ingest(str(one), str(tmp_path / "out"), cfg, workers=1, progress=False)
    (session,) = iter_sessions(str(tmp_path / "out"))
    assert session.meta["annotators"]["masks"] == "centre-square/1"
    assert all(m[8:24, 8:24].all() and m.sum() == 256 for m in session.cur_masks + session.next_masks)
    # no GroundingDINO/SAM2 here: one line naming the missing packages (or, where installed, the missing weights)
    result = run_main(capsys, "data", "ingest", "--videos", str(one), "--out", str(tmp_path / "g"),
                      "--masks", "grounded", "--masks-weights", str(tmp_path))
    assert result.returncode != 0 and "groundingdino" in error_line(result)


def test_videos_from_s3_to_s3(videos, s3_bucket, capsys):
    """Input listed and read from S3, shards, manifest and index written there (moto's S3 server)."""
    import fsspec

    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    good = next((videos / "videos").glob("*.mp4"))
    fs.put_file(str(good), f"{s3_bucket[5:]}/in/clips/{good.name}")
    fs.put_file(str(videos / "videos" / "bad" / "corrupt.mp4"), f"{s3_bucket[5:]}/in/corrupt.mp4")
    out = f"{s3_bucket}/out"
    run_main(capsys, "data", "ingest", "--videos", f"{s3_bucket}/in", "--out", out, "--workers", "1",
             "ingest.interval_s=0.5", check=True)
    latest = {r["video"]: r for r in read_manifest(out)}
    assert latest["corrupt.mp4"]["reason"] == "corrupt" and latest[f"clips/{good.name}"]["sessions"] == 1
    (session,) = iter_sessions(out)
    assert session.meta["video"] == f"clips/{good.name}"
    assert "OK" in run_main(capsys, "data", "index", "verify", out, check=True).stdout


def test_bench_ingest_reports_speed_and_agreement_with_the_truth(capsys):
    """A smoke test of `vincie bench ingest` (no speed is asserted): two synthetic sessions as VP9 files, ingested
    by one process; every video gives one session with one image per state, and each transition's two masks are
    scored against the true ones."""
    result = run_main(capsys, "bench", "ingest", "--sessions", "2", "--turns", "2", "--workers", "1", "--codecs",
                      "vp9", "--json", check=True)
    report = json.loads(result.stdout)
    assert report["videos"] == 2 and report["sessions_made"] == 2 and report["aligned_videos"] == "2/2"
    assert report["videos_per_s_1proc"] > 0 and report["worker_cpu_s_per_video_1proc"] > 0
    kinds = [key.removeprefix("mask_iou_") for key in report if key.startswith("mask_iou_")]
    assert kinds and sum(report[f"mask_pairs_{kind}"] for kind in kinds) == 2 * 2 * 2  # videos x turns x (cur, next)
    assert all(0 <= report[f"mask_iou_{kind}"] <= 1 for kind in kinds)
