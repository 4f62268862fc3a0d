"""The :class:`Strategy` protocol and the pieces strategies share: model inputs, targets, loss masks, noising and
per-sample losses.

A strategy turns a batch of precomputed latents into transformer inputs and targets, and model predictions into
per-sample losses. Each lives in its own file (``text_to_video.py``, ``video_to_video.py``, ...) and is registered
by name in ``registry.py``, the only place that maps a name to a strategy.

Randomness is explicit: a strategy draws everything random from ``key``, an int64 tensor [B] holding one derived
seed per sample (:func:`ltxf.rng.sample_keys`), so the same batch and key always give the same inputs.

Shape legend: B batch, T tokens, C latent channels (128), S text tokens, D context width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

from ltxf.config import FlowConfig, StrategyConfig
from ltxf.latents import patchify_video
from ltxf.models.transformer import Modality
from ltxf.timesteps import noise_latents, shifted_logit_normal_sigmas, uniform_sigmas

if TYPE_CHECKING:
    from ltxf.data import SampleInfo
    from ltxf.models.text import TextContext


@dataclass(frozen=True, kw_only=True)
class ModelInputs:
    """What the transformer consumes plus what the loss needs.

    ``video_loss_mask_BT`` is True on tokens that count in the loss (generated, not conditioning, not
    reference); ``video_target_BTC`` covers only the generated part of the sequence (reference tokens, if any,
    are the first ``num_reference_tokens`` of ``video.latent`` and have no target).
    """

    video: Modality
    audio: Modality | None
    video_target_BTC: torch.Tensor
    video_loss_mask_BT: torch.Tensor
    audio_target_BTC: torch.Tensor | None
    sigma_B: torch.Tensor
    num_reference_tokens: int = 0


@dataclass(frozen=True, kw_only=True)
class StepLosses:
    """Per-sample loss terms of one micro-batch (each [B])."""

    total_B: torch.Tensor
    video_B: torch.Tensor
    audio_B: torch.Tensor | None


def per_sample_noise(shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
    """Standard normal noise [B, *shape]: sample b drawn from its own generator, so a sample's noise does not
    depend on which process or micro-batch it landed in."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def sample_sigmas(flow: FlowConfig, seq_len: int, generators: list[torch.Generator]) -> torch.Tensor:
    """Training sigmas [B] from the configured sampler (one draw per sample generator); ``seq_len`` is the
    generated video token count."""
    sigmas = []
    for g in generators:
        if flow.timestep_sampling == "uniform":
            sigmas.append(uniform_sigmas(1, generator=g, min_value=flow.uniform_min, max_value=flow.uniform_max))
        else:
            sigmas.append(shifted_logit_normal_sigmas(1, seq_len, generator=g, std=flow.logit_std, eps=flow.eps,
                                                      uniform_prob=flow.uniform_prob))
    return torch.cat(sigmas).float()


def first_frame_mask(
    tokens_per_frame: int, num_tokens: int, p: float, generators: list[torch.Generator]
) -> torch.Tensor:
    """Bool [B,T]: True on the first latent frame's tokens of the samples drawn (per sample, probability p) for
    first-frame conditioning. Never conditions a single-frame clip (it would leave nothing to learn)."""
    draws_B = torch.cat([torch.rand(1, generator=g) < p for g in generators])
    if tokens_per_frame >= num_tokens:
        draws_B = torch.zeros_like(draws_B)
    frame0_T = torch.arange(num_tokens) < tokens_per_frame
    return draws_B[:, None] & frame0_T[None, :]


@dataclass(frozen=True, kw_only=True)
class NoisedVideo:
    """The generated video part of a batch after noising: clean tokens, noise, sigmas and the first-frame
    conditioning mask (True = clean conditioning token, timestep 0, no loss)."""

    x0_BTC: torch.Tensor
    noise_BTC: torch.Tensor
    sigma_B: torch.Tensor
    sigma_BT: torch.Tensor
    cond_BT: torch.Tensor
    xt_BTC: torch.Tensor


def noise_video(
    latents_BCFHW: torch.Tensor, *, first_frame_p: float, flow: FlowConfig, generators: list[torch.Generator]
) -> NoisedVideo:
    """Patchify and noise video latents. Each sample draws its noise, sigma and first-frame decision from its
    own generator, in that order (sigma from the generated token count)."""
    device = latents_BCFHW.device
    batch_size, _, _, height, width = latents_BCFHW.shape
    x0_BTC = patchify_video(latents_BCFHW.float())
    num_tokens = x0_BTC.shape[1]
    noise_BTC = per_sample_noise(tuple(x0_BTC.shape[1:]), generators).to(device)
    sigma_B = sample_sigmas(flow, num_tokens, generators).to(device)
    cond_BT = first_frame_mask(height * width, num_tokens, first_frame_p, generators).to(device)
    sigma_BT = torch.where(cond_BT, 0.0, sigma_B[:, None].expand(batch_size, num_tokens))
    return NoisedVideo(x0_BTC=x0_BTC, noise_BTC=noise_BTC, sigma_B=sigma_B, sigma_BT=sigma_BT, cond_BT=cond_BT,
                       xt_BTC=noise_latents(x0_BTC, noise_BTC, sigma_BT))


