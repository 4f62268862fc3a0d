"""Tests of ltxf.models.video_vae: parity with ltx-core 1.0.0, loading, tiling, memory, determinism and errors.

Parity tolerance. Ours and the reference do the same fp32 arithmetic in a different order (rsqrt-multiply vs
sqrt-divide in PixelNorm, F.pad vs concatenation, our reshapes vs einops, another conv algorithm choice), so the
outputs differ by rounding only: measured <= 1.5e-6 absolute on the tiny configs (outputs of order 1) and <= 7e-6
at real widths (latents up to ~6), where each conv sums up to 27 * 1024 products. We assert
``atol = rtol = 1e-4`` for the tiny configs and ``atol = rtol = 5e-4`` at real widths: well above the measured
error, and orders of magnitude below what a wiring mistake (a swapped channel order, a missing skip, a wrong pad)
produces (errors of order 0.1 - 1).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from ltxf.models.video_vae import (
    AxisTiles,
    VideoDecoder,
    VideoEncoder,
    VideoVAEConfig,
    apply_tiles,
    decode_video,
    encode_video,
    load_video_vae_decoder,
    load_video_vae_encoder,
    plan_decode_tiles,
    plan_encode_tiles,
    read_video_vae_config,
)
from tests.ltx_reference import import_ltx_core, random_init_, tiny_transformer_config, write_official_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]

# Tiny configs from reference/ltx2-architecture.md section 3.2: the real block layouts (full 8x / 32x compression)
# with 1 layer per stage and narrow widths.
_RES1 = ["res_x", {"num_layers": 1}]
TINY_23 = {
    "dims": 3, "in_channels": 3, "out_channels": 3, "latent_channels": 16, "patch_size": 4,
    "norm_layer": "pixel_norm", "latent_log_var": "uniform", "spatial_padding_mode": "zeros",
    "decoder_base_channels": 8, "causal_decoder": False, "timestep_conditioning": False,
    "encoder_blocks": [_RES1, ["compress_space_res", {"multiplier": 2}], _RES1,
                       ["compress_time_res", {"multiplier": 2}], _RES1, ["compress_all_res", {"multiplier": 2}],
                       _RES1, ["compress_all_res", {"multiplier": 1}], _RES1],
    "decoder_blocks": [_RES1, ["compress_space", {"multiplier": 2}], _RES1, ["compress_time", {"multiplier": 2}],
                       _RES1, ["compress_all", {"multiplier": 1}], _RES1, ["compress_all", {"multiplier": 2}],
                       _RES1],
}  # fmt: skip
# LTX-2 (19B) style: timestep-conditioned decoder with residual upsamplers, no spatial_padding_mode (encoder
# zeros, decoder reflect), last encoder downsampler x2 as in the 19B layout.
TINY_19B = {
    **{k: v for k, v in TINY_23.items() if k != "spatial_padding_mode"},
    "timestep_conditioning": True,
    "encoder_blocks": [*TINY_23["encoder_blocks"][:7], ["compress_all_res", {"multiplier": 2}], _RES1],
    "decoder_blocks": [_RES1, ["compress_all", {"residual": True, "multiplier": 2}],
                       _RES1, ["compress_all", {"residual": True, "multiplier": 2}],
                       _RES1, ["compress_all", {"residual": True, "multiplier": 2}], _RES1],
}  # fmt: skip
# The remaining code paths of both block vocabularies: group norm, width-changing residual blocks (GroupNorm(1) +
# 1x1x1 shortcut), plain strided encoder convs, per-channel log-variance, a causal decoder, noise injection,
# replicate padding and integer ("res_x": 1) block params.
TINY_OTHER = {
    "dims": 3, "in_channels": 3, "out_channels": 3, "latent_channels": 32, "patch_size": 4,
    "norm_layer": "group_norm", "latent_log_var": "per_channel", "spatial_padding_mode": "replicate",
    "decoder_base_channels": 8, "causal_decoder": True, "timestep_conditioning": True,
    "encoder_blocks": [["res_x", 1], ["res_x_y", {"multiplier": 2}], ["compress_all", {}], ["compress_space", {}],
                       ["compress_time", {}], ["compress_all_x_y", {"multiplier": 2}], ["res_x", 1]],
    "decoder_blocks": [["compress_all", {"multiplier": 1}], ["compress_space", {}], ["compress_time", {}],
                       ["res_x_y", {"multiplier": 2}], ["compress_all", {"residual": True, "multiplier": 1}],
                       ["res_x", {"num_layers": 1, "inject_noise": True}]],
}  # fmt: skip
CONFIGS = {"ltx-2.3": TINY_23, "ltx-2": TINY_19B, "other": TINY_OTHER}

TINY_TOL = 1e-4
REAL_WIDTH_TOL = 5e-4
TILE_TOL = 2e-5
# Tiles of 32 latent cells overlapping by 16, along one axis of a 48-cell input: far larger than the tiny models'
# receptive field (about +-8 cells), so part of every tile, blended overlaps included, is out of its edges' reach.
TIME_TILING = dict(tile_frames=248, tile_overlap_frames=120)
SPACE_TILING = dict(tile_size_px=1024, tile_overlap_px=512)


@functools.cache
def reference():
    return import_ltx_core("ltx_core.model.video_vae")


def reference_modules(cfg: dict, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Random-initialised ltx-core encoder and decoder sharing one set of latent statistics, as in a checkpoint."""
    vae = reference()
    encoder = random_init_(vae.VideoEncoderConfigurator.from_config({"vae": cfg}), seed=seed).eval()
    decoder = random_init_(vae.VideoDecoderConfigurator.from_config({"vae": cfg}), seed=seed + 1).eval()
    decoder.per_channel_statistics.load_state_dict(encoder.per_channel_statistics.state_dict())
    return encoder, decoder


