"""Session shards: round trips on local disk and through a real S3 server (moto's, started by the test)."""

import numpy as np
import pytest

from data_index.synthetic.world import generate_session
from vincie import storage
from vincie.config import SynthConfig
from vincie.sessions.session import SessionFormatError, sample_to_session, session_to_sample
from vincie.sessions.shards import iter_sessions, scan_shard, write_shard

from conftest import error_line, run_vincie


def sessions(count, **kw):
    cfg = SynthConfig(**kw)
    return [generate_session(cfg, "train", 3, i).session for i in range(count)]


def assert_same_session(a, b, exact_images):
    assert a.key == b.key and a.instructions == b.instructions and a.meta == b.meta
    assert len(a.images) == len(b.images)
    for x, y in zip(a.images, b.images):
        if exact_images:
            assert np.array_equal(x, y)
        else:  # JPEG q95 without chroma subsampling: small error
            assert np.abs(x.astype(int) - y.astype(int)).mean() < 3
    for xs, ys in ((a.cur_masks, b.cur_masks), (a.next_masks, b.next_masks)):
        assert all(np.array_equal(x, y) for x, y in zip(xs, ys))


@pytest.mark.parametrize("image_format", ["png", "jpg"])
def test_local_round_trip(tmp_path, image_format):
    originals = sessions(12, image_format=image_format)
    for shard, part in enumerate((originals[:7], originals[7:])):
        write_shard(str(tmp_path / f"shard-{shard:06d}.tar"), part, None, image_format)
    back = list(iter_sessions(str(tmp_path)))
    assert [s.key for s in back] == [s.key for s in originals]
    for a, b in zip(originals, back):
        assert_same_session(a, b, exact_images=image_format == "png")


def test_scan_reports_offsets_that_address_each_sample(tmp_path):
    url = str(tmp_path / "shard-000000.tar")
    originals = sessions(5, image_format="png")
    write_shard(url, originals, None, "png")
    data = open(url, "rb").read()
    scanned = list(scan_shard(url))
    assert [s.key for s in scanned] == [s.key for s in originals]
    for s in scanned:  # the byte range [offset, offset+size) holds exactly this sample's members
        import io
        import tarfile

        with tarfile.open(fileobj=io.BytesIO(data[s.offset:s.offset + s.size] + b"\0" * 1024)) as tar:
            names = tar.getnames()
        assert names and all(n.startswith(s.key + ".") for n in names)
        assert len(names) == len(s.members)


def test_decode_errors_name_key_and_member():
    s = sessions(1, image_format="png")[0]
    sample = session_to_sample(s, "png")
    broken = dict(sample)
    broken["001.img.png"] = sample["001.img.png"][:50]
    with pytest.raises(SessionFormatError, match=rf"{s.key}.*001.img.png"):
        sample_to_session(broken)
    missing = {k: v for k, v in sample.items() if k != "000.next.png"}
    with pytest.raises(SessionFormatError, match=r"000.next.png"):
        sample_to_session(missing)
    with pytest.raises(SessionFormatError, match=r"json"):
        sample_to_session({**sample, "json": b"{not json"})


def test_s3_round_trip(s3_bucket):
    originals = sessions(6, image_format="png")
    root = f"{s3_bucket}/sessions/train"
    write_shard(f"{root}/shard-000000.tar", originals[:4], None, "png")
    write_shard(f"{root}/shard-000001.tar", originals[4:], None, "png")
    assert storage.list_files(root, ".tar") == [f"{root}/shard-000000.tar", f"{root}/shard-000001.tar"]
    back = list(iter_sessions(root))
    for a, b in zip(originals, back, strict=True):
        assert_same_session(a, b, exact_images=True)
    # and through the byte-offset scan used by the index
    assert [s.key for s in scan_shard(f"{root}/shard-000001.tar")] == [s.key for s in originals[4:]]


def test_cli_synth_to_s3_then_verify(s3_bucket):
    root = f"{s3_bucket}/synth/train"
    result = run_vincie("data", "synth", "--out", root, "--sessions", "40", "--shard-size", "16", "--workers", "2",
                        check=True)
    assert "40 sessions in 3 shards" in result.stdout
    result = run_vincie("data", "index", "verify", root, check=True)
    assert "OK: 40 sessions" in result.stdout
    result = run_vincie("data", "index", "stats", root, "--json", check=True)
    assert '"sessions": 40' in result.stdout
    # nothing secret reaches the settings written next to the data
    settings = storage.read_bytes(f"{root}/synth.yaml").decode()
    assert "testing" not in settings


def test_unreachable_s3_is_one_line(tmp_path):
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
           "AWS_DEFAULT_REGION": "us-east-1"}
    result = run_vincie("data", "index", "verify", "s3://nowhere/data", "storage.max_attempts=1",
                        "storage.connect_timeout_s=1", env=env, timeout=120)
    assert result.returncode == 2
    line = error_line(result)
    assert "s3://nowhere/data" in line and "127.0.0.1:9" in line


def test_missing_bucket_is_one_line(s3_server):
    result = run_vincie("data", "synth", "--out", "s3://no-such-bucket-here/x", "--sessions", "2")
    assert result.returncode == 2
    assert "no-such-bucket-here" in error_line(result)
