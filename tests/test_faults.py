"""How runs stop (ltxf.faults), driven through the real ``train.py`` where it is about the process: SIGTERM and
Ctrl-C save and exit 75, a signal during a save is deferred, skipped non-finite steps are named, counted and
limited, a NaN stop and the loader's NaN check name the files, a dataset made for another model fails before the
model loads, save errors name the folder and the free space, ``--model.init_lora`` errors name the flag, and every
user error is one ``error:`` line with exit code 2 (a traceback only with ``--debug`` / ``LTXF_DEBUG``)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from experiments.presets import demo
from ltxf import faults
from ltxf.checkpoint import latest_checkpoint, load_checkpoint, read_checkpoint_metadata, save_checkpoint
from ltxf.demo import build_demo_assets, prepare_demo
from ltxf.faults import (
    EXIT_INTERRUPTED,
    EXIT_NONFINITE,
    EXIT_UNEXPECTED,
    EXIT_USER_ERROR,
    CheckpointSaveError,
    StopSignals,
    run_command,
)
from ltxf.train import main
from tests.distributed.dcp_roundtrip_worker import full_state, zeros_like_state
from tests.processes import wait_for_line

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_assets(tmp_path_factory) -> Path:
    """The demo's checkpoint and dataset, built once; each test copies them (some tests damage the data)."""
    directory = tmp_path_factory.mktemp("faults_assets") / "demo_assets"
    build_demo_assets(directory, seed=demo().seed)
    return directory