def write_vae_checkpoint(path: Path, cfg: dict, encoder: torch.nn.Module, decoder: torch.nn.Module) -> Path:
    """The official layout: ``vae.encoder.*``, ``vae.decoder.*`` and one shared ``vae.per_channel_statistics.*``,
    plus tensors the VAE loaders must skip (another component and an unused statistic)."""

    def without_statistics(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in module.state_dict().items() if not k.startswith("per_channel_statistics.")}

    statistics = dict(encoder.per_channel_statistics.state_dict())
    statistics["mean-of-stds"] = torch.ones_like(statistics["std-of-means"])
    return write_official_checkpoint(
        path,
        {"transformer": tiny_transformer_config("ltx-2.3"), "vae": cfg},
        {
            "vae.encoder.": without_statistics(encoder),
            "vae.decoder.": without_statistics(decoder),
            "vae.per_channel_statistics.": statistics,
            "audio_vae.encoder.": {"conv_in.weight": torch.zeros(3)},
        },
    )


def random_video(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def ours(cfg: dict, seed: int = 0) -> tuple[VideoEncoder, VideoDecoder]:
    config = VideoVAEConfig.from_checkpoint_config(cfg)
    return (
        random_init_(VideoEncoder(config), seed=seed).eval(),
        random_init_(VideoDecoder(config), seed=seed + 1).eval(),
    )


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -------------------------------------------------------------------------------------------------------------
# Parity with ltx-core, through the checkpoint loader


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_reference_through_loader(tmp_path: Path, name: str) -> None:
    cfg = CONFIGS[name]
    ref_encoder, ref_decoder = reference_modules(cfg)
    path = write_vae_checkpoint(tmp_path / "ltx.safetensors", cfg, ref_encoder, ref_decoder)
    encoder = load_video_vae_encoder(path)
    decoder = load_video_vae_decoder(path)

    video = random_video((2, 3, 17, 64, 96))
    with torch.no_grad():
        ref_latent = ref_encoder(video)
    latent = encode_video(encoder, video)
    assert latent.shape == (2, cfg["latent_channels"], 3, 2, 3)
    torch.testing.assert_close(latent, ref_latent, atol=TINY_TOL, rtol=TINY_TOL)

    # The timestep-conditioned decoders draw their noise from the generator in the same order as the reference.
    with torch.no_grad():
        ref_video = ref_decoder(ref_latent, generator=gen(7))
    video_out = decode_video(decoder, ref_latent, generator=gen(7))
    assert video_out.shape == video.shape
    torch.testing.assert_close(video_out, ref_video, atol=TINY_TOL, rtol=TINY_TOL)

    if cfg["timestep_conditioning"]:
        timestep = torch.tensor([0.05, 0.4])
        with torch.no_grad():
            ref_video = ref_decoder(ref_latent, timestep=timestep, generator=gen(8))
        video_out = decode_video(decoder, ref_latent, timestep=timestep, generator=gen(8))
        torch.testing.assert_close(video_out, ref_video, atol=TINY_TOL, rtol=TINY_TOL)


def test_real_widths_match_reference() -> None:
    """The LTX-2.3 layout at the real channel widths (latent 128, decoder base 128; widths up to 1024, and 4096
    in the decoder's first upsampling conv), with one layer per residual stage, on a 1x3x9x64x64 clip."""
    cfg = {**TINY_23, "latent_channels": 128, "decoder_base_channels": 128}
    config = VideoVAEConfig.from_checkpoint_config(cfg)
    vae = reference()
    video = random_video((1, 3, 9, 64, 64))
    start = time.perf_counter()

    ref_encoder = random_init_(vae.VideoEncoderConfigurator.from_config({"vae": cfg})).eval()
    with torch.device("meta"):
        encoder = VideoEncoder(config)
    encoder.load_state_dict(ref_encoder.state_dict(), strict=True, assign=True)  # shares the reference's tensors
    with torch.no_grad():
        ref_latent = ref_encoder(video)
    latent = encode_video(encoder, video)
    encoder_error = (latent - ref_latent).abs().max().item()
    torch.testing.assert_close(latent, ref_latent, atol=REAL_WIDTH_TOL, rtol=REAL_WIDTH_TOL)
    del ref_encoder, encoder

    ref_decoder = random_init_(vae.VideoDecoderConfigurator.from_config({"vae": cfg}), seed=1).eval()
    with torch.device("meta"):
        decoder = VideoDecoder(config)
    decoder.load_state_dict(ref_decoder.state_dict(), strict=True, assign=True)
    with torch.no_grad():
        ref_video = ref_decoder(ref_latent)
    video_out = decode_video(decoder, ref_latent)
    decoder_error = (video_out - ref_video).abs().max().item()
    torch.testing.assert_close(video_out, ref_video, atol=REAL_WIDTH_TOL, rtol=REAL_WIDTH_TOL)
    print(
        f"real widths: encoder max|err|={encoder_error:.2e} (|latent| max {ref_latent.abs().max():.2f}), "
        f"decoder max|err|={decoder_error:.2e} (|video| max {ref_video.abs().max():.2f}), "
        f"{time.perf_counter() - start:.1f} s"
    )


# -------------------------------------------------------------------------------------------------------------
# Loading


def test_loader_reads_only_its_component_and_freezes_the_timestep_multiplier(tmp_path: Path) -> None:
    ref_encoder, ref_decoder = reference_modules(TINY_19B)
    path = write_vae_checkpoint(tmp_path / "ltx.safetensors", TINY_19B, ref_encoder, ref_decoder)
    encoder = load_video_vae_encoder(path, dtype=torch.bfloat16)
    decoder = load_video_vae_decoder(path, torch.float32, "cpu")

    # Strict loading succeeded although the file also holds the other half, audio tensors and an unused statistic.
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in encoder.state_dict().values())
    assert not any(k.startswith(("up_blocks", "last_")) for k in encoder.state_dict())
    assert set(encoder.per_channel_statistics.state_dict()) == {"std-of-means", "mean-of-means"}
    assert not encoder.training and not decoder.training
    for name, tensor in decoder.state_dict().items():
        torch.testing.assert_close(tensor, ref_decoder.state_dict()[name], atol=0, rtol=0)

    multiplier = decoder.timestep_scale_multiplier
    assert isinstance(multiplier, torch.nn.Parameter) and not multiplier.requires_grad
    assert multiplier.item() == 1000.0
    assert decoder.conv_in.conv.weight.requires_grad
    assert read_video_vae_config(path).compression() == (8, 32)


