"""Progress display on stderr: a bar redrawn in place when stderr is a terminal (a pseudo-terminal here), plain lines
with the same figures when it is not (a pipe, as in `make demo > log 2>&1` or `kubectl logs`); never on stdout."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

from helpers import REPO

# 100 steps, figures every 10 (as the trainer's log window), no time-based lines
SCRIPT = """
from vincie.progress import Progress
with Progress(100, "work", "step", interval_s=None) as progress:
    for i in range(100):
        progress.update()
        if i % 10 == 9:
            progress.log({"loss": f"{1 / (i + 1):.3f}"})
"""


def run(stderr) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=stderr, cwd=REPO)


def test_plain_lines_when_stderr_is_not_a_terminal():
    process = run(subprocess.PIPE)
    stdout, stderr = process.communicate(timeout=120)
    lines = stderr.decode().splitlines()
    assert process.returncode == 0 and stdout == b""
    assert len(lines) == 10 and "\r" not in "".join(lines)  # one per log call; the close adds none after the last
    assert lines[0].startswith("work: 10/100 steps (10%), ") and lines[0].endswith("| loss 0.100")
    assert lines[-1].startswith("work: 100/100 steps (100%), ") and "eta" not in lines[-1]


def test_a_bar_redrawn_in_place_on_a_terminal():
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a size, as a real terminal has
    process = run(follower)
    os.close(follower)  # the child holds the terminal now; reading ends when it exits
    output = b""
    try:
        while chunk := os.read(leader, 65536):
            output += chunk
    except OSError:  # EIO: the terminal's other end is closed, everything was read
        pass
    finally:
        os.close(leader)
    assert process.wait(timeout=120) == 0 and process.stdout.read() == b""
    text = output.decode(errors="replace")
    assert "\r" in text and "100/100" in text and "loss=0.010" in text  # tqdm's bar, its postfix
    assert "work: 10/100 steps (10%), " not in text  # no plain lines
