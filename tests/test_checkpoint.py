"""Run checkpoints (DCP: round trip, atomicity, retention, resume checks, 2-rank gloo) and weight exports (LoRA
against ltx-core's own LoRA fusion and the ComfyUI convention; full model in the official layout)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ltxf.checkpoint import (
    check_config_compatible,
    cleanup_incomplete,
    config_fingerprint,
    export_full_model,
    export_lora,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_lora_file,
    read_checkpoint_metadata,
    resume_checkpoint,
    save_checkpoint,
)
from ltxf.models.checkpoint import TRANSFORMER_PREFIX, read_config
from tests.distributed.dcp_roundtrip_worker import STEP, assert_bit_equal, full_state, iter_leaves, zeros_like_state
from tests.ltx_reference import import_ltx_core, random_init_, tiny_transformer_config, write_official_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _config(**overrides) -> dict:
    config = {
        "model": {"training_mode": "lora", "checkpoint": "/models/ltx-2.3.safetensors"},
        "lora": {"rank": 32, "alpha": 32.0, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"], "dropout": 0.0},
        "optim": {"optimizer": "adamw", "learning_rate": 1e-4, "steps": 2000},
        "strategy": {"name": "text_to_video"},
        "seed": 42,
    }
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        config[section][key] = value
    return config


# -------------------------------------------------------------------------------------------------------------
# DCP round trip


def test_round_trip_is_bit_exact_and_in_place(tmp_path):
    state = full_state(7)
    path = save_checkpoint(tmp_path, 7, state, extra={"data": {"epoch": 1, "index": 12}}, config=_config())
    assert path == tmp_path / "checkpoints" / "step_00000007"
    assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp", "metadata.json"]

    template = zeros_like_state(state)
    leaves_before = {p: t for p, t in iter_leaves(template)}
    loaded, extra = load_checkpoint(path, template)
    assert loaded is template and extra == {"data": {"epoch": 1, "index": 12}}
    for leaf_path, expected in iter_leaves(full_state(7)):
        actual = _get(loaded, leaf_path)
        assert actual is leaves_before[leaf_path]  # DCP filled the template's own tensors
        assert_bit_equal(actual, expected, ".".join(leaf_path))  # incl. NaN, -0.0, bf16, int64 0-d, uint8

    metadata = read_checkpoint_metadata(path)
    assert metadata["step"] == 7 and metadata["world_size"] == 1
    assert metadata["config_fingerprint"] == config_fingerprint(_config())
    assert metadata["config"] == _config()


def test_load_rejects_a_template_that_does_not_match(tmp_path):
    path = save_checkpoint(tmp_path, 1, full_state(1))
    wrong_shape = zeros_like_state(full_state(1))
    wrong_shape["params"]["blocks.0.attn.to_q.lora_A.weight"] = torch.zeros(5, 8)
    with pytest.raises(ValueError, match=r"shape mismatches \(1\): params\.blocks\.0\.attn\.to_q\.lora_A\.weight: "
                                         r"checkpoint \(5, 4\) vs template \(5, 8\)"):
        load_checkpoint(path, wrong_shape)

    missing = zeros_like_state(full_state(1))
    missing["params"]["blocks.1.ff.lora_A.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"missing from the checkpoint \(1\): params\.blocks\.1\.ff\.lora_A\.weight"):
        load_checkpoint(path, missing)

    partial = zeros_like_state(full_state(1))
    del partial["opt"]
    with pytest.raises(ValueError, match=r"in the checkpoint but not in the state \(2\): opt\.count, opt\.mu"):
        load_checkpoint(path, partial)
    loaded, _ = load_checkpoint(path, partial, strict=False)
    assert_bit_equal(loaded["step"], torch.tensor(1), "step")


def test_dtype_change_is_cast_with_a_warning(tmp_path, caplog):
    path = save_checkpoint(tmp_path, 1, full_state(1))
    template = zeros_like_state(full_state(1))
    template["params"]["blocks.0.attn.to_q.lora_B.weight"] = torch.zeros(5, 3, dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="ltxf.checkpoint"):
        load_checkpoint(path, template)
    assert "torch.bfloat16 -> torch.float32" in caplog.text
    expected = full_state(1)["params"]["blocks.0.attn.to_q.lora_B.weight"].float()
    assert torch.equal(template["params"]["blocks.0.attn.to_q.lora_B.weight"], expected)


# -------------------------------------------------------------------------------------------------------------
# Atomicity, crash leftovers, retention


def test_incomplete_saves_are_ignored_and_cleaned_up(tmp_path):
    save_checkpoint(tmp_path, 1, full_state(1))
    save_checkpoint(tmp_path, 2, full_state(2))
    root = tmp_path / "checkpoints"
    # A crash during DCP's write: a temp directory with a partial shard file and no metadata.
    partial = root / "step_00000003.tmp"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"\x00" * 100)
    # A final-named directory without our metadata.json (not produced by save_checkpoint, still ignored).
    shutil.copytree(root / "step_00000002", root / "step_00000004")
    (root / "step_00000004" / "metadata.json").unlink()

    assert latest_checkpoint(tmp_path) == root / "step_00000002"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2]

    restored = resume_checkpoint(tmp_path, zeros_like_state(full_state(2)))
    assert restored.step == 2 and restored.path == root / "step_00000002"
    for leaf_path, expected in iter_leaves(full_state(2)):
        assert_bit_equal(_get(restored.state, leaf_path), expected, ".".join(leaf_path))
    assert not partial.exists()  # resume removed the leftover

    save_checkpoint(tmp_path, 3, full_state(3))
    assert latest_checkpoint(tmp_path) == root / "step_00000003"


def test_crash_before_the_final_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, full_state(1))

    rename = Path.rename

    def crash(self, target):
        if self.is_dir() and self.name == "step_00000002.tmp":
            raise KeyboardInterrupt("simulated kill between metadata.json and the final rename")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, full_state(2))
    monkeypatch.undo()

    root = tmp_path / "checkpoints"
    assert (root / "step_00000002.tmp" / "metadata.json").is_file()  # everything written but not renamed
    assert latest_checkpoint(tmp_path) == root / "step_00000001"
    restored = resume_checkpoint(tmp_path, zeros_like_state(full_state(1)))
    assert restored.step == 1
    assert_bit_equal(restored.state["step"], torch.tensor(1), "step")
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]


def test_resaving_a_step_replaces_it_and_an_interrupted_replace_is_recovered(tmp_path):
    save_checkpoint(tmp_path, 1, full_state(1))
    save_checkpoint(tmp_path, 1, full_state(9))  # same step, new content (e.g. a rerun in the same directory)
    loaded, _ = load_checkpoint(latest_checkpoint(tmp_path), zeros_like_state(full_state(1)))
    assert_bit_equal(loaded["step"], torch.tensor(9), "step")
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]

    # A kill between "move the old one aside" and "rename the new one in": only step_X.old is left.
    (root / "step_00000001").rename(root / "step_00000001.old")
    assert latest_checkpoint(tmp_path) is None
    cleanup_incomplete(tmp_path)
    assert latest_checkpoint(tmp_path) == root / "step_00000001"


@pytest.mark.parametrize(("keep_last_n", "kept"), [(2, [4, 5]), (1, [5]), (0, [1, 2, 3, 4, 5])])
def test_keep_last_n(tmp_path, keep_last_n, kept):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, {"step": torch.tensor(step)}, keep_last_n=keep_last_n)
    assert [s for s, _ in list_checkpoints(tmp_path)] == kept


# -------------------------------------------------------------------------------------------------------------
# Config fingerprint and resume checks


def test_config_fingerprint_is_stable():
    a = _config()
    b = json.loads(json.dumps(a))
    b = {k: b[k] for k in reversed(list(b))}  # key order does not matter
    assert config_fingerprint(a) == config_fingerprint(b)
    assert len(config_fingerprint(a)) == 16
    assert config_fingerprint(a) != config_fingerprint(_config(optim__learning_rate=2e-4))


def test_check_config_compatible(caplog):
    saved = _config()
    with pytest.raises(ValueError, match=r"lora\.rank: 32 -> 16.*optim\.optimizer: \"adamw\" -> \"adamw8bit\""):
        check_config_compatible(saved, _config(lora__rank=16, optim__optimizer="adamw8bit"))
    with pytest.raises(ValueError, match=r"lora\.alpha: 32\.0 -> 64\.0"):
        check_config_compatible(saved, _config(lora__alpha=64.0))
    with pytest.raises(ValueError, match=r"lora\.target_modules"):
        check_config_compatible(saved, _config(lora__target_modules=["to_q"]))
    with caplog.at_level(logging.WARNING, logger="ltxf.checkpoint"):
        changed = check_config_compatible(saved, _config(optim__steps=4000, model__checkpoint="/elsewhere.st"))
    assert changed == [
        'model.checkpoint: "/models/ltx-2.3.safetensors" -> "/elsewhere.st"',
        "optim.steps: 2000 -> 4000",
    ]
    assert "optim.steps: 2000 -> 4000" in caplog.text
    # tuples (dataclass asdict) and lists (JSON) are the same value
    assert check_config_compatible({"optim": {"betas": (0.9, 0.99)}}, {"optim": {"betas": [0.9, 0.99]}}) == []


def test_critical_fields_exist_in_the_real_train_config():
    """The patterns must name fields of ltxf.config.TrainConfig, or the check silently guards nothing."""
    import dataclasses
    import fnmatch

    from ltxf.checkpoint import CRITICAL_CONFIG_FIELDS
    from ltxf.config import TrainConfig

    config = TrainConfig(demo_model=True)
    flat = [f"{section}.{key}" for section, value in config.to_dict().items() if isinstance(value, dict)
            for key in value]
    unmatched = [p for p in CRITICAL_CONFIG_FIELDS if not any(fnmatch.fnmatchcase(name, p) for name in flat)]
    assert unmatched == []
    changed = dataclasses.replace(config, lora=dataclasses.replace(config.lora, rank=config.lora.rank * 2))
    with pytest.raises(ValueError, match=r"lora\.rank"):
        check_config_compatible(config.to_dict(), changed.to_dict())


def test_resume_refuses_a_critical_config_change(tmp_path):
    save_checkpoint(tmp_path, 3, full_state(3), config=_config())
    with pytest.raises(ValueError, match=r"step_00000003: cannot resume.*lora\.rank: 32 -> 64"):
        resume_checkpoint(tmp_path, zeros_like_state(full_state(3)), config=_config(lora__rank=64))
    restored = resume_checkpoint(tmp_path, zeros_like_state(full_state(3)), config=_config(optim__steps=5000))
    assert restored.step == 3
    assert resume_checkpoint(tmp_path / "fresh", {"step": torch.tensor(0)}) is None


# -------------------------------------------------------------------------------------------------------------
# Resume picks the newest complete and readable checkpoint


def _damage(root: Path) -> dict[str, str]:
    """Damage step 2..5 of a run with steps 1..5 in four ways; returns each name and what the reason says."""
    shard = next((root / "step_00000005").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:40])  # truncated shard: DCP fails while loading
    (root / "step_00000004" / ".metadata").write_bytes(b"garbage")  # DCP metadata unreadable
    (root / "step_00000003" / ".metadata").unlink()  # a partial copy: no DCP metadata
    (root / "step_00000002" / "metadata.json").write_text("{not json")
    return {"step_00000005": "loading failed", "step_00000004": "DCP's '.metadata' cannot be read",
            "step_00000003": "DCP's '.metadata' is missing", "step_00000002": "is not valid JSON"}


def test_resume_falls_back_to_the_newest_readable_checkpoint_and_moves_the_others_aside(tmp_path, caplog):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, full_state(step))
    root = tmp_path / "checkpoints"
    reasons = _damage(root)
    with caplog.at_level(logging.WARNING, logger="ltxf.checkpoint"):
        restored = resume_checkpoint(tmp_path, zeros_like_state(full_state(1)))
    assert restored.step == 1 and restored.path == root / "step_00000001"
    for leaf_path, expected in iter_leaves(full_state(1)):
        assert_bit_equal(_get(restored.state, leaf_path), expected, ".".join(leaf_path))
    # Every bad one is named with its reason, then kept under another name (not deleted, not overwritten later).
    for name, reason in reasons.items():
        assert any(name in r.message and reason in r.message for r in caplog.records), (name, caplog.text)
        assert (root / f"{name}.unreadable").is_dir() and not (root / name).exists()
    assert "resuming from the older checkpoint" in caplog.text and "step 1" in caplog.text
    save_checkpoint(tmp_path, 2, full_state(2))
    assert latest_checkpoint(tmp_path) == root / "step_00000002"
    assert (root / "step_00000002.unreadable" / "metadata.json").read_text() == "{not json"


def test_resume_names_every_checkpoint_when_none_loads_and_moves_nothing(tmp_path):
    for step in range(2, 6):
        save_checkpoint(tmp_path, step, full_state(step))
    root = tmp_path / "checkpoints"
    reasons = _damage(root)
    with pytest.raises(ValueError) as caught:
        resume_checkpoint(tmp_path, zeros_like_state(full_state(2)))
    message = str(caught.value)
    assert message.startswith(f"cannot resume: no checkpoint in {root} can be loaded:")
    for name, reason in reasons.items():
        assert f"{name}: " in message and reason in message, (name, message)
    assert sorted(p.name for p in root.iterdir()) == sorted(reasons)  # nothing moved


def test_a_config_mismatch_is_an_error_not_a_fallback(tmp_path):
    save_checkpoint(tmp_path, 1, full_state(1), config=_config())
    save_checkpoint(tmp_path, 2, full_state(2), config=_config(lora__rank=64))
    with pytest.raises(ValueError, match=r"step_00000002: cannot resume.*lora\.rank: 64 -> 32"):
        resume_checkpoint(tmp_path, zeros_like_state(full_state(2)), config=_config())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]


def test_a_save_never_overwrites_an_incomplete_directory_of_the_same_step(tmp_path, caplog):
    save_checkpoint(tmp_path, 1, full_state(1))
    root = tmp_path / "checkpoints"
    (root / "step_00000002").mkdir()
    (root / "step_00000002" / "notes.txt").write_text("someone's partial copy")
    with caplog.at_level(logging.WARNING, logger="ltxf.checkpoint"):
        save_checkpoint(tmp_path, 2, full_state(2))
    assert "step_00000002 existed but is not a complete checkpoint" in caplog.text
    assert (root / "step_00000002.unreadable" / "notes.txt").read_text() == "someone's partial copy"
    assert latest_checkpoint(tmp_path) == root / "step_00000002"


# -------------------------------------------------------------------------------------------------------------
# Two ranks (gloo, torchrun)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_sharded_save_and_resharded_loads(tmp_path):
    """2 ranks save DTensors sharded Shard(0) (and replicated plain tensors) and load them back (2 -> 2); this
    process then loads that checkpoint alone into plain tensors (2 -> 1); and 2 ranks resume a checkpoint this
    process saved into sharded DTensors (1 -> 2). All bit-exact."""
    single_run = tmp_path / "single"
    save_checkpoint(single_run, 5, full_state(5), extra={"data": {"index": 5}})
    stale = single_run / "checkpoints" / "step_00000006.tmp"
    stale.mkdir()
    out = tmp_path / "done.json"
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        str(REPO_ROOT / "tests" / "distributed" / "dcp_roundtrip_worker.py"),
        "--sharded-run", str(tmp_path / "sharded"), "--single-run", str(single_run), "--out", str(out),
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    assert json.loads(out.read_text()) == [
        "save_2_ranks_sharded_with_retention",
        "load_2_ranks_sharded_bit_exact",
        "resume_1_to_2_ranks_local_shards_bit_exact",
    ]
    assert not stale.exists()  # the 2-rank resume cleaned up the leftover

    path = latest_checkpoint(tmp_path / "sharded")
    assert read_checkpoint_metadata(path)["world_size"] == 2
    loaded, extra = load_checkpoint(path, zeros_like_state(full_state()))
    assert extra == {"data": {"index": STEP}}
    for leaf_path, expected in iter_leaves(full_state()):
        assert_bit_equal(_get(loaded, leaf_path), expected, ".".join(leaf_path))


# -------------------------------------------------------------------------------------------------------------
# LoRA export: parity with ltx-core's fusion and with the ComfyUI convention

RANK, ALPHA = 4, 8.0  # alpha != rank is the point: the trained model is W + 2 * B @ A
LORA_MODULES = (
    "transformer_blocks.0.attn1.to_q",
    "transformer_blocks.0.attn1.to_v",
    "transformer_blocks.1.attn2.to_v",
    "transformer_blocks.1.audio_attn1.to_q",
    "transformer_blocks.0.audio_to_video_attn.to_v",
    "transformer_blocks.1.video_to_audio_attn.to_q",
)


@pytest.fixture(scope="module")
def tiny_ltx(tmp_path_factory):
    """A tiny LTX-2.3 ltx-core transformer, its bf16 official checkpoint, and trained-looking LoRA tensors."""
    transformer = import_ltx_core("ltx_core.model.transformer")
    config = {"transformer": tiny_transformer_config("ltx-2.3")}
    with torch.device("meta"):
        model = transformer.LTXModelConfigurator.from_config(config)
    model = random_init_(model.to_empty(device="cpu"))
    base_sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    base_path = write_official_checkpoint(
        tmp_path_factory.mktemp("base") / "base.safetensors", config, {TRANSFORMER_PREFIX: base_sd}
    )
    gen = torch.Generator().manual_seed(3)
    lora = {}
    for module in LORA_MODULES:
        out_dim, in_dim = base_sd[module + ".weight"].shape
        lora[module + ".lora_A.weight"] = torch.randn(RANK, in_dim, generator=gen) * 0.1
        lora[module + ".lora_B.weight"] = torch.randn(out_dim, RANK, generator=gen) * 0.1
    return config, base_sd, base_path, lora


def _expected_and_tolerance(base_sd, lora, module, scale):
    """W + scale * B @ A in fp32, and the bf16 error bound: four roundings to bf16 (A, the scaled B, the product
    accumulated in fp32, the sum), each at most the unit roundoff u = 2^-8 relative (8-bit significand), so to
    first order |error| <= 4u * (|W| + scale * |B| @ |A|) = 2^-6 * (...). Measured: at most 0.5 of the bound."""
    w = base_sd[module + ".weight"].float()
    a, b = lora[module + ".lora_A.weight"], lora[module + ".lora_B.weight"]
    expected = w + scale * (b @ a)
    tolerance = 2.0**-6 * (w.abs() + scale * (b.abs() @ a.abs()))
    return expected, tolerance


def _ltx_core_fuse(base_path, lora_path):
    """The official pipeline's path: ltx-core's model builder with a LoRA, which fuses in apply_loras."""
    loader = import_ltx_core("ltx_core.loader")
    transformer = import_ltx_core("ltx_core.model.transformer")
    builder = loader.SingleGPUModelBuilder(
        model_class_configurator=transformer.LTXModelConfigurator,
        model_path=str(base_path),
        model_sd_ops=transformer.LTXV_MODEL_COMFY_RENAMING_MAP,
    ).lora(str(lora_path), 1.0, loader.LTXV_LORA_COMFY_RENAMING_MAP)
    return builder.build(device=torch.device("cpu"), dtype=torch.bfloat16).state_dict()


def _comfy_fuse(base_sd, lora_path, strength=1.0):
    """ComfyUI's convention, written here from its documented behaviour: W + strength * (alpha / rank) * B @ A
    when '<module>.alpha' exists, else W + strength * B @ A. Computed in fp32."""
    sd = load_file(str(lora_path))
    fused = {k: v.float().clone() for k, v in base_sd.items()}
    for key in sd:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        a, b = sd[key].float(), sd[module + ".lora_B.weight"].float()
        alpha_key = module + ".alpha"
        scale = sd[alpha_key].item() / a.shape[0] if alpha_key in sd else 1.0
        fused[module.removeprefix("diffusion_model.") + ".weight"] += strength * scale * (b @ a)
    return fused


def test_export_lora_matches_ltx_core_fusion(tiny_ltx, tmp_path):
    config, base_sd, base_path, lora = tiny_ltx
    lora_path = export_lora(tmp_path / "lora.safetensors", lora, rank=RANK, alpha=ALPHA,
                            metadata={"reference_downscale_factor": "2"})
    fused = _ltx_core_fuse(base_path, lora_path)
    for module in LORA_MODULES:
        expected, tolerance = _expected_and_tolerance(base_sd, lora, module, ALPHA / RANK)
        actual = fused[module + ".weight"]
        assert actual.dtype == torch.bfloat16
        error = (actual.float() - expected).abs()
        assert (error <= tolerance).all(), f"{module}: max error {error.max():.3e}, bound {tolerance.min():.3e}"
    untouched = [k for k in base_sd if k.removesuffix(".weight") not in LORA_MODULES]
    assert untouched and all(torch.equal(fused[k], base_sd[k]) for k in untouched)

    # Negative control: the official trainer's export (B not scaled, no alpha) gives another model under ltx-core.
    unscaled = export_lora(tmp_path / "unscaled.safetensors", lora, rank=RANK, alpha=float(RANK))
    fused_unscaled = _ltx_core_fuse(base_path, unscaled)
    expected, tolerance = _expected_and_tolerance(base_sd, lora, LORA_MODULES[0], ALPHA / RANK)
    assert ((fused_unscaled[LORA_MODULES[0] + ".weight"].float() - expected).abs() > tolerance).any()


def test_export_lora_file_layout_and_comfy_convention(tiny_ltx, tmp_path):
    _, base_sd, _, lora = tiny_ltx
    path = export_lora(tmp_path / "lora.safetensors", lora, rank=RANK, alpha=ALPHA,
                       metadata={"reference_downscale_factor": "2"})
    with safe_open(str(path), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        b = f.get_tensor(f"diffusion_model.{LORA_MODULES[0]}.lora_B.weight")
    assert keys == {f"diffusion_model.{m}.{s}" for m in LORA_MODULES for s in ("lora_A.weight", "lora_B.weight")}
    assert b.dtype == torch.bfloat16
    assert torch.equal(b, (lora[LORA_MODULES[0] + ".lora_B.weight"] * (ALPHA / RANK)).to(torch.bfloat16))
    assert metadata["ltxf_lora_rank"] == "4" and float(metadata["ltxf_training_alpha"]) == ALPHA
    assert float(metadata["ltxf_scale_folded_into_lora_B"]) == ALPHA / RANK
    assert metadata["reference_downscale_factor"] == "2"

    fused = _comfy_fuse(base_sd, path)
    for module in LORA_MODULES:
        expected, tolerance = _expected_and_tolerance(base_sd, lora, module, ALPHA / RANK)
        assert ((fused[module + ".weight"] - expected).abs() <= tolerance).all(), module


def test_load_lora_file_gives_the_effective_scale(tiny_ltx, tmp_path):
    _, base_sd, _, lora = tiny_ltx
    module = LORA_MODULES[0]
    a, b = lora[module + ".lora_A.weight"], lora[module + ".lora_B.weight"]
    expected, tolerance = _expected_and_tolerance(base_sd, lora, module, ALPHA / RANK)

    ours = load_lora_file(export_lora(tmp_path / "ours.safetensors", lora, rank=RANK, alpha=ALPHA))
    assert set(ours.scales.values()) == {1.0} and float(ours.metadata["ltxf_scale_folded_into_lora_B"]) == 2.0
    assert set(ours.tensors) == set(lora)

    # A third-party ComfyUI file: unscaled B and alpha = 8 for rank 4.
    comfy_path = tmp_path / "comfy.safetensors"
    save_file({f"diffusion_model.{module}.lora_A.weight": a, f"diffusion_model.{module}.lora_B.weight": b,
               f"diffusion_model.{module}.alpha": torch.tensor(ALPHA)}, str(comfy_path))
    comfy = load_lora_file(comfy_path)
    assert comfy.scales == {module: ALPHA / RANK}

    # A PEFT file (base_model.model. prefix, no alpha): scale 1, as ComfyUI and ltx-core apply it.
    peft_path = tmp_path / "peft.safetensors"
    save_file({f"base_model.model.{module}.lora_A.weight": a, f"base_model.model.{module}.lora_B.weight": b},
              str(peft_path))
    peft = load_lora_file(peft_path, dtype=torch.bfloat16)
    assert peft.scales == {module: 1.0} and peft.tensors[module + ".lora_A.weight"].dtype == torch.bfloat16

    for loaded in (ours, comfy):
        w = base_sd[module + ".weight"].float()
        applied = w + loaded.scales[module] * (
            loaded.tensors[module + ".lora_B.weight"].float() @ loaded.tensors[module + ".lora_A.weight"].float()
        )
        assert ((applied - expected).abs() <= tolerance).all()


def test_lora_files_with_bad_content_are_rejected(tmp_path):
    a, b = torch.zeros(4, 8), torch.zeros(6, 4)
    with pytest.raises(ValueError, match="module 'm' needs both lora_A and lora_B"):
        export_lora(tmp_path / "x.safetensors", {"m.lora_A.weight": a}, rank=4, alpha=4)
    with pytest.raises(ValueError, match=r"expected lora_A \[rank=2, in\]"):
        export_lora(tmp_path / "x.safetensors", {"m.lora_A.weight": a, "m.lora_B.weight": b}, rank=2, alpha=4)
    with pytest.raises(ValueError, match="unexpected key 'm.weight'"):
        export_lora(tmp_path / "x.safetensors", {"m.weight": a}, rank=4, alpha=4)
    with pytest.raises(ValueError, match="metadata must map str to str"):
        export_lora(tmp_path / "x.safetensors", {"m.lora_A.weight": a, "m.lora_B.weight": b}, rank=4, alpha=4,
                    metadata={"reference_downscale_factor": 2})
    odd = tmp_path / "odd.safetensors"
    save_file({"diffusion_model.norm.diff": torch.zeros(3)}, str(odd))
    with pytest.raises(ValueError, match=r"odd\.safetensors: no LoRA factors .*diffusion_model\.norm\.diff"):
        load_lora_file(odd)
    with pytest.raises(ValueError, match="LoRA file not found"):
        load_lora_file(tmp_path / "missing.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# -------------------------------------------------------------------------------------------------------------
# Full-model export


def test_export_full_model_loads_in_ltx_core(tiny_ltx, tmp_path):
    config, base_sd, base_path, _ = tiny_ltx
    trained = {k: v.float() + 0.5 for k, v in base_sd.items()}  # fp32 "fine-tuned" weights
    path = export_full_model(tmp_path / "full.safetensors", trained, config, dtype=torch.bfloat16)

    with safe_open(str(path), framework="pt") as f:  # real safetensors, not a pickle
        keys = set(f.keys())
    assert keys == {TRANSFORMER_PREFIX + k for k in trained}
    assert read_config(path) == config

    loader = import_ltx_core("ltx_core.loader")
    transformer = import_ltx_core("ltx_core.model.transformer")
    model = loader.SingleGPUModelBuilder(
        model_class_configurator=transformer.LTXModelConfigurator,
        model_path=str(path),
        model_sd_ops=transformer.LTXV_MODEL_COMFY_RENAMING_MAP,
    ).build(device=torch.device("cpu"))
    loaded = model.state_dict()
    assert set(loaded) == set(trained)
    for key, value in trained.items():
        assert torch.equal(loaded[key], value.to(torch.bfloat16)), key


def test_export_full_model_copies_the_other_components_from_the_base(tiny_ltx, tmp_path):
    config, base_sd, _, _ = tiny_ltx
    vae = {"encoder.conv.weight": torch.randn(3, 3), "per_channel_statistics.mean-of-means": torch.randn(3)}
    base = write_official_checkpoint(tmp_path / "base.safetensors", config, {TRANSFORMER_PREFIX: base_sd,
                                                                            "vae.": vae})
    trained = {k: v + 1 for k, v in base_sd.items() if k.startswith("transformer_blocks.")}
    path = export_full_model(tmp_path / "full.safetensors", trained, base_checkpoint=base)
    result = load_file(str(path))
    assert set(result) == set(load_file(str(base)))
    assert torch.equal(result["vae.encoder.conv.weight"], vae["encoder.conv.weight"])
    for key, value in base_sd.items():
        expected = trained.get(key, value)
        assert torch.equal(result[TRANSFORMER_PREFIX + key], expected), key
    assert read_config(path) == config

    with pytest.raises(ValueError, match=r"not in the base checkpoint .*model\.diffusion_model\.extra\.weight"):
        export_full_model(tmp_path / "bad.safetensors", {"extra.weight": torch.zeros(1)}, base_checkpoint=base)
    with pytest.raises(ValueError, match="'transformer' section"):
        export_full_model(tmp_path / "bad.safetensors", trained, {"vae": {}})
