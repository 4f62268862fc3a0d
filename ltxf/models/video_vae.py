"""The LTX-2 / LTX-2.3 video VAE: a causal 3-D convolutional encoder and decoder.

The encoder maps a video in [-1, 1] of shape (B, 3, 1 + 8k, 32h, 32w) to the per-channel-normalised latent means
(B, 128, 1 + k, h, w): a 4x4 spatial patchify, a stack of residual stages and space/time downsamplers from the
config's ``encoder_blocks``, then PixelNorm, SiLU and a conv to 128 means (+ log-variance channels that are
dropped: encoding is deterministic). The decoder inverts it (``decoder_blocks``, applied in reverse) and, in the
LTX-2 (19B) checkpoint, is timestep-conditioned: it first mixes 2.5 % Gaussian noise into the latent (drawn from
an explicit ``torch.Generator``) and modulates its norms with the decode timestep (0.05 by default).

Both modules are built from the checkpoint's ``vae`` config section; their state-dict keys equal the official
checkpoint's after stripping ``vae.encoder.`` / ``vae.decoder.``, and each holds the shared
``vae.per_channel_statistics.{std-of-means,mean-of-means}`` as buffers named ``per_channel_statistics.*``.

``tiled_encode`` / ``tiled_decode`` process a video (or latent) that does not fit in memory tile by tile, in
space and time, and blend the overlaps with linear ramps that sum to one at every position.

Shape legend:
    B  batch
    C  channels
    F  frames (video frames, or latent frames)
    H  height
    W  width
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from ltxf.models.checkpoint import (
    VIDEO_VAE_DECODER_PREFIX,
    VIDEO_VAE_ENCODER_PREFIX,
    check_nothing_on_meta,
    config_section,
    list_keys,
    load_state_dict_strict,
    read_config,
    read_tensors,
)
from ltxf.models.video_vae_blocks import (
    CausalConv3d,
    DepthToSpaceUp,
    LatentStatistics,
    NormLayer,
    PaddingMode,
    ResBlock,
    ResStage,
    SpaceToDepthDown,
    Stride3,
    TimestepEmbedder,
    make_norm,
    patchify,
    unpatchify,
)

logger = logging.getLogger(__name__)

LatentLogVar = Literal["per_channel", "uniform", "constant"]

DECODE_TIMESTEP = 0.05
"""The decode timestep the official pipelines use for the timestep-conditioned (LTX-2) decoder."""
DECODE_NOISE_SCALE = 0.025
"""Fraction of Gaussian noise mixed into the latent before a timestep-conditioned decode."""

STATISTICS_NAMES = ("std-of-means", "mean-of-means")
"""The statistics the VAE uses; other ``vae.per_channel_statistics.*`` entries some files carry are skipped."""
_STATISTICS_MODULE = "per_channel_statistics."

_STRIDES: dict[str, Stride3] = {"time": (2, 1, 1), "space": (1, 2, 2), "all": (2, 2, 2)}
_ENCODER_KINDS = (
    "res_x", "res_x_y", "compress_time", "compress_space", "compress_all", "compress_all_x_y",
    "compress_time_res", "compress_space_res", "compress_all_res",
)  # fmt: skip
_DECODER_KINDS = ("res_x", "res_x_y", "compress_time", "compress_space", "compress_all")
_BLOCK_PARAMS = ("num_layers", "multiplier", "residual", "inject_noise")
# Config keys read as they are (the rest: the block lists, dims and spatial_padding_mode, are translated).
_SCALAR_KEYS = (
    "in_channels", "out_channels", "latent_channels", "patch_size", "norm_layer", "latent_log_var",
    "decoder_base_channels", "causal_decoder", "timestep_conditioning",
)  # fmt: skip


# -------------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True, kw_only=True)
class VAEBlockSpec:
    """One entry of ``encoder_blocks`` / ``decoder_blocks`` with the defaults resolved."""

    kind: str
    """Block type, e.g. ``res_x`` (residual stage), ``compress_space_res`` (encoder), ``compress_all`` (decoder)."""
    num_layers: int = 1
    """Residual blocks in a ``res_x`` stage."""
    multiplier: int = 1
    """Channel multiplier (encoder) or divisor (decoder) of the block."""
    residual: bool = False
    """Decoder ``compress_all`` only: add a depth-to-space copy of the input."""
    inject_noise: bool = False
    """Decoder residual blocks only: add per-channel-scaled spatial noise after each conv."""

    @property
    def stride(self) -> Stride3:
        """(time, height, width) resampling factor of the block; (1, 1, 1) for residual blocks."""
        if not self.kind.startswith("compress_"):
            return (1, 1, 1)
        return _STRIDES[self.kind.split("_")[1]]


@dataclass(frozen=True, kw_only=True)
class VideoVAEConfig:
    """Architecture of the video VAE (the checkpoint's ``vae`` section), with ltx-core's defaults for absent keys."""

    encoder_blocks: tuple[VAEBlockSpec, ...]
    """Encoder stages in order, after the patchify and ``conv_in``."""
    decoder_blocks: tuple[VAEBlockSpec, ...]
    """Decoder stages in checkpoint order, i.e. mirrored: the decoder runs them last to first. Empty for the
    encoder of an LTX-2.5 diffusion-decoder VAE (its decoder is not a conv decoder)."""
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 128
    """Latent width; also the encoder's base width."""
    patch_size: int = 4
    """Spatial patchify factor before the encoder's first conv (and unpatchify after the decoder's last)."""
    norm_layer: NormLayer = "pixel_norm"
    latent_log_var: LatentLogVar = "uniform"
    """Layout of the encoder's log-variance channels (only the means are returned)."""
    encoder_padding_mode: PaddingMode = "zeros"
    decoder_padding_mode: PaddingMode = "reflect"
    """Spatial padding; both come from ``spatial_padding_mode`` when it is set (LTX-2.3: zeros)."""
    decoder_base_channels: int = 128
    """The decoder's first conv maps the latent to 8x this width."""
    causal_decoder: bool = False
    timestep_conditioning: bool = True
    """LTX-2 (19B): the decoder is conditioned on a decode timestep and noises its input."""

    def __post_init__(self) -> None:
        for name in ("in_channels", "out_channels", "latent_channels", "patch_size", "decoder_base_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        _check_choice("norm_layer", self.norm_layer, get_args(NormLayer))
        _check_choice("latent_log_var", self.latent_log_var, get_args(LatentLogVar))
        _check_choice("encoder_padding_mode", self.encoder_padding_mode, get_args(PaddingMode))
        _check_choice("decoder_padding_mode", self.decoder_padding_mode, get_args(PaddingMode))
        for name in ("causal_decoder", "timestep_conditioning"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for field_name, kinds in (("encoder_blocks", _ENCODER_KINDS), ("decoder_blocks", _DECODER_KINDS)):
            for i, spec in enumerate(getattr(self, field_name)):
                if spec.kind not in kinds:
                    raise ValueError(f"{field_name}[{i}]: unknown block {spec.kind!r}; expected one of {kinds}")
                if spec.num_layers < 1 or spec.multiplier < 1:
                    raise ValueError(f"{field_name}[{i}] ({spec.kind}): num_layers and multiplier must be >= 1")
        encoder = self.compression("encoder_blocks")
        decoder = self.compression("decoder_blocks")
        if self.decoder_blocks and encoder != decoder:
            raise ValueError(
                f"encoder_blocks compress (time, space) by {encoder} but decoder_blocks expand by {decoder}; "
                "the encoder and decoder of one VAE must match"
            )
        _check_channel_plan(self)

    def compression(self, field_name: str = "encoder_blocks") -> tuple[int, int]:
        """(time, space) downsampling factor of a block list, the patchify included (LTX: (8, 32))."""
        blocks = getattr(self, field_name)
        time = math.prod(spec.stride[0] for spec in blocks)
        space = self.patch_size * math.prod(spec.stride[1] for spec in blocks)
        return time, space

    @property
    def time_factor(self) -> int:
        """Video frames per latent frame (after the causal first frame)."""
        return self.compression()[0]

    @property
    def space_factor(self) -> int:
        """Pixels per latent cell along height and width."""
        return self.compression()[1]

    @classmethod
    def from_checkpoint_config(cls, vae: Mapping, *, path: str | Path = "<config>") -> VideoVAEConfig:
        """Build from a checkpoint's ``vae`` config section, with a ``ValueError`` naming ``path`` and the key for
        anything missing or malformed. Keys the VAE does not read (``scaling_factor``, ``_class_name``, ...) are
        ignored."""
        if not isinstance(vae, Mapping):
            raise ValueError(f"{path}: the 'vae' config section must be a JSON object, got {type(vae).__name__}")
        try:
            missing = [key for key in ("encoder_blocks", "decoder_blocks") if key not in vae]
            if missing:
                raise ValueError(f"missing required keys {missing}")
            dims = vae.get("dims", 3)
            if dims != 3:
                raise ValueError(f"dims={dims!r} is not supported; the LTX-2 video VAE is 3-D (dims=3)")
            padding = vae.get("spatial_padding_mode")
            kwargs = {key: vae[key] for key in _SCALAR_KEYS if key in vae}
            return cls(
                encoder_blocks=_parse_blocks(vae["encoder_blocks"], "encoder_blocks"),
                decoder_blocks=_parse_blocks(vae["decoder_blocks"], "decoder_blocks"),
                encoder_padding_mode=padding if padding is not None else "zeros",
                decoder_padding_mode=padding if padding is not None else "reflect",
                **kwargs,
            )
        except ValueError as exc:
            raise ValueError(f"{path}: invalid 'vae' config: {exc}") from None


def _check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _parse_blocks(raw: object, field_name: str) -> tuple[VAEBlockSpec, ...]:
    side = "encoder" if field_name == "encoder_blocks" else "decoder"
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise ValueError(f"{field_name} must be a list of [name, params] pairs, got {raw!r}")
    specs = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, Sequence) or isinstance(entry, str) or len(entry) != 2:
            raise ValueError(f"{field_name}[{i}] must be a [name, params] pair, got {entry!r}")
        kind, params = entry
        if isinstance(params, int) and not isinstance(params, bool):
            params = {"num_layers": params}
        if not isinstance(params, Mapping):
            raise ValueError(f"{field_name}[{i}] ({kind}): params must be an object or an integer, got {params!r}")
        if side == "decoder" and kind == "attn_res_x":
            raise ValueError(f"{field_name}[{i}]: 'attn_res_x' is not supported (ltx-core cannot build it either)")
        unknown = sorted(set(params) - set(_BLOCK_PARAMS))
        if unknown:
            logger.warning("%s[%d] (%s): ignoring unknown block parameters %s", field_name, i, kind, unknown)
        if kind == "res_x" and "num_layers" not in params:
            raise ValueError(f"{field_name}[{i}] (res_x): missing 'num_layers'")
        # The channel multiplier defaults to 2 where the encoder widens and the decoder's res_x_y narrows, else 1.
        widening = kind in ("res_x_y", "compress_all_x_y") or (side == "encoder" and kind.endswith("_res"))
        spec_kwargs = {
            "num_layers": params.get("num_layers", 1),
            "multiplier": params.get("multiplier", 2 if widening else 1),
            "residual": params.get("residual", False),
            "inject_noise": params.get("inject_noise", False),
        }
        for key in ("num_layers", "multiplier"):
            if not isinstance(spec_kwargs[key], int) or isinstance(spec_kwargs[key], bool):
                raise ValueError(f"{field_name}[{i}] ({kind}): {key} must be an integer, got {spec_kwargs[key]!r}")
        for key in ("residual", "inject_noise"):
            if not isinstance(spec_kwargs[key], bool):
                raise ValueError(f"{field_name}[{i}] ({kind}): {key} must be true or false, got {spec_kwargs[key]!r}")
        # ltx-core honours these flags only where listed; warn rather than silently diverge from it.
        ignored = []
        if spec_kwargs["residual"] and not (side == "decoder" and kind == "compress_all"):
            ignored.append("residual")
            spec_kwargs["residual"] = False
        if spec_kwargs["inject_noise"] and not (side == "decoder" and kind in ("res_x", "res_x_y")):
            ignored.append("inject_noise")
            spec_kwargs["inject_noise"] = False
        if ignored:
            logger.warning("%s[%d] (%s): %s has no effect on this block; ignored", field_name, i, kind, ignored)
        specs.append(VAEBlockSpec(kind=str(kind), **spec_kwargs))
    return tuple(specs)


def _check_channel_plan(cfg: VideoVAEConfig) -> None:
    width = cfg.latent_channels
    for i, spec in enumerate(cfg.encoder_blocks):
        factor = math.prod(spec.stride)
        if spec.kind in ("res_x_y", "compress_all_x_y") or spec.kind.endswith("_res"):
            out = width * spec.multiplier
            if spec.kind.endswith("_res") and (out % factor or (width * factor) % out):
                raise ValueError(
                    f"encoder_blocks[{i}] ({spec.kind}): {width} -> {out} channels is not divisible by the "
                    f"space-to-depth factor {factor}"
                )
            width = out
    width = 8 * cfg.decoder_base_channels
    for i, spec in enumerate(reversed(cfg.decoder_blocks)):
        if spec.kind == "res_x":
            continue
        if width % spec.multiplier or (spec.residual and math.prod(spec.stride) % spec.multiplier):
            raise ValueError(
                f"decoder_blocks[{len(cfg.decoder_blocks) - 1 - i}] ({spec.kind}): {width} channels cannot be "
                f"reduced by multiplier {spec.multiplier}"
            )
        width //= spec.multiplier


# -------------------------------------------------------------------------------------------------------------
# Input checks


def _nearest_multiples(value: int, step: int, offset: int = 0) -> str:
    below = offset + (value - offset) // step * step
    candidates = [c for c in (below, below + step) if c >= max(offset, 1)]
    return " or ".join(str(c) for c in candidates)


def check_video_shape(shape: Sequence[int], cfg: VideoVAEConfig) -> None:
    """Raise a ``ValueError`` unless ``shape`` is (B, in_channels, 1 + k t, s h, s w) for the VAE's time factor
    ``t`` and space factor ``s`` (8 and 32 for LTX)."""
    t, s = cfg.time_factor, cfg.space_factor
    if len(shape) != 5:
        raise ValueError(f"expected a video of shape (B, C, F, H, W), got shape {tuple(shape)}")
    _, c, f, h, w = shape
    if c != cfg.in_channels:
        raise ValueError(f"expected {cfg.in_channels} video channels, got {c} (shape {tuple(shape)})")
    if f < 1 or (f - 1) % t:
        raise ValueError(
            f"frame count {f} is not 1 + {t}k; the nearest valid frame counts are {_nearest_multiples(f, t, 1)}"
        )
    for name, size in (("height", h), ("width", w)):
        if size < 1 or size % s:
            raise ValueError(
                f"video {name} {size} is not a multiple of {s}; the nearest valid {name}s are "
                f"{_nearest_multiples(size, s)}"
            )
    _check_reflect_padding(cfg.encoder_padding_mode, h // s, w // s, "video", s)


def check_latent_shape(shape: Sequence[int], cfg: VideoVAEConfig) -> None:
    """Raise a ``ValueError`` unless ``shape`` is a decoder input (B, latent_channels, F, H, W)."""
    if len(shape) != 5 or shape[1] != cfg.latent_channels:
        raise ValueError(f"expected a latent of shape (B, {cfg.latent_channels}, F, H, W), got shape {tuple(shape)}")
    _check_reflect_padding(cfg.decoder_padding_mode, shape[3], shape[4], "latent", 1)


def _check_reflect_padding(mode: PaddingMode, cells_h: int, cells_w: int, what: str, unit: int) -> None:
    # A reflect pad of 1 needs 2 values to reflect; the smallest feature map is the latent.
    if mode == "reflect" and min(cells_h, cells_w) < 2:
        raise ValueError(
            f"{what} height and width must be at least {2 * unit} (2 latent cells) with reflect spatial padding, "
            f"got {cells_h * unit} x {cells_w * unit}"
        )


# -------------------------------------------------------------------------------------------------------------
# Encoder


def _build_encoder_block(spec: VAEBlockSpec, width: int, cfg: VideoVAEConfig) -> tuple[nn.Module, int]:
    pad = cfg.encoder_padding_mode
    if spec.kind == "res_x":
        return ResStage(width, spec.num_layers, norm=cfg.norm_layer, causal=True, padding_mode=pad), width
    if spec.kind == "res_x_y":
        out = width * spec.multiplier
        return ResBlock(width, out, norm=cfg.norm_layer, causal=True, padding_mode=pad), out
    if spec.kind.endswith("_res"):
        out = width * spec.multiplier
        return SpaceToDepthDown(width, out, spec.stride, padding_mode=pad), out
    # Plain compress_* / compress_all_x_y: one strided causal conv.
    out = width * spec.multiplier if spec.kind == "compress_all_x_y" else width
    return CausalConv3d(width, out, causal=True, padding_mode=pad, stride=spec.stride), out


class VideoEncoder(nn.Module):
    """Video (B, 3, 1 + 8k, 32h, 32w) in [-1, 1] -> normalised latent means (B, 128, 1 + k, h, w).

    Causal in time: latent frame ``j`` depends only on video frames ``<= 8 j``. ``forward`` is differentiable;
    :func:`encode_video` and :meth:`tiled_encode` are the inference entry points.
    """

    def __init__(self, config: VideoVAEConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        self.per_channel_statistics = LatentStatistics(cfg.latent_channels)
        width = cfg.latent_channels
        self.conv_in = CausalConv3d(
            cfg.in_channels * cfg.patch_size**2, width, causal=True, padding_mode=cfg.encoder_padding_mode
        )
        self.down_blocks = nn.ModuleList()
        for spec in cfg.encoder_blocks:
            block, width = _build_encoder_block(spec, width, cfg)
            self.down_blocks.append(block)
        self.conv_norm_out = make_norm(cfg.norm_layer, width)
        # Means, then log-variances: one per channel, or one shared ("uniform") / fixed ("constant") channel.
        num_out = 2 * cfg.latent_channels if cfg.latent_log_var == "per_channel" else cfg.latent_channels + 1
        self.conv_out = CausalConv3d(width, num_out, causal=True, padding_mode=cfg.encoder_padding_mode)

    def forward(self, video_BCFHW: torch.Tensor) -> torch.Tensor:
        check_video_shape(video_BCFHW.shape, self.config)
        x = self.conv_in(patchify(video_BCFHW, self.config.patch_size))
        for block in self.down_blocks:
            x = block(x)
        x = self.conv_out(F.silu(self.conv_norm_out(x)))
        # The channels after the means hold log-variances; the latent is the (deterministic) mean.
        return self.per_channel_statistics.normalize(x[:, : self.config.latent_channels])

    @torch.inference_mode()
    def tiled_encode(
        self,
        video_BCFHW: torch.Tensor,
        *,
        tile_size_px: int | None = None,
        tile_overlap_px: int = 64,
        tile_frames: int | None = None,
        tile_overlap_frames: int = 24,
    ) -> torch.Tensor:
        """Encode tile by tile and blend the overlaps in latent space (see :func:`plan_encode_tiles` for the tile
        geometry). ``None`` sizes leave that axis untiled. Each tile is moved to the encoder's device and dtype;
        the latent is returned there. Runs under ``torch.inference_mode``."""
        check_video_shape(video_BCFHW.shape, self.config)
        plans = plan_encode_tiles(
            video_BCFHW.shape[2:],
            self.config,
            tile_size_px=tile_size_px,
            tile_overlap_px=tile_overlap_px,
            tile_frames=tile_frames,
            tile_overlap_frames=tile_overlap_frames,
        )
        param = next(self.parameters())
        latent_shape = (video_BCFHW.shape[0], self.config.latent_channels, *(plan.out_length for plan in plans))
        out = torch.zeros(latent_shape, dtype=param.dtype, device=param.device)
        return apply_tiles(self, video_BCFHW, plans, out, device=param.device, dtype=param.dtype)


# -------------------------------------------------------------------------------------------------------------
# Decoder


def _build_decoder_block(spec: VAEBlockSpec, width: int, cfg: VideoVAEConfig) -> tuple[nn.Module, int]:
    common = dict(causal=cfg.causal_decoder, padding_mode=cfg.decoder_padding_mode)
    if spec.kind == "res_x":
        block = ResStage(
            width,
            spec.num_layers,
            norm=cfg.norm_layer,
            inject_noise=spec.inject_noise,
            timestep_conditioning=cfg.timestep_conditioning,
            **common,
        )
        return block, width
    if spec.kind == "res_x_y":
        out = width // spec.multiplier
        return ResBlock(width, out, norm=cfg.norm_layer, inject_noise=spec.inject_noise, **common), out
    block = DepthToSpaceUp(width, spec.stride, reduction=spec.multiplier, residual=spec.residual, **common)
    return block, width // spec.multiplier


class VideoDecoder(nn.Module):
    """Normalised latent (B, 128, F, h, w) -> video (B, 3, 8 (F - 1) + 1, 32 h, 32 w), roughly in [-1, 1].

    ``forward`` is differentiable; :func:`decode_video` and :meth:`tiled_decode` are the inference entry points.
    A timestep-conditioned decoder (LTX-2) needs ``generator`` for its input noise and, for ``inject_noise``
    blocks, its spatial noise: no global RNG is used.
    """

    def __init__(self, config: VideoVAEConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        self.per_channel_statistics = LatentStatistics(cfg.latent_channels)
        width = 8 * cfg.decoder_base_channels
        conv = dict(causal=cfg.causal_decoder, padding_mode=cfg.decoder_padding_mode)
        self.conv_in = CausalConv3d(cfg.latent_channels, width, **conv)
        self.up_blocks = nn.ModuleList()
        for spec in reversed(cfg.decoder_blocks):
            block, width = _build_decoder_block(spec, width, cfg)
            self.up_blocks.append(block)
        self.conv_norm_out = make_norm(cfg.norm_layer, width)
        self.conv_out = CausalConv3d(width, cfg.out_channels * cfg.patch_size**2, **conv)
        if cfg.timestep_conditioning:
            # A fixed constant (1000) kept as a parameter only because the checkpoint stores it as one.
            self.timestep_scale_multiplier = nn.Parameter(torch.tensor(1000.0), requires_grad=False)
            self.last_time_embedder = TimestepEmbedder(2 * width)
            self.last_scale_shift_table = nn.Parameter(torch.zeros(2, width))

    def forward(
        self,
        latent_BCFHW: torch.Tensor,
        timestep: float | torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Decode. ``timestep`` (a float or a (B,) tensor, default 0.05) and ``generator`` (on the latent's device)
        matter only for a timestep-conditioned decoder, which requires ``generator``."""
        check_latent_shape(latent_BCFHW.shape, self.config)
        return self._decode_noised(self.add_decode_noise(latent_BCFHW, generator), timestep, generator)

    def add_decode_noise(self, latent_BCFHW: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """``(1 - s) latent + s noise`` with s = 0.025 for a timestep-conditioned decoder; identity otherwise."""
        if not self.config.timestep_conditioning:
            return latent_BCFHW
        if generator is None:
            raise ValueError(
                "this video decoder is timestep-conditioned (LTX-2) and mixes noise into the latent; pass "
                "generator=torch.Generator(latent.device).manual_seed(seed)"
            )
        noise = torch.randn(
            latent_BCFHW.shape, generator=generator, dtype=latent_BCFHW.dtype, device=latent_BCFHW.device
        )
        return noise * DECODE_NOISE_SCALE + (1.0 - DECODE_NOISE_SCALE) * latent_BCFHW

    def _scaled_timestep(self, timestep: float | torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        batch = like.shape[0]
        t = torch.as_tensor(DECODE_TIMESTEP if timestep is None else timestep, dtype=like.dtype, device=like.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"timestep must be a float or a ({batch},) tensor, got shape {tuple(t.shape)}")
        return t * self.timestep_scale_multiplier.to(like)

    def _decode_noised(
        self,
        latent_BCFHW: torch.Tensor,
        timestep: float | torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        x = self.conv_in(self.per_channel_statistics.denormalize(latent_BCFHW))
        t_B = self._scaled_timestep(timestep, x) if self.config.timestep_conditioning else None
        for block in self.up_blocks:
            if isinstance(block, ResStage):
                x = block(x, t_B, generator)
            elif isinstance(block, ResBlock):
                x = block(x, None, generator)
            else:
                x = block(x)
        x = self.conv_norm_out(x)
        if self.config.timestep_conditioning:
            emb_B2C = self.last_time_embedder(t_B, x.dtype).view(x.shape[0], 2, -1)
            shift, scale = (self.last_scale_shift_table[None].to(x) + emb_B2C).unbind(dim=1)
            x = x * (1 + scale[:, :, None, None, None]) + shift[:, :, None, None, None]
        x = self.conv_out(F.silu(x))
        return unpatchify(x, self.config.patch_size)

    @torch.inference_mode()
    def tiled_decode(
        self,
        latent_BCFHW: torch.Tensor,
        *,
        tile_size_px: int | None = None,
        tile_overlap_px: int = 64,
        tile_frames: int | None = None,
        tile_overlap_frames: int = 24,
        timestep: float | torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Decode tile by tile and blend the overlaps in pixel space (see :func:`plan_decode_tiles`).

        ``None`` sizes leave that axis untiled. The input noise of a timestep-conditioned decoder is drawn once
        for the whole latent (exactly as :meth:`forward` draws it), so tiling changes only what the tile edges
        change; blocks with ``inject_noise`` still draw their spatial noise per tile. Each tile runs on the
        decoder's device; the video is assembled on the latent's device, so a CPU latent with a GPU decoder keeps
        the full video off the GPU. Runs under ``torch.inference_mode``.
        """
        check_latent_shape(latent_BCFHW.shape, self.config)
        plans = plan_decode_tiles(
            latent_BCFHW.shape[2:],
            self.config,
            tile_size_px=tile_size_px,
            tile_overlap_px=tile_overlap_px,
            tile_frames=tile_frames,
            tile_overlap_frames=tile_overlap_frames,
        )
        noised = self.add_decode_noise(latent_BCFHW, generator)
        param = next(self.parameters())
        video_shape = (latent_BCFHW.shape[0], self.config.out_channels, *(plan.out_length for plan in plans))
        out = torch.zeros(video_shape, dtype=param.dtype, device=latent_BCFHW.device)

        def decode_tile(tile_BCFHW: torch.Tensor) -> torch.Tensor:
            return self._decode_noised(tile_BCFHW, timestep, generator)

        return apply_tiles(decode_tile, noised, plans, out, device=param.device, dtype=param.dtype)


# -------------------------------------------------------------------------------------------------------------
# Tiling


@dataclass(frozen=True)
class AxisTiles:
    """How one axis (frames, height or width) is cut into tiles and blended back.

    Tile ``i`` reads ``in_ranges[i]`` of the input and writes ``masks[i] * result`` into ``out_ranges[i]`` of the
    output. The masks are linear ramps over each overlap, normalised so that they sum to exactly one at every
    output position; the output is therefore a convex combination of the tiles, with no seam.
    """

    in_ranges: tuple[tuple[int, int], ...]
    out_ranges: tuple[tuple[int, int], ...]
    masks: tuple[torch.Tensor, ...]
    out_length: int


def split_axis(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Cut ``[0, length)`` into equal tiles of ``tile`` cells overlapping by at least ``overlap`` cells, with the
    starts spread evenly (so the last tile is as long as the others). One tile if ``length <= tile``."""
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap {overlap} must be at least 0 and less than the tile size {tile}")
    if length <= tile:
        return [(0, length)]
    num_tiles = math.ceil((length - overlap) / (tile - overlap))
    starts = [round(i * (length - tile) / (num_tiles - 1)) for i in range(num_tiles)]
    return [(s, s + tile) for s in starts]


def blend_masks(out_ranges: Sequence[tuple[int, int]], skip_heads: Sequence[int]) -> list[torch.Tensor]:
    """Partition-of-unity weights for overlapping 1-D ranges sorted by start.

    Between consecutive ranges the blend region is ``[start_i + skip_heads[i], end_{i-1})``: range ``i - 1``
    ramps down over it as ``(L - k) / (L + 1)`` while range ``i`` ramps up as ``(k + 1) / (L + 1)``; range ``i``
    gets zero weight on its first ``skip_heads[i]`` cells. Finally every mask is divided by the sum of all masks,
    which makes the weights sum to one even where more than two ranges meet.
    """
    masks = [torch.ones(end - start, dtype=torch.float64) for start, end in out_ranges]
    for i in range(1, len(out_ranges)):
        (prev_start, prev_end), (start, _) = out_ranges[i - 1], out_ranges[i]
        lo, hi = start + skip_heads[i], prev_end
        masks[i][: skip_heads[i]] = 0.0
        if hi > lo:
            ramp = torch.arange(1, hi - lo + 1, dtype=torch.float64) / (hi - lo + 1)
            masks[i][lo - start : hi - start] *= ramp
            masks[i - 1][lo - prev_start : hi - prev_start] *= ramp.flip(0)
    total = torch.zeros(max(end for _, end in out_ranges), dtype=torch.float64)
    for (start, end), mask in zip(out_ranges, masks, strict=True):
        total[start:end] += mask
    assert bool((total > 0).all()), "every output position must be covered by a tile with positive weight"
    return [(mask / total[start:end]).float() for (start, end), mask in zip(out_ranges, masks, strict=True)]


def _check_tile_units(name: str, value: int, unit: int, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum or value % unit:
        raise ValueError(f"{name} must be a multiple of {unit} and at least {minimum}, got {value!r}")
    return value // unit


def _latent_tiles(
    latent_FHW: Sequence[int],
    cfg: VideoVAEConfig,
    tile_size_px: int | None,
    tile_overlap_px: int,
    tile_frames: int | None,
    tile_overlap_frames: int,
) -> list[list[tuple[int, int]]]:
    t, s = cfg.time_factor, cfg.space_factor
    if tile_frames is not None and tile_overlap_frames >= tile_frames:
        raise ValueError(f"tile_overlap_frames ({tile_overlap_frames}) must be less than tile_frames ({tile_frames})")
    if tile_size_px is not None and tile_overlap_px >= tile_size_px:
        raise ValueError(f"tile_overlap_px ({tile_overlap_px}) must be less than tile_size_px ({tile_size_px})")
    tiles = []
    if tile_frames is None:
        tiles.append([(0, latent_FHW[0])])
    else:
        # A tile of tile_frames + 1 video frames = tile_frames / t + 1 latent frames (the +1 is the causal first
        # frame); consecutive tiles share tile_overlap_frames + 1 video frames.
        size = _check_tile_units("tile_frames", tile_frames, t, t) + 1
        overlap = _check_tile_units("tile_overlap_frames", tile_overlap_frames, t, 0) + 1
        tiles.append(split_axis(latent_FHW[0], size, overlap))
    for length in latent_FHW[1:]:
        if tile_size_px is None:
            tiles.append([(0, length)])
        else:
            size = _check_tile_units("tile_size_px", tile_size_px, s, 2 * s)
            overlap = _check_tile_units("tile_overlap_px", tile_overlap_px, s, 0)
            tiles.append(split_axis(length, size, overlap))
    return tiles


def _frames_of(latent_range: tuple[int, int], t: int) -> tuple[int, int]:
    # Latent frames [a, b) decode to video frames [t a, t (b - 1) + 1): a chunk's first latent frame is decoded as
    # a causal first frame, i.e. one video frame, the last of the t frames that latent frame a stands for.
    a, b = latent_range
    return t * a, t * (b - 1) + 1


def plan_decode_tiles(
    latent_FHW: Sequence[int],
    cfg: VideoVAEConfig,
    *,
    tile_size_px: int | None = None,
    tile_overlap_px: int = 64,
    tile_frames: int | None = None,
    tile_overlap_frames: int = 24,
) -> tuple[AxisTiles, AxisTiles, AxisTiles]:
    """Tiles for :meth:`VideoDecoder.tiled_decode` of a latent with (frames, height, width) = ``latent_FHW``.

    Spatial tiles are ``tile_size_px`` pixels (a multiple of 32, at least 64) overlapping by at least
    ``tile_overlap_px`` (a multiple of 32). Temporal tiles span ``tile_frames + 1`` video frames (``tile_frames`` a
    multiple of 8) and overlap by at least ``tile_overlap_frames + 1`` frames. Blending is linear over each overlap,
    in pixels. Receptive fields are much larger than one latent cell, so overlaps of 2+ cells hide the seams.
    """
    t, s = cfg.time_factor, cfg.space_factor
    tiles = _latent_tiles(latent_FHW, cfg, tile_size_px, tile_overlap_px, tile_frames, tile_overlap_frames)
    plans = []
    for axis, ranges in enumerate(tiles):
        out = [_frames_of(r, t) for r in ranges] if axis == 0 else [(s * a, s * b) for a, b in ranges]
        masks = blend_masks(out, [0] * len(out))
        plans.append(AxisTiles(tuple(ranges), tuple(out), tuple(masks), out[-1][1]))
    return tuple(plans)


def plan_encode_tiles(
    video_FHW: Sequence[int],
    cfg: VideoVAEConfig,
    *,
    tile_size_px: int | None = None,
    tile_overlap_px: int = 64,
    tile_frames: int | None = None,
    tile_overlap_frames: int = 24,
) -> tuple[AxisTiles, AxisTiles, AxisTiles]:
    """Tiles for :meth:`VideoEncoder.tiled_encode` of a video with (frames, height, width) = ``video_FHW``.

    Same tile geometry as :func:`plan_decode_tiles`, blended linearly in latent cells. A temporal tile that does
    not start at frame 0 encodes its first frame as a lone image, which is not the latent of that position, so
    that latent frame gets zero weight (the previous tile covers it).
    """
    t, s = cfg.time_factor, cfg.space_factor
    latent_FHW = [(video_FHW[0] - 1) // t + 1, video_FHW[1] // s, video_FHW[2] // s]
    tiles = _latent_tiles(latent_FHW, cfg, tile_size_px, tile_overlap_px, tile_frames, tile_overlap_frames)
    plans = []
    for axis, ranges in enumerate(tiles):
        inputs = [_frames_of(r, t) for r in ranges] if axis == 0 else [(s * a, s * b) for a, b in ranges]
        skips = [0] + [1 if axis == 0 else 0] * (len(ranges) - 1)
        masks = blend_masks(ranges, skips)
        plans.append(AxisTiles(tuple(inputs), tuple(ranges), tuple(masks), ranges[-1][1]))
    return tuple(plans)


def apply_tiles(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x_BCFHW: torch.Tensor,
    plans: Sequence[AxisTiles],
    out_BCFHW: torch.Tensor,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Run ``fn`` on every tile of ``x`` (moved to ``device`` / ``dtype``) and add its mask-weighted result into
    ``out`` (zeros on entry), in place; returns ``out``. One tile's result is alive at a time. The masks of all
    tiles sum to one at every output position, so the weighted sum needs no weight buffer."""
    plan_f, plan_h, plan_w = plans
    for i, j, k in itertools.product(*(range(len(p.in_ranges)) for p in plans)):
        (f0, f1), (h0, h1), (w0, w1) = plan_f.in_ranges[i], plan_h.in_ranges[j], plan_w.in_ranges[k]
        tile = x_BCFHW[:, :, f0:f1, h0:h1, w0:w1].to(device=device, dtype=dtype)
        y = fn(tile)
        mask_FHW = (
            plan_f.masks[i][:, None, None] * plan_h.masks[j][None, :, None] * plan_w.masks[k][None, None, :]
        ).to(device=y.device, dtype=y.dtype)
        (g0, g1), (y0, y1), (x0, x1) = plan_f.out_ranges[i], plan_h.out_ranges[j], plan_w.out_ranges[k]
        out_BCFHW[:, :, g0:g1, y0:y1, x0:x1] += (y * mask_FHW).to(out_BCFHW)
        del y, tile
    return out_BCFHW


# -------------------------------------------------------------------------------------------------------------
# Inference helpers


@torch.inference_mode()
def encode_video(encoder: VideoEncoder, video_BCFHW: torch.Tensor) -> torch.Tensor:
    """Encode a video in [-1, 1] to normalised latent means under ``torch.inference_mode`` (moved to the encoder's
    device and dtype). Use :meth:`VideoEncoder.tiled_encode` for videos that do not fit in memory."""
    param = next(encoder.parameters())
    return encoder(video_BCFHW.to(device=param.device, dtype=param.dtype))


@torch.inference_mode()
def decode_video(
    decoder: VideoDecoder,
    latent_BCFHW: torch.Tensor,
    *,
    timestep: float | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Decode a normalised latent to a video under ``torch.inference_mode`` (on the decoder's device and dtype).
    A timestep-conditioned (LTX-2) decoder requires ``generator``, on the decoder's device. Use
    :meth:`VideoDecoder.tiled_decode` for outputs that do not fit in memory."""
    param = next(decoder.parameters())
    return decoder(latent_BCFHW.to(device=param.device, dtype=param.dtype), timestep, generator)


# -------------------------------------------------------------------------------------------------------------
# Loading


DIFFUSION_VAE_CLASS = "CausalDiffusionVAE"


def read_video_vae_config(path: str | Path) -> VideoVAEConfig:
    """The video VAE config of an official checkpoint (its ``vae`` metadata section).

    For the LTX-2.5 diffusion-decoder VAE (``_class_name`` ``CausalDiffusionVAE``, nested ``encoder`` /
    ``decoder`` sections) this is the config of its conv encoder, with no decoder blocks."""
    vae = config_section(read_config(path), "vae", path)
    if vae.get("_class_name") == DIFFUSION_VAE_CLASS:
        encoder = vae.get("encoder")
        if not isinstance(encoder, Mapping) or "blocks" not in encoder or "out_channels" not in encoder:
            raise ValueError(f"{path}: a {DIFFUSION_VAE_CLASS} config needs an 'encoder' section with 'blocks' and "
                             "'out_channels'")
        if encoder.get("base_channels", encoder["out_channels"]) != encoder["out_channels"]:
            raise ValueError(f"{path}: encoder base_channels {encoder.get('base_channels')} != latent channels "
                             f"{encoder['out_channels']}; ltxf's conv encoder starts at the latent width")
        flat = {"encoder_blocks": encoder["blocks"], "decoder_blocks": [], "latent_channels": encoder["out_channels"]}
        for key in ("dims", "in_channels", "patch_size", "norm_layer", "latent_log_var", "spatial_padding_mode"):
            if key in encoder:
                flat[key] = encoder[key]
        return VideoVAEConfig.from_checkpoint_config(flat, path=path)
    return VideoVAEConfig.from_checkpoint_config(vae, path=path)


def _select_component(prefix: str, statistics_prefix: str) -> Callable[[str], str | None]:
    def select(key: str) -> str | None:
        if key.startswith(prefix):
            return key[len(prefix) :]
        if key.startswith(statistics_prefix):
            name = key[len(statistics_prefix) :]
            if name in STATISTICS_NAMES:
                return _STATISTICS_MODULE + name
        return None

    return select


def video_vae_key_prefix(path: str | Path) -> str:
    """The key prefix of the video VAE under the names :func:`ltxf.models.checkpoint.list_keys` gives: ``"vae."``
    for a single-file checkpoint and for a standalone VAE file (the LTX-2.5 split pack stores bare ``encoder.`` /
    ``decoder.`` / ``per_channel_statistics.`` keys, which the reader names officially); ``""`` for bare keys a
    reader leaves as they are. Decided from the header."""
    keys = list_keys(path)
    if any(k.startswith("vae.") for k in keys):
        return "vae."
    if any(k.startswith(("encoder.", "decoder.", "per_channel_statistics.")) for k in keys):
        return ""
    raise ValueError(f"{path}: no video VAE tensors (neither 'vae.*' keys of a single-file checkpoint nor the bare "
                     "'encoder.*' / 'decoder.*' / 'per_channel_statistics.*' keys of a standalone VAE file)")


def _load(
    path: str | Path, module_cls: type[nn.Module], prefix: str, dtype: torch.dtype, device: torch.device | str
) -> nn.Module:
    path = Path(path)
    cfg = read_video_vae_config(path)
    with torch.device("meta"):
        module = module_cls(cfg)
    file_prefix = video_vae_key_prefix(path)
    component = prefix.removeprefix("vae.")
    tensors = read_tensors(path, _select_component(file_prefix + component, file_prefix + "per_channel_statistics."),
                           dtype=dtype, device=device)
    load_state_dict_strict(module, tensors, source=path)
    check_nothing_on_meta(module, path)
    logger.info("loaded %s from %s (%s tensors)", module_cls.__name__, path, len(tensors))
    return module.eval()


def load_video_vae_encoder(
    path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> VideoEncoder:
    """Build the video VAE encoder from an official checkpoint's config and load only its tensors
    (``vae.encoder.*`` and the two ``vae.per_channel_statistics`` entries), strictly. Returned in eval mode."""
    return _load(path, VideoEncoder, VIDEO_VAE_ENCODER_PREFIX, dtype, device)


def load_video_vae_decoder(
    path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> VideoDecoder:
    """Build the video VAE decoder from an official checkpoint's config and load only its tensors
    (``vae.decoder.*`` and the two ``vae.per_channel_statistics`` entries), strictly. Returned in eval mode;
    the LTX-2 decoder's ``timestep_scale_multiplier`` stays frozen.

    The LTX-2.5 diffusion-decoder VAE file is refused with a message naming the conv VAE (same latent space,
    same encoder) to decode with instead."""
    if not read_video_vae_config(path).decoder_blocks:
        raise ValueError(f"{path} is the LTX-2.5 diffusion-decoder video VAE ({DIFFUSION_VAE_CLASS}); ltxf decodes "
                         "with the conv VAE of the same pack (ltx-2.5-video-vae-conv*.safetensors: the same latent "
                         "space and encoder): pass that file as the video VAE (--model.video_vae / --video-vae-path)")
    return _load(path, VideoDecoder, VIDEO_VAE_DECODER_PREFIX, dtype, device)
