"""The memory planner: exact weight bytes against loaded and meta models, the published models' counts, activations
against a saved-tensor measurement of a real-width 2-block model, the CLI and the card presets."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from experiments.presets import ltx2_av_lora, ltx2_av_lora_16gb, ltx2_av_lora_24gb
from ltxf.demo import demo_checkpoint_config, write_random_checkpoint
from ltxf.lora import LoraConfig, inject_lora
from ltxf.memory_plan import (
    GIB,
    Resolution,
    connector_bytes,
    lora_parameter_count,
    measure_saved_bytes,
    plan_memory,
    random_inputs,
    read_model_config,
    suggest_settings,
    transformer_weight_bytes,
)
from ltxf.models.text import load_embeddings_processor
from ltxf.models.transformer import AVTransformer, TransformerConfig, load_transformer
from ltxf.quantization import load_quantized_transformer, model_weight_bytes

REPO = Path(__file__).resolve().parents[1]
LTX23 = REPO / "tests" / "data" / "ltx-2.3-22b-config.json"  # the published config (shared/reference/configs)


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "demo.safetensors", demo_checkpoint_config(),
                                   seed=5)


@pytest.mark.parametrize("quantization", ["none", "fp8", "int8", "nf4"])
def test_weight_bytes_are_exact(demo_checkpoint, quantization):
    """The planner's count (meta model) is the byte size of the model the loader actually builds."""
    config = demo_checkpoint_config()
    for dtype in (torch.bfloat16, torch.float32):
        planned, per_block = transformer_weight_bytes(config, dtype=dtype, quantization=quantization)
        if quantization == "none":
            loaded = load_transformer(demo_checkpoint, dtype=dtype)
        else:
            loaded = load_quantized_transformer(demo_checkpoint, quantization, dtype=dtype)
        assert planned == model_weight_bytes(loaded)
        assert per_block == [model_weight_bytes(b) for b in loaded.transformer_blocks]
    text = load_embeddings_processor(demo_checkpoint, dtype=torch.bfloat16, with_feature_extractor=False,
                                     gemma_hidden_size=64)
    assert connector_bytes(config, dtype=torch.bfloat16) == model_weight_bytes(text)


def test_published_ltx23_counts():
    """LTX-2.3 22B on meta: 18.99 B transformer parameters, 2.02 B in the connectors, 214 M LoRA r32 parameters on
    the attention projections (the counts in issue 10); nf4 stores the base in about 30 % of bf16."""
    config = read_model_config(model_config=LTX23)
    bf16, _ = transformer_weight_bytes(config, dtype=torch.bfloat16, quantization="none")
    assert bf16 / 2 / 1e9 == pytest.approx(18.99, abs=0.01)
    assert connector_bytes(config, dtype=torch.bfloat16) / 2 / 1e9 == pytest.approx(2.02, abs=0.01)
    assert lora_parameter_count(config, ltx2_av_lora().lora) / 1e6 == pytest.approx(214, abs=1)
    nf4, _ = transformer_weight_bytes(config, dtype=torch.bfloat16, quantization="nf4")
    assert 0.28 < nf4 / bf16 < 0.31


