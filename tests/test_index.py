"""The session index: build, verify against damage, atomic shards under a killed writer, resume, split, stats."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from data_index.synthetic.synth import SynthJob, run_synth
from vincie.config import StorageConfig, SynthConfig
from vincie.sessions.index import INDEX_FILE, read_index, verify
from vincie.sessions.shards import scan_shard

from conftest import REPO, run_main, run_vincie


def make_dataset(root, sessions=24, shard_size=8, **synth):
    job = SynthJob(out=str(root), sessions=sessions, split="train", seed=0,
                   synth=SynthConfig(shard_size=shard_size, **synth))
    return run_synth(job, StorageConfig(), workers=1, progress=False)


def test_build_lists_every_session_once(tmp_path):
    make_dataset(tmp_path, sessions=20, shard_size=8)
    table = read_index(str(tmp_path))
    assert table.num_rows == 20
    assert sorted(set(table.column("shard").to_pylist())) == ["shard-000000.tar", "shard-000001.tar",
                                                             "shard-000002.tar"]
    assert len(set(table.column("id").to_pylist())) == 20
    assert set(table.column("turns").to_pylist()) <= set(range(2, 7))
    assert all(table.column("has_masks").to_pylist())
    assert verify(str(tmp_path), progress=False) == (20, [])


def test_verify_names_a_deleted_shard(tmp_path):
    make_dataset(tmp_path)
    os.remove(tmp_path / "shard-000001.tar")
    result = run_vincie("data", "index", "verify", str(tmp_path))
    assert result.returncode == 1
    assert "shard-000001.tar: listed in the index (8 sessions) but missing from storage" in result.stdout


def test_verify_names_a_corrupted_sample(tmp_path):
    make_dataset(tmp_path, image_format="png")
    path = tmp_path / "shard-000002.tar"
    victim = list(scan_shard(str(path)))[3]
    data = bytearray(path.read_bytes())
    # overwrite the middle of image 001 of that session, keeping the tar structure intact
    header_offset = victim.offset
    member_start = data.index(f"{victim.key}.001.img.png".encode(), header_offset) - 0 + 512
    data[member_start + 60:member_start + 120] = b"\x00" * 60
    path.write_bytes(bytes(data))
    result = run_vincie("data", "index", "verify", str(tmp_path))
    assert result.returncode == 1, result.stdout
    assert f"shard-000002.tar: corrupt sample: session {victim.key}: cannot decode 001.img.png" in result.stdout
    assert "1 problem(s)" in result.stdout


def test_verify_names_unlisted_and_truncated_shards(tmp_path):
    make_dataset(tmp_path)
    extra = tmp_path / "shard-000009.tar"
    extra.write_bytes((tmp_path / "shard-000000.tar").read_bytes())
    data = (tmp_path / "shard-000001.tar").read_bytes()
    (tmp_path / "shard-000001.tar").write_bytes(data[:len(data) // 2])
    _, problems = verify(str(tmp_path), progress=False)
    text = "\n".join(problems)
    assert "shard-000009.tar: on storage but not in the index" in text
    assert "shard-000001.tar: truncated or corrupt tar" in text
    assert "is in the index but not in the shard" in text


def test_killed_writer_leaves_no_half_shard_in_the_index(tmp_path):
    out = tmp_path / "data"
    args = [sys.executable, "-m", "vincie", "data", "synth", "--out", str(out), "--sessions", "600",
            "--shard-size", "200", "--resolution", "32", "--workers", "1"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait until shard 0 is complete and shard 1 is being written
            names = os.listdir(out) if out.exists() else []
            if "shard-000000.tar" in names and any(n.startswith("shard-000001.tar.tmp-") for n in names):
                break
            time.sleep(0.01)
        else:
            pytest.fail(f"writer never reached shard 1: {names}")
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    names = sorted(os.listdir(out))
    assert "shard-000001.tar" not in names and INDEX_FILE not in names
    assert any(n.startswith("shard-000001.tar.tmp-") for n in names)  # the half shard, under a temp name
    result = run_vincie("data", "index", "build", str(out), check=True)
    assert "200 sessions" in result.stdout
    assert run_vincie("data", "index", "verify", str(out)).returncode == 0

    # the same command again resumes: shard 0 is kept, the temp file is cleaned, the rest is made
    before = (out / "shard-000000.tar").stat().st_mtime_ns
    result = run_vincie(*args[3:], check=True)
    assert "1 shard already complete" in result.stdout
    assert (out / "shard-000000.tar").stat().st_mtime_ns == before
    assert not [n for n in os.listdir(out) if ".tmp-" in n]
    assert read_index(str(out)).num_rows == 600


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    make_dataset(tmp_path / "a", sessions=24)
    make_dataset(tmp_path / "b", sessions=24)
    os.remove(tmp_path / "b" / "shard-000001.tar")
    make_dataset(tmp_path / "b", sessions=24)
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_rerun_with_other_settings_is_refused(tmp_path):
    make_dataset(tmp_path, sessions=8)
    result = run_vincie("data", "synth", "--out", str(tmp_path), "--sessions", "8", "--seed", "3")
    assert result.returncode == 2
    assert "other settings" in result.stderr and "seed" in result.stderr
    result = run_vincie("data", "synth", "--out", str(tmp_path), "--sessions", "8", "--seed", "3",
                        "--shard-size", "8", "--overwrite", check=True)
    assert read_index(str(tmp_path)).column("id").to_pylist()[0] == "synth-train-s3-00000000"


def test_split_is_deterministic_and_keeps_scenes_together(tmp_path):
    make_dataset(tmp_path, sessions=60, shard_size=30)
    run_vincie("data", "index", "split", str(tmp_path), "--val", "0.2", "--test", "0.2", check=True)
    first = pq.read_table(tmp_path / INDEX_FILE).column("split").to_pylist()
    run_vincie("data", "index", "split", str(tmp_path), "--val", "0.2", "--test", "0.2", check=True)
    assert pq.read_table(tmp_path / INDEX_FILE).column("split").to_pylist() == first
    assert {"train", "val", "test"} <= set(first)
    assert 0.05 < first.count("test") / 60 < 0.4


def test_stats_prints_counts_and_writes_a_png(tmp_path):
    make_dataset(tmp_path, sessions=16)
    result = run_vincie("data", "index", "stats", str(tmp_path), check=True)
    assert result.stdout.startswith("16 sessions in 2 shards")
    png = (tmp_path / "stats.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_show_draws_a_contact_sheet(tmp_path):
    make_dataset(tmp_path / "d", sessions=4)
    out = tmp_path / "sheet.png"
    result = run_vincie("data", "show", str(tmp_path / "d"), "--out", str(out), "--sessions", "3", check=True)
    from PIL import Image

    with Image.open(out) as im:
        assert im.height > 3 * 128 and im.width >= 3 * 128
    assert "3 sessions" in result.stdout


def test_verify_without_index_says_how_to_build(tmp_path):
    make_dataset(tmp_path, sessions=4)
    os.remove(tmp_path / INDEX_FILE)
    result = run_vincie("data", "index", "verify", str(tmp_path))
    assert result.returncode == 2 and "vincie data index build" in result.stderr


def test_bench_synth_reports_every_pass(capsys):
    """A smoke test of `vincie bench synth --videos` (no speed is asserted): rendering, end to end, and end to end
    with video files each measured."""
    result = run_main(capsys, "bench", "synth", "--sessions", "4", "--resolution", "32", "--workers", "1",
                      "--videos", "--json", check=True)
    report = json.loads(result.stdout)
    assert report["sessions"] == 4 and report["resolution"] == 32
    for key in ("render_sessions_per_s_1proc", "end_to_end_sessions_per_s_1proc",
                "end_to_end_with_videos_sessions_per_s_1proc"):
        assert report[key] > 0, key
