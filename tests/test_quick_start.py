"""The README's quick start, run exactly as written, from an empty directory.

A new user's first steps: the bundled broker, a few change events, the
consumer, searches answered by the running consumer while it consumes, and an
update showing in the next search. The block is taken from README.md itself, so
the README cannot drift from what works.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]

README = Path(__file__).resolve().parent.parent / "README.md"


def quick_start_block() -> str:
    section = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the quick start is one shell block"
    return str(blocks[0])


def test_the_quick_start_runs_as_written_and_search_answers_while_consuming(
        tmp_path: Path) -> None:
    with socket.socket() as probe:  # the block uses the default metrics port
        if probe.connect_ex(("127.0.0.1", 9108)) == 0:
            pytest.fail("127.0.0.1:9108 is taken: the quick start's consumer needs it")
    script = tmp_path / "quick_start.sh"
    script.write_text(quick_start_block())
    bin_dir = str(Path(sys.executable).parent)  # the venv: `embedstream` and `python`
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("EMBEDSTREAM_")}
    started = time.monotonic()
    done = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=420)
    wall_s = time.monotonic() - started
    log = (tmp_path / "consume.log").read_text() if (tmp_path / "consume.log").exists() else ""
    assert done.returncode == 0, done.stdout + done.stderr + log[-3000:]
    # The two searches the block prints: the jacket first, then the updated grinder.
    hits = [line.split() for line in done.stdout.splitlines() if re.match(r"\d\.\d{3} ", line)]
    assert hits and hits[0][1] == "p1", done.stdout
    assert hits[-1][1] == "p2" and "hand crank" in " ".join(hits[-1]), done.stdout
    # The consumer stopped cleanly on the block's SIGTERM, and answered the searches.
    deadline = time.monotonic() + 30
    while "stopped cleanly" not in log and time.monotonic() < deadline:
        time.sleep(0.2)
        log = (tmp_path / "consume.log").read_text()
    assert "stopped cleanly" in log, log[-3000:]
    # Every search was answered by the running consumer (no model loaded by `search`).
    assert "asking the running consumer" in done.stderr, done.stderr[-3000:]
    assert "Loading weights" not in done.stderr
    print(f"quick start wall time: {wall_s:.1f} s")