def _two_block_model() -> tuple[AVTransformer, TransformerConfig]:
    config = read_model_config(model_config=LTX23)
    config["transformer"] = {**config["transformer"], "num_layers": 2}
    tc = TransformerConfig.from_checkpoint_config(config["transformer"])
    with torch.device("meta"):
        model = AVTransformer(tc)
    model.to_empty(device="cpu").to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():  # what autograd saves depends on shapes and dtypes, not on values: a cheap fill
        for p in model.parameters():
            p.fill_(0.02)
    inject_lora(model, LoraConfig(rank=32, alpha=32), generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    return model, config


def test_activations_match_a_real_width_measurement():
    """Real-width LTX-2.3 with 2 blocks, LoRA r32 on the attention projections, fp32 adapters under bf16 autocast (as
    train.py runs it), no checkpointing: the bytes saved for backward (saved-tensor hooks, unique storages, weights
    excluded) at two token counts are within 10 % of the planner's activations (blocks + output heads)."""
    model, config = _two_block_model()
    base = ltx2_av_lora()
    cfg = replace(base, parallel=replace(base.parallel, activation_checkpointing=False))
    for video_tokens, audio_tokens in ((96, 16), (192, 32)):
        video, audio = random_inputs(model.config, video_tokens=video_tokens, audio_tokens=audio_tokens,
                                     text_tokens=32)
        measured = measure_saved_bytes(model, video, audio, autocast_dtype=torch.bfloat16)
        plan = plan_memory(cfg, config, Resolution(width=32, height=32, frames=1), tokens=(video_tokens, audio_tokens),
                           text_tokens=32)
        predicted = plan.components["activations (blocks)"] + plan.components["activations (heads)"]
        print(f"{video_tokens} video / {audio_tokens} audio tokens: measured {measured:,} predicted {predicted:,.0f} "
              f"({predicted / measured - 1:+.1%})")
        assert abs(predicted / measured - 1) <= 0.10


def _cli(args: list[str], capsys) -> str:
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_memory", REPO / "tools" / "plan_memory.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(args) == 0
    return capsys.readouterr().out


def test_cli_24gb_preset_fits_in_20_gib(capsys):
    """The acceptance command of issue 10, in JSON and as a table."""
    out = json.loads(_cli(["ltx2_av_lora_24gb", "--model-config", str(LTX23), "--resolution", "768x512x49",
                           "--json"], capsys))
    assert out["total_gib"] <= 20.0 and out["fits"] is True
    assert out["total_gib"] == pytest.approx(sum(out["components"].values()), abs=0.01)
    assert out["tokens"] == {"video": 24 * 16 * 7, "audio": 49, "text": 1024}
    table = _cli(["ltx2_av_lora_24gb", "--model-config", str(LTX23), "--resolution", "768x512x49"], capsys)
    assert "transformer weights (nf4)" in table and "fits in 24 GiB" in table


def test_16gb_preset_and_suggestions():
    config = read_model_config(model_config=LTX23)
    resolution = Resolution.parse("768x512x49")
    assert plan_memory(ltx2_av_lora_16gb(), config, resolution).total <= 16 * GIB
    swap_none = plan_memory(ltx2_av_lora_24gb(), config, resolution)
    assert plan_memory(ltx2_av_lora_16gb(), config, resolution).total < swap_none.total
    bf16 = plan_memory(ltx2_av_lora(), config, resolution)
    assert bf16.total > 40 * GIB  # issue 10's estimate: about 46 GiB
    suggested = suggest_settings(ltx2_av_lora(), config, resolution, 24.0)
    assert suggested is not None and suggested[1].total <= 24 * GIB
    assert suggest_settings(ltx2_av_lora(), config, resolution, 4.0) is None


def test_bad_resolution_is_a_clear_error():
    with pytest.raises(ValueError, match="--resolution"):
        Resolution.parse("768x500x49")
    with pytest.raises(ValueError, match="WxHxF"):
        Resolution.parse("768x512")


def test_block_swap_planning_follows_checkpointing():
    """Swapped blocks free their device weights only when checkpointed (ltxf/block_swap.py); two are in flight."""
    config = read_model_config(model_config=LTX23)
    resolution = Resolution.parse("768x512x49")
    cfg = ltx2_av_lora_24gb()
    _, per_block = transformer_weight_bytes(config, dtype=torch.bfloat16, quantization="nf4")
    key = "transformer weights (nf4)"
    resident = plan_memory(cfg, config, resolution).components[key]
    swap8 = replace(cfg, parallel=replace(cfg.parallel, blocks_to_swap=8))
    assert plan_memory(swap8, config, resolution).components[key] == resident - 6 * per_block[0]
    no_ac = replace(swap8, parallel=replace(swap8.parallel, activation_checkpointing=False))
    assert plan_memory(no_ac, config, resolution).components[key] == resident
    first_half = replace(swap8, parallel=replace(swap8.parallel, checkpoint_first=24))  # swapped: 40-47
    assert plan_memory(first_half, config, resolution).components[key] == resident


def test_offloaded_connectors_keep_two_blocks(demo_checkpoint):
    """parallel.offload_text_connectors: the connector blocks stream from the host, the two largest planned on the
    device, the rest of the connectors resident (counted on the loaded demo connectors)."""
    config = demo_checkpoint_config()
    text = load_embeddings_processor(demo_checkpoint, dtype=torch.bfloat16, with_feature_extractor=False,
                                     gemma_hidden_size=64)
    blocks = [model_weight_bytes(b) for c in (text.video_connector, text.audio_connector)
              for b in c.transformer_1d_blocks]
    expected = model_weight_bytes(text) - sum(blocks) + 2 * max(blocks)
    assert connector_bytes(config, dtype=torch.bfloat16, offloaded=True) == expected


def test_gpu_check_smoke_on_cpu(capsys):
    """tools/gpu_check.py: without CUDA the default run says so and exits 0; --device cpu --tiny runs every check."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    if not torch.cuda.is_available():
        assert tool.main([]) == 0
        assert "no CUDA device" in capsys.readouterr().out
    assert tool.main(["--device", "cpu", "--tiny"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"mfu", "memory", "numerics", "overlap"}
    assert set(report["memory"]) == {"none", "fp8", "int8", "nf4"}
    for kind, minimum in (("fp8", 30.0), ("int8", 38.0), ("nf4", 20.0)):
        assert report["numerics"][kind]["codes_match_cpu"] and report["numerics"][kind]["snr_db"] >= minimum


def test_fsdp_full_finetune_and_ic_lora_tokens():
    """Full fine-tuning under FSDP on 8 processes: fp32 master weights, gradients and AdamW moments divided by 8
    (plus two gathered bf16 blocks); IC-LoRA counts the reference tokens."""
    from experiments.presets import ltx2_full, ltx2_v2v_ic_lora

    config = read_model_config(model_config=LTX23)
    resolution = Resolution.parse("512x512x121")
    fp32, per_block = transformer_weight_bytes(config, dtype=torch.float32, quantization="none")
    plan = plan_memory(ltx2_full(), config, resolution, num_processes=8)
    assert plan.components["transformer weights (float32 master)"] == pytest.approx(fp32 / 8 + per_block[0])
    assert plan.components["optimizer state"] == pytest.approx(fp32 * 2 / 8)
    assert plan.components["trainable + grads"] == pytest.approx(fp32 / 8)
    ic = plan_memory(ltx2_v2v_ic_lora(), config, resolution)
    assert (ic.video_tokens, ic.audio_tokens) == (2 * 16 * 16 * 16, 0)
