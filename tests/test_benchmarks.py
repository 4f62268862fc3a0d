"""The benchmark tools run end to end at their tiny presets and print their ratios (smoke tests: the figures
themselves are measured by running the tools, never asserted here)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_bench_model_prints_time_and_memory_ratios():
    out = _run("tools/bench_model.py", "--preset", "tiny", "--steps", "1", "--warmup", "0", "--rounds", "1",
               "--threads", "1")
    assert "ratios (ltxf/reference): time" in out and "peak memory" in out


def test_bench_train_prints_step_time_and_overhead():
    out = _run("tools/bench_train.py", "--preset", "tiny", "--steps", "3", "--warmup", "1", "--num_workers", "0")
    assert "trainer overhead" in out and "samples/s" in out and "bare fwd+bwd" in out