def _run_dir(tmp_path: Path, assets: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(assets, run / "demo_assets")
    return run


def _cli(run: Path, *extra: str, env: dict | None = None, new_session: bool = False) -> subprocess.Popen:
    """``train.py demo`` in a subprocess (validation off, batch 2, checkpoint every 2 steps)."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "demo", "--output_dir", str(run), "--optim.warmup_steps", "0",
         "--optim.batch_size", "2", "--log.every", "1", "--checkpoints.interval", "2", "--validation.interval",
         "None", *extra],
        cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {})),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=new_session,
    )


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _poison(path: Path, key: str = "latents") -> None:
    data = torch.load(path, weights_only=True)
    data[key] = torch.full_like(data[key], float("nan"))
    torch.save(data, path)


# -------------------------------------------------------------------------------------------------------------
# 1. Stop signals


def test_sigterm_to_every_process_saves_a_checkpoint_and_exits_75(tmp_path, demo_assets):
    """What a scheduler does on preemption: SIGTERM to the whole process group (the DataLoader worker too) after
    the first step. The run finishes its step, saves it, says it was interrupted and exits 75."""
    run = _run_dir(tmp_path, demo_assets)
    proc = _cli(run, "--optim.steps", "1000", "--checkpoints.interval", "500", "--data.num_workers", "1",
                new_session=True)
    seen = wait_for_line(proc.stderr, "step 1/1000")
    os.killpg(proc.pid, signal.SIGTERM)
    code, out, err = _finish(proc)
    err = "".join(seen) + err
    assert code == EXIT_INTERRUPTED, err[-3000:]
    assert "SIGTERM received" in err and "INTERRUPTED (SIGTERM)" in err
    assert "run finished" not in err + out
    saved = latest_checkpoint(run)
    assert saved is not None, err[-3000:]
    step = read_checkpoint_metadata(saved)["step"]
    assert 1 <= step < 1000 and f"at step {step} of 1000" in err
    assert not list((run / "checkpoints").glob("*.tmp"))
    saved_keys = dcp.FileSystemReader(str(saved)).read_metadata().state_dict_metadata
    assert {key.split(".")[0] for key in saved_keys} >= {"params", "opt_state", "step"}
    assert "DataLoader worker" not in err  # the worker ignored the signal; it was not killed under the run


def test_a_signal_during_a_save_is_deferred_and_the_checkpoint_is_complete(tmp_path, monkeypatch):
    """A real SIGTERM delivered in the middle of a real save (between DCP's writes and the final rename) is only
    logged: the save completes and loads bit-exactly. Outside a save, the second signal aborts; before the loop
    (no ``deferring``) the first one does."""
    import ltxf.checkpoint as checkpoint_module

    real_finalise = checkpoint_module._finalise

    def finalise_with_a_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered here, while the shards are written and not yet renamed
        return real_finalise(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "_finalise", finalise_with_a_signal)
    with StopSignals() as stop:
        with stop.deferring():
            with stop.saving():
                path = save_checkpoint(tmp_path, 3, full_state(3))
            assert stop.requested == "SIGTERM"
            loaded, _ = load_checkpoint(path, zeros_like_state(full_state(3)))
            assert torch.equal(loaded["step"], torch.tensor(3))
            with pytest.raises(KeyboardInterrupt):  # a second signal outside a save aborts
                os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):  # not deferring (model loading): at once
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored on exit


# -------------------------------------------------------------------------------------------------------------
# 2 and 4. Non-finite steps


def test_skipped_steps_are_named_and_past_the_limit_stop_with_exit_3(tmp_path, demo_assets):
    """One poisoned sample (NaN latents; the loader check off) makes one step per epoch (16 steps) non-finite.
    With --max_skipped_steps 1 the second skip stops the run (exit 3), each warning naming the step and the
    sample's files."""
    run = _run_dir(tmp_path, demo_assets)
    _poison(run / "demo_assets" / "dataset" / "latents" / "clip_005.pt")
    code, out, err = _finish(_cli(run, "--optim.steps", "40", "--nonfinite_loss", "skip", "--max_skipped_steps",
                                  "1", "--data.check_finite", "False"))
    assert code == EXIT_NONFINITE, err[-3000:]
    warnings = [line for line in err.splitlines() if "update SKIPPED" in line]
    assert len(warnings) == 2, err[-3000:]
    for line in warnings:
        # Only the poisoned sample is named (per-sample losses), not its batch partner.
        named = line.split("samples: ", 1)[1]
        assert named.startswith("clip_005 (") and named.count(" (") == 1, line
        assert str(run / "demo_assets" / "dataset" / "latents" / "clip_005.pt") in line
    assert "2 skipped so far" in warnings[1]
    assert _error_lines(err) == [_error_lines(err)[0]] and "more than max_skipped_steps=1" in _error_lines(err)[0]
    assert "Traceback" not in err


def test_skipped_steps_total_is_reported_at_the_end(tmp_path, demo_assets, capsys):
    run = _run_dir(tmp_path, demo_assets)
    _poison(run / "demo_assets" / "dataset" / "latents" / "clip_005.pt")
    cfg = demo()
    cfg = replace(cfg, output_dir=run, nonfinite_loss="skip",
                  optim=replace(cfg.optim, steps=16, warmup_steps=0, batch_size=2),
                  data=replace(cfg.data, check_finite=False), checkpoints=replace(cfg.checkpoints, interval=None),
                  validation=replace(cfg.validation, interval=None))
    result = main(prepare_demo(cfg))  # its logging handler (set up by the run) writes to the captured stderr
    assert result.skipped_steps == 1 and result.final_step == 16 and not result.interrupted
    assert "1 of 16 steps were skipped for non-finite values" in capsys.readouterr().err
    assert read_checkpoint_metadata(latest_checkpoint(run))["extra"]["skipped_steps"] == 1


def test_loader_check_names_the_file_holding_nan(tmp_path, demo_assets):
    """data.check_finite (on by default) stops at the first batch holding the poisoned sample, in a DataLoader
    worker, with one error line naming the file and exit 2."""
    run = _run_dir(tmp_path, demo_assets)
    bad = run / "demo_assets" / "dataset" / "conditions" / "clip_005.pt"
    _poison(bad, "video_prompt_embeds")
    code, out, err = _finish(_cli(run, "--optim.steps", "16", "--data.num_workers", "1"))
    assert code == EXIT_USER_ERROR, err[-3000:]
    lines = _error_lines(err)
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: 'video_prompt_embeds' holds "), err[-3000:]
    assert "Traceback" not in err


# -------------------------------------------------------------------------------------------------------------
# 5. The dataset against the model, before loading


def test_text_features_for_another_model_fail_before_the_model_loads(tmp_path, demo_assets):
    run = _run_dir(tmp_path, demo_assets)
    bad = run / "demo_assets" / "dataset" / "conditions" / "clip_007.pt"
    data = torch.load(bad, weights_only=True)
    data["video_prompt_embeds"] = data["video_prompt_embeds"][:, :40].contiguous()
    torch.save(data, bad)
    code, out, err = _finish(_cli(run, "--optim.steps", "2"))
    assert code == EXIT_USER_ERROR, err[-3000:]
    lines = _error_lines(err)
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"error: {bad}: 'video_prompt_embeds' has width 40, but the video text connector of ")
    assert "expects 64" in lines[0] and "preprocessed for another model?" in lines[0]
    assert "loading the transformer" not in err  # caught from the checkpoint's header, before any weight


def test_dataset_check_covers_channels_audio_and_references(tmp_path, demo_assets):
    from ltxf.data import PrecomputedDataset, SampleInfo, write_precomputed_sample
    from ltxf.data_check import check_dataset_fits_model, read_model_inputs

    checkpoint = demo_assets / "demo_model.safetensors"
    inputs = read_model_inputs(checkpoint)
    assert (inputs.latent_channels, inputs.video_text_width, inputs.audio_text_width) == (128, 64, 32)

    # Latent channels: the scan is built with the model's channel count.
    g = torch.Generator().manual_seed(0)
    write_precomputed_sample(tmp_path / "c64", "a.mp4", latents=torch.randn(64, 2, 2, 2, generator=g), fps=24.0,
                             video_prompt_embeds=torch.randn(8, 64), prompt_attention_mask=torch.ones(8),
                             latent_channels=64)
    with pytest.raises(ValueError, match=r"a\.pt: 'latents' has 64 channels, expected 128 .*another model"):
        PrecomputedDataset(tmp_path / "c64", latent_channels=inputs.latent_channels, text_length=None)

    def info(name: str, **kw) -> SampleInfo:
        files = {"latents": Path(f"latents/{name}.pt"), "conditions": Path(f"conditions/{name}.pt"),
                 "reference_latents": Path(f"reference_latents/{name}.pt")}
        base = dict(sample_id=name, files=files, video_shape=(128, 2, 4, 6), fps=24.0, audio_length=None,
                    reference_shape=None, text_widths={"video_prompt_embeds": 64, "audio_prompt_embeds": 32})
        return SampleInfo(**(base | kw))

    good = [info("a"), info("b")]
    assert check_dataset_fits_model(good, inputs, with_audio=True, reference=False) is None
    with pytest.raises(ValueError, match=r"conditions/b\.pt: no 'audio_prompt_embeds'.*with_audio"):
        check_dataset_fits_model([info("a"), info("b", text_widths={"video_prompt_embeds": 64})], inputs,
                                 with_audio=True, reference=False)
    with pytest.raises(ValueError, match=r"conditions/a\.pt: 'audio_prompt_embeds' has width 48.*expects 32 "
                                         r"\(and 1 more sample"):
        check_dataset_fits_model([info(n, text_widths={"audio_prompt_embeds": 48}) for n in "ab"], inputs,
                                 with_audio=False, reference=False)
    refs = [info("a", reference_shape=(128, 2, 2, 3)), info("b", reference_shape=(128, 2, 4, 6))]
    assert check_dataset_fits_model(refs[:1], inputs, with_audio=False, reference=True) == 2
    with pytest.raises(ValueError, match=r"mixes reference downscale factors: 1 \(reference_latents/b\.pt\), 2 "):
        check_dataset_fits_model(refs, inputs, with_audio=False, reference=True)
    with pytest.raises(ValueError, match=r"reference_latents/c\.pt: reference latents \(128, 2, 3, 3\)"):
        check_dataset_fits_model([info("c", reference_shape=(128, 2, 3, 3))], inputs, with_audio=False,
                                 reference=True)


# -------------------------------------------------------------------------------------------------------------
# 6. Save errors


def _write_fails_with(monkeypatch, number: int) -> None:
    from torch.distributed.checkpoint import filesystem

    def fail(*args, **kwargs):
        raise OSError(number, os.strerror(number))

    monkeypatch.setattr(filesystem, "_write_item", fail)


def test_disk_full_during_a_save_names_the_folder_and_the_free_space(tmp_path, monkeypatch):
    """DCP's writer raising ENOSPC (as a full disk does): the error names the folder, the cause, the free space
    and what to do; the partial save is removed and the previous checkpoint loads."""
    previous = save_checkpoint(tmp_path, 1, full_state(1))
    _write_fails_with(monkeypatch, errno.ENOSPC)
    with pytest.raises(CheckpointSaveError) as caught:
        save_checkpoint(tmp_path, 2, full_state(2))
    message = str(caught.value)
    assert f"cannot save the checkpoint to {tmp_path / 'checkpoints' / 'step_00000002'}: the disk is full" in message
    assert " free of " in message and "--checkpoints.keep_last_n" in message
    assert f"the previous checkpoint {previous} is intact" in message
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]
    loaded, _ = load_checkpoint(previous, zeros_like_state(full_state(1)))
    assert torch.equal(loaded["step"], torch.tensor(1))


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def test_real_full_disk_and_read_only_folder(tmp_path):
    """A real 1 MiB tmpfs filled by a 4 MiB state, and a real read-only folder (a read-only tmpfs as root, a
    chmod 555 folder otherwise)."""
    big = {"step": torch.tensor(1), "params": {"w": torch.zeros(1024, 1024)}}
    full_disk, read_only = tmp_path / "full", tmp_path / "ro"
    mounted = _mount_tmpfs(full_disk, "size=1m")
    try:
        if mounted:
            with pytest.raises(CheckpointSaveError, match=r"the disk is full \(No space left on device.*free of"):
                save_checkpoint(full_disk, 1, big)
            assert not list((full_disk / "checkpoints").iterdir())  # the partial save was removed
    finally:
        if mounted:
            subprocess.run(["umount", str(full_disk)], check=True)
    if os.geteuid() == 0:
        if not _mount_tmpfs(read_only, "ro,size=1m"):
            pytest.skip("running as root without permission to mount a read-only tmpfs: no read-only folder")
    else:
        read_only.mkdir()
        read_only.chmod(0o555)
    try:
        with pytest.raises(CheckpointSaveError, match=rf"cannot save the checkpoint to {read_only}/checkpoints/"
                                                      r"step_00000001: permission denied .* writable"):
            save_checkpoint(read_only, 1, big)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(read_only)], check=True)
        else:
            read_only.chmod(0o755)
    if not mounted and os.geteuid() == 0:
        pytest.skip("no permission to mount a 1 MiB tmpfs: the real full-disk case did not run (the simulated "
                    "one above did)")