def test_missing_vae_section_or_tensors_raise(tmp_path: Path) -> None:
    ref_encoder, ref_decoder = reference_modules(TINY_23)
    no_section = write_official_checkpoint(
        tmp_path / "no_vae.safetensors", {"transformer": {}}, {"vae.encoder.": ref_encoder}
    )
    with pytest.raises(ValueError, match=r"no_vae\.safetensors.*no 'vae' section"):
        load_video_vae_encoder(no_section)

    encoder_only = write_official_checkpoint(
        tmp_path / "encoder_only.safetensors", {"vae": TINY_23}, {"vae.encoder.": ref_encoder}
    )
    encoder = load_video_vae_encoder(encoder_only)  # the statistics come with the encoder's own state dict here
    assert isinstance(encoder, VideoEncoder)
    with pytest.raises(ValueError, match=r"(?s)encoder_only\.safetensors.*missing keys.*conv_in\.conv\.weight"):
        load_video_vae_decoder(encoder_only)

    no_statistics = write_official_checkpoint(
        tmp_path / "no_stats.safetensors",
        {"vae": TINY_23},
        {"vae.decoder.": {k: v for k, v in ref_decoder.state_dict().items() if "statistics" not in k}},
    )
    with pytest.raises(ValueError, match=r"(?s)missing keys \(2\).*per_channel_statistics\.mean-of-means"):
        load_video_vae_decoder(no_statistics)

    wider = reference_modules({**TINY_19B, "decoder_base_channels": 16})
    mismatch = write_vae_checkpoint(tmp_path / "mismatch.safetensors", TINY_19B, *wider)
    with pytest.raises(ValueError, match=r"(?s)mismatch\.safetensors.*shape mismatches.*conv_in\.conv\.weight"):
        load_video_vae_decoder(mismatch)


