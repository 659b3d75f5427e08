"""Storage behind fsspec URLs: local paths and `s3://bucket/prefix` (s3fs), atomic writes, one-line errors.

S3 endpoint and region come from the config's `storage` section or, when that is empty, from the usual AWS
environment variables (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION); credentials come only from the
environment or the AWS config files, so nothing secret passes through vincie's config or logs.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
import uuid
from typing import Iterator

import fsspec

from vincie.config import StorageConfig
from vincie.errors import VincieError


class StorageError(VincieError):
    pass


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def s3_endpoint(cfg: StorageConfig) -> str | None:
    return cfg.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def storage_options(url: str, cfg: StorageConfig) -> dict:
    if not url.startswith("s3://"):
        return {}
    client_kwargs = {}
    if s3_endpoint(cfg):
        client_kwargs["endpoint_url"] = s3_endpoint(cfg)
    region = cfg.s3_region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        client_kwargs["region_name"] = region
    return {
        "client_kwargs": client_kwargs,
        "config_kwargs": {"connect_timeout": cfg.connect_timeout_s, "read_timeout": cfg.read_timeout_s,
                          "retries": {"max_attempts": cfg.max_attempts, "mode": "standard"}},
        "use_listings_cache": False,
        "skip_instance_cache": True,
    }


def filesystem(url: str, cfg: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """URL -> (filesystem, path inside it)."""
    cfg = cfg or StorageConfig()
    return fsspec.core.url_to_fs(url, **storage_options(url, cfg))


def join(url: str, *parts: str) -> str:
    if is_remote(url):
        return posixpath.join(url.rstrip("/"), *parts)
    return os.path.join(url, *parts)


def describe_error(url: str, exc: BaseException, cfg: StorageConfig) -> str:
    """One line saying what went wrong with `url`, for errors from local disks, s3fs and botocore alike."""
    name = type(exc).__name__
    text = str(exc).splitlines()[0] if str(exc) else name
    if isinstance(exc, FileNotFoundError):
        return f"{url}: no such file, directory or bucket"
    if isinstance(exc, PermissionError):
        return f"{url}: permission denied ({text})"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionRefusedError",
                "ServerDisconnectedError", "ReadTimeoutError"):
        return f"{url}: cannot reach the S3 endpoint {s3_endpoint(cfg) or '(AWS default)'} ({text})"
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return f"{url}: no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
    return f"{url}: {name}: {text}"


@contextlib.contextmanager
def storage_errors(url: str, cfg: StorageConfig | None = None) -> Iterator[None]:
    """Turns storage exceptions into one-line StorageErrors naming the URL."""
    try:
        yield
    except VincieError:
        raise
    except (OSError, ValueError) as exc:
        raise StorageError(describe_error(url, exc, cfg or StorageConfig())) from exc
    except Exception as exc:  # botocore/aiohttp errors are not OSErrors
        if type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "s3fs"):
            raise StorageError(describe_error(url, exc, cfg or StorageConfig())) from exc
        raise


def temp_name(path: str) -> str:
    """A sibling name for an in-progress write; readers ignore names containing `.tmp-`."""
    return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def is_temp_name(path: str) -> bool:
    return ".tmp-" in posixpath.basename(path)


def makedirs(url: str, cfg: StorageConfig | None = None) -> None:
    fs, path = filesystem(url, cfg)
    with storage_errors(url, cfg):
        if not is_remote(url):
            fs.makedirs(path, exist_ok=True)
        elif url.startswith("s3://"):
            bucket = path.split("/")[0]
            if not fs.exists(bucket):
                raise StorageError(f"{url}: bucket '{bucket}' does not exist (create it first)")


def put_file_atomic(local_path: str, url: str, cfg: StorageConfig | None = None) -> None:
    """Publish a finished local file at `url` so that readers see all of it or nothing.

    Local: rename within the destination directory. S3: one PUT (or a multipart upload), which only becomes
    visible when it completes."""
    fs, path = filesystem(url, cfg)
    with storage_errors(url, cfg):
        if is_remote(url):
            fs.put_file(local_path, path)
            return
        fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if os.path.dirname(os.path.abspath(local_path)) == os.path.dirname(os.path.abspath(path)):
            os.replace(local_path, path)
            return
        tmp = temp_name(path)
        try:
            fs.put_file(local_path, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def write_bytes_atomic(url: str, data: bytes, cfg: StorageConfig | None = None) -> None:
    if is_remote(url):
        fs, path = filesystem(url, cfg)
        with storage_errors(url, cfg):
            fs.pipe_file(path, data)
        return
    directory = os.path.dirname(os.path.abspath(url))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(url) + ".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, url)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_bytes(url: str, cfg: StorageConfig | None = None) -> bytes:
    fs, path = filesystem(url, cfg)
    with storage_errors(url, cfg):
        return fs.cat_file(path)


def exists(url: str, cfg: StorageConfig | None = None) -> bool:
    fs, path = filesystem(url, cfg)
    with storage_errors(url, cfg):
        return fs.exists(path)


def list_files(url: str, suffix: str, cfg: StorageConfig | None = None) -> list[str]:
    """Complete files directly under `url` whose names end in `suffix`, as full URLs, sorted."""
    fs, path = filesystem(url, cfg)
    with storage_errors(url, cfg):
        if not fs.exists(path):
            return []
        names = fs.ls(path, detail=False)
    found = [n for n in names if n.endswith(suffix) and not is_temp_name(n)]
    return sorted(join(url, posixpath.basename(n)) for n in found)


def remove(url: str, cfg: StorageConfig | None = None) -> None:
    fs, path = filesystem(url, cfg)
    with storage_errors(url, cfg):
        fs.rm_file(path)
