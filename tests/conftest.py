"""Shared fixtures: a real S3 server (moto's, on 127.0.0.1) and a helper to run the `vincie` command."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server in this process, on a free loopback port; the AWS variables point every client at it
    (this process's s3fs and the `vincie` subprocesses alike)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL"]
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the test S3 server, created through the real S3 API; yields its s3:// URL."""
    import boto3

    name = f"vincie-test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


def run_vincie(*args: str, check: bool = False, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs `python -m vincie ARGS` as a user would, capturing output."""
    result = subprocess.run([sys.executable, "-m", "vincie", *args], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, **(env or {})}, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"vincie {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def run_main(capsys, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    """Runs the `vincie` command inside this process (vincie.cli.main.main: the same code, without an interpreter's
    start-up), its output captured as run_vincie returns it."""
    from vincie.cli.main import main

    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    if check and code != 0:
        raise AssertionError(f"vincie {' '.join(args)} failed ({code}):\n{captured.out}\n{captured.err}")
    return subprocess.CompletedProcess(["vincie", *args], code, captured.out, captured.err)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a failed command printed on stderr (asserting there is exactly one)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{result.stderr}"
    return lines[0]