# -------------------------------------------------------------------------------------------------------------
# Config and input errors


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"encoder_blocks": None}, r"missing required keys \['encoder_blocks'\]"),
        ({"decoder_blocks": [["res_x", {}]]}, r"decoder_blocks\[0\] \(res_x\): missing 'num_layers'"),
        ({"decoder_blocks": [["compress_all_res", {}]]}, r"decoder_blocks\[0\]: unknown block 'compress_all_res'"),
        ({"decoder_blocks": [["attn_res_x", {"num_layers": 1}]]}, r"decoder_blocks\[0\]: 'attn_res_x' is not"),
        ({"norm_layer": "layer_norm"}, r"norm_layer must be one of"),
        ({"latent_log_var": "none"}, r"latent_log_var must be one of"),
        ({"dims": 2}, r"dims=2 is not supported"),
        ({"latent_channels": "128"}, r"latent_channels must be a positive integer"),
        ({"decoder_blocks": TINY_23["decoder_blocks"][:3]}, r"encoder_blocks compress .* \(8, 32\) but"),
    ],
)
def test_bad_config_raises(change: dict, message: str) -> None:
    cfg = {k: v for k, v in {**TINY_23, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=r"model\.safetensors: invalid 'vae' config: " + message):
        VideoVAEConfig.from_checkpoint_config(cfg, path="model.safetensors")


def test_bad_input_shapes_raise() -> None:
    encoder, decoder = ours(TINY_19B)
    with pytest.raises(ValueError, match=r"frame count 10 is not 1 \+ 8k; the nearest valid frame counts are 9 or 17"):
        encode_video(encoder, random_video((1, 3, 10, 32, 32)))
    with pytest.raises(ValueError, match=r"frame count 0 .* 1$"):
        encode_video(encoder, random_video((1, 3, 0, 32, 32)))
    with pytest.raises(ValueError, match=r"video height 100 is not a multiple of 32; .* 96 or 128"):
        encode_video(encoder, random_video((1, 3, 9, 100, 32)))
    with pytest.raises(ValueError, match=r"video width 16 is not a multiple of 32; .* 32$"):
        encoder.tiled_encode(random_video((1, 3, 9, 32, 16)), tile_size_px=64)
    with pytest.raises(ValueError, match=r"expected 3 video channels, got 4"):
        encode_video(encoder, random_video((1, 4, 9, 32, 32)))
    with pytest.raises(ValueError, match=r"expected a latent of shape \(B, 16, F, H, W\)"):
        decode_video(decoder, torch.zeros(1, 8, 2, 2, 2), generator=gen(0))
    with pytest.raises(ValueError, match=r"latent height and width must be at least 2 .* reflect .* got 1 x 2"):
        decode_video(decoder, torch.zeros(1, 16, 2, 1, 2), generator=gen(0))  # the LTX-2 decoder pads by reflection
    with pytest.raises(ValueError, match=r"timestep-conditioned .* pass generator="):
        decode_video(decoder, torch.zeros(1, 16, 2, 2, 2))
    with pytest.raises(ValueError, match=r"timestep must be a float or a \(1,\) tensor"):
        decode_video(decoder, torch.zeros(1, 16, 2, 2, 2), timestep=torch.zeros(3), generator=gen(0))
    with pytest.raises(ValueError, match=r"tile_size_px must be a multiple of 32 and at least 64, got 100"):
        decoder.tiled_decode(torch.zeros(1, 16, 2, 2, 2), tile_size_px=100, tile_overlap_px=32, generator=gen(0))
    with pytest.raises(ValueError, match=r"tile_overlap_frames \(24\) must be less than tile_frames \(16\)"):
        decoder.tiled_decode(torch.zeros(1, 16, 2, 2, 2), tile_frames=16, generator=gen(0))


# -------------------------------------------------------------------------------------------------------------
# Determinism, autograd and inference mode


def test_deterministic_and_generator_driven() -> None:
    encoder, decoder = ours(TINY_19B)
    video = random_video((1, 3, 9, 64, 64))
    latent = encode_video(encoder, video)
    assert torch.equal(latent, encode_video(encoder, video))
    first = decode_video(decoder, latent, generator=gen(3))
    assert torch.equal(first, decode_video(decoder, latent, generator=gen(3)))
    assert not torch.allclose(first, decode_video(decoder, latent, generator=gen(4)))


def test_helpers_run_in_inference_mode_and_forward_is_differentiable() -> None:
    encoder, decoder = ours(TINY_23)
    video = random_video((1, 3, 9, 32, 32))
    assert encode_video(encoder, video).is_inference()
    assert decode_video(decoder, torch.zeros(1, 16, 2, 1, 1)).is_inference()
    assert encoder.tiled_encode(video, tile_size_px=64, tile_overlap_px=0).is_inference()
    # forward itself is not wrapped: gradients reach the weights.
    decoder(encoder(video)).square().mean().backward()
    assert encoder.conv_in.conv.weight.grad is not None and decoder.conv_out.conv.weight.grad is not None


# -------------------------------------------------------------------------------------------------------------
# Tiling


def check_partition_of_unity(plan: AxisTiles) -> None:
    total = torch.zeros(plan.out_length)
    for (start, end), mask in zip(plan.out_ranges, plan.masks, strict=True):
        assert mask.min() >= 0 and len(mask) == end - start
        total[start:end] += mask
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-6, rtol=0)


