"""Loading the transformer from bad checkpoints: every failure is a ValueError whose message names the problem.
Also: loading needs about one copy of the weights in host memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ltxf.models import checkpoint
from ltxf.models.transformer import AVTransformer, TransformerConfig, load_transformer, save_transformer
from tests.ltx_reference import tiny_transformer_config

PREFIX = checkpoint.TRANSFORMER_PREFIX


def _tiny_state(version: str) -> dict[str, torch.Tensor]:
    config = TransformerConfig.from_checkpoint_config(tiny_transformer_config(version))
    return AVTransformer(config).state_dict()


def _write(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> Path:
    save_file({PREFIX + k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def _write_with_config(path: Path, state: dict[str, torch.Tensor], section: dict) -> Path:
    return _write(path, state, {"config": json.dumps({"transformer": section})})


def test_valid_checkpoint_loads(tmp_path):
    path = _write_with_config(tmp_path / "ok.safetensors", _tiny_state("ltx-2"), tiny_transformer_config("ltx-2"))
    assert load_transformer(path).config.version == "ltx-2"


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="checkpoint file not found: .*nope.safetensors"):
        load_transformer(tmp_path / "nope.safetensors")


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ValueError, match="junk.safetensors is not a readable safetensors file"):
        load_transformer(path)


def test_no_config_metadata(tmp_path):
    path = _write(tmp_path / "bare.safetensors", _tiny_state("ltx-2"), {"format": "pt"})
    with pytest.raises(ValueError, match="has no 'config' entry in its safetensors metadata"):
        load_transformer(path)


def test_no_transformer_section(tmp_path):
    path = _write(tmp_path / "vae_only.safetensors", _tiny_state("ltx-2"), {"config": json.dumps({"vae": {}})})
    with pytest.raises(ValueError, match="has no 'transformer' section"):
        load_transformer(path)


def test_partial_v2_config(tmp_path):
    section = tiny_transformer_config("ltx-2.3")
    del section["caption_proj_input_norm"], section["caption_projection_second_linear"]
    path = _write_with_config(tmp_path / "partial.safetensors", _tiny_state("ltx-2.3"), section)
    with pytest.raises(ValueError, match="partial LTX-2.3 .*missing \\['caption_proj_input_norm', "
                                         "'caption_projection_second_linear'\\]"):
        load_transformer(path)


def test_unknown_v2_value(tmp_path):
    section = dict(tiny_transformer_config("ltx-2.3"), caption_projection_first_linear=True)
    path = _write_with_config(tmp_path / "unknown.safetensors", _tiny_state("ltx-2.3"), section)
    with pytest.raises(ValueError, match="unknown text-encoder config values \\{'caption_projection_first_linear'"):
        load_transformer(path)


@pytest.mark.parametrize("key,value,message", [
    ("qk_norm", "layer_norm", "'qk_norm' is 'layer_norm'; expected 'rms_norm'"),
    ("use_middle_indices_grid", None, "'use_middle_indices_grid' is missing; expected True"),
    ("rope_type", "spiral", "'rope_type' is 'spiral'"),
    ("caption_channels", None, "'caption_channels' is missing"),
    ("cross_attention_dim", 48, "cross_attention_dim \\(48\\) must equal num_heads \\* head_dim \\(32\\)"),
])
def test_bad_config_value_names_the_key(tmp_path, key, value, message):
    section = tiny_transformer_config("ltx-2")
    if value is None:
        del section[key]
    else:
        section[key] = value
    path = _write_with_config(tmp_path / "bad.safetensors", _tiny_state("ltx-2"), section)
    with pytest.raises(ValueError, match=message):
        load_transformer(path)


def test_adaln_rows_contradict_the_config(tmp_path):
    """9*D AdaLN rows (LTX-2.3 style) under an LTX-2 config: both shapes are named."""
    state = _tiny_state("ltx-2")
    state["adaln_single.linear.weight"] = torch.zeros(9 * 32, 32)
    state["adaln_single.linear.bias"] = torch.zeros(9 * 32)
    path = _write_with_config(tmp_path / "rows.safetensors", state, tiny_transformer_config("ltx-2"))
    with pytest.raises(ValueError, match="implies adaln_single.linear.weight of shape \\(192, 32\\) .* but the "
                                         "checkpoint has \\(288, 32\\) \\(9 x 32\\)"):
        load_transformer(path)


def test_version_contradicts_the_weights(tmp_path):
    # LTX-2.3 config, LTX-2 weights: the caption projection is the first signal.
    path = _write_with_config(tmp_path / "v.safetensors", _tiny_state("ltx-2"), tiny_transformer_config("ltx-2.3"))
    with pytest.raises(ValueError, match="\\(ltx-2.3, .*does not expect caption_projection.\\* weights, but the "
                                         "checkpoint has"):
        load_transformer(path)
    # LTX-2 config with gated-attention weights.
    state = _tiny_state("ltx-2")
    state["transformer_blocks.0.attn1.to_gate_logits.weight"] = torch.zeros(2, 32)
    path = _write_with_config(tmp_path / "g.safetensors", state, tiny_transformer_config("ltx-2"))
    with pytest.raises(ValueError, match="apply_gated_attention=False\\) does not expect to_gate_logits weights"):
        load_transformer(path)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state = _tiny_state("ltx-2")
    del state["transformer_blocks.1.ff.net.2.weight"]
    state["transformer_blocks.1.ff.extra.weight"] = torch.zeros(3)
    path = _write_with_config(tmp_path / "keys.safetensors", state, tiny_transformer_config("ltx-2"))
    with pytest.raises(ValueError) as info:
        load_transformer(path)
    message = str(info.value)
    assert "keys.safetensors" in message
    assert "missing keys (1): transformer_blocks.1.ff.net.2.weight" in message
    assert "unexpected keys (1): transformer_blocks.1.ff.extra.weight" in message


def test_shape_mismatch_is_listed(tmp_path):
    state = _tiny_state("ltx-2")
    state["proj_out.weight"] = torch.zeros(128, 16)
    path = _write_with_config(tmp_path / "shape.safetensors", state, tiny_transformer_config("ltx-2"))
    with pytest.raises(ValueError, match="proj_out.weight: checkpoint \\(128, 16\\) vs model \\(128, 32\\)"):
        load_transformer(path)


def test_no_transformer_tensors(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({"vae.encoder.conv_in.weight": torch.zeros(2)}, str(path),
              metadata={"config": json.dumps({"transformer": tiny_transformer_config("ltx-2")})})
    with pytest.raises(ValueError, match="no transformer tensors"):
        load_transformer(path)


_MEASURE = textwrap.dedent("""
    import resource, sys, torch
    from ltxf.models import checkpoint
    from ltxf.models.transformer import AVTransformer, TransformerConfig, load_transformer
    path = sys.argv[1]
    def rss_mib():
        with open("/proc/self/status") as f:
            return {l.split(":")[0]: int(l.split()[1]) / 1024 for l in f if l.startswith(("VmRSS", "VmHWM"))}
    # Warm up everything but the tensor data (imports, header parsing, building on meta).
    config = TransformerConfig.from_checkpoint_config(checkpoint.read_config(path)["transformer"])
    with torch.device("meta"):
        AVTransformer(config)
    checkpoint.read_tensors(path, lambda key: None)
    before = rss_mib()["VmRSS"]
    model = load_transformer(path)
    with torch.no_grad():
        for p in model.parameters():
            p.sum()  # make every weight resident
    peak = rss_mib()["VmHWM"]
    size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(peak - before, size)
