"""Real video -> scenes -> sampled frames: PyAV decoding, PySceneDetect cuts, hybrid sampling and frame filters.

One pass over the file: every frame goes (small, BGR) to PySceneDetect's ContentDetector; frames on the candidate
grid (`ingest.candidate_fps`) are also kept at output size (longer side <= `ingest.max_side`). When a cut is found,
the candidates of the finished scene are sampled and filtered and the scene is handed on; so memory holds one
scene's candidates, at most `max_scene_s` of them (longer scenes are split there).

Sampling is the paper's hybrid: points at equal time intervals (`interval_s`, for fine object changes) plus a fixed
number per scene (`per_scene`, spread evenly, for scene-level changes); each point snaps to the nearest candidate.
Filters: letterbox/black borders are cropped (a scene whose border takes more than `max_border` of a side is
dropped), too-dark frames are dropped, and a frame that differs from the last one kept in fewer than `min_change`
of its pixels (after aligning for camera shift) is a near-duplicate and dropped. A pair that differs in more than
`max_change` of its pixels is not one edit: the frames go to separate sessions.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import av
import cv2
import numpy as np

from data_index.ingest.regions import change_map, luma
from vincie.config import IngestConfig


class VideoRejected(Exception):
    """A video that yields nothing, for a reason that a rerun would not change; `reason` goes to the manifest."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Scene:
    index: int  # scene number within the video
    start_frame: int
    end_frame: int  # exclusive
    fps: float
    frames: list[np.ndarray]  # sampled frames kept after the filters, each (H, W, 3) uint8
    frame_indices: list[int]
    groups: list[list[int]]  # positions into `frames`: runs of frames whose consecutive pairs are single edits
    crop: tuple[int, int, int, int]  # (top, bottom, left, right) pixels removed as borders


@dataclass
class VideoScan:
    """What a pass over one video found: the scenes kept and why the others were dropped."""
    fps: float = 0.0
    frames: int = 0
    width: int = 0
    height: int = 0
    codec: str = ""
    truncated: str = ""  # decoder error that ended the pass early; empty: decoded to the end
    dropped: Counter = field(default_factory=Counter)  # scene-level reason -> count


def output_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2)


def resize(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if frame.shape[1::-1] == size:
        return frame
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)


def open_video(path: str, threads: int = 1) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    """Opens a local video file for decoding with `threads` threads (0: FFmpeg's choice); raises VideoRejected
    (empty, corrupt, no_video, unsupported_codec)."""
    if os.path.getsize(path) == 0:
        raise VideoRejected("empty", "zero-length file")
    try:
        container = av.open(path)
    except av.FFmpegError as exc:
        raise VideoRejected("corrupt", f"cannot open as a video container ({exc})") from None
    if not container.streams.video:
        container.close()
        raise VideoRejected("no_video", "the file has no video stream")
    stream = container.streams.video[0]
    context = stream.codec_context
    name = context.name if context is not None else "none"
    if name in ("none", "") or not context.codec.is_decoder:
        tag = context.codec_tag if context is not None else "?"
        container.close()
        raise VideoRejected("unsupported_codec", f"no decoder in this FFmpeg build for the video codec "
                                                 f"(name {name!r}, tag {tag!r})")
    if threads != 0:
        stream.thread_type = "SLICE" if threads > 1 else "NONE"
        context.thread_count = threads
    return container, stream


