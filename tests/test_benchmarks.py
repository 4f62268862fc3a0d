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


def test_bench_memory_prints_bytes_per_token_as_json(tmp_path):
    import json

    from ltxf.models.transformer import TransformerConfig

    tiny = TransformerConfig(version="ltx-2.3", num_layers=1, num_heads=2, head_dim=16, cross_attention_dim=32,
                             audio_num_heads=2, audio_head_dim=8, audio_cross_attention_dim=16, caption_channels=24,
                             apply_gated_attention=True, cross_attention_adaln=True)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({"transformer": tiny.to_checkpoint_config()}))
    report = json.loads(_run("tools/bench_memory.py", "--model-config", str(config_path), "--rank", "4", "--json"))
    assert set(report["modes"]) == {"floor", "lora", "full"}
    for mode in report["modes"].values():
        assert {"per_video_token", "per_audio_token", "constant"} <= set(mode)
