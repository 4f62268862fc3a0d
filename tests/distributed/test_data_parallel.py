"""The one data-parallel path (FSDP2 on a (replicate x shard) mesh), with real ``torchrun`` processes (gloo, CPU).

- A 2 x 2 mesh (4 processes: parameters sharded over pairs, replicated across the pairs, HSDP) trains the demo
  (full fine-tune and text connectors) like 1 process with the same global batch of 4. Tolerance: fp32,
  gradients summed in another order (reduce-scatter within a pair, all-reduce across pairs, vs one batch); 1e-5
  relative over 3 steps, as in test_train_distributed.py, which still catches a missing or doubled reduction.
- A LoRA run checkpointed at step 2 on 1 process with batch 2 and resumed on 2 processes with batch 1 (the same
  global batch) ends with the weights of the uninterrupted 1-process run: the data order is a function of the
  global batch, and the sampler's position counts global batches. Tolerance: fp32, the gradients of step 3 are
  summed across processes in another order: rtol 1e-5 / atol 1e-7. The sampler of before (which rescaled the
  position by the number of processes) fails it.
- Under FSDP2 on 2 ranks with bf16 compute, positions, timesteps and sigma reach the model in fp32; the control
  (FSDP2's default policy) shows the probe does see a cast when there is one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ltxf.checkpoint import latest_checkpoint, load_lora_file
from ltxf.demo import build_demo_checkpoint
from tests.distributed.test_train_distributed import REPO, _free_port, _train

STEPS = 3


def _torchrun(nproc: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_hsdp_2x2_mesh_matches_one_process(tmp_path):
    # The text connectors train too: their FSDP2 unit is reduced by the same hooks.
    flags = ("--model.training_mode", "full", "--model.train_connectors", "True", "--optim.learning_rate", "1e-4")
    one = _train(tmp_path / "one", 1, *flags, global_batch=4)
    hsdp = _train(tmp_path / "hsdp", 4, *flags, "--parallel.data_parallel", "fsdp", "--parallel.shard_size", "2",
                  global_batch=4)
    assert sorted(one) == sorted(hsdp) == list(range(1, STEPS + 1))
    for step in one:
        assert hsdp[step] == pytest.approx(one[step], rel=1e-5), (step, one, hsdp)
    assert one[STEPS] != one[1]


def test_resume_on_two_processes_continues_a_one_process_run(tmp_path):
    flags = ("--checkpoints.interval", "2", "--checkpoints.export_dtype", "float32")
    _train(tmp_path / "reference", 1, *flags)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "reference", resumed_dir)
    for leftover in (latest_checkpoint(resumed_dir), resumed_dir / "exports"):
        shutil.rmtree(leftover)
    assert latest_checkpoint(resumed_dir).name == "step_00000002"
    _train(resumed_dir, 2, *flags)

    name = f"lora_weights_step_{STEPS:06d}.safetensors"
    reference = load_lora_file(tmp_path / "reference" / "exports" / name).tensors
    resumed = load_lora_file(resumed_dir / "exports" / name).tensors
    assert reference.keys() == resumed.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=1e-5, atol=1e-7, msg=key)


def test_forward_inputs_stay_fp32_under_fsdp(tmp_path):
    checkpoint = build_demo_checkpoint(tmp_path / "demo.safetensors", seed=0)
    _torchrun(2, str(Path(__file__).with_name("forward_dtypes_worker.py")), str(checkpoint), str(tmp_path))
    fp32 = {"positions": "torch.float32", "timesteps": "torch.float32", "sigma": "torch.float32"}
    for rank in range(2):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["ltxf"] == {"video": fp32, "audio": fp32}
        # The control: FSDP2's default policy casts them, and the probe sees it.
        assert record["default_policy"]["video"]["positions"] == "torch.bfloat16"
