"""Exports loaded by the tools users have: ltx-core 1.0.0's model builders (the official pipelines' loader),
ComfyUI's LoRA rule (written here from its documented behaviour), and diffusers 0.42.1 (``LTX2LoraLoaderMixin``
with peft, ``LTX2VideoTransformer3DModel.from_single_file``). ltx-core and diffusers are test-only oracles.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ltxf.checkpoint import (
    LORA_METADATA_FOLDED_SCALE,
    LORA_METADATA_RANK,
    LORA_METADATA_TRAINING_ALPHA,
    export_full_model,
    export_lora,
)
from ltxf.demo import build_demo_checkpoint
from ltxf.models.checkpoint import TRANSFORMER_PREFIX, read_metadata
from tests.ltx_reference import import_ltx_core

CONNECTOR_KEYS = ("video_embeddings_connector.", "audio_embeddings_connector.")


@pytest.fixture(scope="module")
def demo_base(tmp_path_factory):
    """The demo checkpoint (every component) with the extra metadata the published files carry."""
    directory = tmp_path_factory.mktemp("demo")
    plain = build_demo_checkpoint(directory / "plain.safetensors", seed=0)
    tensors, metadata = load_file(str(plain)), read_metadata(plain)
    metadata.update(model_version="2.3.0", license="LTX-2 Community License", custom_note="kept as is")
    base = directory / "base.safetensors"
    save_file(tensors, str(base), metadata=metadata)
    return base, tensors, metadata


def _trained(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Fine-tuned-looking fp32 transformer and connector weights (keys without the transformer prefix)."""
    generator = torch.Generator().manual_seed(5)
    transformer, connectors = {}, {}
    for key, value in tensors.items():
        if not key.startswith(TRANSFORMER_PREFIX):
            continue
        name = key.removeprefix(TRANSFORMER_PREFIX)
        trained = value.float() + 0.01 * torch.randn(value.shape, generator=generator)
        (connectors if name.startswith(CONNECTOR_KEYS) else transformer)[name] = trained
    return transformer, connectors


def _build(configurator, path, sd_ops):
    loader = import_ltx_core("ltx_core.loader")
    return loader.SingleGPUModelBuilder(model_class_configurator=configurator, model_path=str(path),
                                        model_sd_ops=sd_ops).build(device=torch.device("cpu"))


def _assert_built_from(model, tensors: dict[str, torch.Tensor], prefix_of, what: str) -> None:
    """Nothing left on meta (ltx-core returns the meta model with a warning then), and every tensor is the file's."""
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"{what}: uninitialised in ltx-core: {left[:5]}"
    state = model.state_dict()
    assert state, what
    for name, value in state.items():
        assert torch.equal(value, tensors[prefix_of(name)]), f"{what}: {name}"