def test_save_under_a_file_says_so(tmp_path):
    (tmp_path / "checkpoints").write_text("not a folder")
    with pytest.raises(CheckpointSaveError, match=r"a path component is a file, not a folder.*Remove or rename"):
        save_checkpoint(tmp_path, 1, full_state(1))


# -------------------------------------------------------------------------------------------------------------
# 7. --model.init_lora


def test_init_lora_of_another_rank_names_the_flag_the_file_and_both_shapes(tmp_path):
    from ltxf.checkpoint import export_lora
    from ltxf.lora import LoraConfig, inject_lora, lora_state_dict
    from ltxf.train import apply_initial_lora

    source = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    inject_lora(source, LoraConfig(rank=4, alpha=4, target_modules=("0", "1")))
    path = export_lora(tmp_path / "rank4.safetensors", lora_state_dict(source), rank=4, alpha=4)

    target = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    run_cfg = LoraConfig(rank=8, alpha=8, target_modules=("0", "1"))
    inject_lora(target, run_cfg)
    with pytest.raises(ValueError) as caught:
        apply_initial_lora(target, path, run_cfg)
    assert str(caught.value) == (f"--model.init_lora {path}: 0.lora_A.weight has shape (4, 8) in the file, this run "
                                 "expects (8, 8) (the file has rank 4, this run --lora.rank 8)")

    other = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    inject_lora(other, LoraConfig(rank=4, alpha=4, target_modules=("1",)))
    with pytest.raises(ValueError, match=rf"--model.init_lora {path}: 2 tensor\(s\) of the file have no adapter in "
                                         r"this run \(first: 0.lora_A.weight\).*--lora.target_modules"):
        apply_initial_lora(other, path, LoraConfig(rank=4, alpha=4, target_modules=("1",)))
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"^--model.init_lora: .*broken.safetensors is not a readable"):
        apply_initial_lora(other, tmp_path / "broken.safetensors", LoraConfig(rank=4, alpha=4))


