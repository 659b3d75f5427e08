"""Commands that touch S3 exit with status 0, every time.

The cause of a past flake: pyarrow's scan threads freed the last reference to a Python object (the index file's
bytes) after `read_table` had returned, and freeing it takes the GIL; when the interpreter was already exiting,
CPython ended that thread inside a C++ destructor, so the process died with SIGABRT ("terminate called without an
active exception") after printing its correct output, about 1 run in 4 on a busy machine. The race depends on
scheduling, so these tests make it likely: a small preloaded library (compiled here with gcc) makes every thread
but the main one wait before it takes the GIL from native code (PyGILState_Ensure), as a native worker
descheduled on a loaded machine does. Without vincie.sessions.index's fix `data index stats` aborts every time
under it; with the fix, no command may leave such a thread behind.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import run_vincie
from helpers import write_config

DELAY = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <unistd.h>
int PyGILState_Ensure(void) {
    static int (*real)(void);
    static long ms = -1;
    if (!real) real = (int (*)(void))dlsym(RTLD_NEXT, "PyGILState_Ensure");
    if (ms < 0) { const char *s = getenv("VINCIE_TEST_GIL_DELAY_MS"); ms = s ? atol(s) : 50; }
    if (getpid() != gettid()) usleep(ms * 1000);  /* threads other than the main one wait */
    return real();
}
"""


@pytest.fixture(scope="module")
def gil_delay(tmp_path_factory) -> dict:
    """The environment that preloads the GIL delay into a command."""
    assert shutil.which("gcc"), "gcc is needed to build the GIL delay (Debian: apt-get install gcc)"
    directory = tmp_path_factory.mktemp("gil_delay")
    (directory / "delay.c").write_text(DELAY)
    library = directory / "delay.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(library), str(directory / "delay.c"), "-ldl"],
                   check=True)
    return {"LD_PRELOAD": str(library)}


def clean_exit(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    result = run_vincie(*args, env=env, timeout=timeout)
    assert result.returncode == 0 and "terminate called" not in result.stderr, \
        f"vincie {' '.join(args)}: exit status {result.returncode}\n{result.stderr[-2000:]}"
    return result


def test_index_stats_from_s3_exits_cleanly_when_arrow_threads_run_late(s3_bucket, gil_delay):
    root = f"{s3_bucket}/synth/train"
    clean_exit("data", "synth", "--out", root, "--sessions", "8", "--resolution", "32")
    for _ in range(3):
        result = clean_exit("data", "index", "stats", root, "--json", env=gil_delay)
        assert '"sessions": 8' in result.stdout


@pytest.mark.slow
def test_every_s3_command_exits_cleanly_every_time(s3_bucket, gil_delay, tmp_path):
    """synth, index build / stats / verify, a short training and an eval reading s3://, each run repeatedly, half
    of the runs with the GIL delay (a shorter one for the commands whose threads take the GIL often)."""
    train, held_out = f"{s3_bucket}/train", f"{s3_bucket}/eval"
    clean_exit("data", "synth", "--out", held_out, "--sessions", "4", "--resolution", "32", "--split", "test",
               "--min-turns", "2", "--turns", "2", "--image-format", "png")
    short = {**gil_delay, "VINCIE_TEST_GIL_DELAY_MS": "5"}
    for attempt in range(4):
        env = gil_delay if attempt % 2 else None
        clean_exit("data", "synth", "--out", train, "--sessions", "16", "--resolution", "32", "--overwrite", env=env)
        clean_exit("data", "index", "build", train, env=env)
        clean_exit("data", "index", "stats", train, "--json", env=env)
        clean_exit("data", "index", "verify", train, env=env)
    for attempt in range(2):
        run = tmp_path / f"run{attempt}"
        config = write_config(tmp_path / f"run{attempt}.yaml", run, train, held_out, train={"steps": 2})
        env = short if attempt % 2 else None
        clean_exit("train", "--config", config, "--no-progress", env=env)
        clean_exit("eval", "--model", str(run), "--bench", "synth", "--data", held_out, "--sessions", "2",
                   "--turns", "2", "--steps", "2", "--out", str(tmp_path / f"eval{attempt}"), env=env)
