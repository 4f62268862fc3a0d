"""A stop signal on ONE rank of a real 2-process ``torchrun`` (gloo, CPU): both ranks agree, save the same step
together and exit 75 (ltxf.faults)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ltxf.checkpoint import latest_checkpoint, read_checkpoint_metadata
from ltxf.faults import EXIT_INTERRUPTED
from tests.processes import wait_for_line

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _rank_pid(torchrun_pid: int, rank: int) -> int:
    for pid in _children(torchrun_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no child of torchrun {torchrun_pid} has RANK={rank}")


def test_sigterm_on_one_rank_stops_both_after_a_common_checkpoint(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "train.py", "demo", "--output_dir", str(run), "--optim.steps", "1000",
           "--optim.warmup_steps", "0", "--optim.batch_size", "1", "--log.every", "1", "--checkpoints.interval",
           "500", "--validation.interval", "None"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = wait_for_line(proc.stdout, "step 1/1000")
    os.kill(_rank_pid(proc.pid, 1), signal.SIGTERM)  # rank 1 only: rank 0 learns it from the agreement
    started = time.monotonic()
    out, _ = proc.communicate(timeout=300)
    out = "".join(seen) + out
    assert "[rank 1]" in out and "SIGTERM received" in out, out[-4000:]
    # Rank 0 got no signal, yet it stopped, saved (its log) and reported the interruption.
    assert "run INTERRUPTED (stop signal on another rank)" in out, out[-4000:]
    assert out.count(f"exitcode  : {EXIT_INTERRUPTED}") >= 1 or f"exitcode: {EXIT_INTERRUPTED}" in out, out[-4000:]
    assert proc.returncode != 0
    saved = latest_checkpoint(run)
    assert saved is not None, out[-4000:]
    metadata = read_checkpoint_metadata(saved)
    assert metadata["world_size"] == 2 and 1 <= metadata["step"] < 1000
    assert time.monotonic() - started < 120
