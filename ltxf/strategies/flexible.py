"""The flexible strategy (official ltx-trainer 1.2): per modality, generated or given, plus a list of conditions.

Each modality (video, audio) of :class:`~ltxf.config.StrategyConfig` is either *generated* (noised with its own
sigma, trained on) or *given* (clean, timestep 0, no loss: it conditions the other one, as in a2v / v2a). A
generated modality takes intrinsic conditions, drawn per sample with their probability and applied in list order:

* ``first_frame``: the first latent frame's tokens are clean;
* ``prefix`` / ``suffix``: the first / last ``temporal_boundary`` latent frames (video) or audio steps are clean;
* ``spatial_crop``: a pixel region ``(y1, x1, y2, x2)`` is clean on every frame (``y // 32`` etc., clamped);
* ``mask``: the per-sample mask file (> 0.5 = clean), frame-major like the tokens.

Applying a condition mask ``m`` sets ``latent = m * clean + (1 - m) * noisy``, ``timesteps *= 1 - m`` and removes
those tokens from the loss; the per-sample sigma is unchanged. A ``reference`` (IC-LoRA) condition, on a generated
or given modality, is drawn once per batch (it changes the sequence length) and puts the clean reference tokens
(timestep 0, no loss) *before* the target tokens. Video reference positions come from the reference's own grid
and frame rate, scaled by the spatial factor on rows/columns and shifted back by ``(S - 1) / fps`` in time for a
temporal factor ``S`` (clamped at 0); both factors are inferred from each batch's latent shapes (the official
trainer scans a working-directory-relative folder once and silently falls back to 1). Audio references keep their
own positions.

The loss is the per-sample masked MSE over each generated modality's target tokens (not conditioning), summed
over modalities (audio weighted by ``strategy.audio_loss_weight``, 1 as officially).

Randomness: sample ``b`` draws everything from its own generator (derived from the seed, the step and the
sample's index in the global batch), through one independent stream per modality and purpose, so a sample's
inputs do not depend on the batch split across processes, the other modality or the number of conditions. The
per-batch reference draw uses a generator keyed by (seed, step, micro-batch), the same on every process.

Shape legend: B batch, C channels, F/H/W latent frames/height/width, T tokens, R reference tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch

from ltxf.config import FlowConfig, StrategyConfig
from ltxf.latents import (
    VIDEO_SPATIAL_SCALE,
    audio_positions,
    patchify_audio,
    patchify_video,
    video_positions,
)
from ltxf.models.text import TextContext
from ltxf.models.transformer import Modality
from ltxf.rng import make_generator
from ltxf.strategies.base import (
    StepLosses,
    masked_mse_per_sample,
    sample_sigmas,
    training_keyframes_mask,
)
from ltxf.timesteps import noise_latents

if TYPE_CHECKING:
    from ltxf.data import SampleInfo

# Batch keys (see ltxf.data) of each modality's latents, reference latents and mask.
LATENT_KEYS = {"video": "video_latents", "audio": "audio_latents"}
REFERENCE_KEYS = {"video": "reference_latents", "audio": "reference_audio_latents"}
MASK_KEYS = {"video": "video_mask", "audio": "audio_mask"}
# Data roles (ltxf.data) of the same, for the dataset's sources.
LATENT_ROLES = {"video": "latents", "audio": "audio_latents"}
REFERENCE_ROLES = {"video": "reference_latents", "audio": "reference_audio_latents"}
MASK_ROLES = {"video": "video_masks", "audio": "audio_masks"}
MODALITIES = ("video", "audio")


@dataclass(frozen=True, kw_only=True)
class Grid:
    """A modality's latent token grid: video ``(F, H, W)``, audio ``(T, 1, 1)``; tokens are frame-major."""

    num_frames: int
    height: int = 1
    width: int = 1

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def num_tokens(self) -> int:
        return self.num_frames * self.height * self.width


