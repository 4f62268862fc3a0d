"""Flow-matching sampling for LTX-2 / LTX-2.3: sigma schedule, Euler steps, CFG/STG guidance, the denoising loop.

Convention (rectified flow): ``x_t = (1 - sigma) * x0 + sigma * noise`` and the transformer predicts the velocity
``v = noise - x0``, so the clean estimate is ``x0_hat = x_t - sigma * v`` and an Euler step from ``sigma`` to
``sigma_next`` is ``x + (x - x0_hat) / sigma * (sigma_next - sigma)``.

Conditioning is per token: ``denoise_mask`` is 1 on tokens to generate and ``1 - strength`` on conditioning tokens
(a first frame, IC-LoRA reference tokens). The model sees per-token timesteps ``sigma * denoise_mask``, and after
every model call the estimate is re-anchored, ``x0_hat <- x0_hat * mask + clean * (1 - mask)``, so fully
conditioned tokens never move.

Everything here is a pure function of its arguments: noise and schedules are passed in, nothing is cached, no
input is modified, and the loop never reads a device value back to the host.

Shape legend: B batch, T tokens, C latent channels (128), A position axes, S context tokens, D context width,
L transformer blocks, N guidance passes batched together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from ltxf.latents import patchify_video, video_positions
from ltxf.models.transformer import Modality, Perturbations
from ltxf.timesteps import noise_latents

logger = logging.getLogger(__name__)

# The token counts between which the schedule's shift is interpolated linearly (and extrapolated beyond).
_BASE_SHIFT_TOKENS = 1024
_MAX_SHIFT_TOKENS = 4096

DenoiserModel = Callable[..., tuple[torch.Tensor | None, torch.Tensor | None]]


# --------------------------------------------------------------------------------------------------------------
# Latent state
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LatentState:
    """One stream's tokens during sampling.

    ``latent`` ``[B, T, C]`` is the current (noisy) sample; ``denoise_mask`` ``[B, T]`` float32 in [0, 1] is how
    much of each token is generated (1) versus held at ``clean_latent`` ``[B, T, C]`` (0); ``positions`` is
    ``[B, A, T, 2]`` (see :mod:`ltxf.latents`); ``attention_mask`` ``[B, T, T]`` in [0, 1] or None (full
    attention); ``keyframes_mask`` ``[B, T]`` float32, 1 on tokens whose latent encodes one standalone pixel
    frame (the LTX-2.5 keyframe embedding; see :func:`first_frame_keyframes_mask`), or None. A ``frozen`` stream
    (video-to-audio, audio-to-video) is given, not generated: its denoise mask is 0 everywhere and the model sees
    it at sigma 0, as the official validation does.
    """

    latent: torch.Tensor
    denoise_mask: torch.Tensor
    positions: torch.Tensor
    clean_latent: torch.Tensor
    attention_mask: torch.Tensor | None = None
    keyframes_mask: torch.Tensor | None = None
    frozen: bool = False

    def __post_init__(self) -> None:
        if self.latent.ndim != 3:
            raise ValueError(f"LatentState.latent must be [B, T, C], got shape {tuple(self.latent.shape)}")
        batch_size, num_tokens, _ = self.latent.shape
        if self.clean_latent.shape != self.latent.shape:
            raise ValueError(
                f"LatentState.clean_latent has shape {tuple(self.clean_latent.shape)}, expected the latent's "
                f"{tuple(self.latent.shape)}"
            )
        if tuple(self.denoise_mask.shape) != (batch_size, num_tokens):
            raise ValueError(
                f"LatentState.denoise_mask must be [B, T] = [{batch_size}, {num_tokens}], "
                f"got shape {tuple(self.denoise_mask.shape)}"
            )
        pos = self.positions
        if pos.ndim != 4 or pos.shape[0] != batch_size or pos.shape[2] != num_tokens or pos.shape[3] != 2:
            raise ValueError(
                f"LatentState.positions must be [B, A, T, 2] with B={batch_size}, T={num_tokens}, "
                f"got shape {tuple(pos.shape)}"
            )
        if self.attention_mask is not None and tuple(self.attention_mask.shape) != (batch_size, num_tokens,
                                                                                    num_tokens):
            raise ValueError(
                f"LatentState.attention_mask must be [B, T, T] = [{batch_size}, {num_tokens}, {num_tokens}], "
                f"got shape {tuple(self.attention_mask.shape)}"
            )

        if self.keyframes_mask is not None and tuple(self.keyframes_mask.shape) != (batch_size, num_tokens):
            raise ValueError(f"LatentState.keyframes_mask must be [B, T] = [{batch_size}, {num_tokens}], "
                             f"got shape {tuple(self.keyframes_mask.shape)}")

    @property
    def num_tokens(self) -> int:
        return self.latent.shape[1]


def first_frame_keyframes_mask(batch_size: int, num_tokens: int, tokens_per_frame: int,
                               device: torch.device | str | None = None) -> torch.Tensor:
    """``[B, T]`` float32: 1 on the first latent frame's tokens (frame-major order), 0 elsewhere. The causal VAE
    encodes pixel frame 0 alone into latent frame 0, so those tokens are a standalone keyframe; the official
    pipelines mark them in every target whatever the conditioning (``VideoLatentTools.create_initial_state``)."""
    mask_T = (torch.arange(num_tokens, device=device) < tokens_per_frame).to(torch.float32)
    return mask_T[None].expand(batch_size, num_tokens).clone()
def frozen_state(clean_latent_BTC: torch.Tensor, positions: torch.Tensor, *,
                 keyframes_mask_BT: torch.Tensor | None = None) -> LatentState:
    """A given stream: its clean tokens, never denoised (mask 0), seen by the model at sigma 0. A frozen video
    keeps its keyframe marks (``keyframes_mask_BT``), as the official pipelines build every video state."""
    mask_BT = torch.zeros(clean_latent_BTC.shape[:2], device=clean_latent_BTC.device, dtype=torch.float32)
    return LatentState(latent=clean_latent_BTC, denoise_mask=mask_BT, positions=positions,
                       clean_latent=clean_latent_BTC, keyframes_mask=keyframes_mask_BT, frozen=True)


def condition_tokens(state: LatentState, clean_BTC: torch.Tensor, mask_BT: torch.Tensor, *, strength: float = 1.0
                     ) -> LatentState:
    """Hold the tokens where ``mask_BT`` is 1 at ``clean_BTC`` (the conditioning's encoded latents on the state's
    grid): their denoise mask becomes ``1 - strength`` there and they start clean (official
    ``VideoConditionByMask`` / latent-index conditions; prefix, suffix, spatial crop and mask are such masks)."""
    if clean_BTC.shape != state.clean_latent.shape or tuple(mask_BT.shape) != tuple(state.denoise_mask.shape):
        raise ValueError(f"condition tokens {tuple(clean_BTC.shape)} / mask {tuple(mask_BT.shape)} do not match the "
                         f"state {tuple(state.clean_latent.shape)}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    m_BT = (mask_BT > 0.5).to(state.denoise_mask.dtype)
    m_BT1 = m_BT.unsqueeze(-1)
    clean = clean_BTC.to(state.clean_latent.dtype) * m_BT1 + state.clean_latent * (1 - m_BT1)
    return dataclasses.replace(
        state,
        latent=(clean_BTC.to(state.latent.dtype) * m_BT1 + state.latent * (1 - m_BT1)),
        clean_latent=clean,
        denoise_mask=state.denoise_mask * (1 - m_BT) + (1.0 - strength) * m_BT,
    )


def append_reference_tokens(state: LatentState, tokens_BRC: torch.Tensor, positions: torch.Tensor) -> LatentState:
    """Append clean reference tokens (denoise mask 0) with their own positions after the state's tokens. The
    appended tokens are no keyframes (keyframes mask 0 there, when the state has one)."""
    if state.attention_mask is not None:
        raise ValueError("append_reference_tokens does not extend an existing attention_mask")
    mask_BT = torch.zeros(tokens_BRC.shape[:2], device=state.denoise_mask.device, dtype=state.denoise_mask.dtype)
    keyframes_mask = None if state.keyframes_mask is None else torch.cat(
        [state.keyframes_mask, torch.zeros_like(mask_BT, dtype=state.keyframes_mask.dtype)], dim=1)
    return dataclasses.replace(
        state,
        keyframes_mask=keyframes_mask,
        latent=torch.cat([state.latent, tokens_BRC.to(state.latent.dtype)], dim=1),
        denoise_mask=torch.cat([state.denoise_mask, mask_BT], dim=1),
        positions=torch.cat([state.positions, positions.to(state.positions.dtype)], dim=2),
        clean_latent=torch.cat([state.clean_latent, tokens_BRC.to(state.clean_latent.dtype)], dim=1),
    )


def init_latent_state(
    clean_latent_BTC: torch.Tensor, positions: torch.Tensor, *, denoise_mask_BT: torch.Tensor | None = None,
    keyframes_mask_BT: torch.Tensor | None = None,
) -> LatentState:
    """A state whose sample is ``clean_latent_BTC`` (zeros for pure generation) and whose mask is all ones unless
    given. Call :func:`noise_state` on it before sampling."""
    if denoise_mask_BT is None:
        denoise_mask_BT = torch.ones(clean_latent_BTC.shape[:2], device=clean_latent_BTC.device, dtype=torch.float32)
    return LatentState(
        latent=clean_latent_BTC, denoise_mask=denoise_mask_BT, positions=positions, clean_latent=clean_latent_BTC,
        keyframes_mask=keyframes_mask_BT,
    )


def noise_state(state: LatentState, noise_BTC: torch.Tensor, *, noise_scale: float = 1.0) -> LatentState:
    """Mix noise into the tokens to generate: ``latent = noise * m + clean * (1 - m)`` with
    ``m = denoise_mask * noise_scale`` (so conditioning tokens with mask 0 stay clean)."""
    if noise_BTC.shape != state.clean_latent.shape:
        raise ValueError(
            f"noise has shape {tuple(noise_BTC.shape)}, expected the latent's {tuple(state.clean_latent.shape)}"
        )
    latent = noise_latents(state.clean_latent, noise_BTC, state.denoise_mask * noise_scale)
    return dataclasses.replace(state, latent=latent.to(state.clean_latent.dtype))


def condition_video_frame(
    state: LatentState,
    frame_latents_BC1HW: torch.Tensor,
    *,
    latent_index: int = 0,
    strength: float = 1.0,
) -> LatentState:
    """Replace the tokens of latent frame ``latent_index`` with an encoded image (image-to-video).

    The frame's tokens get ``denoise_mask = 1 - strength`` and become part of ``clean_latent`` (and of
    ``latent``, so they start clean). The state's tokens must be the frame-major video grid (nothing prepended).
    """
    if frame_latents_BC1HW.ndim != 5 or frame_latents_BC1HW.shape[2] != 1:
        raise ValueError(f"frame latents must be [B, C, 1, H, W], got shape {tuple(frame_latents_BC1HW.shape)}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    tokens_BTC = patchify_video(frame_latents_BC1HW).to(state.clean_latent.dtype)
    tokens_per_frame = tokens_BTC.shape[1]
    start = latent_index * tokens_per_frame
    stop = start + tokens_per_frame
    if tokens_BTC.shape[0] != state.latent.shape[0] or tokens_BTC.shape[2] != state.latent.shape[2]:
        raise ValueError(
            f"frame latents give tokens {tuple(tokens_BTC.shape)}, which do not match the state's batch and "
            f"channels {tuple(state.latent.shape)}"
        )
    if latent_index < 0 or stop > state.num_tokens:
        raise ValueError(
            f"latent_index {latent_index} is outside the state's {state.num_tokens // tokens_per_frame} frames"
        )

    def put(full: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        return torch.cat([full[:, :start], part, full[:, stop:]], dim=1)

    frame_mask = torch.full(tokens_BTC.shape[:2], 1.0 - strength, device=state.denoise_mask.device,
                            dtype=state.denoise_mask.dtype)
    return dataclasses.replace(
        state,
        latent=put(state.latent, tokens_BTC.to(state.latent.dtype)),
        clean_latent=put(state.clean_latent, tokens_BTC),
        denoise_mask=put(state.denoise_mask, frame_mask),
    )


def append_reference_video(
    state: LatentState,
    reference_latents_BCFHW: torch.Tensor,
    fps: float,
    *,
    spatial_scale: float = 1,
    strength: float = 1.0,
) -> LatentState:
    """Append IC-LoRA reference tokens (clean, ``denoise_mask = 1 - strength``) after the state's tokens.

    Their positions are computed on the reference's own grid with rows and columns multiplied by
    ``spatial_scale`` (the target/reference resolution ratio the LoRA was trained with). Attention masks are not
    supported here: the state must have none.
    """
    if state.attention_mask is not None:
        raise ValueError("append_reference_video does not extend an existing attention_mask; build it afterwards")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    batch_size, _, num_frames, height, width = reference_latents_BCFHW.shape
    tokens_BTC = patchify_video(reference_latents_BCFHW).to(state.clean_latent.dtype)
    positions = video_positions(batch_size, num_frames, height, width, fps, spatial_scale=spatial_scale,
                                dtype=state.positions.dtype, device=state.positions.device)
    mask_BT = torch.full(tokens_BTC.shape[:2], 1.0 - strength, device=state.denoise_mask.device,
                         dtype=state.denoise_mask.dtype)
    keyframes = state.keyframes_mask
    if keyframes is not None:  # reference tokens are never marked (as in the official pipelines)
        keyframes = torch.cat([keyframes, torch.zeros_like(mask_BT, dtype=keyframes.dtype)], dim=1)
    return LatentState(
        latent=torch.cat([state.latent, tokens_BTC.to(state.latent.dtype)], dim=1),
        denoise_mask=torch.cat([state.denoise_mask, mask_BT], dim=1),
        positions=torch.cat([state.positions, positions], dim=2),
        clean_latent=torch.cat([state.clean_latent, tokens_BTC], dim=1),
        keyframes_mask=keyframes,
    )


# --------------------------------------------------------------------------------------------------------------
# Schedule and Euler step
# --------------------------------------------------------------------------------------------------------------


def ltx2_sigma_schedule(
    num_steps: int,
    num_tokens: int,
    *,
    max_shift: float = 2.05,
    base_shift: float = 0.95,
    stretch: bool = True,
    terminal: float = 0.1,
) -> torch.Tensor:
    """The LTX-2 sigma schedule, float32 ``[num_steps + 1]`` from 1 down to 0.

    A uniform grid ``linspace(1, 0)`` is warped by ``sigma' = e^s / (e^s + 1/sigma - 1)`` with the shift ``s``
    linear in ``num_tokens`` (``base_shift`` at 1024 tokens, ``max_shift`` at 4096, extrapolated and not clamped
    outside), then, with ``stretch``, rescaled in ``1 - sigma`` so the last non-zero sigma equals ``terminal``.

    ``num_tokens`` is the real token count of the latent being sampled, ``F * H * W`` of the video grid (the seed
    trainer's validation passes no latent and so always uses 4096, which ignores the resolution). Computed in
    float64 and rounded once. With one step and ``stretch`` the schedule is ``[1, 0]`` (there is no interior
    sigma to stretch; the reference divides 0 by 0 there).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if stretch and not 0.0 < terminal < 1.0:
        raise ValueError(f"terminal must be in (0, 1), got {terminal}")
    slope = (max_shift - base_shift) / (_MAX_SHIFT_TOKENS - _BASE_SHIFT_TOKENS)
    shift = base_shift + slope * (num_tokens - _BASE_SHIFT_TOKENS)

    sigmas = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    interior = sigmas[:-1]  # every sigma but the final 0
    warped = math.exp(shift) / (math.exp(shift) + (1.0 / interior - 1.0))
    if stretch and num_steps > 1:
        one_minus = 1.0 - warped
        warped = 1.0 - one_minus * ((1.0 - terminal) / one_minus[-1])
    return torch.cat([warped, sigmas[-1:]]).to(torch.float32)


def euler_step(
    x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float
) -> torch.Tensor:
    """One Euler step of the flow ODE from ``sigma`` to ``sigma_next`` in float32, returned in ``x.dtype``.

    ``sigma`` and ``sigma_next`` are Python floats or 0-d tensors (kept on device: no host sync); ``sigma`` must
    be non-zero.
    """
    x32 = x.float()
    if isinstance(sigma, torch.Tensor):
        sigma = sigma.float()
    if isinstance(sigma_next, torch.Tensor):
        sigma_next = sigma_next.float()
    velocity = (x32 - denoised.float()) / sigma
    return (x32 + velocity * (sigma_next - sigma)).to(x.dtype)


# --------------------------------------------------------------------------------------------------------------
# Guidance
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class GuidanceConfig:
    """Guidance for one stream. Disabled terms cost no forward pass."""

    cfg_scale: float = 4.0
    """Classifier-free guidance scale; 1.0 disables CFG (and its negative-prompt pass)."""
    stg_scale: float = 1.0
    """Spatio-temporal guidance scale; 0.0 disables STG (and its perturbed pass)."""
    stg_blocks: tuple[int, ...] | None = (29,)
    """Blocks whose self-attention is skipped in the perturbed pass; None means every block."""
    stg_mode: Literal["stg_av", "stg_v"] = "stg_av"
    """``stg_av`` skips video and audio self-attention in ``stg_blocks``; ``stg_v`` only video."""
    guidance_rescale: float = 0.0
    """Blend of the std-rescaled prediction (``factor = r * std(cond) / std(pred) + 1 - r``); 0 disables."""
    modality_scale: float = 1.0
    """Scale of the audio<->video cross-attention guidance (a pass with A2V and V2A skipped in every block);
    1.0 disables it. Only used with joint audio."""

    def __post_init__(self) -> None:
        if self.stg_mode not in ("stg_av", "stg_v"):
            raise ValueError(f"GuidanceConfig.stg_mode must be 'stg_av' or 'stg_v', got {self.stg_mode!r}")
        if self.stg_blocks is not None:
            blocks = tuple(self.stg_blocks)
            if any(not isinstance(b, int) or b < 0 for b in blocks):
                raise ValueError(f"GuidanceConfig.stg_blocks must be non-negative block indices, got {blocks}")
            object.__setattr__(self, "stg_blocks", blocks)

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale != 1.0

    @property
    def uses_stg(self) -> bool:
        return self.stg_scale != 0.0

    @property
    def uses_modality(self) -> bool:
        return self.modality_scale != 1.0


FROZEN_GUIDANCE = GuidanceConfig(cfg_scale=1.0, stg_scale=0.0, guidance_rescale=0.0, modality_scale=1.0)
"""A frozen (given) stream's guidance: the official ``MultiModalGuiderParams()`` defaults, no guidance at all."""


def official_guidance(*, video: bool = True, audio: bool = True, stg_blocks: tuple[int, ...] | None = (28,)
                      ) -> tuple[GuidanceConfig, GuidanceConfig]:
    """The official trainer 1.2's validation defaults as (video, audio) guidance: CFG 3 / 7, STG 1 / 1 on block 28,
    rescale 0.7, modality-isolation 3 / 3 (1, i.e. off, for a stream whose partner is absent)."""
    both = video and audio
    return (GuidanceConfig(cfg_scale=3.0, stg_scale=1.0, stg_blocks=stg_blocks, guidance_rescale=0.7,
                           modality_scale=3.0 if both else 1.0),
            GuidanceConfig(cfg_scale=7.0, stg_scale=1.0, stg_blocks=stg_blocks, guidance_rescale=0.7,
                           modality_scale=3.0 if both else 1.0))


def guide(
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    perturbed: torch.Tensor | None,
    config: GuidanceConfig,
    isolated: torch.Tensor | None = None,
) -> torch.Tensor:
    """Combine the passes' clean estimates ``[B, ...]`` into the guided estimate.

    ``cond + (cfg - 1)(cond - uncond) + stg (cond - perturbed) + (modality - 1)(cond - isolated)``, each term only
    when its scale enables it (its prediction may then be None). With ``guidance_rescale = r`` the result is
    multiplied by ``r * std(cond) / std(pred) + (1 - r)``, the std (unbiased) taken per sample over all of its
    tokens and channels; the reference takes one std over the whole batch, which is the same for one sample but
    would couple the samples of a batch.
    """
    pred = cond
    if config.uses_cfg:
        if uncond is None:
            raise ValueError(f"cfg_scale={config.cfg_scale} needs the unconditional prediction")
        pred = pred + (config.cfg_scale - 1.0) * (cond - uncond)
    if config.uses_stg:
        if perturbed is None:
            raise ValueError(f"stg_scale={config.stg_scale} needs the perturbed prediction")
        pred = pred + config.stg_scale * (cond - perturbed)
    if config.uses_modality and isolated is not None:
        pred = pred + (config.modality_scale - 1.0) * (cond - isolated)
    if config.guidance_rescale != 0.0:
        dims = tuple(range(1, cond.ndim))
        ratio = cond.std(dim=dims, keepdim=True) / pred.std(dim=dims, keepdim=True)
        pred = pred * (config.guidance_rescale * ratio + (1.0 - config.guidance_rescale))
    return pred


# --------------------------------------------------------------------------------------------------------------
# Denoising loop
# --------------------------------------------------------------------------------------------------------------

_PassKind = Literal["cond", "uncond", "perturbed", "isolated"]


@dataclass(frozen=True, kw_only=True)
class _Pass:
    """The constant inputs of one guidance pass, for the whole batch."""

    kind: _PassKind
    video_context: torch.Tensor | None
    audio_context: torch.Tensor | None
    perturbations: Perturbations


_PERTURBATION_FIELDS = tuple(f.name for f in dataclasses.fields(Perturbations))


def _pass_perturbations(
    kind: _PassKind, guidance: GuidanceConfig, *, batch_size: int, num_layers: int, has_video: bool,
    has_audio: bool, device: torch.device,
) -> Perturbations:
    if kind == "perturbed":
        skips = ["video_self_attn"] if has_video else []
        if has_audio and (guidance.stg_mode == "stg_av" or not has_video):
            skips.append("audio_self_attn")
        return Perturbations.build(batch_size, num_layers, skip=skips, blocks=guidance.stg_blocks, device=device)
    if kind == "isolated":
        return Perturbations.build(batch_size, num_layers, skip=["a2v", "v2a"], blocks=None, device=device)
    return Perturbations()


def _cat_perturbations(items: list[Perturbations], *, batch_size: int, num_layers: int, device: torch.device
                       ) -> Perturbations:
    """Stack per-pass perturbations along the batch; a kind that is off in some passes is all-False there."""
    off_BL = torch.zeros(batch_size, num_layers, dtype=torch.bool, device=device)
    fields = {}
    for name in _PERTURBATION_FIELDS:
        masks = [getattr(p, name) for p in items]
        fields[name] = None if all(m is None for m in masks) else torch.cat(
            [off_BL if m is None else m for m in masks], dim=0)
    return Perturbations(**fields)


def _broadcast_context(context: torch.Tensor, batch_size: int, name: str) -> torch.Tensor:
    if context.ndim != 3 or context.shape[0] not in (1, batch_size):
        raise ValueError(f"{name} must be [B, S, D] or [1, S, D] with B={batch_size}, got {tuple(context.shape)}")
    return context.expand(batch_size, -1, -1)


def denoise(
    model: DenoiserModel,
    video_state: LatentState | None,
    audio_state: LatentState | None,
    *,
    sigmas: torch.Tensor,
    video_context: torch.Tensor | None,
    audio_context: torch.Tensor | None = None,
    negative_video_context: torch.Tensor | None = None,
    negative_audio_context: torch.Tensor | None = None,
    guidance: GuidanceConfig | None = None,
    audio_guidance: GuidanceConfig | None = None,
    num_layers: int | None = None,
    batch_passes: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Integrate the flow ODE along ``sigmas`` with Euler steps and return the final latents ``[B, T, C]``
    (video or None, audio or None), in float32, conditioning tokens included.

    ``model(video=Modality | None, audio=Modality | None, perturbations=Perturbations)`` returns velocities (the
    :class:`ltxf.models.transformer.AVTransformer` interface). At least one state is given (audio alone for
    text-to-audio); a ``frozen`` state (see :func:`frozen_state`) is given clean at sigma 0 and only conditions
    the other stream. The states must already be noised (see :func:`noise_state`); ``sigmas`` is a decreasing
    schedule ending at 0 (:func:`ltx2_sigma_schedule`).

    Guidance follows ltx-core's ``MultiModalGuider`` per stream (``guidance`` for video, ``audio_guidance`` for
    audio, defaulting to ``guidance``; a frozen stream gets :data:`FROZEN_GUIDANCE`) and runs up to four passes per
    step: the positive prompt; the negative prompt, whose contexts replace both streams' contexts (when a stream's
    CFG is on); the positive prompt with self-attention skipped in ``stg_blocks`` (when a stream's STG is on); and,
    with both streams, the positive prompt with the audio<->video cross-attention skipped everywhere (when a
    modality scale is on). The structure of the perturbed pass (``stg_blocks``, ``stg_mode``) comes from the
    video guidance (the audio one without video). With ``batch_passes`` the passes are concatenated along the
    batch into one forward (the model takes per-sample perturbations); otherwise they run one by one, which needs
    less activation memory. Contexts may have batch 1 (shared by every sample).

    ``num_layers`` (the transformer's block count, for the perturbation masks) defaults to
    ``model.config.num_layers``. The model runs under ``torch.autocast(autocast_dtype)`` when given; the
    mask/guidance/Euler arithmetic is float32 throughout. Nothing is synchronised with the host inside the loop.
    """
    guidance = guidance if guidance is not None else GuidanceConfig()
    audio_guidance = audio_guidance if audio_guidance is not None else guidance
    states = {"video": video_state, "audio": audio_state}
    present = [name for name, state in states.items() if state is not None]
    if not present:
        raise ValueError("denoise needs a video_state or an audio_state")
    has_video, has_audio = video_state is not None, audio_state is not None
    contexts = {"video": video_context, "audio": audio_context}
    for name in present:
        if contexts[name] is None:
            raise ValueError(f"{name}_state is given but {name}_context is None")
    active = {name: (FROZEN_GUIDANCE if states[name].frozen else (guidance if name == "video" else audio_guidance))
              for name in present}
    if not any(not states[name].frozen for name in present):
        raise ValueError("every stream is frozen: nothing to generate")
    structure = guidance if has_video else audio_guidance
    if has_video and has_audio and audio_guidance is not guidance and active["audio"].uses_stg and (
        audio_guidance.stg_blocks != guidance.stg_blocks or audio_guidance.stg_mode != guidance.stg_mode
    ):
        raise ValueError(
            "audio_guidance.stg_blocks/stg_mode must equal guidance's (one perturbed pass serves both streams): "
            f"got {audio_guidance.stg_blocks}/{audio_guidance.stg_mode} vs {guidance.stg_blocks}/{guidance.stg_mode}"
        )
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D schedule of at least 2 values, got shape {tuple(sigmas.shape)}")
    if num_layers is None:
        num_layers = getattr(getattr(model, "config", None), "num_layers", None)
        if num_layers is None:
            raise ValueError("num_layers is required when the model has no config.num_layers")
    use_cfg = any(g.uses_cfg for g in active.values())
    use_stg = any(g.uses_stg for g in active.values())
    use_modality = has_video and has_audio and any(g.uses_modality for g in active.values())
    if use_stg and structure.stg_blocks is not None:
        bad = [b for b in structure.stg_blocks if b >= num_layers]
        if bad:
            raise ValueError(f"GuidanceConfig.stg_blocks {bad} out of range for a transformer with {num_layers} "
                             "blocks")

    primary = states[present[0]]
    device = primary.latent.device
    batch_size = primary.latent.shape[0]
    for name in present:
        if states[name].latent.shape[0] != batch_size:
            raise ValueError(f"{name} batch {states[name].latent.shape[0]} differs from {present[0]} batch "
                             f"{batch_size}")
    sigmas = sigmas.to(device=device, dtype=torch.float32)

    kinds: list[_PassKind] = ["cond"]
    negatives = {"video": negative_video_context, "audio": negative_audio_context}
    if use_cfg:
        missing = [f"negative_{name}_context" for name in present if negatives[name] is None]
        if missing:
            raise ValueError(f"cfg_scale={guidance.cfg_scale}/{audio_guidance.cfg_scale} needs "
                             + " and ".join(missing))
        kinds.append("uncond")
    if use_stg:
        kinds.append("perturbed")
    if use_modality:
        kinds.append("isolated")

    def context_for(name: str, negative: bool) -> torch.Tensor | None:
        if states[name] is None:
            return None
        value = negatives[name] if negative else contexts[name]
        return _broadcast_context(value, batch_size, f"{'negative_' if negative else ''}{name}_context")

    passes = [
        _Pass(kind=kind, video_context=context_for("video", kind == "uncond"),
              audio_context=context_for("audio", kind == "uncond"),
              perturbations=_pass_perturbations(kind, structure, batch_size=batch_size, num_layers=num_layers,
                                                has_video=has_video, has_audio=has_audio, device=device))
        for kind in kinds
    ]
    groups = [passes] if batch_passes else [[p] for p in passes]
    group_inputs = [_group_inputs(group, video_state, audio_state, num_layers=num_layers) for group in groups]
    logger.debug("denoise: %d steps, passes %s, batched=%s", sigmas.numel() - 1, kinds, batch_passes)

    xs = {name: None if states[name] is None else states[name].latent.float() for name in ("video", "audio")}
    for step in range(sigmas.numel() - 1):
        sigma, sigma_next = sigmas[step], sigmas[step + 1]
        x0: dict[str, dict[_PassKind, torch.Tensor]] = {name: {} for name in present}
        for group, inputs in zip(groups, group_inputs, strict=True):
            outputs = _run_group(model, inputs, xs["video"], xs["audio"], sigma, autocast_dtype=autocast_dtype)
            for p, pair in zip(group, outputs, strict=True):
                for name, value in zip(("video", "audio"), pair, strict=True):
                    if value is not None:
                        x0[name][p.kind] = value
        for name in present:
            if states[name].frozen:
                continue
            hat = guide(x0[name]["cond"], x0[name].get("uncond"), x0[name].get("perturbed"), active[name],
                        isolated=x0[name].get("isolated"))
            xs[name] = euler_step(xs[name], _reanchor(hat, states[name]), sigma, sigma_next)
    return xs["video"], xs["audio"]


def _reanchor(denoised_BTC: torch.Tensor, state: LatentState) -> torch.Tensor:
    """Hold conditioning tokens at their clean values: ``x0_hat * mask + clean * (1 - mask)``."""
    mask_BT1 = state.denoise_mask.float().unsqueeze(-1)
    return denoised_BTC * mask_BT1 + state.clean_latent.float() * (1 - mask_BT1)


@dataclass(frozen=True, kw_only=True)
class _StreamInputs:
    """The step-independent inputs of one stream for a group of passes, concatenated along the batch (N*B)."""

    denoise_mask_NBT: torch.Tensor
    positions: torch.Tensor
    context: torch.Tensor
    attention_mask: torch.Tensor | None
    keyframes_mask: torch.Tensor | None = None
    frozen: bool = False

    def modality(self, x_BTC: torch.Tensor, sigma: torch.Tensor, num_passes: int) -> Modality:
        # A frozen stream is seen at sigma 0 (its tokens are clean; the other stream's cross-attention AdaLN and
        # this stream's prompt AdaLN read sigma).
        sigma = torch.zeros_like(sigma) if self.frozen else sigma
        return Modality(
            latent=x_BTC if num_passes == 1 else torch.cat([x_BTC] * num_passes, dim=0),
            sigma=sigma.expand(self.denoise_mask_NBT.shape[0]),
            timesteps=sigma * self.denoise_mask_NBT,  # per token: conditioning tokens are seen as (partly) clean
            positions=self.positions,
            context=self.context,
            attention_mask=self.attention_mask,
            keyframes_mask=self.keyframes_mask,
        )


@dataclass(frozen=True, kw_only=True)
class _GroupInputs:
    num_passes: int
    video: _StreamInputs | None
    audio: _StreamInputs | None
    perturbations: Perturbations


def _group_inputs(group: list[_Pass], video_state: LatentState | None, audio_state: LatentState | None,
                  *, num_layers: int) -> _GroupInputs:
    n = len(group)
    primary = video_state if video_state is not None else audio_state

    def rep(t: torch.Tensor | None) -> torch.Tensor | None:
        return t if t is None or n == 1 else torch.cat([t] * n, dim=0)

    def stream(state: LatentState | None, contexts: list[torch.Tensor | None]) -> _StreamInputs | None:
        if state is None:
            return None
        return _StreamInputs(
            denoise_mask_NBT=rep(state.denoise_mask.float()),
            positions=rep(state.positions),
            context=contexts[0] if n == 1 else torch.cat(contexts, dim=0),
            attention_mask=rep(state.attention_mask),
            keyframes_mask=rep(state.keyframes_mask),
            frozen=state.frozen,
        )

    perturbations = group[0].perturbations if n == 1 else _cat_perturbations(
        [p.perturbations for p in group], batch_size=primary.latent.shape[0], num_layers=num_layers,
        device=primary.latent.device)
    return _GroupInputs(
        num_passes=n,
        video=stream(video_state, [p.video_context for p in group]),
        audio=stream(audio_state, [p.audio_context for p in group]),
        perturbations=perturbations,
    )


def _run_group(
    model: DenoiserModel,
    inputs: _GroupInputs,
    video_x: torch.Tensor | None,
    audio_x: torch.Tensor | None,
    sigma: torch.Tensor,
    *,
    autocast_dtype: torch.dtype | None,
) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """One forward over a group of passes -> each pass's float32 clean estimates (video or None, audio or None)."""
    n = inputs.num_passes
    video = None if inputs.video is None else inputs.video.modality(video_x, sigma, n)
    audio = None if inputs.audio is None else inputs.audio.modality(audio_x, sigma, n)
    device_type = (video_x if video_x is not None else audio_x).device.type
    autocast = (
        torch.autocast(device_type=device_type, dtype=autocast_dtype)
        if autocast_dtype is not None else contextlib.nullcontext()
    )
    with autocast:
        video_v, audio_v = model(video=video, audio=audio, perturbations=inputs.perturbations)

    def parts(stream: Modality | None, velocity: torch.Tensor | None) -> list[torch.Tensor | None]:
        if stream is None:
            return [None] * n
        # x0_hat = x_t - v * (sigma * mask), per token, in float32
        return list((stream.latent - velocity.float() * stream.timesteps.unsqueeze(-1)).chunk(n, dim=0))

    return list(zip(parts(video, video_v), parts(audio, audio_v), strict=True))
