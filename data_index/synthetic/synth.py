"""`vincie data synth`: generate synthetic sessions into shards (and optionally videos), then index them.

The run is deterministic and resumable: session i of (split, seed) is always the same, shard j always holds
sessions [j*shard_size, (j+1)*shard_size), and the run's settings are written first as `synth.yaml`. A rerun with
the same settings skips the shards that are complete and makes the rest; a rerun with other settings is refused
unless --overwrite is given.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import time
from dataclasses import dataclass, field

import yaml

from data_index.synthetic.videos import CODECS, write_videos
from data_index.synthetic.world import SPLIT_IDS, generate_session
from vincie import storage
from vincie.config import StorageConfig, SynthConfig
from vincie.errors import VincieError
from vincie.progress import Progress
from vincie.sessions import index as session_index
from vincie.sessions.shards import SHARD_SUFFIX, shard_name, write_shard

SETTINGS_FILE = "synth.yaml"


@dataclass
class SynthJob:
    out: str
    sessions: int
    split: str
    seed: int
    synth: SynthConfig
    videos: str = ""  # URL for video files; empty: none
    video_codecs: list[str] = field(default_factory=lambda: ["vp9", "h264"])
    fps: int = 8
    hold_frames: int = 8

    def settings(self) -> dict:
        """What determines the output bytes: compared on resume."""
        return {"sessions": self.sessions, "split": self.split, "seed": self.seed,
                "synth": dataclasses.asdict(self.synth), "videos": self.videos,
                "video_codecs": self.video_codecs if self.videos else [], "fps": self.fps,
                "hold_frames": self.hold_frames}

    @property
    def num_shards(self) -> int:
        return math.ceil(self.sessions / self.synth.shard_size)

    def shard_range(self, shard: int) -> range:
        size = self.synth.shard_size
        return range(shard * size, min((shard + 1) * size, self.sessions))


def check_job(job: SynthJob) -> None:
    if job.sessions < 1:
        raise VincieError(f"--sessions must be >= 1, got {job.sessions}")
    if job.split not in SPLIT_IDS:
        raise VincieError(f"--split must be one of {', '.join(SPLIT_IDS)}, got {job.split!r}")
    if job.seed < 0:
        raise VincieError(f"--seed must be >= 0, got {job.seed}")
    for codec in job.video_codecs:
        if codec not in CODECS:
            raise VincieError(f"unknown video codec {codec!r} (expected some of: {', '.join(CODECS)})")


def make_shard(job: SynthJob, shard: int, cfg: StorageConfig) -> tuple[int, int, float]:
    start = time.perf_counter()
    items = [generate_session(job.synth, job.split, job.seed, i) for i in job.shard_range(shard)]
    if job.videos:
        for item in items:
            write_videos(item, job.videos, job.video_codecs, job.fps, job.hold_frames, job.synth.noise_std, cfg)
    count = write_shard(storage.join(job.out, shard_name(shard)), (item.session for item in items), cfg,
                        job.synth.image_format, job.synth.jpeg_quality)
    return shard, count, time.perf_counter() - start


def _make_shard_star(args: tuple) -> tuple[int, int, float]:
    return make_shard(*args)


def prepare_output(job: SynthJob, cfg: StorageConfig, overwrite: bool) -> set[int]:
    """Checks the output location against an earlier run; returns the shard numbers already complete."""
    storage.makedirs(job.out, cfg)
    settings_url = storage.join(job.out, SETTINGS_FILE)
    existing_shards = storage.list_files(job.out, SHARD_SUFFIX, cfg)
    if storage.exists(settings_url, cfg):
        previous = yaml.safe_load(storage.read_bytes(settings_url, cfg))
        if previous != job.settings() and not overwrite:
            differ = sorted(k for k in job.settings() if previous.get(k) != job.settings()[k])
            raise VincieError(f"{job.out} already holds a synth run with other settings (differs in: "
                              f"{', '.join(differ)}); pass --overwrite to replace it, or choose another --out")
        if previous != job.settings():
            existing_shards = clear_output(job.out, existing_shards, cfg)
    elif existing_shards:
        if not overwrite:
            raise VincieError(f"{job.out} already holds {len(existing_shards)} shards from something other than "
                              "this synth run; pass --overwrite to replace them, or choose another --out")
        existing_shards = clear_output(job.out, existing_shards, cfg)
    if not storage.is_remote(job.out):  # writers killed earlier leave temp files; nobody else writes here
        for name in os.listdir(job.out):
            if storage.is_temp_name(name):
                os.remove(os.path.join(job.out, name))
    storage.write_bytes_atomic(settings_url, yaml.safe_dump(job.settings(), sort_keys=False).encode(), cfg)
    done = set()
    for url in existing_shards:
        name = url.rsplit("/", 1)[-1]
        number = int(name[len("shard-"):-len(SHARD_SUFFIX)])
        if number < job.num_shards:
            done.add(number)
    return done


def clear_output(out: str, shards: list[str], cfg: StorageConfig) -> list[str]:
    for url in shards + [storage.join(out, session_index.INDEX_FILE)]:
        if storage.exists(url, cfg):
            storage.remove(url, cfg)
    return []


def run_synth(job: SynthJob, cfg: StorageConfig, workers: int = 1, overwrite: bool = False,
              progress: bool = True) -> dict:
    check_job(job)
    done = prepare_output(job, cfg, overwrite)
    todo = [s for s in range(job.num_shards) if s not in done]
    start = time.perf_counter()
    made = 0
    bar = Progress(job.sessions, f"synth {job.split}", "session", initial=sum(len(job.shard_range(s)) for s in done),
                   enabled=progress)
    tasks = [(job, shard, cfg) for shard in todo]
    if workers <= 1 or len(tasks) <= 1:
        results = map(_make_shard_star, tasks)
        for _, count, _ in results:
            made += count
            bar.update(count)
    else:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            for _, count, _ in pool.imap_unordered(_make_shard_star, tasks):
                made += count
                bar.update(count)
    bar.close()
    seconds = time.perf_counter() - start
    table = session_index.build_index(job.out, cfg, progress=progress)
    return {"sessions": table.num_rows, "made": made, "shards": job.num_shards, "skipped_shards": len(done),
            "seconds": seconds, "sessions_per_s": made / seconds if seconds > 0 else float("nan")}