@dataclass(frozen=True, kw_only=True)
class StreamInputs:
    """One modality's transformer input and what its loss needs.

    ``modality.latent`` is ``[reference | target]`` tokens; ``target_BTC`` and ``loss_mask_BT`` cover only the
    target part (the last ``modality.latent.shape[1] - num_reference_tokens`` tokens). A given (not generated)
    modality has neither target nor loss mask.
    """

    modality: Modality
    target_BTC: torch.Tensor | None
    loss_mask_BT: torch.Tensor | None
    sigma_B: torch.Tensor
    num_reference_tokens: int = 0

    @property
    def is_generated(self) -> bool:
        return self.target_BTC is not None


@dataclass(frozen=True, kw_only=True)
class FlexibleInputs:
    """Both streams of one micro-batch (None where the strategy has no such modality); ``video`` / ``audio`` are
    the transformer inputs, as the step expects from every strategy."""

    video_stream: StreamInputs | None
    audio_stream: StreamInputs | None

    @property
    def video(self) -> Modality | None:
        return None if self.video_stream is None else self.video_stream.modality

    @property
    def audio(self) -> Modality | None:
        return None if self.audio_stream is None else self.audio_stream.modality

    @property
    def sigma_B(self) -> torch.Tensor:
        """The sigma of the first generated modality (video first), for per-sigma loss metrics."""
        video = self.video_stream
        return (video if video is not None and video.is_generated else self.audio_stream).sigma_B


# ----------------------------------------------------------------------------------------------------------------
# Configuration and data sources


ConditionType = Literal["first_frame", "prefix", "suffix", "spatial_crop", "mask", "reference"]
CONDITION_TYPES: tuple[str, ...] = ("first_frame", "prefix", "suffix", "spatial_crop", "mask", "reference")
# The one field each condition type requires (first_frame needs none); any other field set is an error.
_CONDITION_FIELDS = {"prefix": "temporal_boundary", "suffix": "temporal_boundary", "spatial_crop": "spatial_region",
                     "mask": "mask_dir", "reference": "latents_dir"}