def border_crop(frames: list[np.ndarray], dark: float) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) rows/columns that are dark in every frame (letterbox, pillarbox)."""
    brightest = np.max(np.stack([luma(f) for f in frames]), axis=0)  # (H, W)
    rows, cols = brightest.mean(axis=1), brightest.mean(axis=0)

    def run(values: np.ndarray) -> int:
        bright = np.nonzero(values >= dark)[0]
        return int(bright[0]) if bright.size else len(values)

    return run(rows), run(rows[::-1]), run(cols), run(cols[::-1])


def sample_points(start: int, end: int, fps: float, cfg: IngestConfig) -> list[int]:
    """Frame indices in [start, end): equal time intervals from the scene start plus `per_scene` evenly spread."""
    step = max(1.0, cfg.interval_s * fps)
    points = {int(round(start + k * step)) for k in range(int(np.ceil((end - start) / step)))}
    length = end - start
    points |= {start + int((j + 0.5) * length / cfg.per_scene) for j in range(cfg.per_scene)}
    return sorted(p for p in points if start <= p < end)


def sample_scene(index: int, start: int, end: int, fps: float, candidates: list[tuple[int, np.ndarray]],
                 cfg: IngestConfig, dropped: Counter) -> Scene | None:
    """Samples and filters one scene's candidate frames; None (and a count in `dropped`) when nothing is left."""
    if (end - start) / fps < cfg.min_scene_s or not candidates:
        dropped["too_short"] += 1
        return None
    top, bottom, left, right = border_crop([f for _, f in candidates], cfg.border_luma)
    height, width = candidates[0][1].shape[:2]
    if top + bottom >= height or left + right >= width:  # dark all over: not a border
        dropped["filtered_dark"] += 1
        return None
    if max(top, bottom) > cfg.max_border * height or max(left, right) > cfg.max_border * width:
        dropped["filtered_border"] += 1
        return None
    indices = np.asarray([i for i, _ in candidates])
    chosen = sorted({int(np.argmin(np.abs(indices - p))) for p in sample_points(start, end, fps, cfg)})
    frames, frame_indices, groups = [], [], [[]]
    dark = 0
    for c in chosen:
        frame = np.ascontiguousarray(candidates[c][1][top:height - bottom, left:width - right])
        if luma(frame).mean() < cfg.dark_luma:
            dark += 1
            continue
        if frames:
            share = change_map(frames[-1], frame, cfg).mean()
            if share < cfg.min_change:
                continue  # near-duplicate of the last kept frame
            if share > cfg.max_change:
                groups.append([])
        frames.append(frame)
        frame_indices.append(int(indices[c]))
        groups[-1].append(len(frames) - 1)
    groups = [g for g in groups if len(g) >= 2]
    if not groups:
        dropped["filtered_dark" if dark and dark >= len(chosen) - 1 else "static"] += 1
        return None
    return Scene(index, start, end, fps, frames, frame_indices, groups, (top, bottom, left, right))


def scan_video(path: str, cfg: IngestConfig, scan: VideoScan) -> Iterator[Scene]:
    """Yields the usable scenes of a local video file in order; fills `scan` as it goes. Raises VideoRejected."""
    from scenedetect import ContentDetector, FrameTimecode

    container, stream = open_video(path, cfg.decode_threads)
    with container:
        fps = float(stream.average_rate or stream.guessed_rate or 25)
        scan.fps, scan.codec = fps, stream.codec_context.name
        detector = ContentDetector(threshold=cfg.scene_threshold, min_scene_len=max(1, int(cfg.min_scene_s * fps)))
        stride = max(1, int(round(fps / cfg.candidate_fps)))
        max_scene = max(2, int(cfg.max_scene_s * fps))
        candidates: list[tuple[int, np.ndarray]] = []
        start = n = 0
        out_size = detect_size = None
        scene_number = 0
        try:
            for frame in container.decode(stream):
                if out_size is None:
                    scan.width, scan.height = frame.width, frame.height
                    out_size = output_size(frame.width, frame.height, cfg.max_side)
                    detect_size = output_size(frame.width, frame.height, cfg.detect_side)
                rgb = frame.to_ndarray(format="rgb24")  # (H, W, 3); PyAV's own rescaling is far slower than cv2's
                small = np.ascontiguousarray(resize(rgb, detect_size)[..., ::-1])  # (h, w, 3) BGR for OpenCV
                cuts = [int(c.frame_num) for c in detector.process_frame(FrameTimecode(n, fps), small)]
                if n - start >= max_scene:
                    cuts.append(n)
                for cut in cuts:
                    if cut <= start:
                        continue
                    scene = sample_scene(scene_number, start, cut, fps, [c for c in candidates if c[0] < cut],
                                         cfg, scan.dropped)
                    scene_number += 1
                    if scene is not None:
                        yield scene
                    candidates = [c for c in candidates if c[0] >= cut]
                    start = cut
                if (n - start) % stride == 0:
                    candidates.append((n, resize(rgb, out_size)))
                n += 1
        except av.FFmpegError as exc:
            if n == 0:
                raise VideoRejected("corrupt", f"no frame decodes ({exc})") from None
            scan.truncated = f"decoding stopped after frame {n}: {exc}"
        scan.frames = n
        if n == 0:
            raise VideoRejected("corrupt", "the video stream holds no frames")
        if n > start:
            scene = sample_scene(scene_number, start, n, fps, candidates, cfg, scan.dropped)
            if scene is not None:
                yield scene
