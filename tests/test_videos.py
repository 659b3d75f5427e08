"""`vincie data synth --videos`: real video files whose frames match the ground truth written beside them."""

import json

import av
import numpy as np

from data_index.synthetic.world import generate_session
from vincie.config import SynthConfig

from conftest import run_vincie


def decode(path):
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)], \
            container.streams.video[0].codec_context.name


def test_videos_match_ground_truth(tmp_path):
    run_vincie("data", "synth", "--out", str(tmp_path / "shards"), "--sessions", "3", "--videos",
               str(tmp_path / "videos"), "--video-codecs", "vp9,mjpeg,h264", "--workers", "1", check=True)
    for index in range(3):
        key = f"synth-train-s0-{index:08d}"
        truth = json.loads((tmp_path / "videos" / f"{key}.gt.json").read_text())
        session = generate_session(SynthConfig(), "train", 0, index)
        masks = np.load(tmp_path / "videos" / truth["masks"])
        assert masks["cur"].shape == (session.session.turns, 64, 64)
        assert np.array_equal(masks["cur"].astype(bool), np.stack(session.session.cur_masks))
        assert truth["instructions"] == session.session.instructions
        for codec, expected_codec in (("vp9", "vp9"), ("mjpeg", "mjpeg"), ("h264", "h264")):
            frames, name = decode(tmp_path / "videos" / truth["videos"][codec])
            assert expected_codec in name
            assert len(frames) == truth["num_frames"] == len(session.clean_frames) * truth["hold_frames"]
            for state, start in enumerate(truth["state_start_frames"]):
                clean = session.clean_frames[state].astype(np.float64)
                for frame in frames[start:start + truth["hold_frames"]]:
                    # lossy 4:2:0 video of 64x64 frames: close to its own state...
                    own = np.abs(frame - clean).mean()
                    assert own < 6, (codec, state, own)
                    # ...and farther from the neighbouring states where they differ
                    for other in (state - 1, state + 1):
                        if 0 <= other < len(session.clean_frames):
                            region = np.any(session.clean_frames[other] != session.clean_frames[state], axis=-1)
                            far = np.abs(frame[region] - session.clean_frames[other][region]).mean()
                            near = np.abs(frame[region] - clean[region]).mean()
                            assert near < far, (codec, state, other)


def test_unknown_codec_is_refused(tmp_path):
    result = run_vincie("data", "synth", "--out", str(tmp_path / "s"), "--sessions", "1", "--videos",
                        str(tmp_path / "v"), "--video-codecs", "av1")
    assert result.returncode == 2 and "av1" in result.stderr