# -------------------------------------------------------------------------------------------------------------
# 8. One error style


def test_a_user_error_is_one_line_with_exit_2(tmp_path):
    args = ("--demo_model", "False", "--model.checkpoint", str(tmp_path / "missing.safetensors"), "--data.root",
            str(tmp_path))
    code, out, err = _finish(_cli(tmp_path / "run", *args))
    assert code == EXIT_USER_ERROR
    assert err.strip().splitlines() == [f"error: model.checkpoint: file not found: {tmp_path / 'missing.safetensors'}"]


def test_run_command_maps_every_outcome_to_its_exit_code(capsys, monkeypatch):
    monkeypatch.delenv(faults.DEBUG_ENV, raising=False)

    def raising(exc: BaseException):
        def command(argv):
            raise exc
        return command

    assert run_command(lambda argv: 0, []) == 0
    assert run_command(lambda argv: EXIT_INTERRUPTED, []) == EXIT_INTERRUPTED
    assert run_command(lambda argv: None if argv == ["x"] else 9, ["x", "--debug"]) == 0  # --debug is removed

    assert run_command(raising(ValueError("data.root: folder not found: /x")), []) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err == "error: data.root: folder not found: /x\n"

    assert run_command(raising(PermissionError(errno.EACCES, "Permission denied", "/ro/run/config.json")), []) == 2
    assert capsys.readouterr().err == "error: Permission denied: /ro/run/config.json\n"

    assert run_command(raising(faults.TrainingStopped("3 steps were skipped")), []) == EXIT_NONFINITE
    assert capsys.readouterr().err == "error: 3 steps were skipped\n"

    assert run_command(raising(KeyboardInterrupt("SIGTERM")), []) == EXIT_INTERRUPTED
    assert capsys.readouterr().err.startswith("error: interrupted (SIGTERM)")

    # A ValueError re-raised from a DataLoader worker carries the worker's traceback: only its message is shown.
    wrapped = ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                         "last):\n  File \"x.py\", line 1\nValueError: /d/latents/a.pt: bad")
    assert run_command(raising(wrapped), []) == EXIT_USER_ERROR
    assert capsys.readouterr().err == "error: /d/latents/a.pt: bad\n"

    # Unexpected errors keep their traceback and exit 1.
    assert run_command(raising(RuntimeError("boom")), []) == EXIT_UNEXPECTED
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "RuntimeError: boom" in err
    assert err.strip().splitlines()[-1].startswith("error: unexpected RuntimeError")

    # LTXF_DEBUG=1 prints the traceback of a user error too.
    monkeypatch.setenv(faults.DEBUG_ENV, "1")
    assert run_command(raising(ValueError("bad flag")), []) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.endswith("error: bad flag\n")
    monkeypatch.setenv(faults.DEBUG_ENV, "0")
    assert not faults.debug_requested([])