@dataclass(frozen=True, kw_only=True)
class ConditionConfig:
    """One condition of a modality in the flexible strategy (official 1.2 ``ConditionConfig``)."""

    type: ConditionType
    """first_frame | prefix | suffix | spatial_crop | mask | reference."""

    probability: float = 1.0
    """Chance the condition applies: drawn per sample (intrinsic conditions) or per batch (reference)."""

    temporal_boundary: int | None = None
    """prefix / suffix: latent frames (video) or audio latent steps kept clean at the start / end."""

    spatial_region: tuple[int, int, int, int] | None = None
    """spatial_crop: pixel region (y1, x1, y2, x2) kept clean on every frame."""

    mask_dir: str | None = None
    """mask: folder of per-sample masks under the data root (video_masks/ or audio_masks/)."""

    latents_dir: str | None = None
    """reference: folder of reference latents under the data root (reference_latents/ or
    reference_audio_latents/)."""

    def __post_init__(self) -> None:
        if self.type not in CONDITION_TYPES:
            raise ValueError(f"condition type must be one of {list(CONDITION_TYPES)}, got {self.type!r}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"condition {self.type!r}: probability must be in [0, 1], got {self.probability}")
        required = _CONDITION_FIELDS.get(self.type)
        for name in ("temporal_boundary", "spatial_region", "mask_dir", "latents_dir"):
            value = getattr(self, name)
            if name == required and value is None:
                raise ValueError(f"condition {self.type!r} needs the field {name!r}")
            if name != required and value is not None:
                raise ValueError(f"condition {self.type!r} takes no field {name!r} (it takes "
                                 f"{[required] if required else []} and 'probability')")
        if self.temporal_boundary is not None and self.temporal_boundary < 1:
            raise ValueError(f"condition {self.type!r}: temporal_boundary must be >= 1, got {self.temporal_boundary}")
        if self.spatial_region is not None:
            y1, x1, y2, x2 = self.spatial_region
            if not (0 <= y1 < y2 and 0 <= x1 < x2):
                raise ValueError(f"condition 'spatial_crop': spatial_region (y1, x1, y2, x2) must satisfy "
                                 f"0 <= y1 < y2 and 0 <= x1 < x2, got {self.spatial_region}")


@dataclass(frozen=True, kw_only=True)
class ModalityConfig:
    """One modality (video or audio) of the flexible strategy (official 1.2 ``video:`` / ``audio:`` block)."""

    is_generated: bool
    """True: noised, trained on (loss). False: given clean at timestep 0 and conditions the other modality."""

    latents_dir: str
    """Folder of this modality's latents under the data root (latents/ or audio_latents/)."""

    conditions: tuple[ConditionConfig, ...] = ()
    """Conditions applied in order (intrinsic ones only when the modality is generated)."""


@dataclass(frozen=True, kw_only=True)
class FlexibleConfig(StrategyConfig):
    """The flexible strategy's section (official 1.2 ``training_strategy: {name: flexible, video:, audio:}``).

    The shared fields ``first_frame_conditioning_p``, ``with_audio`` and ``independent_audio_sigma`` belong to the
    older strategies and are not read; ``audio_loss_weight`` (1, as officially) weights the audio term."""

    name: str = "flexible"

    video: ModalityConfig | None = None
    """The video modality (None: no video stream)."""

    audio: ModalityConfig | None = None
    """The audio modality (None: no audio stream)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        modalities = {"video": self.video, "audio": self.audio}
        if not any(m is not None and m.is_generated for m in modalities.values()):
            raise ValueError("strategy 'flexible': at least one of strategy.video / strategy.audio must have "
                             "is_generated=True")
        if self.audio is not None:
            for condition in self.audio.conditions:
                if condition.type in ("first_frame", "spatial_crop"):
                    raise ValueError(f"strategy.audio.conditions: {condition.type!r} is a video-only condition; "
                                     "audio allows ['prefix', 'suffix', 'mask', 'reference']")
        for name, modality in modalities.items():
            if modality is None:
                continue
            for kind in ("reference", "mask"):
                count = sum(c.type == kind for c in modality.conditions)
                if count > 1:
                    raise ValueError(f"strategy.{name}.conditions: at most one {kind!r} condition per modality, got "
                                     f"{count}")


def data_sources(strategy: FlexibleConfig) -> dict[str, str]:
    """Dataset roles -> folder names the flexible strategy reads (official ``get_data_sources``); the generated
    modality's latents come first, so they define the samples."""
    modalities = [(name, getattr(strategy, name)) for name in MODALITIES if getattr(strategy, name) is not None]
    modalities.sort(key=lambda item: not item[1].is_generated)
    sources: dict[str, str] = {}
    for name, modality in modalities:
        sources[LATENT_ROLES[name]] = modality.latents_dir
    sources["conditions"] = "conditions"
    for name, modality in modalities:
        for condition in modality.conditions:
            if condition.type == "reference":
                sources[REFERENCE_ROLES[name]] = condition.latents_dir
            elif condition.type == "mask":
                sources[MASK_ROLES[name]] = condition.mask_dir
    return sources


def reference_metadata(strategy: FlexibleConfig, samples: Sequence[SampleInfo]) -> dict[str, str]:
    """LoRA metadata of a video reference, as the official files carry it (strings; only factors != 1):
    ``reference_spatial_scale_factor`` and ``reference_downscale_factor`` (the older name), and
    ``reference_temporal_scale_factor``. The factors come from every sample's latent shapes and must agree
    (the official trainer scans a working-directory-relative folder and silently falls back to 1)."""
    video = strategy.video
    if video is None or not any(c.type == "reference" for c in video.conditions):
        return {}
    factors = {}
    for info in samples:
        if info.video_shape is None or info.reference_shape is None:
            continue
        factors[info.sample_id] = reference_scale_factors(tuple(info.video_shape[1:]), tuple(info.reference_shape[1:]))
    distinct = set(factors.values())
    if len(distinct) > 1:
        examples = {f: next(k for k, v in factors.items() if v == f) for f in distinct}
        raise ValueError(f"the dataset mixes reference (spatial, temporal) scale factors: {examples} (one sample "
                         "each); a LoRA is trained for one pair")
    if not distinct:
        return {}
    spatial, temporal = distinct.pop()
    metadata = {}
    if spatial != 1:
        metadata["reference_spatial_scale_factor"] = metadata["reference_downscale_factor"] = str(spatial)
    if temporal != 1:
        metadata["reference_temporal_scale_factor"] = str(temporal)
    return metadata


# ----------------------------------------------------------------------------------------------------------------
# Condition masks (pure functions of the grid and the condition)


def temporal_mask(grid: Grid, boundary: int, *, at_end: bool) -> torch.Tensor:
    """Float ``[T]``: 1 on the first (``at_end=False``) or last ``boundary`` frames' tokens."""
    num_cond = min(boundary, grid.num_frames) * grid.tokens_per_frame
    index_T = torch.arange(grid.num_tokens)
    keep_T = index_T >= grid.num_tokens - num_cond if at_end else index_T < num_cond
    return keep_T.float()


def spatial_crop_mask(grid: Grid, region: tuple[int, int, int, int], *, spatial_scale: int = VIDEO_SPATIAL_SCALE
                      ) -> torch.Tensor:
    """Float ``[T]``: 1 inside the latent rectangle of the pixel region ``(y1, x1, y2, x2)`` on every frame
    (each corner floor-divided by the VAE's spatial factor and clamped to the grid)."""
    y1, x1, y2, x2 = region
    rows = [min(max(v // spatial_scale, 0), grid.height) for v in (y1, y2)]
    cols = [min(max(v // spatial_scale, 0), grid.width) for v in (x1, x2)]
    frame_HW = torch.zeros(grid.height, grid.width)
    frame_HW[rows[0]:rows[1], cols[0]:cols[1]] = 1.0
    return frame_HW.flatten().repeat(grid.num_frames)


def condition_mask(condition: ConditionConfig, grid: Grid, mask_BT: torch.Tensor | None, batch_size: int
                   ) -> torch.Tensor:
    """Float ``[B, T]`` of the tokens an intrinsic condition keeps clean, before the per-sample draw."""
    if condition.type == "first_frame":
        mask_T = temporal_mask(grid, 1, at_end=False)
    elif condition.type in ("prefix", "suffix"):
        mask_T = temporal_mask(grid, condition.temporal_boundary, at_end=condition.type == "suffix")
    elif condition.type == "spatial_crop":
        mask_T = spatial_crop_mask(grid, condition.spatial_region)
    elif condition.type == "mask":
        if mask_BT is None:
            raise ValueError(f"condition 'mask' (mask_dir {condition.mask_dir!r}): the batch has no mask")
        return (mask_BT.float() > 0.5).float()
    else:
        raise ValueError(f"{condition.type!r} is not an intrinsic condition")
    return mask_T[None].expand(batch_size, -1)


def apply_condition_mask(
    latent_BTC: torch.Tensor, clean_BTC: torch.Tensor, timesteps_BT: torch.Tensor, loss_mask_BT: torch.Tensor,
    mask_BT: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Official application of a conditioning mask: clean where 1, timestep 0 there, and no loss there."""
    m = mask_BT.to(latent_BTC.dtype)
    latent_BTC = m[..., None] * clean_BTC + (1 - m[..., None]) * latent_BTC
    return latent_BTC, timesteps_BT * (1 - mask_BT.to(timesteps_BT.dtype)), loss_mask_BT & (mask_BT == 0)


# ----------------------------------------------------------------------------------------------------------------
# Positions


def video_positions_at_fps(grid: Grid, fps_B: torch.Tensor) -> torch.Tensor:
    """Video positions ``[B, 3, T, 2]`` (causal time bounds in seconds at each sample's fps, pixel rows/cols)."""
    batch_size = fps_B.shape[0]
    positions = video_positions(batch_size, grid.num_frames, grid.height, grid.width, fps=1.0, device=fps_B.device)
    seconds = positions[:, :1] / fps_B.to(torch.float32)[:, None, None, None]
    return torch.cat([seconds, positions[:, 1:]], dim=1)


def reference_scale_factors(target_FHW: tuple[int, int, int], reference_FHW: tuple[int, int, int]) -> tuple[int, int]:
    """``(spatial, temporal)`` factors of a video reference from the latent shapes: target H, W = spatial x
    reference H, W; target ``F - 1`` = temporal x reference ``F - 1`` (frame 0 kept, then every S-th frame)."""
    tf, th, tw = target_FHW
    rf, rh, rw = reference_FHW
    if th % rh or tw % rw or th // rh != tw // rw:
        raise ValueError(f"reference latents [F, H, W] = {list(reference_FHW)} are not the target {list(target_FHW)} "
                         "scaled down by one integer factor in both height and width")
    if rf == tf:
        temporal = 1
    elif rf > 1 and (tf - 1) % (rf - 1) == 0:
        temporal = (tf - 1) // (rf - 1)
    else:
        raise ValueError(f"reference latents have {rf} frames and the target {tf}: (target - 1) must be a multiple "
                         "of (reference - 1) (a reference subsampled in time keeps frame 0, then every S-th)")
    return th // rh, temporal


def video_reference_positions(
    reference_grid: Grid, reference_fps_B: torch.Tensor, target_fps_B: torch.Tensor, *, spatial: int, temporal: int
) -> torch.Tensor:
    """Positions ``[B, 3, R, 2]`` of video reference tokens on the target's time and pixel axes: the reference's
    own grid at its own fps, shifted back by ``(temporal - 1)`` target frame durations (clamped at 0) when
    subsampled in time, and rows/columns times ``spatial``."""
    positions = video_positions_at_fps(reference_grid, reference_fps_B)
    seconds, rows_cols = positions[:, :1], positions[:, 1:]
    if temporal != 1:
        # The official shift uses the end of the target's first (causal, one pixel frame) latent frame: 1 / fps.
        frame_B = (1.0 / target_fps_B.to(torch.float32))[:, None, None, None]
        seconds = (seconds - (temporal - 1) * frame_B).clamp_min(0.0)
    if spatial != 1:
        rows_cols = rows_cols * spatial
    return torch.cat([seconds, rows_cols], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Randomness


def streams(key_B: torch.Tensor, modality: str, purpose: str) -> list[torch.Generator]:
    """One CPU generator per sample for (modality, purpose), derived from the sample's key: each purpose is its
    own stream, so a sample's draws do not depend on the other modality or on the number of conditions."""
    return [make_generator(int(seed), 0, 0, f"flexible/{modality}/{purpose}") for seed in key_B.tolist()]


def condition_draws(condition_index: int, probability: float, key_B: torch.Tensor, modality: str) -> torch.Tensor:
    """Bool ``[B]``: whether intrinsic condition ``condition_index`` applies to each sample (own stream each)."""
    draws = [torch.rand(1, generator=g) < probability
             for g in streams(key_B, modality, f"condition/{condition_index}")]
    return torch.cat(draws)


def reference_draw(probability: float, shared_key: torch.Tensor, modality: str) -> bool:
    """Whether a modality's reference applies to the whole micro-batch: one draw from the shared key's stream
    (the same on every process)."""
    g = make_generator(int(shared_key.reshape(-1)[0]), 0, 0, f"flexible/{modality}/reference")
    return bool(torch.rand(1, generator=g) < probability)


# ----------------------------------------------------------------------------------------------------------------
# The strategy


def _grid(name: str, latents: torch.Tensor) -> Grid:
    if name == "video":
        _, _, num_frames, height, width = latents.shape
        return Grid(num_frames=num_frames, height=height, width=width)
    return Grid(num_frames=latents.shape[2])


def _require(batch: Mapping[str, torch.Tensor], key: str, why: str) -> torch.Tensor:
    if key not in batch:
        raise ValueError(f"strategy 'flexible': {why} needs {key!r} in the batch (found {sorted(batch)})")
    return batch[key]


def prepare_stream(
    name: str,
    modality_cfg: ModalityConfig,
    batch: Mapping[str, torch.Tensor],
    context: torch.Tensor,
    context_mask: torch.Tensor | None,
    *,
    flow: FlowConfig,
    key: torch.Tensor,
    shared_key: torch.Tensor,
    dtype: torch.dtype,
    keyframes_mask: str = "none",
) -> StreamInputs:
    """Build one modality's inputs (official ``_process_modality``). ``keyframes_mask`` is the video policy
    ``strategy.keyframes_mask`` (see :func:`ltxf.strategies.base.training_keyframes_mask`); audio has none."""
    latents = _require(batch, LATENT_KEYS[name], f"the {name} modality")
    device = latents.device
    batch_size = latents.shape[0]
    grid = _grid(name, latents)
    clean_BTC = patchify_video(latents.float()) if name == "video" else patchify_audio(latents.float())
    if name == "video":
        positions = video_positions_at_fps(grid, _require(batch, "fps", "the video modality"))
    else:
        positions = audio_positions(batch_size, grid.num_frames, device=device)

    if modality_cfg.is_generated:
        noise_BTC = torch.stack([torch.randn(clean_BTC.shape[1:], generator=g)
                                 for g in streams(key, name, "noise")]).to(device)
        sigma_B = sample_sigmas(flow, grid.num_tokens, streams(key, name, "sigma")).to(device)
        timesteps_BT = sigma_B[:, None].expand(batch_size, grid.num_tokens).clone()
        latent_BTC = noise_latents(clean_BTC, noise_BTC, timesteps_BT)
        target_BTC = noise_BTC - clean_BTC
        loss_mask_BT = torch.ones(batch_size, grid.num_tokens, dtype=torch.bool, device=device)
        mask_BT = batch.get(MASK_KEYS[name])
        if mask_BT is not None:
            mask_BT = mask_BT.reshape(batch_size, -1)[:, : grid.num_tokens]
        for index, condition in enumerate(modality_cfg.conditions):
            if condition.type == "reference":
                continue
            cond_BT = condition_mask(condition, grid, mask_BT, batch_size).to(device)
            applies_B = condition_draws(index, condition.probability, key, name).to(device)
            cond_BT = cond_BT * applies_B[:, None].float()
            latent_BTC, timesteps_BT, loss_mask_BT = apply_condition_mask(latent_BTC, clean_BTC, timesteps_BT,
                                                                          loss_mask_BT, cond_BT)
    else:
        sigma_B = torch.zeros(batch_size, device=device)
        timesteps_BT = torch.zeros(batch_size, grid.num_tokens, device=device)
        latent_BTC, target_BTC, loss_mask_BT = clean_BTC, None, None

    num_reference = 0
    for condition in modality_cfg.conditions:
        if condition.type != "reference":
            continue
        if not reference_draw(condition.probability, shared_key, name):
            continue
        reference = _require(batch, REFERENCE_KEYS[name], f"the {name} reference condition")
        ref_grid = _grid(name, reference)
        if name == "video":
            spatial, temporal = reference_scale_factors((grid.num_frames, grid.height, grid.width),
                                                        (ref_grid.num_frames, ref_grid.height, ref_grid.width))
            fps_B = batch["fps"]
            ref_fps_B = batch.get("reference_fps", torch.full_like(fps_B, float("nan"))).to(fps_B)
            # A reference file without "fps" runs at the target's rate divided by the temporal factor.
            ref_fps_B = torch.where(torch.isnan(ref_fps_B), fps_B / temporal, ref_fps_B)
            ref_positions = video_reference_positions(ref_grid, ref_fps_B, fps_B, spatial=spatial, temporal=temporal)
            ref_BRC = patchify_video(reference.float())
        else:
            ref_positions = audio_positions(batch_size, ref_grid.num_frames, device=device)
            ref_BRC = patchify_audio(reference.float())
        num_reference = ref_BRC.shape[1]
        latent_BTC = torch.cat([ref_BRC.to(device), latent_BTC], dim=1)
        positions = torch.cat([ref_positions.to(positions), positions], dim=2)
        timesteps_BT = torch.cat([torch.zeros(batch_size, num_reference, device=device), timesteps_BT], dim=1)

    keyframes_BT1 = None
    if name == "video":
        # The target's first latent frame, never the reference tokens placed before it (as inference marks them).
        keyframes_BT1 = training_keyframes_mask(keyframes_mask, batch_size, grid.num_tokens, grid.tokens_per_frame,
                                                num_leading=num_reference, device=device)
    modality = Modality(latent=latent_BTC.to(dtype), sigma=sigma_B, timesteps=timesteps_BT, positions=positions,
                        context=context.to(dtype), context_mask=context_mask, keyframes_mask=keyframes_BT1)
    return StreamInputs(modality=modality, target_BTC=target_BTC, loss_mask_BT=loss_mask_BT, sigma_B=sigma_B,
                        num_reference_tokens=num_reference)


def prepare_flexible(
    batch: Mapping[str, torch.Tensor],
    context: TextContext,
    *,
    strategy: FlexibleConfig,
    flow: FlowConfig,
    key: torch.Tensor,
    shared_key: torch.Tensor,
    dtype: torch.dtype,
) -> FlexibleInputs:
    """Model inputs of both modalities. ``key`` [B] holds one derived seed per sample (its global-batch index);
    ``shared_key`` [1] is keyed by (seed, step, micro-batch) only, identical on every process."""
    built: dict[str, StreamInputs | None] = {}
    for name in MODALITIES:
        modality_cfg = getattr(strategy, name)
        if modality_cfg is None:
            built[name] = None
            continue
        text = context.video_context if name == "video" else context.audio_context
        if text is None:
            raise ValueError(f"strategy 'flexible': the {name} modality needs {name} text features "
                             f"({name}_prompt_embeds in the conditions files)")
        built[name] = prepare_stream(name, modality_cfg, batch, text, context.context_mask, flow=flow, key=key,
                                     shared_key=shared_key, dtype=dtype, keyframes_mask=strategy.keyframes_mask)
    return FlexibleInputs(video_stream=built["video"], audio_stream=built["audio"])


def stream_loss(stream: StreamInputs, pred_BTC: torch.Tensor) -> torch.Tensor:
    """Per-sample masked MSE ``[B]`` of a generated stream over its target, non-conditioning tokens."""
    return masked_mse_per_sample(pred_BTC[:, stream.num_reference_tokens:], stream.target_BTC, stream.loss_mask_BT)


def compute_flexible_losses(
    inputs: FlexibleInputs, video_pred_BTC: torch.Tensor | None, audio_pred_BTC: torch.Tensor | None,
    audio_weight: float = 1.0,
) -> StepLosses:
    """Per-sample losses: the generated modalities' masked MSEs, summed (audio times ``audio_weight``)."""
    video_B = audio_B = None
    if inputs.video_stream is not None and inputs.video_stream.is_generated:
        video_B = stream_loss(inputs.video_stream, video_pred_BTC)
    if inputs.audio_stream is not None and inputs.audio_stream.is_generated:
        audio_B = stream_loss(inputs.audio_stream, audio_pred_BTC)
    if video_B is None:
        total_B = audio_weight * audio_B
        video_B = torch.zeros_like(audio_B)
    else:
        total_B = video_B if audio_B is None else video_B + audio_weight * audio_B
    return StepLosses(total_B=total_B, video_B=video_B, audio_B=audio_B)


class Flexible:
    """The official 1.2 flexible strategy (module docstring); every mode of ``experiments/presets.py``."""

    name: ClassVar[str] = "flexible"
    config_type: ClassVar[type[StrategyConfig]] = FlexibleConfig

    def __init__(self, config: FlexibleConfig, *, flow: FlowConfig) -> None:
        self.config = config
        self.flow = flow

    def data_sources(self) -> dict[str, str]:
        return data_sources(self.config)

    def prepare_inputs(
        self, batch: Mapping[str, torch.Tensor], context: TextContext, key: torch.Tensor, *, dtype: torch.dtype,
        shared_key: torch.Tensor | None = None,
    ) -> FlexibleInputs:
        if shared_key is None:
            # A caller with per-sample keys only: the batch draw comes from the first sample's key. Deterministic,
            # but a batch split across processes may then draw differently for a reference with 0 < p < 1 (the
            # training step always passes the micro-batch's shared key).
            shared_key = key.reshape(-1)[:1]
        return prepare_flexible(batch, context, strategy=self.config, flow=self.flow, key=key, shared_key=shared_key,
                                dtype=dtype)

    def per_sample_losses(
        self, inputs: FlexibleInputs, video_pred_BTC: torch.Tensor | None, audio_pred_BTC: torch.Tensor | None
    ) -> StepLosses:
        return compute_flexible_losses(inputs, video_pred_BTC, audio_pred_BTC, self.config.audio_loss_weight)

    def export_metadata(self, samples: Sequence[SampleInfo]) -> dict[str, str]:
        return {"ltxf_strategy": self.name, **reference_metadata(self.config, samples)}
