"""`vincie data ingest`: a pile of videos (local dir or S3) -> session shards, an index and a manifest.

Worker processes each take one video: decode, cut and sample it (data_index/ingest/scenes.py), annotate every frame pair
(data_index/ingest/annotators.py) and return its sessions as encoded WebDataset samples. The parent writes them into
shards of whole videos (`ingest.shard_size` sessions, a little more when a video straddles the limit), published
atomically, and after each shard a manifest part beside it: one JSON line per video with its outcome (sessions
made, or the reason for none: empty, corrupt, no_video, unsupported_codec, too_short, static, filtered_*), the
shard its sessions are in. `manifest/part-N.jsonl` belongs to `shard-N.tar` (a part may have no shard when none of
its videos made sessions).

Resumable and idempotent by video id (the video's path under --videos): a rerun skips every video whose outcome
is recorded as done. A shard without its manifest part is what a run killed between the two writes leaves; it is
removed on the next start and its videos are made again. Transient failures (the VLM endpoint or storage not
answering) are recorded as `failed` and retried by the next run. The run's settings go to `ingest.yaml`; a rerun
with other settings is refused unless --overwrite.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import posixpath
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import yaml

from data_index.ingest.annotators import make_mask_annotator, make_text_annotator
from data_index.ingest.regions import region_change, where
from data_index.ingest.scenes import Scene, VideoRejected, VideoScan, scan_video
from vincie import storage
from vincie.config import Config, to_dict
from vincie.errors import VincieError
from vincie.progress import Progress
from vincie.sessions import index as session_index
from vincie.sessions.session import Session, session_to_sample
from vincie.sessions.shards import SHARD_SUFFIX, ShardWriter, shard_name

SETTINGS_FILE = "ingest.yaml"
MANIFEST_DIR = "manifest"
MANIFEST_FILE = "manifest.jsonl"
PART_SUFFIX = ".jsonl"
TRANSIENT = "failed"  # a status retried on the next run


@dataclass
class VideoTask:
    url: str
    rel: str  # path under the --videos root
    video_id: str


def video_id(rel: str) -> str:
    """A stable id for a video path: readable stem plus a hash of the whole path (no '.' or '/': a session key)."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", posixpath.splitext(rel)[0])[-48:].strip("_") or "video"
    return f"{stem}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}"


def list_videos(url: str, extensions: list[str], cfg) -> list[VideoTask]:
    fs, root = storage.filesystem(url, cfg)
    with storage.storage_errors(url, cfg):
        if not fs.exists(root):
            raise VincieError(f"--videos {url}: no such directory or bucket prefix")
        found = sorted(fs.find(root))
    wanted = tuple(e.lower() for e in extensions)
    tasks = []
    for path in found:
        rel = posixpath.relpath(path, root.rstrip("/")) if path != root else posixpath.basename(path)
        if rel.lower().endswith(wanted) and not storage.is_temp_name(rel):
            tasks.append(VideoTask(storage.join(url, rel) if storage.is_remote(url) else os.path.join(url, rel),
                                   rel, video_id(rel)))
    return tasks


# ---------------------------------------------------------------------------------------------------------------
# worker side

_worker: dict = {}


def init_worker(cfg: Config, cache_dir: str, processes: int) -> None:
    """Per process: the annotators (a VLM client keeps its rate limiter across videos)."""
    _worker["cfg"] = cfg
    _worker["text"] = make_text_annotator(cfg.ingest, cache_dir, processes)
    _worker["masks"] = make_mask_annotator(cfg.ingest)


def scene_sessions(scene: Scene, task: VideoTask, scan: VideoScan, cfg: Config) -> list[Session]:
    g = cfg.ingest
    text, masks = _worker["text"], _worker["masks"]
    sessions = []
    part = 0
    for group in scene.groups:
        for start in range(0, len(group) - 1, g.max_turns):
            chunk = group[start:start + g.max_turns + 1]
            if len(chunk) - 1 < g.min_turns:
                continue
            images = [scene.frames[p] for p in chunk]
            instructions, curs, nexts, changes = [], [], [], []
            for a, b in zip(images, images[1:]):
                change = region_change(a, b, g)
                instruction = text.instruction(a, b, change)
                cur, nxt = masks.masks(a, b, change, instruction)
                instructions.append(instruction)
                curs.append(np.asarray(cur, bool))
                nexts.append(np.asarray(nxt, bool))
                changes.append({"kind": change.kind, "changed_share": round(change.changed_share, 5),
                                "where": where(change.cur | change.next) if change.cur.any() else "",
                                "shift": list(change.shift)})
            frame_indices = [scene.frame_indices[p] for p in chunk]
            key = f"{task.video_id}-{scene.index:04d}-{part:02d}"
            part += 1
            meta = {
                "source": g.source,
                "video": task.rel,
                "video_id": task.video_id,
                "scene": f"{task.video_id}-{scene.index:04d}",
                "split": "train",
                "fps": scene.fps,
                "frame_indices": frame_indices,
                "frame_times": [round(f / scene.fps, 4) for f in frame_indices],
                "scene_frames": [scene.start_frame, scene.end_frame],
                "crop": list(scene.crop),
                "original_size": [scan.width, scan.height],
                "resolution": [images[0].shape[1], images[0].shape[0]],
                "codec": scan.codec,
                "annotators": {"text": text.name, "masks": masks.name},
                "annotator_versions": text.versions(),
                "quality": text.quality,
                "mask_areas": [[float(c.mean()), float(n.mean())] for c, n in zip(curs, nexts)],
                "changes": changes,
            }
            sessions.append(Session(key=key, images=images, instructions=instructions, cur_masks=curs,
                                    next_masks=nexts, meta=meta))
    return sessions


