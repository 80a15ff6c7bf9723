"""What a power cut or SIGKILL leaves behind: at most the last frame's line is lost."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, SAMPLES


def test_sigkill_mid_run_leaves_an_audit_log_of_whole_lines(tmp_path: Path, endpoint: str) -> None:
    audit = tmp_path / "audit.jsonl"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge",
            "-q",
            "replay",
            str(SAMPLES),
            "--publish",
            endpoint,
            "--fps",
            "20",
            "--loop",
            "--audit",
            str(audit),
        ],
        cwd=REPO,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not audit.exists() or audit.read_text().count("\n") < 15):
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    text = audit.read_text()
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]
    assert len(complete) >= 15
    seqs = [json.loads(line)["seq"] for line in complete]
    assert seqs == list(range(len(seqs))), "every flushed line is whole and in order"
    assert tail == "" or not tail.endswith("}"), "only a torn last line may be incomplete"