def test_full_export_is_a_whole_checkpoint_that_ltx_core_builds(demo_base, tmp_path):
    base, base_tensors, base_metadata = demo_base
    transformer, connectors = _trained(base_tensors)
    path = export_full_model(tmp_path / "full.safetensors", transformer, dtype=torch.bfloat16, base_checkpoint=base,
                             connectors=connectors)
    exported, metadata = load_file(str(path)), read_metadata(path)

    # The base's metadata (config, model_version, license, anything else) is kept.
    assert metadata == base_metadata
    # Every tensor of the base is there; the untrained ones unchanged (values and dtype), the trained ones in bf16.
    assert set(exported) == set(base_tensors)
    trained = {TRANSFORMER_PREFIX + k: v for k, v in {**transformer, **connectors}.items()}
    for key, value in exported.items():
        if key in trained:
            assert value.dtype == torch.bfloat16 and torch.equal(value, trained[key].to(torch.bfloat16)), key
        else:
            assert value.dtype == base_tensors[key].dtype and torch.equal(value, base_tensors[key]), key
    untrained = set(base_tensors) - set(trained)
    assert {k.split(".")[0] for k in untrained} == {"vae", "audio_vae", "vocoder", "text_embedding_projection"}

    # The official loader builds every component from it with nothing uninitialised.
    ltx_transformer = import_ltx_core("ltx_core.model.transformer")
    video_vae = import_ltx_core("ltx_core.model.video_vae")
    audio_vae = import_ltx_core("ltx_core.model.audio_vae.model_configurator")
    model = _build(ltx_transformer.LTXModelConfigurator, path, ltx_transformer.LTXV_MODEL_COMFY_RENAMING_MAP)
    _assert_built_from(model, exported, lambda n: TRANSFORMER_PREFIX + n, "transformer")

    def media(prefix: str):
        def name(n: str) -> str:
            stats = n.startswith("per_channel_statistics.")
            return f"{prefix}.{n}" if stats else f"{prefix}.{{part}}.{n}"
        return name

    for configurator, sd_ops, prefix, part in (
        (video_vae.VideoEncoderConfigurator, video_vae.VAE_ENCODER_COMFY_KEYS_FILTER, "vae", "encoder"),
        (video_vae.VideoDecoderConfigurator, video_vae.VAE_DECODER_COMFY_KEYS_FILTER, "vae", "decoder"),
        (audio_vae.AudioEncoderConfigurator, audio_vae.AUDIO_VAE_ENCODER_COMFY_KEYS_FILTER, "audio_vae", "encoder"),
        (audio_vae.AudioDecoderConfigurator, audio_vae.AUDIO_VAE_DECODER_COMFY_KEYS_FILTER, "audio_vae", "decoder"),
    ):
        model = _build(configurator, path, sd_ops)
        _assert_built_from(model, exported, lambda n, p=prefix, q=part: media(p)(n).format(part=q), f"{prefix}.{part}")
    vocoder = _build(audio_vae.VocoderConfigurator, path, audio_vae.VOCODER_COMFY_KEYS_FILTER)
    _assert_built_from(vocoder, exported, lambda n: "vocoder." + n, "vocoder")


def test_full_export_refuses_names_the_base_lacks(demo_base, tmp_path):
    base, base_tensors, _ = demo_base
    transformer, _ = _trained(base_tensors)
    with pytest.raises(ValueError, match=r"not in the base checkpoint .*model\.diffusion_model\.extra\.weight"):
        export_full_model(tmp_path / "bad.safetensors", {**transformer, "extra.weight": torch.zeros(1)},
                          base_checkpoint=base)
    with pytest.raises(ValueError, match="connector keys must start with"):
        export_full_model(tmp_path / "bad.safetensors", transformer, base_checkpoint=base,
                          connectors={"transformer_blocks.0.attn1.to_q.weight": torch.zeros(1)})
    assert not (tmp_path / "bad.safetensors").exists()


# -------------------------------------------------------------------------------------------------------------
# LoRA exports in ltx-core, ComfyUI and diffusers

RANK, ALPHA = 4, 8.0  # alpha != rank is the point: the trained model is W + 2 * B @ A


@pytest.fixture(scope="module")
def bf16_base(demo_base, tmp_path_factory):
    """The demo checkpoint with a bf16 transformer, as the published files (ltx-core fuses LoRAs into bf16 only)."""
    _, tensors, metadata = demo_base
    tensors = {k: v.to(torch.bfloat16) if k.startswith(TRANSFORMER_PREFIX) else v for k, v in tensors.items()}
    path = tmp_path_factory.mktemp("bf16") / "base_bf16.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path, tensors, metadata


@pytest.fixture(scope="module")
def demo_lora(bf16_base):
    """Trained-looking LoRA tensors on attention and feed-forward layers of the demo transformer."""
    _, base_tensors, _ = bf16_base
    modules = ("transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn2.to_k", "transformer_blocks.1.ff.net.2",
               "transformer_blocks.1.audio_attn1.to_out.0", "transformer_blocks.0.video_to_audio_attn.to_v")
    generator = torch.Generator().manual_seed(3)
    lora = {}
    for module in modules:
        out_dim, in_dim = base_tensors[f"{TRANSFORMER_PREFIX}{module}.weight"].shape
        lora[module + ".lora_A.weight"] = torch.randn(RANK, in_dim, generator=generator) * 0.1
        lora[module + ".lora_B.weight"] = torch.randn(out_dim, RANK, generator=generator) * 0.1
    return modules, lora


