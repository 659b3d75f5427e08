"""WebDataset tar shards of sessions: atomic writing, streaming reading, and a scan that reports byte offsets.

A shard is a plain tar whose members are `<key>.<suffix>` (the WebDataset convention), written in session order
with fixed metadata (mtime 0, uid 0) so the same sessions always give the same bytes. A shard becomes visible
under its final name only when complete: it is written to a temp file and renamed (local) or uploaded in one
PUT (S3), so a killed writer never leaves a half shard where a reader or the index could take it for whole.
"""

from __future__ import annotations

import importlib
import io
import os
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Iterable, Iterator

from vincie import storage
from vincie.config import StorageConfig
from vincie.errors import VincieError
from vincie.sessions.session import Session, sample_to_session, session_to_sample

SHARD_SUFFIX = ".tar"


class ShardError(VincieError):
    pass


def shard_name(index: int) -> str:
    return f"shard-{index:06d}{SHARD_SUFFIX}"


def split_member_name(name: str) -> tuple[str, str]:
    """`dir/key.000.img.jpg` -> (`dir/key`, `000.img.jpg`), as webdataset splits names (first dot of the base)."""
    head, _, base = name.rpartition("/")
    key, dot, suffix = base.partition(".")
    if not dot:
        raise ShardError(f"tar member {name!r} has no extension (expected <key>.<suffix>)")
    return (f"{head}/{key}" if head else key), suffix


class ShardWriter:
    """Writes one shard. Use as a context manager: a clean exit publishes it, an exception discards it."""

    def __init__(self, url: str, cfg: StorageConfig | None = None, image_format: str = "jpg", jpeg_quality: int = 95):
        self.url, self.cfg = url, cfg
        self.image_format, self.jpeg_quality = image_format, jpeg_quality
        if storage.is_remote(url):
            fd, self.tmp_path = tempfile.mkstemp(suffix=".tar.tmp-upload")
            os.close(fd)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(url)), exist_ok=True)
            self.tmp_path = storage.temp_name(url)
        self.tar = tarfile.open(self.tmp_path, "w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self.tar.addfile(info, io.BytesIO(data))

    def write(self, session: Session) -> None:
        self.write_sample(session_to_sample(session, self.image_format, self.jpeg_quality))

    def write_sample(self, sample: dict[str, bytes | str]) -> None:
        """An already encoded session (`session_to_sample`), e.g. made in another process."""
        for suffix, data in sample.items():
            if suffix != "__key__":
                self.add_member(f"{sample['__key__']}.{suffix}", data)
        self.count += 1

    def close(self) -> None:
        self.tar.close()
        try:
            storage.put_file_atomic(self.tmp_path, self.url, self.cfg)
        finally:
            if os.path.exists(self.tmp_path):
                os.remove(self.tmp_path)

    def abort(self) -> None:
        self.tar.close()
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shard(url: str, sessions: Iterable[Session], cfg: StorageConfig | None = None,
                image_format: str = "jpg", jpeg_quality: int = 95) -> int:
    with ShardWriter(url, cfg, image_format, jpeg_quality) as writer:
        for session in sessions:
            writer.write(session)
    return writer.count


@dataclass
class ScannedSample:
    key: str
    offset: int  # byte offset of the sample's first tar header in the shard
    size: int  # bytes from that header to the end of the sample's last member
    members: dict[str, bytes]  # suffix -> bytes


def scan_shard(url: str, cfg: StorageConfig | None = None) -> Iterator[ScannedSample]:
    """Streams a shard's samples in order with their byte ranges. Raises ShardError on a truncated or
    malformed tar, after yielding every complete sample before the damage."""
    fs, path = storage.filesystem(url, cfg)
    with storage.storage_errors(url, cfg):
        total = fs.size(path)
    current: ScannedSample | None = None
    end = 0
    with storage.storage_errors(url, cfg), fs.open(path, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r|") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    key, suffix = split_member_name(info.name)
                    data = tar.extractfile(info).read()
                    if len(data) != info.size:
                        raise tarfile.ReadError(f"member {info.name} has {len(data)} of {info.size} bytes")
                    end = info.offset_data + info.size
                    if current is not None and current.key == key:
                        current.members[suffix] = data
                        current.size = end - current.offset
                        continue
                    if current is not None:
                        yield current
                    current = ScannedSample(key, info.offset, end - info.offset, {suffix: data})
        except (tarfile.ReadError, EOFError) as exc:
            raise ShardError(f"{url}: truncated or corrupt tar after sample "
                             f"{current.key if current else '(none)'} ({exc})") from None
    # tarfile ends quietly at a cut header; a whole tar ends with two zero blocks after its last member
    if total < -(-end // 512) * 512 + 1024:
        raise ShardError(f"{url}: truncated or corrupt tar after sample {current.key if current else '(none)'} "
                         f"(no end-of-archive marker)")
    if current is not None:
        yield current


def register_s3_with_webdataset(cfg: StorageConfig | None = None) -> None:
    """Let webdataset stream `s3://` URLs through s3fs with vincie's endpoint and retry settings."""
    gopen_module = importlib.import_module("webdataset.gopen")  # `webdataset.gopen` the attribute is a function

    def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_):
        fs, path = storage.filesystem(url, cfg)
        return fs.open(path, mode, block_size=max(bufsize, 8 << 20))

    gopen_module.gopen_schemes["s3"] = gopen_s3


def shard_urls(url: str, cfg: StorageConfig | None = None) -> list[str]:
    """A dataset root -> its complete shards; a URL ending in .tar is taken as one shard."""
    if url.endswith(SHARD_SUFFIX):
        return [url]
    urls = storage.list_files(url, SHARD_SUFFIX, cfg)
    if not urls:
        raise ShardError(f"{url}: no shards (*{SHARD_SUFFIX}) found")
    return urls


def iter_sessions(url: str | list[str], cfg: StorageConfig | None = None) -> Iterator[Session]:
    """Streams every session of a dataset root (or of a list of shard URLs) in shard order, via webdataset."""
    import webdataset as wds

    urls = url if isinstance(url, list) else shard_urls(url, cfg)
    register_s3_with_webdataset(cfg)
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=lambda src: src,
                             workersplitter=lambda src: src, empty_check=False)
    for sample in dataset:
        yield sample_to_session({k: v for k, v in sample.items() if k != "__url__" and k != "__local_path__"})
