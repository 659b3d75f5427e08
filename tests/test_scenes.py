"""Scene cuts, sampling and frame filters of real-video ingest on small videos made here with known content."""

import numpy as np
import pytest

from data_index.ingest.regions import region_change
from data_index.ingest.scenes import VideoScan, sample_points, scan_video
from data_index.synthetic.videos import encode_video
from vincie.config import load_config

FPS = 8


def ingest_cfg(*overrides: str):
    return load_config("tiny", ["ingest.interval_s=0.5", *overrides]).ingest


def square_frames(background: tuple, colour: tuple, states: int, hold: int = 8, size: int = 64,
                  start: int = 8) -> list[np.ndarray]:
    """A flat background with a square that moves 8 px to the right at each new state, each held `hold` frames."""
    frames = []
    for state in range(states):
        frame = np.empty((size, size, 3), np.uint8)
        frame[:] = background
        x = start + 8 * state
        frame[20:36, x:x + 16] = colour
        frames += [frame] * hold
    return frames


def scan(path, cfg):
    info = VideoScan()
    return list(scan_video(str(path), cfg, info)), info


def test_a_cut_between_two_shots_makes_two_scenes(tmp_path):
    first = square_frames((110, 110, 110), (220, 40, 40), states=3)
    second = [255 - f[:, ::-1] for f in square_frames((60, 90, 200), (40, 200, 60), states=3)]  # another shot
    encode_video(first + second, str(tmp_path / "two.mp4"), "h264", FPS)
    scenes, info = scan(tmp_path / "two.mp4", ingest_cfg())
    assert [(s.start_frame, s.end_frame) for s in scenes] == [(0, 24), (24, 48)]
    for scene in scenes:  # one image per held state: the repeats were near-duplicates
        assert [f // 8 for f in scene.frame_indices] == [scene.start_frame // 8 + k for k in range(3)]
    assert info.frames == 48 and info.codec == "h264" and not info.truncated


def test_letterbox_is_cropped(tmp_path):
    frames = square_frames((120, 120, 120), (40, 40, 220), states=3)
    boxed = [np.concatenate([np.zeros((8, 64, 3), np.uint8), f[8:56], np.zeros((8, 64, 3), np.uint8)]) for f in frames]
    encode_video(boxed, str(tmp_path / "box.webm"), "vp9", FPS)
    (scene,), _ = scan(tmp_path / "box.webm", ingest_cfg())
    assert scene.crop[2:] == (0, 0) and all(7 <= c <= 9 for c in scene.crop[:2]), scene.crop
    assert scene.frames[0].shape == (64 - scene.crop[0] - scene.crop[1], 64, 3)
    # a border wider than ingest.max_border of the frame drops the scene
    _, info = scan(tmp_path / "box.webm", ingest_cfg("ingest.max_border=0.1"))
    assert info.dropped == {"filtered_border": 1}


@pytest.mark.parametrize("name, frames, reason", [
    ("dark", [(f * 0.08).astype(np.uint8) for f in square_frames((100, 100, 100), (250, 250, 250), states=3)],
     "filtered_dark"),
    ("static", square_frames((100, 100, 100), (250, 40, 40), states=1, hold=24), "static"),
    ("short", square_frames((100, 100, 100), (250, 40, 40), states=2, hold=3), "too_short"),
])
def test_filtered_scenes_are_counted_with_their_reason(tmp_path, name, frames, reason):
    encode_video(frames, str(tmp_path / f"{name}.avi"), "mjpeg", FPS)
    scenes, info = scan(tmp_path / f"{name}.avi", ingest_cfg())
    assert scenes == [] and info.dropped == {reason: 1}


def test_hybrid_sampling_points():
    cfg = ingest_cfg("ingest.interval_s=1.0", "ingest.per_scene=4")
    # equal intervals (every 8 frames from the scene start) plus 4 points spread over the 40 frames
    assert sample_points(100, 140, 8.0, cfg) == sorted({100, 108, 116, 124, 132} | {105, 115, 125, 135})


def test_camera_shift_is_aligned_before_differencing():
    a = np.random.default_rng(0).integers(60, 200, (64, 64, 3), dtype=np.uint8)
    b = np.roll(a, (2, -3), axis=(0, 1)).copy()  # the camera moved; frame content shifted by (+2, -3)
    b[40:50, 40:50] = (250, 20, 20)  # and something appeared
    change = region_change(a, b, ingest_cfg())
    assert change.shift == (2, -3)  # b[y + 2, x - 3] = a[y, x]
    assert change.kind == "appear"
    truth = np.zeros((64, 64), bool)
    truth[40:50, 40:50] = True
    assert (change.next & truth).sum() / (change.next | truth).sum() > 0.8  # in frame i+1's coordinates


def test_offline_masks_and_text_of_a_move():
    """A flat square moved right by half its width: its overlap with itself does not change, yet belongs to both
    masks; the templated text names kind, place, colour and direction."""
    from data_index.ingest.annotators import OfflineTextAnnotator

    a, b = square_frames((110, 110, 110), (220, 40, 40), states=2, hold=1)
    change = region_change(a, b, ingest_cfg())
    before, after = np.zeros((64, 64), bool), np.zeros((64, 64), bool)
    before[20:36, 8:24] = True
    after[20:36, 16:32] = True
    assert change.kind == "change"
    assert np.array_equal(change.cur, before) and np.array_equal(change.next, after)
    assert OfflineTextAnnotator().instruction(a, b, change) == "move the red object at the left to the right"
    appear = region_change(a, a.copy() + (np.arange(64)[:, None, None] >= 48) * (np.arange(64)[None, :, None] >= 48)
                           * np.uint8(100), ingest_cfg())
    assert appear.kind == "appear" and appear.cur.sum() == 16 * 16
    assert OfflineTextAnnotator().instruction(a, a, appear).startswith("add a ")
