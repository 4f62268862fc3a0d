"""ltxf.latents against ltx-core's patchifiers and latent tools (exact equality: pure integer/float32 index math)."""

from __future__ import annotations

import pytest
import torch

from ltxf.latents import (
    audio_latent_length,
    audio_positions,
    patchify_audio,
    patchify_video,
    unpatchify_audio,
    unpatchify_video,
    video_latent_size,
    video_positions,
)
from tests.ltx_reference import import_ltx_core

patchifiers = import_ltx_core("ltx_core.components.patchifiers")
ltx_tools = import_ltx_core("ltx_core.tools")
ltx_types = import_ltx_core("ltx_core.types")


def _video_tools(batch: int, frames: int, height: int, width: int, fps: float):
    shape = ltx_types.VideoLatentShape(batch, 128, frames, height, width)
    return ltx_tools.VideoLatentTools(patchifiers.VideoLatentPatchifier(patch_size=1), shape, fps=fps)


@pytest.mark.parametrize("shape", [(2, 128, 3, 4, 5), (1, 16, 1, 2, 7)])
def test_video_patchify_matches_reference_and_round_trips(shape):
    latents = torch.randn(shape)
    tokens = patchify_video(latents)
    assert torch.equal(tokens, patchifiers.VideoLatentPatchifier(1).patchify(latents))
    assert torch.equal(unpatchify_video(tokens, *shape[2:]), latents)


def test_audio_patchify_matches_reference_and_round_trips():
    latents = torch.randn(2, 8, 11, 16)
    tokens = patchify_audio(latents)
    assert torch.equal(tokens, patchifiers.AudioPatchifier(1).patchify(latents))
    assert torch.equal(unpatchify_audio(tokens), latents)
    reference = patchifiers.AudioPatchifier(1).unpatchify(tokens, ltx_types.AudioLatentShape(2, 8, 11, 16))
    assert torch.equal(unpatchify_audio(tokens), reference)


@pytest.mark.parametrize("fps", [25.0, 24.0, 23.976, 30.0])
@pytest.mark.parametrize("grid", [(16, 2, 3), (1, 1, 1), (5, 3, 2)])
def test_video_positions_match_reference(grid, fps):
    frames, height, width = grid
    state = _video_tools(2, frames, height, width, fps).create_initial_state(torch.device("cpu"), torch.float32)
    ours = video_positions(2, frames, height, width, fps)
    assert ours.dtype == torch.float32 and ours.shape == (2, 3, frames * height * width, 2)
    assert torch.equal(ours, state.positions)


def test_video_positions_causal_first_frame_and_float32():
    pos = video_positions(1, 3, 1, 1, 25.0)
    # latent frame k covers pixel frames [max(0, 8k-7), 8k+1)
    expected = torch.tensor([[0.0, 1.0], [1.0, 9.0], [9.0, 17.0]], dtype=torch.float64) / 25
    torch.testing.assert_close(pos[0, 0].double(), expected, atol=1e-7, rtol=0)
    assert pos.dtype == torch.float32


@pytest.mark.parametrize("scale", [1, 2, 4])
def test_reference_video_positions_match_ic_lora_reference(scale):
    conditioning = import_ltx_core("ltx_core.conditioning")
    tools = _video_tools(1, 3, 4, 6, 24.0)
    state = tools.create_initial_state(torch.device("cpu"), torch.float32)
    ref_latent = torch.randn(1, 128, 3, 4 // 2, 6 // 2)
    item = conditioning.VideoConditionByReferenceLatent(latent=ref_latent, downscale_factor=scale)
    expected = item.apply_to(state, tools).positions[:, :, 3 * 4 * 6 :]
    assert torch.equal(video_positions(1, 3, 2, 3, 24.0, spatial_scale=scale), expected)


@pytest.mark.parametrize("frame_idx", [0, 8, 17])
def test_keyframe_positions_match_reference(frame_idx):
    conditioning = import_ltx_core("ltx_core.conditioning")
    tools = _video_tools(1, 3, 2, 2, 25.0)
    state = tools.create_initial_state(torch.device("cpu"), torch.float32)
    keyframe = torch.randn(1, 128, 1, 2, 2)
    item = conditioning.VideoConditionByKeyframeIndex(keyframes=keyframe, frame_idx=frame_idx, strength=1.0)
    expected = item.apply_to(state, tools).positions[:, :, 3 * 2 * 2 :]
    ours = video_positions(1, 1, 2, 2, 25.0, frame_offset=frame_idx, causal_fix=frame_idx == 0)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("num_frames", [1, 17, 121, 126])
def test_audio_positions_match_reference(num_frames):
    shape = ltx_types.AudioLatentShape(3, 8, num_frames, 16)
    tools = ltx_tools.AudioLatentTools(patchifiers.AudioPatchifier(patch_size=1), shape)
    state = tools.create_initial_state(torch.device("cpu"), torch.float32)
    ours = audio_positions(3, num_frames)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, state.positions)
    assert ours[0, 0, 0].tolist() == [0.0, pytest.approx(0.01)]


def test_audio_positions_offset_matches_reference_shift():
    shape = ltx_types.AudioLatentShape(1, 8, 9, 16)
    expected = patchifiers.AudioPatchifier(patch_size=1, shift=5).get_patch_grid_bounds(shape)
    assert torch.equal(audio_positions(1, 9, frame_offset=5), expected)


@pytest.mark.parametrize(("frames", "fps"), [(121, 25.0), (121, 24.0), (97, 30.0), (1, 25.0), (33, 23.976)])
def test_audio_latent_length_matches_reference(frames, fps):
    pixel_shape = ltx_types.VideoPixelShape(batch=1, frames=frames, height=32, width=32, fps=fps)
    assert audio_latent_length(frames, fps) == ltx_types.AudioLatentShape.from_video_pixel_shape(pixel_shape).frames
    assert audio_latent_length(121, 25.0) == 121


def test_video_latent_size_and_bad_input():
    assert video_latent_size(121, 512, 768) == (16, 16, 24)
    with pytest.raises(ValueError, match="num_pixel_frames"):
        video_latent_size(120, 512, 768)
    with pytest.raises(ValueError, match="pixel_width"):
        video_latent_size(121, 512, 700)
    with pytest.raises(ValueError, match="video tokens"):
        unpatchify_video(torch.zeros(1, 10, 4), 2, 2, 2)
    with pytest.raises(ValueError, match="fps"):
        video_positions(1, 1, 1, 1, 0.0)