def blend_of_tile_indices(plan: AxisTiles) -> torch.Tensor:
    """What tiling outputs when tile i returns the constant i: a hard cut would jump by 1."""
    out = torch.zeros(plan.out_length, dtype=torch.float64)
    for i, ((start, end), mask) in enumerate(zip(plan.out_ranges, plan.masks, strict=True)):
        out[start:end] += i * mask.double()
    return out


def test_blending_is_continuous() -> None:
    """Along every axis the masks sum to one, and blending tiles that return the constants 0, 1, 2, ... rises
    monotonically from 0 to n - 1 in steps of at most 1 / (L + 1) for a blend region of L output cells (a hard
    seam would step by 1). The bound on the step holds where at most two tiles meet, as in these tilings."""
    cfg = VideoVAEConfig.from_checkpoint_config(TINY_23)
    tiling = dict(tile_size_px=128, tile_overlap_px=32, tile_frames=32, tile_overlap_frames=8)
    decode = plan_decode_tiles((20, 11, 7), cfg, **tiling)
    encode = plan_encode_tiles((8 * 19 + 1, 32 * 11, 32 * 7), cfg, **tiling)
    # Minimum blend length per axis in output units: decode frames (overlap + the shared causal frame) and pixels;
    # encode latent cells (in time, less the zero-weight first latent of a tile).
    min_blend = {"decode": (8 + 1, 32, 32), "encode": (8 // 8, 1, 1)}
    for kind, plans in (("decode", decode), ("encode", encode)):
        for axis, plan in enumerate(plans):
            assert len(plan.in_ranges) >= 2, (kind, axis)
            check_partition_of_unity(plan)
            values = blend_of_tile_indices(plan)
            steps = values.diff()
            assert values[0] == 0 and values[-1] == pytest.approx(len(plan.in_ranges) - 1), (kind, axis)
            assert steps.min() >= -1e-9, (kind, axis)
            assert steps.max() <= 1 / (min_blend[kind][axis] + 1) + 1e-6, (kind, axis, steps.max())
    # A temporal encode tile that does not start at frame 0 encodes its first frame as an image: zero weight.
    assert all(mask[0] == 0 for mask in encode[0].masks[1:])
    # Tiles are inside the input and the output, and equally long.
    for plans, in_shape in ((decode, (20, 11, 7)), (encode, (153, 352, 224))):
        for plan, length in zip(plans, in_shape, strict=True):
            assert plan.in_ranges[0][0] == 0 and plan.in_ranges[-1][1] == length
            assert len({end - start for start, end in plan.in_ranges}) == 1


def footprint(run, x: torch.Tensor, axis: int, cell: int, bump) -> tuple[int, int, int]:
    """Perturb input cell ``q`` (the middle one) along ``axis`` and return (q, first, last) output index along
    ``axis`` that changes at all. Interior footprints are translation invariant, so this gives the receptive field
    of every cell: cell c reaches outputs [first + (c - q) s, last + (c - q) s] for the axis scale s."""
    q = x.shape[axis] // cell // 2
    bumped = bump(x.clone(), q)
    diff = (run(bumped) - run(x)).abs()
    changed = diff.amax(dim=[d for d in range(diff.ndim) if d != axis]).nonzero().flatten()
    return q, int(changed.min()), int(changed.max())


def exact_positions(
    plan: AxisTiles, num_cells: int, first: int, last: int, q: int, scale: int, left_outside: int
) -> torch.Tensor:
    """Output positions where every tile with non-zero weight saw the whole receptive field: no cell outside the
    tile reaches them. ``left_outside`` is the offset of the last cell left of a tile that lies (partly) outside it
    (-1: cell a - 1; 0: cell a itself, for encode tiles in time, which hold only cell a's last frame)."""
    exact = torch.ones(plan.out_length, dtype=torch.bool)
    for (a, b), (o0, o1), mask in zip(plan.in_ranges, plan.out_ranges, plan.masks, strict=True):
        p = torch.arange(o0, o1)
        ok = torch.ones(o1 - o0, dtype=torch.bool)
        if a > 0:
            ok &= p > last + (a + left_outside - q) * scale
        if b < num_cells:
            ok &= p < first + (b - q) * scale
        exact[o0:o1] &= ok | (mask == 0)
    return exact


def assert_exact_where_expected(tiled: torch.Tensor, untiled: torch.Tensor, exact: torch.Tensor, axis: int) -> None:
    diff = (tiled - untiled).abs().amax(dim=[d for d in range(tiled.ndim) if d != axis])
    assert exact.float().mean() > 0.3, "the tiling must leave a sizeable region out of reach of the tile edges"
    assert diff[exact].max() <= TILE_TOL, diff[exact].max()
    # The tile edges do matter elsewhere, so the exactness above is not a coincidence.
    assert diff[~exact].max() > 100 * TILE_TOL


@pytest.mark.parametrize("name", ["ltx-2.3", "ltx-2"])
@pytest.mark.parametrize("axis", [2, 4], ids=["time", "width"])
def test_tiled_decode_equals_untiled_outside_tile_edge_reach(name: str, axis: int) -> None:
    """Tiled and untiled decodes agree to TILE_TOL (2e-5; measured <= 2.1e-6) wherever no tile with non-zero
    blend weight has a cut edge within the receptive field (measured, not assumed). There every contributing tile
    computes the same numbers as the full decode up to fp32 rounding (conv algorithms may differ with the input
    size), and the weights sum to one, so the blend is that number again. Positions in blended overlaps are
    included when both tiles reach them."""
    cfg = CONFIGS[name]
    _, decoder = ours(cfg)
    shape = (1, 16, 48, 2, 2) if axis == 2 else (1, 16, 1, 2, 48)
    latent = torch.randn(shape, generator=gen(1))
    scale = 8 if axis == 2 else 32

    def run(z: torch.Tensor) -> torch.Tensor:
        return decode_video(decoder, z, generator=gen(5))

    def bump(z: torch.Tensor, q: int) -> torch.Tensor:
        z.select(axis, q).add_(5.0)
        return z

    q, first, last = footprint(run, latent, axis, 1, bump)
    tiling = TIME_TILING if axis == 2 else SPACE_TILING
    tiled = decoder.tiled_decode(latent, generator=gen(5), **tiling)
    untiled = run(latent)
    assert tiled.shape == untiled.shape
    plan = plan_decode_tiles(shape[2:], decoder.config, **tiling)[axis - 2]
    exact = exact_positions(plan, shape[axis], first, last, q, scale, left_outside=-1)
    assert_exact_where_expected(tiled, untiled, exact, axis)


@pytest.mark.parametrize("axis", [2, 4], ids=["time", "width"])
def test_tiled_encode_equals_untiled_outside_tile_edge_reach(axis: int) -> None:
    """As for decoding, in latent cells. In time the encoder is causal, so only a tile's start matters."""
    encoder, _ = ours(TINY_23)
    num_cells = 48
    shape = (1, 3, 8 * (num_cells - 1) + 1, 32, 32) if axis == 2 else (1, 3, 1, 32, 32 * num_cells)
    video = random_video(shape)

    def run(x: torch.Tensor) -> torch.Tensor:
        return encode_video(encoder, x)

    def bump(x: torch.Tensor, q: int) -> torch.Tensor:
        if axis == 2:  # latent frame q stands for video frames 8q - 7 .. 8q
            x[:, :, 8 * q - 7 : 8 * q + 1] *= -1
        else:
            x[..., 32 * q : 32 * q + 32] *= -1
        return x

    q, first, last = footprint(run, video, axis, 8 if axis == 2 else 32, bump)
    tiling = TIME_TILING if axis == 2 else SPACE_TILING
    tiled = encoder.tiled_encode(video, **tiling)
    untiled = run(video)
    plan = plan_encode_tiles(shape[2:], encoder.config, **tiling)[axis - 2]
    # Express the tiles' inputs in latent cells (a tile reading cells [a, b) writes latents [a, b)).
    cells = AxisTiles(plan.out_ranges, plan.out_ranges, plan.masks, plan.out_length)
    exact = exact_positions(cells, num_cells, first, last, q, 1, left_outside=0 if axis == 2 else -1)
    assert_exact_where_expected(tiled, untiled, exact, axis)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from ltxf.models.video_vae import VideoDecoder, VideoVAEConfig, decode_video
    from tests.ltx_reference import random_init_

    def peak_rss_kib():
        # VmHWM belongs to this process's address space; ru_maxrss would include the parent's peak (it survives
        # fork + exec on Linux).
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

    torch.set_num_threads(1)
    cfg, tiling = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    decoder = random_init_(VideoDecoder(VideoVAEConfig.from_checkpoint_config(cfg))).eval()
    latent = torch.randn(2, 16, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    decode_video(decoder, latent[:, :, :2, :2, :2])  # one-off allocations (thread pools, kernels) before measuring
    before = peak_rss_kib()
    video = decoder.tiled_decode(latent, **tiling) if tiling else decode_video(decoder, latent)
    peak = peak_rss_kib() - before
    print(json.dumps({"peak_mib": peak / 1024, "output_mib": video.nbytes / 2**20, "shape": list(video.shape)}))
    """
)


def test_tiled_decode_bounds_peak_memory() -> None:
    """Peak resident memory added by decoding a (2, 16, 5, 8, 8) latent to 2 x 33 x 256 x 256 frames (50 MiB),
    untiled and in 128-pixel / 17-frame tiles, each in a fresh process (VmHWM, the peak resident set of that
    process). Both must hold the returned video; beyond it, the untiled decode holds several full-size activations
    at once, the tiled one only one tile's. Measured: untiled ~130 MiB, tiled ~65-80 MiB, i.e. working memory
    (peak - output) ~80 MiB vs ~15-30 MiB. Batch 2 keeps both on the same (mkldnn) CPU conv path: PyTorch
    sends small batch-1 3-D convs to slow_conv3d, whose im2col buffers would distort the comparison."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    tiled = dict(tile_size_px=128, tile_overlap_px=32, tile_frames=16, tile_overlap_frames=8)
    tilings = {"untiled": {}, "tiled": tiled}
    procs = {
        mode: subprocess.Popen(
            [sys.executable, "-c", MEMORY_SCRIPT, json.dumps(TINY_23), json.dumps(tiling)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT,
        )  # fmt: skip
        for mode, tiling in tilings.items()
    }
    results = {}
    for mode, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        results[mode] = json.loads(stdout.strip().splitlines()[-1])
    untiled, tiled = results["untiled"], results["tiled"]
    assert untiled["shape"] == tiled["shape"] == [2, 3, 33, 256, 256]
    output = tiled["output_mib"]
    print(
        f"peak RSS increase: untiled {untiled['peak_mib']:.0f} MiB, tiled {tiled['peak_mib']:.0f} MiB "
        f"(output {output:.0f} MiB)"
    )
    assert tiled["peak_mib"] < 0.8 * untiled["peak_mib"]
    assert tiled["peak_mib"] - output < 0.6 * (untiled["peak_mib"] - output)


def test_tiling_composes_exactly_across_all_axes() -> None:
    """The tile bookkeeping on all three axes at once, with maps that have no receptive field beyond a cell:
    then every tile computes exactly what the whole input gives, so tiling must reproduce it to rounding. The
    decode map spreads latent cell j over the video frames 8j - 7 .. 8j (frame 0 for j = 0) and 32 x 32 pixels;
    the encode map samples frame 8j and one pixel per cell."""
    cfg = VideoVAEConfig.from_checkpoint_config(TINY_23)
    tiling = dict(tile_size_px=64, tile_overlap_px=32, tile_frames=16, tile_overlap_frames=8)

    def spread(z: torch.Tensor) -> torch.Tensor:
        return z.repeat_interleave(8, dim=2)[:, :, 7:].repeat_interleave(32, dim=3).repeat_interleave(32, dim=4)

    latent = torch.randn(2, 3, 6, 5, 7, generator=gen(0))
    plans = plan_decode_tiles(latent.shape[2:], cfg, **tiling)
    assert [len(p.in_ranges) for p in plans] == [4, 4, 6]
    out = apply_tiles(spread, latent, plans, torch.zeros(2, 3, 41, 160, 224))
    torch.testing.assert_close(out, spread(latent), atol=1e-6, rtol=1e-6)

    def sample(x: torch.Tensor) -> torch.Tensor:
        return x[:, :, ::8, ::32, ::32]

    video = random_video((2, 3, 41, 160, 224))
    plans = plan_encode_tiles(video.shape[2:], cfg, **tiling)
    out = apply_tiles(sample, video, plans, torch.zeros(2, 3, 6, 5, 7))
    torch.testing.assert_close(out, sample(video), atol=1e-6, rtol=1e-6)


def test_tiled_decode_on_all_axes() -> None:
    """The decoder tiled on all three axes at once fills the whole output (with tiles far smaller than the
    receptive field, so not the untiled values); a tile as large as the input reproduces the untiled decode."""
    _, decoder = ours(TINY_23)
    latent = torch.randn(2, 16, 5, 4, 5, generator=gen(2))
    untiled = decode_video(decoder, latent)
    tiling = dict(tile_size_px=64, tile_overlap_px=32, tile_frames=16, tile_overlap_frames=8)
    assert [len(p.in_ranges) for p in plan_decode_tiles((5, 4, 5), decoder.config, **tiling)] == [3, 3, 4]
    tiled = decoder.tiled_decode(latent, **tiling)
    assert tiled.shape == untiled.shape == (2, 3, 33, 128, 160)
    assert torch.isfinite(tiled).all() and (tiled != 0).all()
    single = decoder.tiled_decode(latent, tile_size_px=160, tile_overlap_px=32, tile_frames=32, tile_overlap_frames=8)
    assert torch.equal(single, untiled)