def _trained_weight(base_tensors, lora, module) -> torch.Tensor:
    w = base_tensors[f"{TRANSFORMER_PREFIX}{module}.weight"].float()
    return w + (ALPHA / RANK) * (lora[module + ".lora_B.weight"] @ lora[module + ".lora_A.weight"])


def _tolerance(base_tensors, lora, module) -> torch.Tensor:
    """The bf16 error bound: at most four roundings to bf16 (A, the scaled B, the product, the fused sum in a
    loader that fuses in bf16), each at most the unit roundoff u = 2^-8 relative, so to first order
    |error| <= 4u * (|W| + scale * |B| @ |A|) = 2^-6 * (...). Observed: at most about half of it."""
    w = base_tensors[f"{TRANSFORMER_PREFIX}{module}.weight"].float()
    a, b = lora[module + ".lora_A.weight"], lora[module + ".lora_B.weight"]
    return 2.0**-6 * (w.abs() + (ALPHA / RANK) * (b.abs() @ a.abs()))


def test_lora_export_layout_and_metadata(demo_lora, tmp_path):
    modules, lora = demo_lora
    path = export_lora(tmp_path / "lora.safetensors", lora, rank=RANK, alpha=ALPHA,
                       metadata={"reference_downscale_factor": "2"})
    with safe_open(str(path), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    # Lightricks' own layout: A/B pairs under diffusion_model., no .alpha keys (diffusers refuses them).
    assert keys == {f"diffusion_model.{m}.lora_{x}.weight" for m in modules for x in "AB"}
    assert metadata["reference_downscale_factor"] == "2"
    assert metadata[LORA_METADATA_RANK] == "4" and float(metadata[LORA_METADATA_TRAINING_ALPHA]) == ALPHA
    assert float(metadata[LORA_METADATA_FOLDED_SCALE]) == ALPHA / RANK
    # No metadata name a loader would read as an alpha to apply again.
    assert not {"lora_alpha", "ss_network_alpha", "lora_adapter_metadata", "alpha"} & set(metadata)


def test_lora_export_gives_the_trained_weights_in_ltx_core_and_comfyui(bf16_base, demo_lora, tmp_path):
    base, base_tensors, _ = bf16_base
    modules, lora = demo_lora
    path = export_lora(tmp_path / "lora.safetensors", lora, rank=RANK, alpha=ALPHA)

    loader = import_ltx_core("ltx_core.loader")
    ltx_transformer = import_ltx_core("ltx_core.model.transformer")
    fused = loader.SingleGPUModelBuilder(
        model_class_configurator=ltx_transformer.LTXModelConfigurator, model_path=str(base),
        model_sd_ops=ltx_transformer.LTXV_MODEL_COMFY_RENAMING_MAP,
    ).lora(str(path), 1.0, loader.LTXV_LORA_COMFY_RENAMING_MAP).build(device=torch.device("cpu"),
                                                                      dtype=torch.bfloat16).state_dict()

    # ComfyUI's rule: W + strength * (alpha / rank if '<module>.alpha' exists else 1) * up @ down.
    file = load_file(str(path))
    comfy = {}
    for module in modules:
        prefix = f"diffusion_model.{module}"
        a, b = file[prefix + ".lora_A.weight"].float(), file[prefix + ".lora_B.weight"].float()
        scale = file[prefix + ".alpha"].item() / RANK if prefix + ".alpha" in file else 1.0
        comfy[module] = base_tensors[f"{TRANSFORMER_PREFIX}{module}.weight"].float() + scale * (b @ a)

    for module in modules:
        expected, bound = _trained_weight(base_tensors, lora, module), _tolerance(base_tensors, lora, module)
        for name, weight in (("ltx-core", fused[module + ".weight"]), ("ComfyUI", comfy[module])):
            error = (weight.float() - expected).abs()
            assert (error <= bound).all(), f"{name} {module}: max error {error.max():.2e}"
    # Negative control: what the training alpha would give if a loader applied it on top.
    doubled = base_tensors[f"{TRANSFORMER_PREFIX}{modules[0]}.weight"].float() + 2 * (
        _trained_weight(base_tensors, lora, modules[0]) - base_tensors[f"{TRANSFORMER_PREFIX}{modules[0]}.weight"])
    assert ((doubled - comfy[modules[0]]).abs() > _tolerance(base_tensors, lora, modules[0])).any()
    untouched = [k for k in fused if k.removesuffix(".weight") not in modules]
    assert all(torch.equal(fused[k], base_tensors[TRANSFORMER_PREFIX + k].to(torch.bfloat16)) for k in untouched)


def test_lora_export_gives_the_trained_weights_in_diffusers(bf16_base, demo_lora, tmp_path):
    """diffusers' pipeline loader (``LTX2LoraLoaderMixin.load_lora_weights``, peft) on the transformer read by
    ``LTX2VideoTransformer3DModel.from_single_file``; fused with ``fuse_lora``. The official-to-diffusers
    renaming is diffusers' own (its single-file converter and its LoRA converter)."""
    from tests.diffusers_reference import diffusers_transformer_from_single_file, lora_pipeline

    base, base_tensors, _ = bf16_base
    modules, lora = demo_lora
    path = export_lora(tmp_path / "lora.safetensors", lora, rank=RANK, alpha=ALPHA)
    transformer = diffusers_transformer_from_single_file(base, tmp_path / "config")
    pipe = lora_pipeline(transformer)
    pipe.load_lora_weights(str(path), adapter_name="ltxf")
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    state = transformer.state_dict()
    for module in modules:
        expected, bound = _trained_weight(base_tensors, lora, module), _tolerance(base_tensors, lora, module)
        key = next(k for k in (module + ".weight", module + ".base_layer.weight") if k in state)
        error = (state[key].float() - expected).abs()
        assert (error <= bound).all(), f"diffusers {module}: max error {error.max():.2e}"

    # The old layout (with '.alpha' keys) is what diffusers refused.
    with_alpha = load_file(str(path))
    with_alpha.update({f"diffusion_model.{m}.alpha": torch.tensor(float(RANK)) for m in modules})
    save_file(with_alpha, str(tmp_path / "with_alpha.safetensors"))
    with pytest.raises(ValueError, match="LoRA param names contain"):
        lora_pipeline(diffusers_transformer_from_single_file(base, tmp_path / "config")).load_lora_weights(
            str(tmp_path / "with_alpha.safetensors"))


# -------------------------------------------------------------------------------------------------------------
# diffusers reads ltxf-written transformers


@pytest.mark.parametrize("version", ["ltx-2", "ltx-2.3"])
def test_diffusers_from_single_file_gives_ltxf_outputs(version, tmp_path):
    """An ltxf-written checkpoint (``save_transformer``) read by ``LTX2VideoTransformer3DModel.from_single_file``
    (LTX-2.3 after the ``prompt_adaln_single`` rename its single-file path lacks) gives ltxf's outputs, video and
    audio, fp32. Tolerance 1e-5 absolute on outputs of magnitude ~2: both compute in fp32 but order the RoPE and
    attention arithmetic differently (and diffusers masks text with -10000 where ltxf excludes the keys); measured
    max 5e-7 (a few fp32 ulps), so the bound is 20x the rounding seen and far below any wiring error."""
    from ltxf.demo import init_random_
    from ltxf.latents import audio_positions, video_positions
    from ltxf.models.transformer import AVTransformer, Modality, TransformerConfig, save_transformer
    from tests.diffusers_reference import diffusers_transformer_from_single_file
    from tests.ltx_reference import tiny_transformer_config

    section = tiny_transformer_config(version)
    model = init_random_(AVTransformer(TransformerConfig.from_checkpoint_config(section)),
                         torch.Generator().manual_seed(1)).eval()
    path = save_transformer(model, tmp_path / "ltxf.safetensors", {"transformer": section})
    theirs = diffusers_transformer_from_single_file(path, tmp_path / "diffusers").eval()

    batch, frames, height, width, audio_frames, text = 2, 2, 3, 4, 5, 7
    generator = torch.Generator().manual_seed(2)
    sigma = torch.tensor([0.8, 0.3])
    video_text = section["caption_channels"] if version == "ltx-2" else model.config.inner_dim
    audio_text = section["caption_channels"] if version == "ltx-2" else model.config.audio_inner_dim
    mask = torch.ones(batch, text, dtype=torch.int64)
    mask[1, :3] = 0
    video = Modality(latent=torch.randn(batch, frames * height * width, 128, generator=generator), sigma=sigma,
                     timesteps=sigma[:, None].expand(batch, frames * height * width).clone(),
                     positions=video_positions(batch, frames, height, width, 24.0),
                     context=torch.randn(batch, text, video_text, generator=generator), context_mask=mask)
    audio = Modality(latent=torch.randn(batch, audio_frames, 128, generator=generator), sigma=sigma,
                     timesteps=sigma[:, None].expand(batch, audio_frames).clone(),
                     positions=audio_positions(batch, audio_frames),
                     context=torch.randn(batch, text, audio_text, generator=generator), context_mask=mask)
    with torch.no_grad():
        ours_video, ours_audio = model(video=video, audio=audio)
        scaled = sigma * section["timestep_scale_multiplier"]
        out = theirs(
            hidden_states=video.latent, audio_hidden_states=audio.latent, encoder_hidden_states=video.context,
            audio_encoder_hidden_states=audio.context, timestep=video.timesteps * section["timestep_scale_multiplier"],
            audio_timestep=audio.timesteps * section["timestep_scale_multiplier"], sigma=scaled, audio_sigma=scaled,
            encoder_attention_mask=mask, audio_encoder_attention_mask=mask, video_coords=video.positions,
            audio_coords=audio.positions, use_cross_timestep=True, return_dict=False)
    for name, ours, reference in (("video", ours_video, out[0]), ("audio", ours_audio, out[1])):
        assert ours.shape == reference.shape, name
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0, msg=lambda m, n=name: f"{version} {n}: {m}")


