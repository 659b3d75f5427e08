"""The session index: one parquet row per session, the table that drives sampling, splits and statistics.

`<root>/index.parquet` lists every session of the complete shards directly under `<root>`: where it lives
(shard, byte offset and size of its tar members) and what it is (turns, resolution, masks, split, source,
annotators, quality). It is rebuilt from the shards by `build`, checked against them by `verify`.
"""

from __future__ import annotations

import hashlib
import io
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vincie import storage
from vincie.config import StorageConfig
from vincie.errors import VincieError
from vincie.progress import track
from vincie.sessions.session import SessionFormatError, parse_header, sample_to_session
from vincie.sessions.shards import SHARD_SUFFIX, ScannedSample, ShardError, scan_shard

INDEX_FILE = "index.parquet"
SCHEMA = pa.schema([
    ("id", pa.string()),
    ("shard", pa.string()),  # file name of the shard, relative to the dataset root
    ("offset", pa.int64()),  # byte offset of the session's first tar header in the shard
    ("size", pa.int64()),  # bytes of the session's tar members, headers included
    ("turns", pa.int32()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("has_masks", pa.bool_()),
    ("split", pa.string()),
    ("source", pa.string()),
    ("scene", pa.string()),  # source video / scene id: sessions of one scene stay in one split
    ("text_annotator", pa.string()),
    ("mask_annotator", pa.string()),
    ("quality", pa.float32()),  # annotation quality in 0..1 (1 = exact ground truth)
    ("instruction_words", pa.float32()),  # mean words per instruction
    ("mask_area", pa.float32()),  # mean share of the image covered by the turn masks; NaN without masks
])


class SessionIndexError(VincieError):
    pass


def index_url(root: str) -> str:
    return storage.join(root, INDEX_FILE)


def row_from_sample(shard: str, sample: ScannedSample) -> dict:
    if "json" not in sample.members:
        raise SessionFormatError(f"session {sample.key}: missing json member")
    header = parse_header(sample.key, sample.members["json"])
    meta = header["meta"]
    words = [len(t.split()) for t in header["instructions"]]
    areas = meta.get("mask_areas") or []
    annotators = meta.get("annotators", {})
    return {
        "id": sample.key,
        "shard": shard,
        "offset": sample.offset,
        "size": sample.size,
        "turns": len(header["instructions"]),
        "width": header["width"],
        "height": header["height"],
        "has_masks": header["has_masks"],
        "split": str(meta.get("split", "train")),
        "source": str(meta.get("source", "unknown")),
        "scene": str(meta.get("scene", sample.key)),
        "text_annotator": str(annotators.get("text", "")),
        "mask_annotator": str(annotators.get("masks", "")),
        "quality": float(meta.get("quality", float("nan"))),
        "instruction_words": float(np.mean(words)) if words else 0.0,
        "mask_area": float(np.mean(areas)) if areas else float("nan"),
    }


def index_shard(url: str, cfg: StorageConfig | None) -> tuple[list[dict], list[str]]:
    """Rows for one shard, and a line for each sample that could not be indexed."""
    shard = url.rstrip("/").rsplit("/", 1)[-1]
    rows, problems = [], []
    try:
        for sample in scan_shard(url, cfg):
            try:
                rows.append(row_from_sample(shard, sample))
            except SessionFormatError as exc:
                problems.append(f"{shard}: {exc}")
    except ShardError as exc:
        problems.append(str(exc))
    return rows, problems


def build_index(root: str, cfg: StorageConfig | None = None, progress: bool = True, threads: int = 8) -> pa.Table:
    """Scans every complete shard under `root` and writes `<root>/index.parquet` atomically."""
    shards = storage.list_files(root, SHARD_SUFFIX, cfg)
    if not shards:
        raise SessionIndexError(f"{root}: no shards (*{SHARD_SUFFIX}) to index")
    rows, problems = [], []
    with ThreadPoolExecutor(threads) as pool:
        for shard_rows, shard_problems in track(pool.map(lambda u: index_shard(u, cfg), shards), len(shards),
                                                "index build", "shard", enabled=progress):
            rows += shard_rows
            problems += shard_problems
    for line in problems:
        print(f"index build: skipped: {line}", file=sys.stderr)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    write_index(root, table, cfg)
    return table


def write_index(root: str, table: pa.Table, cfg: StorageConfig | None = None) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(index_url(root), buf.getvalue(), cfg)


def read_index(root: str, cfg: StorageConfig | None = None) -> pa.Table:
    url = index_url(root)
    if not storage.exists(url, cfg):
        raise SessionIndexError(f"{root}: no {INDEX_FILE} (run: vincie data index build {root})")
    # Arrow reads from a copy in its own memory, not from a Python object (BytesIO, bytes): its scan threads drop
    # their last reference to the input after read_table has returned, and freeing a Python object takes the GIL,
    # which, once the interpreter is exiting, ends the thread inside a C++ destructor: std::terminate, SIGABRT
    # ("terminate called without an active exception") after a command's correct output
    data = pa.BufferOutputStream()
    data.write(storage.read_bytes(url, cfg))
    try:
        return pq.read_table(pa.BufferReader(data.getvalue()))
    except pa.ArrowInvalid as exc:
        raise SessionIndexError(f"{url}: not a readable parquet file ({exc})") from None


# ---------------------------------------------------------------------------------------------------------------
# verify


def verify_shard(url: str, shard: str, expected: dict[str, dict], cfg: StorageConfig | None,
                 decode: bool) -> list[str]:
    problems, seen = [], set()
    try:
        for sample in scan_shard(url, cfg):
            row = expected.get(sample.key)
            if row is None:
                problems.append(f"{shard}: session {sample.key} is in the shard but not in the index")
                continue
            seen.add(sample.key)
            if (row["offset"], row["size"]) != (sample.offset, sample.size):
                problems.append(f"{shard}: session {sample.key} is at offset {sample.offset} (size {sample.size}), "
                                f"the index says offset {row['offset']} (size {row['size']})")
            try:
                if decode:
                    session = sample_to_session({"__key__": sample.key, **sample.members})
                    actual = {"turns": session.turns, "width": session.width, "height": session.height,
                              "has_masks": session.has_masks}
                else:
                    actual = {k: v for k, v in row_from_sample(shard, sample).items()
                              if k in ("turns", "width", "height", "has_masks")}
            except SessionFormatError as exc:
                problems.append(f"{shard}: corrupt sample: {exc}")
                continue
            for name, value in actual.items():
                if row[name] != value:
                    problems.append(f"{shard}: session {sample.key}: {name} is {value} in the shard, "
                                    f"{row[name]} in the index")
    except ShardError as exc:
        problems.append(str(exc))
    for key in sorted(set(expected) - seen):
        problems.append(f"{shard}: session {key} is in the index but not in the shard")
    return problems


def verify(root: str, cfg: StorageConfig | None = None, decode: bool = True, progress: bool = True,
           threads: int = 8) -> tuple[int, list[str]]:
    """Checks index and shards agree; returns (sessions checked, a line per disagreement)."""
    table = read_index(root, cfg)
    rows = table.to_pylist()
    problems = []
    counts = defaultdict(int)
    for row in rows:
        counts[row["id"]] += 1
    problems += [f"session {key} is listed {n} times in the index" for key, n in sorted(counts.items()) if n > 1]
    by_shard: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        by_shard[row["shard"]][row["id"]] = row
    on_storage = {url.rsplit("/", 1)[-1]: url for url in storage.list_files(root, SHARD_SUFFIX, cfg)}
    work = []
    for shard in sorted(set(by_shard) | set(on_storage)):
        if shard not in on_storage:
            problems.append(f"{shard}: listed in the index ({len(by_shard[shard])} sessions) but missing from storage")
        elif shard not in by_shard:
            problems.append(f"{shard}: on storage but not in the index")
        else:
            work.append((on_storage[shard], shard, by_shard[shard]))
    with ThreadPoolExecutor(threads) as pool:
        results = pool.map(lambda w: verify_shard(*w, cfg, decode), work)
        for shard_problems in track(results, len(work), "index verify", "shard", enabled=progress):
            problems += shard_problems
    return len(rows), problems


# ---------------------------------------------------------------------------------------------------------------
# split


def assign_splits(table: pa.Table, val: float, test: float) -> pa.Table:
    """Deterministic split by scene: a scene's sessions share a split, so near-duplicates never cross it."""
    if val < 0 or test < 0 or val + test >= 1:
        raise VincieError(f"--val and --test must be >= 0 and sum below 1, got {val} and {test}")

    def bucket(scene: str) -> float:
        return int.from_bytes(hashlib.sha256(scene.encode()).digest()[:8], "big") / 2.0 ** 64

    splits = []
    for scene in table.column("scene").to_pylist():
        u = bucket(scene)
        splits.append("test" if u < test else "val" if u < test + val else "train")
    return table.set_column(table.schema.get_field_index("split"), "split", pa.array(splits, pa.string()))


# ---------------------------------------------------------------------------------------------------------------
# stats


def summarize(table: pa.Table) -> dict:
    rows = table.to_pydict()
    n = table.num_rows

    def counts(column: str) -> dict:
        values, freq = np.unique(np.asarray(rows[column], dtype=object).astype(str), return_counts=True)
        return {str(v): int(c) for v, c in zip(values, freq)}

    turns = np.asarray(rows["turns"], dtype=np.int64)
    areas = np.asarray(rows["mask_area"], dtype=np.float64)
    return {
        "sessions": n,
        "shards": len(set(rows["shard"])),
        "turns_total": int(turns.sum()),
        "images_total": int((turns + 1).sum()),
        "turns_histogram": {str(k): v for k, v in sorted(counts("turns").items(), key=lambda kv: int(kv[0]))},
        "split": counts("split"),
        "source": counts("source"),
        "resolution": {f"{w}x{h}": int(c) for (w, h), c in
                       zip(*np.unique(np.stack([rows["width"], rows["height"]], 1), axis=0, return_counts=True))}
        if n else {},
        "with_masks": int(np.sum(rows["has_masks"])),
        "instruction_words_mean": float(np.mean(rows["instruction_words"])) if n else 0.0,
        "mask_area_mean": float(np.nanmean(areas)) if n and np.isfinite(areas).any() else None,
        "text_annotator": counts("text_annotator"),
        "per_source": {source: source_summary(table.filter(pc.equal(table.column("source"), source)))
                       for source in sorted(set(rows["source"]))},
    }


def source_summary(table: pa.Table) -> dict:
    """Sessions, turns, instruction length, mask area and quality of one source's rows."""
    turns = np.asarray(table.column("turns").to_pylist(), dtype=np.int64)
    words = np.asarray(table.column("instruction_words").to_pylist(), dtype=np.float64)
    areas = np.asarray(table.column("mask_area").to_pylist(), dtype=np.float64)
    quality = np.asarray(table.column("quality").to_pylist(), dtype=np.float64)
    return {"sessions": table.num_rows, "turns_total": int(turns.sum()), "turns_mean": float(turns.mean()),
            "instruction_words_mean": float(words.mean()),
            "mask_area_mean": float(np.nanmean(areas)) if np.isfinite(areas).any() else None,
            "quality_mean": float(np.nanmean(quality)) if np.isfinite(quality).any() else None}


def plot_stats(table: pa.Table, path: str, cfg: StorageConfig | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table.to_pydict()
    sources = sorted(set(rows["source"]))
    column = {name: np.asarray(rows[name], dtype=np.float64) for name in ("turns", "instruction_words", "mask_area")}
    of_source = [np.asarray(rows["source"]) == source for source in sources]  # one row mask per source
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    turns = column["turns"]
    panels = ((axes[0], "turns", np.arange(turns.min(), turns.max() + 2) - 0.5, "turns per session", "turns"),
              (axes[1], "instruction_words", 30, "instruction length", "mean words per instruction"),
              (axes[2], "mask_area", 30, "region-of-editing area", "mean mask share of image"))
    for ax, name, bins, title, xlabel in panels:
        values = [column[name][m] for m in of_source]
        values = [v[np.isfinite(v)] for v in values]
        if any(v.size for v in values):
            ax.hist([v for v in values], bins=bins, stacked=True, label=sources, rwidth=0.9)
        ax.set(title=title, xlabel=xlabel, ylabel="sessions")
    axes[0].legend(fontsize=8)
    axes[3].bar(sources, [int(m.sum()) for m in of_source], color="#8172b2")
    axes[3].set(title="sessions per source", ylabel="sessions")
    fig.suptitle(f"{table.num_rows} sessions")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes_atomic(path, buf.getvalue(), cfg)
