"""Text side of LTX-2 / LTX-2.3: Gemma feature extractors, the 1-D embeddings connectors, and their loader.

The prompt path is ``Gemma 3 hidden states -> feature extractor -> (cached on disk) -> connectors -> context``:

* The **feature extractor** turns the stacked hidden states of every Gemma layer (embeddings + 48 blocks = 49
  states of width 3840) into one feature vector per token. V1 (LTX-2) normalises each layer per sample and
  projects with ``aggregate_embed`` (no bias), giving the same features for video and audio. V2 (LTX-2.3)
  RMS-normalises each token per layer and projects with separate ``video_aggregate_embed`` /
  ``audio_aggregate_embed`` (with bias). These features are what the trainer caches.
* Each **connector** (video, audio) replaces the padded tokens by learnable registers, then runs a small
  pre-norm transformer with 1-D RoPE. After it every token position is valid, so the output mask is all ones.

State-dict names are those of the official checkpoint once its prefixes are stripped:
``text_embedding_projection.*`` -> ``feature_extractor.*``, ``model.diffusion_model.video_embeddings_connector.*``
-> ``video_connector.*``, ``model.diffusion_model.audio_embeddings_connector.*`` -> ``audio_connector.*``.

Shape legend: B batch, S text tokens, D Gemma hidden width, L Gemma hidden states (layers + 1), F = D * L
flattened features, C connector width (heads * head_dim), R learnable registers.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ltxf.models.attention import Attention
from ltxf.models.checkpoint import (
    AUDIO_CONNECTOR_PREFIX,
    LTX_2_5_SWITCHES,
    TEXT_PROJECTION_PREFIX,
    VIDEO_CONNECTOR_PREFIX,
    ModelVersion,
    config_section,
    detect_text_version,
    list_keys,
    read_config,
    read_tensor_shapes,
    strip_prefix,
)
from ltxf.models.feed_forward import FeedForward
from ltxf.models.materialize import TensorTransform, block_units, materialize_
from ltxf.models.rope import ROPE_TYPES, RopeType, build_rope

logger = logging.getLogger(__name__)

# Gemma-3-12B, the text encoder of both model versions: hidden width and number of hidden states (embedding
# output + 48 decoder layers). The official config does not store them; they are fixed by the aggregate weights.
GEMMA_HIDDEN_SIZE = 3840
GEMMA_NUM_HIDDEN_STATES = 49

_NORM_EPS = 1e-6

# -------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True, kw_only=True)
class ConnectorConfig:
    """Geometry of one embeddings connector (a 1-D pre-norm transformer over the text tokens)."""

    num_layers: int
    """Transformer blocks (2 in LTX-2, 8 in LTX-2.3)."""
    num_heads: int
    head_dim: int
    num_registers: int = 128
    """Learnable registers that replace padded tokens; 0 disables the replacement (padding is masked instead)."""
    gated_attention: bool = False
    """Per-head attention gate (LTX-2.3)."""
    rope_type: RopeType = "interleaved"
    double_precision_rope: bool = False
    """Frequency grid computed in float64 (the checkpoints' ``frequencies_precision == "float64"``)."""
    max_pos: tuple[float, ...] = (1.0,)
    """RoPE position normaliser (``connector_positional_embedding_max_pos``; the checkpoints use [4096])."""
    theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ConnectorConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.num_registers, int) or self.num_registers < 0:
            raise ValueError(f"ConnectorConfig.num_registers must be an int >= 0, got {self.num_registers!r}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"ConnectorConfig.rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        if len(self.max_pos) != 1 or not self.max_pos[0] > 0:
            raise ValueError(f"ConnectorConfig.max_pos must hold one positive value (1-D RoPE), got {self.max_pos}")
        if self.rope_type == "split" and self.inner_dim % (2 * self.num_heads):
            raise ValueError(
                f"split RoPE needs the connector width {self.inner_dim} divisible by 2 * num_heads "
                f"({2 * self.num_heads})"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim


@dataclass(frozen=True, kw_only=True)
class EmbeddingsProcessorConfig:
    """Everything needed to build an :class:`EmbeddingsProcessor` (feature extractor + two connectors).

    The feature widths are the connector widths (the connectors consume the features directly); V1 produces one
    feature tensor for both modalities, so it needs equal video and audio connector widths.
    """

    version: ModelVersion
    video_connector: ConnectorConfig
    audio_connector: ConnectorConfig
    gemma_hidden_size: int = GEMMA_HIDDEN_SIZE
    gemma_num_hidden_states: int = GEMMA_NUM_HIDDEN_STATES
    """Gemma hidden states fed to the feature extractor: decoder layers + 1 (the embedding output)."""

    def __post_init__(self) -> None:
        if self.version not in ("ltx-2", "ltx-2.3"):
            raise ValueError(f"EmbeddingsProcessorConfig.version must be 'ltx-2' or 'ltx-2.3', got {self.version!r}")
        for name in ("gemma_hidden_size", "gemma_num_hidden_states"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"EmbeddingsProcessorConfig.{name} must be a positive int, got {value!r}")
        if self.version == "ltx-2" and self.video_connector.inner_dim != self.audio_connector.inner_dim:
            raise ValueError(
                "LTX-2 (feature extractor V1) feeds the same features to both connectors, so their widths must match: "
                f"video {self.video_connector.inner_dim} vs audio {self.audio_connector.inner_dim}"
            )

    @property
    def num_features(self) -> int:
        """Flattened feature width ``F = D * L`` at the input of the aggregate projection(s)."""
        return self.gemma_hidden_size * self.gemma_num_hidden_states

    @classmethod
    def from_transformer_config(
        cls,
        transformer_config: Mapping,
        *,
        gemma_hidden_size: int = GEMMA_HIDDEN_SIZE,
        gemma_num_hidden_states: int = GEMMA_NUM_HIDDEN_STATES,
        source: str | Path = "<config>",
    ) -> EmbeddingsProcessorConfig:
        """Read the connector settings from a checkpoint's ``transformer`` config section.

        Keys (ltx-core defaults in brackets): ``connector_num_layers`` [2], ``connector_num_attention_heads``
        [30], ``connector_attention_head_dim`` [128], ``connector_num_learnable_registers`` [128],
        ``connector_apply_gated_attention`` [False], ``audio_connector_{num_layers,num_attention_heads,
        attention_head_dim}`` [the video values], ``rope_type`` ["interleaved"; "split" for an LTX-2.5 config],
        ``frequencies_precision``
        ["float64" -> double-precision grid], ``connector_positional_embedding_max_pos`` [[1]]. The version comes
        from :func:`ltxf.models.checkpoint.detect_text_version`.
        """
        cfg = transformer_config
        version = detect_text_version(cfg, source)
        # ltx-core 1.2 (LTX-2.5) changed the code default to "split"; a config with any 2.5 switch is read so.
        is_25 = any(key in cfg for key in LTX_2_5_SWITCHES)
        rope_type = cfg.get("rope_type", "split" if is_25 else "interleaved")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"{source}: transformer.rope_type must be one of {ROPE_TYPES}, got {rope_type!r}")
        max_pos = cfg.get("connector_positional_embedding_max_pos", [1])
        if not isinstance(max_pos, (list, tuple)):
            raise ValueError(f"{source}: transformer.connector_positional_embedding_max_pos must be a list, "
                             f"got {max_pos!r}")

        def get_int(key: str, default: int) -> int:
            value = cfg.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{source}: transformer.{key} must be an int, got {value!r}")
            return value

        shared = dict(
            num_registers=get_int("connector_num_learnable_registers", 128),
            gated_attention=bool(cfg.get("connector_apply_gated_attention", False)),
            rope_type=rope_type,
            double_precision_rope=cfg.get("frequencies_precision") == "float64",
            max_pos=tuple(float(p) for p in max_pos),
        )
        video_layers = get_int("connector_num_layers", 2)
        video_heads = get_int("connector_num_attention_heads", 30)
        video_head_dim = get_int("connector_attention_head_dim", 128)
        try:
            video = ConnectorConfig(num_layers=video_layers, num_heads=video_heads, head_dim=video_head_dim, **shared)
            audio = ConnectorConfig(
                num_layers=get_int("audio_connector_num_layers", video_layers),
                num_heads=get_int("audio_connector_num_attention_heads", video_heads),
                head_dim=get_int("audio_connector_attention_head_dim", video_head_dim),
                **shared,
            )
            config = cls(
                version=version,
                video_connector=video,
                audio_connector=audio,
                gemma_hidden_size=gemma_hidden_size,
                gemma_num_hidden_states=gemma_num_hidden_states,
            )
        except ValueError as exc:
            raise ValueError(f"{source}: invalid text-encoder config: {exc}") from exc
        if version == "ltx-2.3":
            # ltx-core sizes the V2 projections from the transformer's widths; they must equal the connector widths.
            for stream, heads_key, dim_key, width in (
                ("video", "num_attention_heads", "attention_head_dim", video.inner_dim),
                ("audio", "audio_num_attention_heads", "audio_attention_head_dim", audio.inner_dim),
            ):
                if heads_key in cfg and dim_key in cfg and cfg[heads_key] * cfg[dim_key] != width:
                    raise ValueError(
                        f"{source}: transformer.{heads_key} * {dim_key} = {cfg[heads_key] * cfg[dim_key]} (the "
                        f"{stream} aggregate_embed width) differs from the {stream} connector width {width}"
                    )
        return config


# -------------------------------------------------------------------------------------------------------------
# Feature extractors


def stack_hidden_states(hidden_states: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Gemma hidden states as one ``[B, S, D, L]`` tensor (a tuple of ``L`` ``[B, S, D]`` tensors is stacked)."""
    if isinstance(hidden_states, torch.Tensor):
        if hidden_states.ndim != 4:
            raise ValueError(f"stacked hidden states must be [B, S, D, L], got shape {tuple(hidden_states.shape)}")
        return hidden_states
    return torch.stack(tuple(hidden_states), dim=-1)


def normalize_hidden_states_v1(hidden_BSDL: torch.Tensor, mask_BS: torch.Tensor) -> torch.Tensor:
    """LTX-2 feature normalisation: per sample and per layer, ``8 * (x - mean) / (max - min)`` over the valid
    tokens and all ``D`` channels; padded tokens become 0. Returns ``[B, S, D * L]`` (layer index fastest) in
    the input dtype.

    ``mask_BS`` is the binary attention mask (1 = real token); any padding side works. Statistics are
    accumulated in float32. ``eps = 1e-6`` is added to the token count and to the range, as in the reference.
    """
    batch, num_tokens, hidden, num_layers = hidden_BSDL.shape
    valid_BS11 = mask_BS.bool()[:, :, None, None]
    count_B111 = valid_BS11.sum(dim=1, keepdim=True, dtype=torch.float32) * hidden
    total_B11L = hidden_BSDL.masked_fill(~valid_BS11, 0.0).sum(dim=(1, 2), keepdim=True, dtype=torch.float32)
    mean_B11L = total_B11L / (count_B111 + _NORM_EPS)
    low_B11L = hidden_BSDL.masked_fill(~valid_BS11, float("inf")).amin(dim=(1, 2), keepdim=True).float()
    high_B11L = hidden_BSDL.masked_fill(~valid_BS11, float("-inf")).amax(dim=(1, 2), keepdim=True).float()
    scale_B11L = 8.0 / (high_B11L - low_B11L + _NORM_EPS)
    # where(), not multiplication: padded positions of left-padded Gemma outputs may hold NaN.
    normed_BSDL = torch.where(valid_BS11, (hidden_BSDL - mean_B11L) * scale_B11L, 0.0)
    return normed_BSDL.to(hidden_BSDL.dtype).reshape(batch, num_tokens, hidden * num_layers)


def normalize_hidden_states_v2(hidden_BSDL: torch.Tensor, mask_BS: torch.Tensor) -> torch.Tensor:
    """LTX-2.3 feature normalisation: RMS norm of every token over ``D``, per layer (``eps = 1e-6``); padded
    tokens become 0. Returns ``[B, S, D * L]`` (layer index fastest) in the input dtype."""
    batch, num_tokens, hidden, num_layers = hidden_BSDL.shape
    normed_BSLD = F.rms_norm(hidden_BSDL.transpose(2, 3), (hidden,), eps=_NORM_EPS)
    normed_BSLD = torch.where(mask_BS.bool()[:, :, None, None], normed_BSLD, 0.0)
    return normed_BSLD.transpose(2, 3).reshape(batch, num_tokens, hidden * num_layers)


class _FeatureExtractor(nn.Module):
    """Shared input handling of the two feature extractor versions."""

    def __init__(self, hidden_size: int, num_hidden_states: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.num_hidden_states = num_hidden_states

    def _check_inputs(
        self, hidden_states: torch.Tensor | Sequence[torch.Tensor], mask_BS: torch.Tensor
    ) -> torch.Tensor:
        hidden_BSDL = stack_hidden_states(hidden_states)
        batch, num_tokens, hidden, num_layers = hidden_BSDL.shape
        if (hidden, num_layers) != (self.hidden_size, self.num_hidden_states):
            raise ValueError(
                f"hidden states have width {hidden} and {num_layers} layers; this feature extractor expects "
                f"{self.hidden_size} and {self.num_hidden_states} (Gemma layers + 1)"
            )
        if tuple(mask_BS.shape) != (batch, num_tokens):
            raise ValueError(f"attention mask shape {tuple(mask_BS.shape)} does not match hidden states [B, S] = "
                             f"{(batch, num_tokens)}")
        return hidden_BSDL


class FeatureExtractorV1(_FeatureExtractor):
    """LTX-2 feature extractor: :func:`normalize_hidden_states_v1` then ``aggregate_embed`` (no bias).

    The same features serve video and audio.
    """

    def __init__(
        self, *, out_features: int, hidden_size: int = GEMMA_HIDDEN_SIZE,
        num_hidden_states: int = GEMMA_NUM_HIDDEN_STATES,
    ) -> None:
        super().__init__(hidden_size, num_hidden_states)
        self.aggregate_embed = nn.Linear(hidden_size * num_hidden_states, out_features, bias=False)

    def forward(
        self, hidden_states: torch.Tensor | Sequence[torch.Tensor], mask_BS: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, S, D, L]`` hidden states (or a tuple of ``L`` ``[B, S, D]``) and binary mask ``[B, S]`` ->
        ``(video_features, audio_features)``, both the same ``[B, S, C]`` tensor."""
        hidden_BSDL = self._check_inputs(hidden_states, mask_BS)
        weight = self.aggregate_embed.weight
        features_BSC = self.aggregate_embed(normalize_hidden_states_v1(hidden_BSDL, mask_BS).to(weight.dtype))
        return features_BSC, features_BSC


class FeatureExtractorV2(_FeatureExtractor):
    """LTX-2.3 feature extractor: :func:`normalize_hidden_states_v2`, scaled by ``sqrt(out / D)`` per modality,
    then ``video_aggregate_embed`` / ``audio_aggregate_embed`` (with bias)."""

    def __init__(
        self, *, video_out_features: int, audio_out_features: int, hidden_size: int = GEMMA_HIDDEN_SIZE,
        num_hidden_states: int = GEMMA_NUM_HIDDEN_STATES,
    ) -> None:
        super().__init__(hidden_size, num_hidden_states)
        num_features = hidden_size * num_hidden_states
        self.video_aggregate_embed = nn.Linear(num_features, video_out_features, bias=True)
        self.audio_aggregate_embed = nn.Linear(num_features, audio_out_features, bias=True)

    def _project(self, features_BSF: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
        # W (s x) + b == s (W x) + b: scaling after the matmul avoids a second [B, S, F] temporary.
        scale = math.sqrt(linear.out_features / self.hidden_size)
        return F.linear(features_BSF, linear.weight) * scale + linear.bias

    def forward(
        self, hidden_states: torch.Tensor | Sequence[torch.Tensor], mask_BS: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, S, D, L]`` hidden states (or a tuple of ``L`` ``[B, S, D]``) and binary mask ``[B, S]`` ->
        ``(video_features [B, S, Cv], audio_features [B, S, Ca])``."""
        hidden_BSDL = self._check_inputs(hidden_states, mask_BS)
        features_BSF = normalize_hidden_states_v2(hidden_BSDL, mask_BS).to(self.video_aggregate_embed.weight.dtype)
        return self._project(features_BSF, self.video_aggregate_embed), self._project(
            features_BSF, self.audio_aggregate_embed
        )


# -------------------------------------------------------------------------------------------------------------
# Connectors


def replace_padding_with_registers(
    x_BSC: torch.Tensor, mask_BS: torch.Tensor, registers_RC: torch.Tensor
) -> torch.Tensor:
    """Move each sample's real tokens to the front (order kept) and fill the rest with registers.

    Position ``i`` of the tail gets ``registers_RC[i % R]`` (the registers tiled along the sequence). For left
    padding this is exactly ltx-core's replacement; unlike it, this works for any batch size and padding side,
    without a host synchronisation (no boolean-mask indexing).
    """
    batch, num_tokens, width = x_BSC.shape
    valid_BS = mask_BS.bool()
    # A stable sort on "is padding" lists the real tokens first, in their original order.
    order_BS = torch.argsort((~valid_BS).to(torch.uint8), dim=1, stable=True)
    front_BSC = torch.gather(x_BSC, 1, order_BS.unsqueeze(-1).expand(batch, num_tokens, width))
    positions_S = torch.arange(num_tokens, device=x_BSC.device)
    keep_BS1 = (positions_S < valid_BS.sum(dim=1, keepdim=True)).unsqueeze(-1)
    registers_SC = registers_RC[positions_S % registers_RC.shape[0]].to(x_BSC.dtype)
    return torch.where(keep_BS1, front_BSC, registers_SC)


class ConnectorBlock(nn.Module):
    """Pre-norm block: ``x += attn1(rms(x))``; ``x += ff(rms(x))`` (RMS without weight, eps 1e-6)."""

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__()
        dim = config.inner_dim
        self.attn1 = Attention(
            dim, num_heads=config.num_heads, head_dim=config.head_dim, rope_type=config.rope_type,
            gated=config.gated_attention,
        )
        self.ff = FeedForward(dim)

    def forward(
        self, x_BSC: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None
    ) -> torch.Tensor:
        x_BSC = x_BSC + self.attn1(F.rms_norm(x_BSC, (x_BSC.shape[-1],), eps=_NORM_EPS), mask=mask, rope=rope)
        return x_BSC + self.ff(F.rms_norm(x_BSC, (x_BSC.shape[-1],), eps=_NORM_EPS))


class EmbeddingsConnector(nn.Module):
    """One modality's connector: register replacement, 1-D RoPE, ``num_layers`` blocks, final RMS norm.

    State-dict names: ``transformer_1d_blocks.N.{attn1,ff}.*`` and ``learnable_registers`` ``[R, C]``.
    """

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer_1d_blocks = nn.ModuleList([ConnectorBlock(config) for _ in range(config.num_layers)])
        if config.num_registers:
            # Uniform in [-1, 1) as in the reference; real values come from the checkpoint.
            self.learnable_registers = nn.Parameter(torch.rand(config.num_registers, config.inner_dim) * 2.0 - 1.0)
        else:
            self.register_parameter("learnable_registers", None)

    def forward(self, x_BSC: torch.Tensor, mask_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``[B, S, C]`` and binary mask ``[B, S]`` (1 = real token) -> ``(context [B, S, C], mask)``.

        With registers the padding is filled in and the returned int64 mask is all ones; without, attention
        ignores padded keys and the mask is returned unchanged (as int64).
        """
        batch, num_tokens, width = x_BSC.shape
        if width != self.config.inner_dim:
            raise ValueError(f"connector expects features of width {self.config.inner_dim}, got {width}")
        if tuple(mask_BS.shape) != (batch, num_tokens):
            raise ValueError(
                f"mask shape {tuple(mask_BS.shape)} does not match features [B, S] = {(batch, num_tokens)}"
            )
        if self.learnable_registers is not None:
            x_BSC = replace_padding_with_registers(x_BSC, mask_BS, self.learnable_registers)
            attn_mask = None
            out_mask_BS = torch.ones_like(mask_BS, dtype=torch.int64)
        else:
            attn_mask = mask_BS.bool()[:, None, None, :]
            out_mask_BS = mask_BS.to(torch.int64)

        positions_11S = torch.arange(num_tokens, dtype=torch.float32, device=x_BSC.device)[None, None, :]
        rope = build_rope(
            positions_11S, dim=width, num_heads=self.config.num_heads, max_pos=self.config.max_pos,
            rope_type=self.config.rope_type, theta=self.config.theta, use_middle_indices_grid=False,
            double_precision=self.config.double_precision_rope, dtype=x_BSC.dtype,
        )
        for block in self.transformer_1d_blocks:
            x_BSC = block(x_BSC, rope, attn_mask)
        return F.rms_norm(x_BSC, (width,), eps=_NORM_EPS), out_mask_BS


# -------------------------------------------------------------------------------------------------------------
# Embeddings processor


class TextContext(NamedTuple):
    """Connector outputs: the transformer's cross-attention context per modality and its mask."""

    video_context: torch.Tensor
    """``[B, S, Cv]``."""
    audio_context: torch.Tensor | None
    """``[B, S, Ca]``, or None when no audio features were given."""
    context_mask: torch.Tensor
    """``[B, S]`` int64, 1 = attend (all ones with registers)."""


class EmbeddingsProcessor(nn.Module):
    """Feature extractor (optional) + video connector + audio connector.

    Two entry points: :meth:`forward` from cached features (the training path) and
    :meth:`process_hidden_states` from Gemma hidden states. Both handle any batch size.
    """

    def __init__(self, config: EmbeddingsProcessorConfig, *, with_feature_extractor: bool = True) -> None:
        super().__init__()
        self.config = config
        self.feature_extractor: FeatureExtractorV1 | FeatureExtractorV2 | None
        if not with_feature_extractor:
            self.feature_extractor = None
        elif config.version == "ltx-2":
            self.feature_extractor = FeatureExtractorV1(
                out_features=config.video_connector.inner_dim, hidden_size=config.gemma_hidden_size,
                num_hidden_states=config.gemma_num_hidden_states,
            )
        else:
            self.feature_extractor = FeatureExtractorV2(
                video_out_features=config.video_connector.inner_dim,
                audio_out_features=config.audio_connector.inner_dim, hidden_size=config.gemma_hidden_size,
                num_hidden_states=config.gemma_num_hidden_states,
            )
        self.video_connector = EmbeddingsConnector(config.video_connector)
        self.audio_connector = EmbeddingsConnector(config.audio_connector)

    def forward(
        self, video_features_BSC: torch.Tensor, audio_features_BSC: torch.Tensor | None, mask_BS: torch.Tensor
    ) -> TextContext:
        """Cached features (``video_prompt_embeds`` ``[B, S, Cv]``, ``audio_prompt_embeds`` ``[B, S, Ca]`` or
        None to skip audio) and the binary ``prompt_attention_mask`` ``[B, S]`` -> :class:`TextContext`."""
        video_BSC, mask_out_BS = self.video_connector(video_features_BSC, mask_BS)
        audio_BSC = None
        if audio_features_BSC is not None:
            audio_BSC, _ = self.audio_connector(audio_features_BSC, mask_BS)
        if self.video_connector.learnable_registers is None:
            # Without registers the padded positions carry no information; zero them (ltx-core does so for video).
            keep_BS1 = mask_out_BS.unsqueeze(-1).to(video_BSC.dtype)
            video_BSC = video_BSC * keep_BS1
            audio_BSC = None if audio_BSC is None else audio_BSC * keep_BS1
        return TextContext(video_BSC, audio_BSC, mask_out_BS)

    def extract_features(
        self, hidden_states: torch.Tensor | Sequence[torch.Tensor], mask_BS: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gemma hidden states ``[B, S, D, L]`` + mask -> ``(video_features, audio_features)``: what is cached."""
        if self.feature_extractor is None:
            raise ValueError("this EmbeddingsProcessor was built without its feature extractor "
                             "(with_feature_extractor=False); it can only run on cached features")
        return self.feature_extractor(hidden_states, mask_BS)

    def process_hidden_states(
        self, hidden_states: torch.Tensor | Sequence[torch.Tensor], mask_BS: torch.Tensor
    ) -> TextContext:
        """Gemma hidden states ``[B, S, D, L]`` (or a tuple of ``L`` ``[B, S, D]``) + binary mask ``[B, S]`` ->
        :class:`TextContext` (feature extractor, then connectors)."""
        video_features_BSC, audio_features_BSC = self.extract_features(hidden_states, mask_BS)
        return self(video_features_BSC, audio_features_BSC, mask_BS)


# -------------------------------------------------------------------------------------------------------------
# Loading from an official checkpoint

_V1_AGGREGATE_KEY = TEXT_PROJECTION_PREFIX + "aggregate_embed.weight"
_V2_AGGREGATE_KEYS = tuple(
    f"{TEXT_PROJECTION_PREFIX}{stream}_aggregate_embed.{param}" for stream in ("video", "audio")
    for param in ("weight", "bias")
)
_BLOCK_INDEX = re.compile(r"transformer_1d_blocks\.(\d+)\.")


def _count_connector_layers(keys: Sequence[str], prefix: str) -> int:
    indices = {int(m.group(1)) for k in keys if k.startswith(prefix) and (m := _BLOCK_INDEX.match(k[len(prefix):]))}
    return max(indices) + 1 if indices else 0


def _weights_version(keys: Sequence[str], path: Path) -> ModelVersion | None:
    has_v1 = _V1_AGGREGATE_KEY in keys
    v2_found = [k for k in _V2_AGGREGATE_KEYS if k in keys]
    if has_v1 and v2_found:
        raise ValueError(f"{path}: holds both the LTX-2 key {_V1_AGGREGATE_KEY} and the LTX-2.3 keys {v2_found}")
    if has_v1:
        return "ltx-2"
    if v2_found:
        return "ltx-2.3"
    return None


def _infer_num_hidden_states(
    in_features: int, gemma_hidden_size: int, gemma_num_hidden_states: int | None, key: str, path: Path
) -> int:
    if in_features % gemma_hidden_size:
        raise ValueError(
            f"{path}: {key} has {in_features} input features, which is not a multiple of the Gemma hidden size "
            f"{gemma_hidden_size} (input features = hidden size x hidden states); pass gemma_hidden_size="
        )
    inferred = in_features // gemma_hidden_size
    if gemma_num_hidden_states is not None and inferred != gemma_num_hidden_states:
        raise ValueError(
            f"{path}: {key} has {in_features} input features = {gemma_hidden_size} x {inferred} hidden states, "
            f"but gemma_num_hidden_states={gemma_num_hidden_states} was requested"
        )
    return inferred


def build_embeddings_processor_on_meta(
    path: str | Path,
    *,
    with_feature_extractor: bool = True,
    gemma_hidden_size: int | None = None,
    gemma_num_hidden_states: int | None = None,
    text_encoder_path: str | Path | None = None,
) -> EmbeddingsProcessor:
    """The text embeddings processor (feature extractor + connectors) of an official checkpoint, built on the
    ``meta`` device; fill it with :func:`load_embeddings_processor_weights_`.

    LTX-2.5 splits it over two files: the config and the connectors in the transformer file (``path``), the
    feature extractor's ``text_embedding_projection.*`` in the packed text-encoder file (``text_encoder_path``,
    whose Gemma config also gives the Gemma width and layer count). A single-file checkpoint needs no
    ``text_encoder_path`` (a Gemma 3 directory passed there is ignored).

    The version comes from the config metadata (the ``transformer`` section's V2 text keys) and is cross-checked
    against the weights: the aggregate-embed keys (V1 ``aggregate_embed`` vs V2 ``{video,audio}_aggregate_embed``)
    and each connector's layer count; a contradiction is a ``ValueError`` naming both sides. The module is built
    on ``meta``; nothing is read but the header.

    Args:
        path: the ``.safetensors`` checkpoint.
        with_feature_extractor: False skips the aggregate projection (1-1.2 B parameters) when only cached
            features will be processed (training).
        gemma_hidden_size: Gemma width ``D``; the number of hidden states is inferred from the aggregate weight
            (``in_features = D * L``). The official single-file config stores neither; None means the packed text
            encoder's ``hidden_size``, else 3840 (Gemma-3-12B).
        gemma_num_hidden_states: optional expected ``L`` (49 for Gemma-3-12B); checked against the weights.
    """
    path = Path(path)
    config = read_config(path)
    transformer_config = config_section(config, "transformer", path)
    version = detect_text_version(transformer_config, path)
    keys = list_keys(path)
    projection_path = path
    has_projection = any(k.startswith(TEXT_PROJECTION_PREFIX) for k in keys)
    packed = text_encoder_path is not None and Path(text_encoder_path).is_file()
    if packed:
        from ltxf.models.gemma import read_packed_text_encoder_config

        gemma_config = read_packed_text_encoder_config(text_encoder_path)
        text_config = gemma_config.get("text_config", gemma_config)
        if gemma_hidden_size is None:
            gemma_hidden_size = int(text_config["hidden_size"])
        if gemma_num_hidden_states is None:
            gemma_num_hidden_states = int(text_config["num_hidden_layers"]) + 1
    gemma_hidden_size = GEMMA_HIDDEN_SIZE if gemma_hidden_size is None else gemma_hidden_size
    if with_feature_extractor and not has_projection:
        if not packed:
            given = "" if text_encoder_path is None else f" (got {text_encoder_path}, not a packed file)"
            raise ValueError(
                f"{path}: no feature-extractor weights ({TEXT_PROJECTION_PREFIX}*) in this file: an LTX-2.5 split "
                "transformer keeps them in the packed text-encoder file; pass that file as text_encoder_path "
                f"(--model.text_encoder / --text-encoder-path){given}"
            )
        projection_path = Path(text_encoder_path)
        keys = keys + [k for k in list_keys(projection_path) if k.startswith(TEXT_PROJECTION_PREFIX)]

    weights_version = _weights_version(keys, path)
    if weights_version is not None and weights_version != version:
        found = _V1_AGGREGATE_KEY if weights_version == "ltx-2" else ", ".join(_V2_AGGREGATE_KEYS)
        raise ValueError(
            f"{path}: the config says {version} (from the V2 text keys of its transformer section) but the weights "
            f"hold {found}, the {weights_version} feature extractor"
        )
    if with_feature_extractor and weights_version is None:
        expected = [_V1_AGGREGATE_KEY] if version == "ltx-2" else list(_V2_AGGREGATE_KEYS)
        raise ValueError(f"{path}: no feature-extractor weights; expected {expected} (or pass "
                         "with_feature_extractor=False to load only the connectors)")

    num_hidden_states = GEMMA_NUM_HIDDEN_STATES if gemma_num_hidden_states is None else gemma_num_hidden_states
    if with_feature_extractor:
        weight_key = _V1_AGGREGATE_KEY if version == "ltx-2" else _V2_AGGREGATE_KEYS[0]
        (weight_shape,) = read_tensor_shapes(projection_path, [weight_key]).values()
        num_hidden_states = _infer_num_hidden_states(
            weight_shape[1], gemma_hidden_size, gemma_num_hidden_states, weight_key, projection_path
        )

    processor_config = EmbeddingsProcessorConfig.from_transformer_config(
        transformer_config, gemma_hidden_size=gemma_hidden_size, gemma_num_hidden_states=num_hidden_states,
        source=path,
    )
    for name, prefix, connector in (
        ("video", VIDEO_CONNECTOR_PREFIX, processor_config.video_connector),
        ("audio", AUDIO_CONNECTOR_PREFIX, processor_config.audio_connector),
    ):
        num_layers = _count_connector_layers(keys, prefix)
        if num_layers != connector.num_layers:
            config_key = "connector_num_layers" if name == "video" else "audio_connector_num_layers"
            raise ValueError(
                f"{path}: the config gives the {name} connector {connector.num_layers} layers (transformer."
                f"{config_key} or its default) but the weights under {prefix} have {num_layers}"
            )
    if with_feature_extractor:
        _check_aggregate_shapes(projection_path, processor_config)

    with torch.device("meta"):
        return EmbeddingsProcessor(processor_config, with_feature_extractor=with_feature_extractor)


def load_embeddings_processor_weights_(
    processor: EmbeddingsProcessor,
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    transform: TensorTransform | None = None,
    text_encoder_path: str | Path | None = None,
) -> EmbeddingsProcessor:
    """Fill a processor built by :func:`build_embeddings_processor_on_meta` (possibly sharded) from ``path``,
    component by component and block by block, each tensor cast to its parameter's dtype; strict per component
    (see :mod:`ltxf.models.materialize`). The feature extractor comes from ``text_encoder_path`` (an LTX-2.5 packed
    text encoder) when ``path`` does not hold it."""
    path = Path(path)
    projection_path = path
    if processor.feature_extractor is not None and text_encoder_path is not None \
            and not any(k.startswith(TEXT_PROJECTION_PREFIX) for k in list_keys(path)):
        projection_path = Path(text_encoder_path)
    components: list[tuple[str, nn.Module | None, Path]] = [
        (VIDEO_CONNECTOR_PREFIX, processor.video_connector, path),
        (AUDIO_CONNECTOR_PREFIX, processor.audio_connector, path),
        (TEXT_PROJECTION_PREFIX, processor.feature_extractor, projection_path),
    ]
    for file_prefix, module, source in components:
        if module is None:
            continue
        units = block_units(module, "transformer_1d_blocks") if hasattr(module, "transformer_1d_blocks") else ()
        materialize_(module, source, strip_prefix(file_prefix), device=device, units=units, transform=transform,
                     source=f"{source} [{file_prefix}*]")
    return processor


def load_embeddings_processor(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    with_feature_extractor: bool = True,
    gemma_hidden_size: int | None = None,
    gemma_num_hidden_states: int | None = None,
    text_encoder_path: str | Path | None = None,
) -> EmbeddingsProcessor:
    """Load the text embeddings processor (feature extractor + connectors) from an official checkpoint (and, for
    LTX-2.5, the packed text-encoder file holding the feature extractor): :func:`build_embeddings_processor_on_meta`
    (every consistency check), then the text-side tensors only, cast to ``dtype`` as they are read, strictly,
    nothing left on ``meta``. Arguments as there; ``dtype``, ``device``: of the loaded parameters."""
    path = Path(path)
    processor = build_embeddings_processor_on_meta(
        path, with_feature_extractor=with_feature_extractor, gemma_hidden_size=gemma_hidden_size,
        gemma_num_hidden_states=gemma_num_hidden_states, text_encoder_path=text_encoder_path).to(dtype)
    load_embeddings_processor_weights_(processor, path, device=device, text_encoder_path=text_encoder_path)
    logger.info("loaded %s text embeddings processor from %s (%s, feature extractor: %s)", processor.config.version,
                path, dtype, with_feature_extractor)
    return processor.eval()


def _check_aggregate_shapes(path: Path, config: EmbeddingsProcessorConfig) -> None:
    if config.version == "ltx-2":
        expected = {_V1_AGGREGATE_KEY: (config.video_connector.inner_dim, config.num_features)}
    else:
        expected = {}
        for stream, connector in (("video", config.video_connector), ("audio", config.audio_connector)):
            expected[f"{TEXT_PROJECTION_PREFIX}{stream}_aggregate_embed.weight"] = (connector.inner_dim,
                                                                                   config.num_features)
            expected[f"{TEXT_PROJECTION_PREFIX}{stream}_aggregate_embed.bias"] = (connector.inner_dim,)
    shapes = read_tensor_shapes(path, expected)
    for key, shape in expected.items():
        if key not in shapes:
            raise ValueError(f"{path}: missing feature-extractor tensor {key}")
        if shapes[key] != shape:
            raise ValueError(
                f"{path}: {key} has shape {shapes[key]} but the config implies {shape} (output = connector width "
                f"heads x head_dim from the transformer config, input = Gemma hidden size {config.gemma_hidden_size}"
                f" x {config.gemma_num_hidden_states} hidden states)"
            )


__all__ = [
    "GEMMA_HIDDEN_SIZE",
    "GEMMA_NUM_HIDDEN_STATES",
    "ConnectorBlock",
    "ConnectorConfig",
    "EmbeddingsConnector",
    "EmbeddingsProcessor",
    "EmbeddingsProcessorConfig",
    "FeatureExtractorV1",
    "FeatureExtractorV2",
    "TextContext",
    "build_embeddings_processor_on_meta",
    "load_embeddings_processor",
    "load_embeddings_processor_weights_",
    "normalize_hidden_states_v1",
    "normalize_hidden_states_v2",
    "replace_padding_with_registers",
    "stack_hidden_states",
]