def process_video(task: VideoTask) -> tuple[dict, list[dict]]:
    """One video -> (its manifest record, its sessions as WebDataset samples)."""
    cfg = _worker["cfg"]
    start, cpu_start = time.perf_counter(), time.process_time()
    record = {"video": task.rel, "id": task.video_id, "status": "done", "reason": "ok", "detail": "",
              "sessions": 0, "turns": 0, "scenes": 0}
    samples = []
    scan = VideoScan()
    tmp = None
    try:
        path = task.url
        if storage.is_remote(task.url):
            fd, tmp = tempfile.mkstemp(suffix=posixpath.splitext(task.rel)[1])
            os.close(fd)
            fs, remote = storage.filesystem(task.url, cfg.storage)
            with storage.storage_errors(task.url, cfg.storage):
                fs.get_file(remote, tmp)
            path = tmp
        for scene in scan_video(path, cfg.ingest, scan):
            record["scenes"] += 1
            for session in scene_sessions(scene, task, scan, cfg):
                samples.append(session_to_sample(session, cfg.ingest.image_format, cfg.ingest.jpeg_quality))
                record["sessions"] += 1
                record["turns"] += session.turns
        if not samples:
            reasons = scan.dropped.most_common()
            record["reason"] = reasons[0][0] if reasons else "static"
            record["detail"] = ", ".join(f"{n} scene(s) {r}" for r, n in reasons) or "no scene"
    except VideoRejected as exc:
        record.update(reason=exc.reason, detail=exc.detail)
        samples = []
    except VincieError as exc:  # the VLM endpoint or storage: worth another try on the next run
        record.update(status=TRANSIENT, reason="error", detail=str(exc).splitlines()[0])
        samples = []
    except Exception as exc:  # anything else one odd video triggers must not end a run over millions
        record.update(status=TRANSIENT, reason="error",
                      detail=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        samples = []
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
    record.update(frames=scan.frames, fps=round(scan.fps, 3), codec=scan.codec, truncated=scan.truncated,
                  dropped=dict(scan.dropped), seconds=round(time.perf_counter() - start, 3),
                  cpu_seconds=round(time.process_time() - cpu_start, 3))
    return record, samples


# ---------------------------------------------------------------------------------------------------------------
# parent side


def part_url(out: str, number: int) -> str:
    return storage.join(out, MANIFEST_DIR, f"part-{number:06d}{PART_SUFFIX}")


def read_manifest(out: str, cfg=None) -> list[dict]:
    """Every recorded video outcome, latest last (a video retried after a failure appears more than once)."""
    records = []
    for url in storage.list_files(storage.join(out, MANIFEST_DIR), PART_SUFFIX, cfg):
        records += [json.loads(line) for line in storage.read_bytes(url, cfg).decode().splitlines() if line]
    return records


def number_of(url: str, prefix: str, suffix: str) -> int:
    return int(url.rsplit("/", 1)[-1][len(prefix):-len(suffix)])


def prepare_output(out: str, cfg: Config, overwrite: bool) -> int:
    """Checks --out against earlier runs, removes shards without a manifest part; -> the next part number."""
    storage.makedirs(out, cfg.storage)
    settings = {"ingest": to_dict(cfg.ingest)}
    settings_url = storage.join(out, SETTINGS_FILE)
    shards = storage.list_files(out, SHARD_SUFFIX, cfg.storage)
    parts = storage.list_files(storage.join(out, MANIFEST_DIR), PART_SUFFIX, cfg.storage)
    if storage.exists(settings_url, cfg.storage):
        previous = yaml.safe_load(storage.read_bytes(settings_url, cfg.storage))
        if previous != settings:
            if not overwrite:
                differ = sorted(k for k in settings["ingest"] if previous.get("ingest", {}).get(k)
                                != settings["ingest"][k])
                raise VincieError(f"{out} already holds an ingest run with other settings (differs in: "
                                  f"{', '.join('ingest.' + k for k in differ)}); pass --overwrite to replace it, "
                                  f"or choose another --out")
            for url in shards + parts:
                storage.remove(url, cfg.storage)
            shards, parts = [], []
    elif shards and not overwrite:
        raise VincieError(f"{out} already holds {len(shards)} shards from something other than an ingest run; "
                          f"pass --overwrite to replace them, or choose another --out")
    elif shards:
        for url in shards:
            storage.remove(url, cfg.storage)
        shards = []
    recorded = {number_of(u, "part-", PART_SUFFIX) for u in parts}
    for url in shards:
        if number_of(url, "shard-", SHARD_SUFFIX) not in recorded:
            storage.remove(url, cfg.storage)  # written by a run killed before its manifest part
    if not storage.is_remote(out):
        for name in os.listdir(out):
            if storage.is_temp_name(name):
                os.remove(os.path.join(out, name))
    storage.write_bytes_atomic(settings_url, yaml.safe_dump(settings, sort_keys=False).encode(), cfg.storage)
    return max(recorded, default=-1) + 1


class ShardSink:
    """Collects finished videos; publishes a shard (then its manifest part) every `shard_size` sessions."""

    def __init__(self, out: str, cfg: Config, number: int):
        self.out, self.cfg, self.number = out, cfg, number
        self.records: list[dict] = []
        self.samples: list[dict] = []

    def add(self, record: dict, samples: list[dict]) -> None:
        self.records.append(record)
        self.samples += samples
        if len(self.samples) >= self.cfg.ingest.shard_size or len(self.records) >= 4 * self.cfg.ingest.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.records:
            return
        if self.samples:
            name = shard_name(self.number)
            with ShardWriter(storage.join(self.out, name), self.cfg.storage) as writer:
                for sample in self.samples:
                    writer.write_sample(sample)
            for record in self.records:
                record["shard"] = name if record["sessions"] else None
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records)
        storage.write_bytes_atomic(part_url(self.out, self.number), lines.encode(), self.cfg.storage)
        self.number += 1
        self.records, self.samples = [], []