def test_demo_checkpoint_is_one_the_official_tools_build(demo_base):
    """The demo file's connectors and decoder have the sizes every official version builds: 128 learnable
    registers (the 1.2 code builds 128 whatever the config says) and decoder upsampling multipliers whose product
    is 8 (1.2 sizes the decoder's first convolution base x product, 1.0 base x 8). ltx-core 1.0's connector
    builders take the demo's connector tensors strictly (the VAEs and the transformer: the full-export test)."""
    from ltxf.demo import DEMO_VIDEO_VAE

    _, tensors, metadata = demo_base
    base_channels = DEMO_VIDEO_VAE["decoder_base_channels"]
    multipliers = [b[1]["multiplier"] for b in DEMO_VIDEO_VAE["decoder_blocks"] if b[0].startswith("compress")]
    assert math.prod(multipliers) == 8
    assert tensors["vae.decoder.conv_in.conv.weight"].shape[0] == base_channels * math.prod(multipliers)

    connectors = import_ltx_core("ltx_core.text_encoders.gemma.embeddings_connector")
    config = json.loads(metadata["config"])
    for name, configurator in (("video", connectors.Embeddings1DConnectorConfigurator),
                               ("audio", connectors.AudioEmbeddings1DConnectorConfigurator)):
        prefix = f"{TRANSFORMER_PREFIX}{name}_embeddings_connector."
        state = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        assert state["learnable_registers"].shape[0] == 128
        with torch.device("meta"):
            module = configurator.from_config(config)
        module.load_state_dict(state, strict=True, assign=True)