def masked_mse_per_sample(pred_BTC: torch.Tensor, target_BTC: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample over the tokens where ``mask_BT`` is True (and all channels), [B].

    Computed in fp32. A sample with no loss token contributes 0 (the clamp only guards the division).
    """
    err_BT = (pred_BTC.float() - target_BTC.float()).pow(2).mean(dim=-1)
    mask = mask_BT.to(err_BT.dtype)
    return (err_BT * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def compute_losses(
    inputs: ModelInputs, video_pred_BTC: torch.Tensor, audio_pred_BTC: torch.Tensor | None, audio_weight: float
) -> StepLosses:
    """Per-sample losses: masked video MSE on the generated tokens, plus the weighted audio MSE."""
    video_pred_BTC = video_pred_BTC[:, inputs.num_reference_tokens :]
    video_B = masked_mse_per_sample(video_pred_BTC, inputs.video_target_BTC, inputs.video_loss_mask_BT)
    audio_B = None
    total_B = video_B
    if inputs.audio_target_BTC is not None and audio_pred_BTC is not None:
        audio_B = (audio_pred_BTC.float() - inputs.audio_target_BTC.float()).pow(2).mean(dim=(1, 2))
        total_B = video_B + audio_weight * audio_B
    return StepLosses(total_B=total_B, video_B=video_B, audio_B=audio_B)


def generators_from_key(key_B: torch.Tensor) -> list[torch.Generator]:
    """One fresh CPU generator per sample, seeded with that sample's derived seed. Drawing from them changes
    nothing outside this call: the same key gives the same draws every time."""
    return [torch.Generator().manual_seed(int(seed)) for seed in key_B.tolist()]


class Strategy(Protocol):
    """What the step needs from a training strategy.

    Construct one with its config: ``strategy_cls(config, flow=cfg.flow)`` (see ``registry.build_strategy``).
    Every method is a function of its arguments (no state changes between calls).
    """

    name: ClassVar[str]
    """The registered name (``strategy.name`` in the config)."""

    config_type: ClassVar[type[StrategyConfig]]
    """The config section this strategy reads (a :class:`~ltxf.config.StrategyConfig` subclass, or the class
    itself when it needs no options of its own)."""

    config: StrategyConfig

    def data_sources(self) -> tuple[str, ...] | Mapping[str, str]:
        """Dataset folders the strategy reads (``latents``, ``conditions``, ``audio_latents``, ...), or a mapping
        dataset role (:data:`ltxf.data.ROLES`, :data:`ltxf.data.CONDITION_ROLES`) -> folder name."""
        ...

    def prepare_inputs(
        self, batch: Mapping[str, torch.Tensor], context: TextContext, key: torch.Tensor, *, dtype: torch.dtype,
        shared_key: torch.Tensor | None = None,
    ) -> ModelInputs:
        """Noise the batch and build the transformer inputs and targets; all randomness from ``key`` [B] and,
        for draws that apply to the whole micro-batch (a reference that changes the sequence length), from
        ``shared_key`` [1] (keyed by seed, step and micro-batch: the same on every process).

        The result has ``video`` / ``audio`` (:class:`~ltxf.models.transformer.Modality` or None, at least one)
        and ``sigma_B``; :meth:`per_sample_losses` receives it back."""
        ...

    def per_sample_losses(
        self, inputs: ModelInputs, video_pred_BTC: torch.Tensor, audio_pred_BTC: torch.Tensor | None
    ) -> StepLosses:
        """Per-sample loss terms of the predictions (each [B], fp32)."""
        ...

    def export_metadata(self, samples: Sequence[SampleInfo]) -> dict[str, str]:
        """String metadata for the exported LoRA (at least ``ltxf_strategy``), from the dataset's samples."""
        ...


def training_keyframes_mask(
    policy: str, batch_size: int, num_tokens: int, tokens_per_frame: int, *, num_leading: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """The video ``Modality.keyframes_mask`` ``[B, num_leading + T, 1]`` for ``strategy.keyframes_mask``:
    'first_frame' marks the target's first latent frame (as inference does), never the ``num_leading`` tokens
    placed before the target (IC-LoRA references, not marked in inference either); 'none' gives None (the
    official 1.2 trainer). Only models with the LTX-2.5 keyframe embedding read it."""
    if policy == "none":
        return None
    if policy != "first_frame":
        raise ValueError(f"strategy.keyframes_mask must be 'first_frame' or 'none', got {policy!r}")
    from ltxf.sampling import first_frame_keyframes_mask

    mask_BT = first_frame_keyframes_mask(batch_size, num_tokens, tokens_per_frame, device=device)
    if num_leading:
        mask_BT = torch.cat([mask_BT.new_zeros(batch_size, num_leading), mask_BT], dim=1)
    return mask_BT[..., None]