def default_cache_dir(out: str) -> str:
    if storage.is_remote(out):
        return os.path.join(os.path.expanduser("~"), ".cache", "vincie", "vlm")
    return os.path.join(out, "vlm_cache")


def run_ingest(videos: str, out: str, cfg: Config, workers: int = 1, overwrite: bool = False,
               progress: bool = True) -> dict:
    tasks = list_videos(videos, cfg.ingest.extensions, cfg.storage)
    cache_dir = cfg.ingest.vlm.cache_dir or default_cache_dir(out)
    init_worker(cfg, cache_dir, workers)  # here too: a bad annotator setting fails before any work
    number = prepare_output(out, cfg, overwrite)
    done = {r["id"] for r in read_manifest(out, cfg.storage) if r["status"] == "done"}
    todo = [t for t in tasks if t.video_id not in done]
    sink = ShardSink(out, cfg, number)
    outcomes: Counter = Counter()
    made = {"sessions": 0, "turns": 0, "videos": 0, "cpu_seconds": 0.0}
    start = time.perf_counter()
    bar = Progress(len(tasks), "ingest", "video", initial=len(tasks) - len(todo), enabled=progress)

    def take(record: dict, samples: list[dict]) -> None:
        sink.add(record, samples)
        outcomes[record["reason"] if record["status"] == "done" else "failed"] += 1
        made["sessions"] += record["sessions"]
        made["turns"] += record["turns"]
        made["videos"] += 1
        made["cpu_seconds"] += record["cpu_seconds"]
        bar.update(1, {"sessions": str(made["sessions"])})

    try:
        if workers <= 1 or len(todo) <= 1:
            for task in todo:
                take(*process_video(task))
        else:
            with multiprocessing.get_context("spawn").Pool(min(workers, len(todo)), initializer=init_worker,
                                                           initargs=(cfg, cache_dir, workers)) as pool:
                for result in pool.imap_unordered(process_video, todo):
                    take(*result)
    finally:
        sink.flush()  # what finished is kept, also when interrupted
        bar.close()
    seconds = time.perf_counter() - start
    records = read_manifest(out, cfg.storage)
    latest = {r["id"]: r for r in records}
    storage.write_bytes_atomic(storage.join(out, MANIFEST_FILE),
                               "".join(json.dumps(r, sort_keys=True) + "\n" for r in latest.values()).encode(),
                               cfg.storage)
    sessions = 0
    if storage.list_files(out, SHARD_SUFFIX, cfg.storage):
        sessions = session_index.build_index(out, cfg.storage, progress=progress).num_rows
    elif storage.exists(session_index.index_url(out), cfg.storage):
        storage.remove(session_index.index_url(out), cfg.storage)  # left by an overwritten run
    return {"videos": len(tasks), "skipped": len(tasks) - len(todo), "processed": made["videos"],
            "sessions_made": made["sessions"], "turns_made": made["turns"], "sessions": sessions,
            "outcomes": dict(outcomes), "seconds": seconds, "cpu_seconds": made["cpu_seconds"],
            "videos_per_s": made["videos"] / seconds if seconds > 0 else float("nan"),
            "sessions_per_s": made["sessions"] / seconds if seconds > 0 else float("nan")}