def test_interrupted_before_the_first_step_saves_nothing_and_says_so(tmp_path, demo_assets):
    """A stop request already pending when the loop starts: no step, no checkpoint, interrupted (not finished)."""
    run = _run_dir(tmp_path, demo_assets)
    cfg = demo()
    cfg = replace(cfg, output_dir=run, optim=replace(cfg.optim, steps=4, warmup_steps=0, batch_size=2),
                  validation=replace(cfg.validation, interval=None))
    real_deferring = StopSignals.deferring

    def deferring_with_a_pending_request(self):
        self.requested = "SIGTERM"
        return real_deferring(self)

    start = time.monotonic()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StopSignals, "deferring", deferring_with_a_pending_request)
        result = main(prepare_demo(cfg))
    assert result.interrupted and result.final_step == 0 and result.export_path is None
    assert latest_checkpoint(run) is None
    assert time.monotonic() - start < 120


# -------------------------------------------------------------------------------------------------------------
# 3. Resume from a damaged run


def test_a_run_with_a_corrupt_newest_checkpoint_resumes_from_the_previous_one(tmp_path, demo_assets, capsys):
    """A real run's newest checkpoint loses bytes of its shard: the rerun names it, moves it aside, resumes from
    the previous checkpoint with a warning and trains to the end."""
    run = _run_dir(tmp_path, demo_assets)
    cfg = demo()
    cfg = prepare_demo(replace(cfg, output_dir=run, optim=replace(cfg.optim, steps=4, warmup_steps=0, batch_size=2),
                               checkpoints=replace(cfg.checkpoints, interval=2, keep_last_n=3),
                               log=replace(cfg.log, every=1), validation=replace(cfg.validation, interval=None)))
    assert main(cfg).final_step == 4
    newest = run / "checkpoints" / "step_00000004"
    shard = next(newest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    capsys.readouterr()
    result = main(replace(cfg, optim=replace(cfg.optim, steps=6)))
    err = capsys.readouterr().err
    assert result.final_step == 6 and len(result.losses) == 4  # steps 3..6 trained again from step 2
    assert f"checkpoint {newest} cannot be used: loading failed" in err
    assert "resuming from the older checkpoint" in err and "step_00000004 -> step_00000004.unreadable" in err
    assert (run / "checkpoints" / "step_00000004.unreadable").is_dir()
    assert latest_checkpoint(run).name == "step_00000006"


def test_an_output_dir_under_a_file_is_a_user_error(tmp_path, demo_assets):
    from ltxf.config import DataConfig, ModelConfig, TrainConfig

    (tmp_path / "a_file").write_text("")
    cfg = TrainConfig(model=ModelConfig(checkpoint=demo_assets / "demo_model.safetensors"),
                      data=DataConfig(root=demo_assets / "dataset"), output_dir=tmp_path / "a_file" / "run")
    with pytest.raises(ValueError, match=rf"^output_dir: cannot create {tmp_path / 'a_file' / 'run'} \("):
        main(cfg)


def test_a_bad_flag_is_one_error_line_too(capsys, monkeypatch):
    """tyro's boxed parse errors become one ``error:`` line with exit 2 (the suggestions kept)."""
    from train import run

    monkeypatch.delenv(faults.DEBUG_ENV, raising=False)
    cases = {
        ("demo", "--optim.stepz", "3"): "error: Unrecognized options: --optim.stepz, 3 (did you mean --optim.steps",
        ("demo", "--optim.steps", "0"): "error: optim.steps must be >= 1, got 0; --help lists every flag",
        ("demo", "--nonfinite_loss", "maybe"): "error: invalid choice 'maybe' for argument '--nonfinite_loss'",
        ("nopreset",): "error: Unrecognized options: nopreset (Available subcommands: demo, ",
    }
    for argv, expected in cases.items():
        assert run_command(run, list(argv)) == EXIT_USER_ERROR
        err = capsys.readouterr().err
        assert err.startswith(expected) and err.count("\n") == 1, (argv, err)