""")


def test_loading_peak_host_memory_is_about_one_copy(tmp_path):
    """Peak RSS growth while loading a ~120 MB float32 checkpoint stays near one copy of the weights (measured
    1.0x; two copies would be 2.0x), checked in a fresh process against a generous 1.5x bound."""
    config = TransformerConfig(version="ltx-2.3", num_layers=4, num_heads=8, head_dim=64, cross_attention_dim=512,
                               audio_num_heads=8, audio_head_dim=32, audio_cross_attention_dim=256,
                               apply_gated_attention=True, cross_attention_adaln=True)
    with torch.device("meta"):
        model = AVTransformer(config)
    model = model.to_empty(device="cpu")
    path = save_transformer(model, tmp_path / "big.safetensors", {"transformer": config.to_checkpoint_config()})
    del model
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True, check=True,
                         cwd=root)
    growth_mib, size_mib = map(float, out.stdout.split())
    assert size_mib > 100
    assert growth_mib < 1.5 * size_mib, f"loading grew RSS by {growth_mib:.0f} MiB for {size_mib:.0f} MiB of weights"


# -------------------------------------------------------------------------------------------------------------
# Key layouts users have: ComfyUI files, split-off transformer-only and VAE-only files


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    from ltxf.demo import build_demo_checkpoint

    return build_demo_checkpoint(tmp_path_factory.mktemp("demo") / "demo.safetensors", seed=0)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _rewrite(source, target, rename, *, keep=lambda key: True, metadata=True):
    from safetensors.torch import load_file

    tensors = {rename(k): v for k, v in load_file(str(source)).items() if keep(k)}
    save_file(tensors, str(target), metadata=checkpoint.read_metadata(source) if metadata else None)
    return target


def test_comfyui_layout_reads_like_the_official_file(demo_file, tmp_path):
    """ComfyUI keeps the transformer and the connectors under ``diffusion_model.`` (no ``model.``)."""
    from ltxf.demo import DEMO_GEMMA_HIDDEN
    from ltxf.models.text import load_embeddings_processor
    from ltxf.models.video_vae import load_video_vae_decoder

    comfy = _rewrite(demo_file, tmp_path / "comfy.safetensors", lambda k: k.removeprefix("model."))
    assert any(k.startswith("diffusion_model.") for k in checkpoint._file_keys(comfy))
    assert _same_state(load_transformer(comfy), load_transformer(demo_file))
    assert _same_state(load_embeddings_processor(comfy, gemma_hidden_size=DEMO_GEMMA_HIDDEN),
                       load_embeddings_processor(demo_file, gemma_hidden_size=DEMO_GEMMA_HIDDEN))
    assert _same_state(load_video_vae_decoder(comfy), load_video_vae_decoder(demo_file))
    assert checkpoint.detect_version(checkpoint.read_config(comfy)) == "ltx-2.3"


def test_transformer_only_and_vae_only_files(demo_file, tmp_path):
    from ltxf.models.video_vae import load_video_vae_decoder, load_video_vae_encoder

    reference = load_transformer(demo_file)
    # A bare transformer state dict with its config in the metadata.
    bare = _rewrite(demo_file, tmp_path / "bare.safetensors", lambda k: k.removeprefix(PREFIX),
                    keep=lambda k: k.startswith(PREFIX))
    assert _same_state(load_transformer(bare), reference)
    # The same without metadata: refused with a hint, read with the config of a given single file.
    plain = _rewrite(demo_file, tmp_path / "plain.safetensors", lambda k: k, keep=lambda k: k.startswith(PREFIX),
                     metadata=False)
    with pytest.raises(ValueError, match=r"plain\.safetensors has no .config. entry .*--config_from"):
        load_transformer(plain)
    with checkpoint.config_from(demo_file):
        assert _same_state(load_transformer(plain), reference)
    with pytest.raises(ValueError, match="no 'config' entry"):
        load_transformer(plain)  # the config source applies inside the block only

    # A VAE-only file, with the official prefix and without, with and without config metadata.
    vae_only = _rewrite(demo_file, tmp_path / "vae.safetensors", lambda k: k, keep=lambda k: k.startswith("vae."),
                        metadata=False)
    with checkpoint.config_from(demo_file):
        assert _same_state(load_video_vae_decoder(vae_only), load_video_vae_decoder(demo_file))
    config = checkpoint.read_config(demo_file)
    bare_vae = tmp_path / "bare_vae.safetensors"
    from safetensors.torch import load_file

    save_file({k.removeprefix("vae."): v for k, v in load_file(str(demo_file)).items() if k.startswith("vae.")},
              str(bare_vae), metadata={"config": json.dumps({"vae": config["vae"]})})
    assert _same_state(load_video_vae_encoder(bare_vae), load_video_vae_encoder(demo_file))
