"""Synthetic sessions as real video files with ground truth beside them, the known-answer inputs of real-video ingest.

Each state I_k of a session is held for `hold` frames (state k covers frames [k*hold, (k+1)*hold)); with sensor
noise on, every video frame gets fresh noise, so held frames are not bit-identical, as in a real camera. Next to
`<key>.webm|.avi|.mp4` goes `<key>.gt.json`: fps, the first frame of every state, instructions, transitions, and
the masks' file (`<key>.gt.npz`: cur and next masks, (K, H, W) uint8).
"""

from __future__ import annotations

import io
import json
import os
import tempfile

import numpy as np

from data_index.synthetic.world import SynthSession, quantize
from vincie import storage
from vincie.config import StorageConfig

CODECS = {  # name -> (container suffix, PyAV codec, pixel format, options)
    "vp9": (".webm", "libvpx-vp9", "yuv420p", {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"}),
    "mjpeg": (".avi", "mjpeg", "yuvj420p", {"qmin": "1", "qmax": "2"}),
    "h264": (".mp4", "libx264", "yuv420p", {"preset": "veryfast", "crf": "18"}),
}


def video_frames(item: SynthSession, hold: int, noise_std: float, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng([seed, 7919])
    frames = []
    for clean in item.clean_frames:
        for _ in range(hold):
            frame = clean if noise_std <= 0 else quantize(clean + rng.normal(0, noise_std, clean.shape))
            frames.append(frame)
    return frames


def encode_video(frames: list[np.ndarray], path: str, codec: str, fps: int) -> None:
    import av  # PyAV (FFmpeg) only where videos are written: sessions alone need none

    _, codec_name, pix_fmt, options = CODECS[codec]
    height, width = frames[0].shape[:2]
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec_name, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_videos(item: SynthSession, out_url: str, codecs: list[str], fps: int, hold: int, noise_std: float,
                 cfg: StorageConfig | None = None) -> list[str]:
    """Writes one video per codec plus ground truth for a session; returns the URLs written."""
    session = item.session
    key = session.key
    frames = video_frames(item, hold, noise_std, session.meta["index"])
    ground_truth = {
        "key": key,
        "fps": fps,
        "hold_frames": hold,
        "num_frames": len(frames),
        "state_start_frames": [k * hold for k in range(len(item.clean_frames))],
        "instructions": session.instructions,
        "transitions": session.meta["transitions"],
        "camera_offsets": session.meta["camera_offsets"],
        "width": session.width,
        "height": session.height,
        "masks": f"{key}.gt.npz",
        "videos": {codec: key + CODECS[codec][0] for codec in codecs},
    }
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        for codec in codecs:
            local = os.path.join(tmp, key + CODECS[codec][0])
            encode_video(frames, local, codec, fps)
            url = storage.join(out_url, os.path.basename(local))
            storage.put_file_atomic(local, url, cfg)
            written.append(url)
    buf = io.BytesIO()
    np.savez_compressed(buf, cur=np.stack(session.cur_masks).astype(np.uint8),
                        next=np.stack(session.next_masks).astype(np.uint8))
    for name, data in ((f"{key}.gt.npz", buf.getvalue()),
                       (f"{key}.gt.json", json.dumps(ground_truth, indent=1).encode())):
        url = storage.join(out_url, name)
        storage.write_bytes_atomic(url, data, cfg)
        written.append(url)
    return written
