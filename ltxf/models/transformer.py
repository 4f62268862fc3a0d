"""The LTX-2 (19B) / LTX-2.3 (22B) audio-video diffusion transformer, its config, inputs and checkpoint I/O.

A dual-stream DiT: every block holds a video stream (width D = 32 x 128) and an audio stream (Da = 32 x 64). Per
block and stream: AdaLN-modulated self-attention with RoPE, text cross-attention, then (both streams together)
audio<->video cross-attention with cross-modal AdaLN, then an AdaLN-modulated feed-forward. The model predicts
a velocity per token. The two versions share this code path and differ by config switches:

* LTX-2: the caption projection (Gemma features -> D) lives here; AdaLN has 6 coefficients per block; the text
  cross-attention is unmodulated.
* LTX-2.3: no caption projection; 9 AdaLN coefficients (the text cross-attention query is modulated too), the
  context is modulated by a prompt AdaLN of sigma, and every attention has a per-head gate.
* LTX-2.5: LTX-2.3 plus four switches (``ff_bias``, ``audio_ff_bias``, ``use_prompt_adaln_single``,
  ``use_keyframes_abs_pos_embedding``). The last adds one learned vector to the video tokens that the
  ``keyframes_mask`` of the video :class:`Modality` marks (tokens whose latent encodes a single standalone frame).
  As in ltx-core 1.2 (which defines 2.5; checked against its goldens), a stream's audio<->video AdaLN scale/shift
  follows its own per-token timesteps; in LTX-2 / 2.3 (ltx-core 1.0) they follow the other stream's sigma.

Parameter names equal those of the official checkpoints after ``model.diffusion_model.`` is stripped.

Training-first: everything that depends on the inputs but not on the block (timestep modulation, RoPE tables,
masks, projected context) is computed once by the model's own ``prepare_stream`` method and handed to every
block as a NamedTuple of plain tensors, so each ``transformer_blocks[i]`` can be wrapped by FSDP2 / activation
checkpointing / torch.compile on its own and mixed-precision casting reaches every floating input. No module
is referenced outside the module tree, inputs are never modified in place, and the forward has no host syncs on
accelerators.

AdaLN is evaluated once per *distinct* timestep of each sample (usually sigma, plus 0 for clean conditioning
tokens) instead of once per token as the reference does; tokens then look their modulation up by index.
Outputs are unchanged.

Shape legend: B batch, T tokens of the stream, S text tokens, D stream width (heads x head_dim), C latent
channels, K distinct timesteps per sample, M modulation rows (AdaLN coefficients), L blocks, A position axes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ltxf.models import checkpoint
from ltxf.models.attention import Attention, reciprocal_rms, rms_norm
from ltxf.models.checkpoint import ModelVersion
from ltxf.models.feed_forward import FeedForward
from ltxf.models.materialize import TensorTransform, UnitCallback, block_units, materialize_
from ltxf.models.rope import ROPE_TYPES, RopeType, build_rope

logger = logging.getLogger(__name__)

# Values the reference configurator asserts (``config.get(key) == value``, so a missing key counts as None).
ASSERTED_CONFIG_VALUES: dict[str, Any] = {
    "dropout": 0.0,
    "attention_bias": True,
    "num_vector_embeds": None,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "use_linear_projection": False,
    "only_cross_attention": False,
    "cross_attention_norm": True,
    "double_self_attention": False,
    "upcast_attention": False,
    "standardization_norm": "rms_norm",
    "norm_elementwise_affine": False,
    "qk_norm": "rms_norm",
    "positional_embedding_type": "rope",
    "use_audio_video_cross_attention": True,
    "share_ff": False,
    "av_cross_ada_norm": True,
    "use_middle_indices_grid": True,
}

# Sinusoidal timestep features fed to every AdaLN-single.
_TIMESTEP_CHANNELS = 256
# Distinct timesteps per sample the AdaLN dedup handles by default (sigma, 0, and two partial strengths).
DEFAULT_MAX_DISTINCT_TIMESTEPS = 4

# -------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """Architecture of the audio-video transformer. Defaults are the official checkpoints' values."""

    version: ModelVersion
    """"ltx-2" (19B: caption projection inside the transformer), "ltx-2.3" (22B) or "ltx-2.5" (22B, split pack)."""
    num_layers: int = 48
    num_heads: int = 32
    head_dim: int = 128
    cross_attention_dim: int = 4096
    """Width of the video text context entering the blocks (must equal num_heads * head_dim)."""
    audio_num_heads: int = 32
    audio_head_dim: int = 64
    audio_cross_attention_dim: int = 2048
    """Audio text-context width and the RoPE width of the audio<->video attentions (= audio inner width)."""
    in_channels: int = 128
    out_channels: int = 128
    audio_in_channels: int = 128
    audio_out_channels: int = 128
    caption_channels: int | None = 3840
    """Width of the text features entering the LTX-2 caption projection (unused by LTX-2.3)."""
    positional_embedding_max_pos: tuple[float, ...] = (20, 2048, 2048)
    audio_positional_embedding_max_pos: tuple[float, ...] = (20,)
    positional_embedding_theta: float = 10000.0
    timestep_scale_multiplier: float = 1000
    av_ca_timestep_scale_multiplier: float = 1000.0
    rope_type: RopeType = "split"
    double_precision_rope: bool = True
    """Frequency grid computed in float64 (``frequencies_precision == "float64"``)."""
    norm_eps: float = 1e-6
    apply_gated_attention: bool = False
    """Per-head attention gates (LTX-2.3)."""
    cross_attention_adaln: bool = False
    """9-coefficient AdaLN with modulated text cross-attention and prompt AdaLN (LTX-2.3)."""
    use_prompt_adaln_single: bool = True
    """With ``cross_attention_adaln``: the text K/V modulation adds a prompt AdaLN of sigma to the per-block
    ``prompt_scale_shift_table``; False (LTX-2.5 "KV-cacheable" variants) uses the table alone."""
    ff_bias: bool = True
    """Biases in the video feed-forward (False in LTX-2.5)."""
    audio_ff_bias: bool = True
    """Biases in the audio feed-forward."""
    keyframes_embedding: bool = False
    """``use_keyframes_abs_pos_embedding`` (LTX-2.5): a learned ``[1, D]`` vector added to the video tokens that
    the video Modality's ``keyframes_mask`` marks."""

    def __post_init__(self) -> None:
        if self.version not in ("ltx-2", "ltx-2.3", "ltx-2.5"):
            raise ValueError(f"TransformerConfig.version must be 'ltx-2', 'ltx-2.3' or 'ltx-2.5', got {self.version!r}")
        if self.version == "ltx-2.5" and not self.cross_attention_adaln:
            raise ValueError("TransformerConfig: an ltx-2.5 transformer has the LTX-2.3 architecture "
                             "(cross_attention_adaln=True)")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"TransformerConfig.rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        for name in ("num_layers", "num_heads", "head_dim", "audio_num_heads", "audio_head_dim", "in_channels",
                     "out_channels", "audio_in_channels", "audio_out_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"TransformerConfig.{name} must be a positive int, got {value!r}")
        if self.cross_attention_dim != self.inner_dim:
            raise ValueError(
                f"TransformerConfig.cross_attention_dim ({self.cross_attention_dim}) must equal num_heads * head_dim "
                f"({self.inner_dim}): the text context enters the blocks at the video width"
            )
        if self.audio_cross_attention_dim != self.audio_inner_dim:
            raise ValueError(
                f"TransformerConfig.audio_cross_attention_dim ({self.audio_cross_attention_dim}) must equal "
                f"audio_num_heads * audio_head_dim ({self.audio_inner_dim})"
            )
        if self.has_caption_projection and not self.caption_channels:
            raise ValueError("TransformerConfig.caption_channels is required for an LTX-2 transformer")
        if len(self.positional_embedding_max_pos) != 3 or len(self.audio_positional_embedding_max_pos) != 1:
            raise ValueError(
                "TransformerConfig.positional_embedding_max_pos needs 3 entries (t, h, w) and "
                f"audio_positional_embedding_max_pos 1; got {self.positional_embedding_max_pos} and "
                f"{self.audio_positional_embedding_max_pos}"
            )
        if self.rope_type == "split":
            for name, dim, heads in (("video", self.inner_dim, self.num_heads),
                                     ("audio", self.audio_inner_dim, self.audio_num_heads)):
                if dim % (2 * heads):
                    raise ValueError(f"split RoPE needs the {name} width {dim} divisible by 2 * heads ({heads})")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def audio_inner_dim(self) -> int:
        return self.audio_num_heads * self.audio_head_dim

    @property
    def has_caption_projection(self) -> bool:
        return self.version == "ltx-2"

    @property
    def cross_modulation_from_own_timesteps(self) -> bool:
        """Where the audio<->video AdaLN scale/shift of a stream comes from. ltx-core 1.2 (which defines LTX-2.5,
        proven by its goldens) evaluates it at the stream's own per-token timesteps; ltx-core 1.0 (LTX-2 / 2.3, the
        oracle of those versions) at the other stream's sigma. The output gates follow the other stream's sigma in
        both."""
        return self.version == "ltx-2.5"

    @property
    def has_prompt_adaln(self) -> bool:
        """``prompt_adaln_single`` / ``audio_prompt_adaln_single`` exist."""
        return self.cross_attention_adaln and self.use_prompt_adaln_single

    @property
    def num_adaln_rows(self) -> int:
        """AdaLN coefficients per block: shift/scale/gate for self-attention and FF (+ text cross-attention)."""
        return 9 if self.cross_attention_adaln else 6

    @classmethod
    def from_checkpoint_config(cls, transformer_section: Mapping, *, path: str | Path = "<config>",
                               model_version: str | None = None) -> TransformerConfig:
        """Build from the ``transformer`` section of an official checkpoint config.

        Checks every value the reference asserts (a ``ValueError`` names the key), detects the version with
        :func:`ltxf.models.checkpoint.detect_model_version` (the V2 text keys, the LTX-2.5 switches and the file's
        ``model_version`` metadata string, passed as ``model_version``), and fills absent keys with the
        reference's code defaults (which differ from the checkpoint values for ``rope_type`` and
        ``av_ca_timestep_scale_multiplier``, exactly as the reference reads such a file). The architecture comes
        from the keys alone, never from the version string.
        """
        section = dict(transformer_section)
        for key, expected in ASSERTED_CONFIG_VALUES.items():
            actual = section.get(key)
            if actual != expected or (expected is not None and key not in section):
                found = "missing" if key not in section else f"{actual!r}"
                raise ValueError(f"{path}: transformer config key '{key}' is {found}; expected {expected!r}")
        version = checkpoint.detect_model_version(section, model_version, path)
        for key in checkpoint.LTX_2_5_SWITCHES:
            if key in section and not isinstance(section[key], bool):
                raise ValueError(f"{path}: transformer config key '{key}' must be true or false, got {section[key]!r}")
        rope_type = section.get("rope_type", "interleaved")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"{path}: transformer config key 'rope_type' is {rope_type!r}; expected one of "
                             f"{ROPE_TYPES}")
        if version == "ltx-2" and "caption_channels" not in section:
            raise ValueError(f"{path}: transformer config key 'caption_channels' is missing; an LTX-2 checkpoint "
                             "needs it for the caption projection")
        try:
            return cls(
                version=version,
                num_layers=section.get("num_layers", 48),
                num_heads=section.get("num_attention_heads", 32),
                head_dim=section.get("attention_head_dim", 128),
                cross_attention_dim=section.get("cross_attention_dim", 4096),
                audio_num_heads=section.get("audio_num_attention_heads", 32),
                audio_head_dim=section.get("audio_attention_head_dim", 64),
                audio_cross_attention_dim=section.get("audio_cross_attention_dim", 2048),
                in_channels=section.get("in_channels", 128),
                out_channels=section.get("out_channels", 128),
                audio_in_channels=section.get("audio_in_channels", 128),
                audio_out_channels=section.get("audio_out_channels", 128),
                caption_channels=section.get("caption_channels"),
                positional_embedding_max_pos=tuple(section.get("positional_embedding_max_pos", (20, 2048, 2048))),
                audio_positional_embedding_max_pos=tuple(section.get("audio_positional_embedding_max_pos", (20,))),
                positional_embedding_theta=section.get("positional_embedding_theta", 10000.0),
                timestep_scale_multiplier=section.get("timestep_scale_multiplier", 1000),
                av_ca_timestep_scale_multiplier=section.get("av_ca_timestep_scale_multiplier", 1),
                rope_type=rope_type,
                double_precision_rope=section.get("frequencies_precision", False) == "float64",
                norm_eps=section.get("norm_eps", 1e-6),
                apply_gated_attention=bool(section.get("apply_gated_attention", False)),
                cross_attention_adaln=bool(section.get("cross_attention_adaln", False)),
                use_prompt_adaln_single=section.get("use_prompt_adaln_single", True),
                ff_bias=section.get("ff_bias", True),
                audio_ff_bias=section.get("audio_ff_bias", True),
                keyframes_embedding=section.get("use_keyframes_abs_pos_embedding", False),
            )
        except ValueError as exc:
            raise ValueError(f"{path}: invalid transformer config: {exc}") from exc

    def to_checkpoint_config(self) -> dict[str, Any]:
        """The ``transformer`` config section an official loader needs to build this model."""
        section: dict[str, Any] = dict(ASSERTED_CONFIG_VALUES)
        section.update(
            num_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            attention_head_dim=self.head_dim,
            cross_attention_dim=self.cross_attention_dim,
            audio_num_attention_heads=self.audio_num_heads,
            audio_attention_head_dim=self.audio_head_dim,
            audio_cross_attention_dim=self.audio_cross_attention_dim,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            audio_in_channels=self.audio_in_channels,
            audio_out_channels=self.audio_out_channels,
            positional_embedding_max_pos=list(self.positional_embedding_max_pos),
            audio_positional_embedding_max_pos=list(self.audio_positional_embedding_max_pos),
            positional_embedding_theta=self.positional_embedding_theta,
            timestep_scale_multiplier=self.timestep_scale_multiplier,
            av_ca_timestep_scale_multiplier=self.av_ca_timestep_scale_multiplier,
            rope_type=self.rope_type,
            frequencies_precision="float64" if self.double_precision_rope else "float32",
            norm_eps=self.norm_eps,
            apply_gated_attention=self.apply_gated_attention,
            cross_attention_adaln=self.cross_attention_adaln,
        )
        if self.caption_channels is not None:
            section["caption_channels"] = self.caption_channels
        if self.version != "ltx-2":
            section.update(checkpoint.V2_TEXT_KEYS)
        if self.version == "ltx-2.5":
            # Written out in full so that a reader never depends on a code default.
            section.update(ff_bias=self.ff_bias, audio_ff_bias=self.audio_ff_bias,
                           use_prompt_adaln_single=self.use_prompt_adaln_single,
                           use_keyframes_abs_pos_embedding=self.keyframes_embedding)
        else:
            for key, value, default in (("ff_bias", self.ff_bias, True), ("audio_ff_bias", self.audio_ff_bias, True),
                                        ("use_prompt_adaln_single", self.use_prompt_adaln_single, True),
                                        ("use_keyframes_abs_pos_embedding", self.keyframes_embedding, False)):
                if value != default:
                    section[key] = value
        return section


# -------------------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True, kw_only=True, eq=False)
class Modality:
    """The inputs of one stream (video or audio) for one forward pass.

    Attributes:
        latent: ``[B, T, C]`` patchified noisy tokens (conditioning tokens included).
        sigma: ``[B]`` noise level per sample; drives the *other* stream's audio<->video AdaLN (LTX-2.5: only its
            output gate) and (LTX-2.3/2.5) this stream's prompt AdaLN.
        timesteps: ``[B, T]`` (or ``[B, T, 1]``) per-token noise level, 0 for clean conditioning tokens; or
            ``[B]`` / ``[B, 1]`` when every token of a sample shares one value.
        positions: ``[B, A, T, 2]`` ``[start, end)`` bounds: video ``A = 3`` (seconds, pixels, pixels), audio
            ``A = 1`` (seconds). ``[1, A, T, 2]`` shares one grid (and one set of RoPE tables) across the batch.
        context: ``[B, S, C_text]`` text context (LTX-2: caption_channels wide, projected in the model;
            LTX-2.3: already at the stream width).
        context_mask: ``[B, S]`` 1 = real token, 0 = padding (bool, int or float), or None for no masking. Pass
            None for an all-ones mask (the connectors' output): it lets SDPA use flash attention.
        attention_mask: ``[B, T, T]`` self-attention weights in ``[0, 1]`` (0 = blocked), or None.
        keyframes_mask: video only, ``[B, T, 1]`` (or ``[B, T]``): non-zero marks a token whose latent encodes a
            single standalone pixel frame (the first latent frame of a target; see :mod:`ltxf.latents`). With the
            LTX-2.5 keyframe embedding the model adds ``keyframes_abs_pos_embedding`` to those tokens; None adds
            nothing (ignored by models without the embedding).
        enabled: when False the stream is not updated by the blocks (its tokens still feed the other stream's
            cross-attention) and its output is the head applied to the un-updated tokens, as in the reference.
    """

    latent: torch.Tensor
    sigma: torch.Tensor
    timesteps: torch.Tensor
    positions: torch.Tensor
    context: torch.Tensor
    context_mask: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    keyframes_mask: torch.Tensor | None = None
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.latent.ndim != 3:
            raise ValueError(f"Modality.latent must be [B, T, C], got {tuple(self.latent.shape)}")
        batch, num_tokens, _ = self.latent.shape
        if tuple(self.sigma.shape) != (batch,):
            raise ValueError(f"Modality.sigma must be [B] = [{batch}], got {tuple(self.sigma.shape)}")
        shape = tuple(self.timesteps.shape)
        if shape not in ((batch,), (batch, 1), (batch, num_tokens), (batch, num_tokens, 1)):
            raise ValueError(f"Modality.timesteps must be [B, T] (or [B, T, 1], [B], [B, 1]) with B={batch}, "
                             f"T={num_tokens}; got {shape}")
        if self.positions.ndim != 4 or self.positions.shape[0] not in (1, batch) \
                or self.positions.shape[2] != num_tokens or self.positions.shape[3] != 2:
            raise ValueError(f"Modality.positions must be [B, A, T, 2] (or [1, A, T, 2]) with B={batch}, "
                             f"T={num_tokens}; got {tuple(self.positions.shape)}")
        if self.context.ndim != 3 or self.context.shape[0] != batch:
            raise ValueError(f"Modality.context must be [B, S, C] with B={batch}, got {tuple(self.context.shape)}")
        if self.context_mask is not None and tuple(self.context_mask.shape) != tuple(self.context.shape[:2]):
            raise ValueError(f"Modality.context_mask must be [B, S] = {tuple(self.context.shape[:2])}, got "
                             f"{tuple(self.context_mask.shape)}")
        if self.attention_mask is not None and tuple(self.attention_mask.shape) != (batch, num_tokens, num_tokens):
            raise ValueError(f"Modality.attention_mask must be [B, T, T] = {(batch, num_tokens, num_tokens)}, got "
                             f"{tuple(self.attention_mask.shape)}")
        if self.keyframes_mask is not None and tuple(self.keyframes_mask.shape) not in (
                (batch, num_tokens), (batch, num_tokens, 1)):
            raise ValueError(f"Modality.keyframes_mask must be [B, T, 1] (or [B, T]) with B={batch}, T={num_tokens}; "
                             f"got {tuple(self.keyframes_mask.shape)}")


PERTURBATION_KINDS = ("video_self_attn", "audio_self_attn", "a2v", "v2a")


class BlockSkips(NamedTuple):
    """One block's STG switches: bool ``[B]`` per kind (True = perturbed sample), or None when off."""

    video_self_attn: torch.Tensor | None = None
    audio_self_attn: torch.Tensor | None = None
    a2v: torch.Tensor | None = None
    v2a: torch.Tensor | None = None


@dataclass(frozen=True, kw_only=True, eq=False)
class Perturbations:
    """Per-sample, per-block STG switches: bool ``[B, L]`` tensors (True = perturbed), None = off everywhere.

    ``skip_video_self_attn`` / ``skip_audio_self_attn`` replace that self-attention's output by its value
    projection (the attention is bypassed) for the marked samples and blocks; ``skip_a2v`` / ``skip_v2a`` drop the
    audio-to-video / video-to-audio cross-attention residual. Same semantics as the reference's
    ``BatchedPerturbationConfig``, as tensors, so different samples of a batch can run different guidance passes.
    Build them on the model's device (``build(..., device=...)``): the forward moves them otherwise, every call.
    """

    skip_video_self_attn: torch.Tensor | None = None
    skip_audio_self_attn: torch.Tensor | None = None
    skip_a2v: torch.Tensor | None = None
    skip_v2a: torch.Tensor | None = None

    def __post_init__(self) -> None:
        shapes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, mask in shapes.items():
            if mask is not None and (mask.dtype != torch.bool or mask.ndim != 2):
                raise ValueError(f"Perturbations.{name} must be a bool [B, L] tensor, got {mask.dtype} "
                                 f"{tuple(mask.shape)}")

    @classmethod
    def build(
        cls,
        batch_size: int,
        num_layers: int,
        *,
        skip: str | Iterable[str],
        blocks: Iterable[int] | None = None,
        samples: Iterable[int] | None = None,
        device: torch.device | str = "cpu",
    ) -> Perturbations:
        """Switch on the ``skip`` kinds (from :data:`PERTURBATION_KINDS`) in ``blocks`` (None = all) for
        ``samples`` (None = all). Combine several with :meth:`merge`."""
        kinds = [skip] if isinstance(skip, str) else list(skip)
        unknown = [k for k in kinds if k not in PERTURBATION_KINDS]
        if unknown:
            raise ValueError(f"unknown perturbation kind(s) {unknown}; expected any of {PERTURBATION_KINDS}")
        block_list = list(range(num_layers)) if blocks is None else list(blocks)
        sample_list = list(range(batch_size)) if samples is None else list(samples)
        if any(not 0 <= b < num_layers for b in block_list):
            raise ValueError(f"perturbation blocks {block_list} out of range for {num_layers} blocks")
        if any(not 0 <= s < batch_size for s in sample_list):
            raise ValueError(f"perturbation samples {sample_list} out of range for batch size {batch_size}")
        mask_BL = torch.zeros(batch_size, num_layers, dtype=torch.bool)
        mask_BL[torch.tensor(sample_list, dtype=torch.long)[:, None], torch.tensor(block_list, dtype=torch.long)] = True
        mask_BL = mask_BL.to(device)
        return cls(**{f"skip_{k}": mask_BL for k in kinds})

    def merge(self, other: Perturbations) -> Perturbations:
        """Union of two perturbation sets (logical or, kind by kind)."""
        fields = {}
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            fields[f.name] = a if b is None else b if a is None else a | b
        return Perturbations(**fields)

    def to(self, device: torch.device | str) -> Perturbations:
        return Perturbations(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                                for f in dataclasses.fields(self)})

    def for_block(self, index: int) -> BlockSkips:
        """The ``[B]`` switches of block ``index`` (views, no allocation)."""
        def col(mask: torch.Tensor | None) -> torch.Tensor | None:
            return None if mask is None else mask[:, index]
        return BlockSkips(col(self.skip_video_self_attn), col(self.skip_audio_self_attn), col(self.skip_a2v),
                          col(self.skip_v2a))


class StreamInputs(NamedTuple):
    """What every block needs from one stream besides its tokens, prepared once per forward.

    A NamedTuple of tensors (plus one bool), so FSDP2's mixed-precision input cast and activation checkpointing
    see every tensor.
    """

    modulation: torch.Tensor
    """``[B, K, M, D]`` AdaLN-single output per distinct timestep (before each block's own table is added)."""
    token_index: torch.Tensor | None
    """``[B, T]`` int64 row of each token in ``modulation.flatten(0, 1)``; None when K == 1 (broadcast)."""
    context: torch.Tensor
    """``[B, S, D]`` projected text context."""
    context_mask: torch.Tensor | None
    """``[B, 1, 1, S]`` additive text mask, or None."""
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor
    self_attention_mask: torch.Tensor | None
    """``[B, 1, T, T]`` additive log-space self-attention bias, or None."""
    cross_rope_cos: torch.Tensor | None
    cross_rope_sin: torch.Tensor | None
    cross_modulation: torch.Tensor | None
    """``[B, 1, 4, D]`` audio<->video AdaLN (scale, shift rows) from the other stream's sigma, or ``[B, K, 4, D]``
    per distinct timestep of this stream (LTX-2.5; rows looked up by ``cross_token_index``)."""
    cross_token_index: torch.Tensor | None
    """``[B, T]`` row of each token in ``cross_modulation.flatten(0, 1)``, or None (broadcast)."""
    cross_gate: torch.Tensor | None
    """``[B, 1, D]`` audio<->video output gate from the other stream's sigma."""
    prompt_modulation: torch.Tensor | None
    """``[B, 1, 2, D]`` LTX-2.3 prompt AdaLN (shift, scale of the context) from this stream's sigma; None without
    prompt AdaLN (LTX-2, or LTX-2.5 with ``use_prompt_adaln_single`` false)."""
    enabled: bool


# -------------------------------------------------------------------------------------------------------------
# Building blocks


def timestep_features(timesteps_N: torch.Tensor, num_channels: int = _TIMESTEP_CHANNELS) -> torch.Tensor:
    """Sinusoidal features ``[N, num_channels]`` in float32, cosines first, frequencies exp(-ln(1e4) k / half)."""
    half = num_channels // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps_N.device) / half
    angles_NK = timesteps_N[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles_NK), torch.sin(angles_NK)], dim=-1)


class _TimestepMLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(_TIMESTEP_CHANNELS, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, features_NF: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(features_NF)))


class _TimestepEmbedding(nn.Module):
    # Only exists so that the checkpoint keys read ``<adaln>.emb.timestep_embedder.linear_*``.
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.timestep_embedder = _TimestepMLP(dim)


class AdaLNSingle(nn.Module):
    """PixArt-style AdaLN-single: timestep -> sinusoid -> MLP (the embedding) -> SiLU -> Linear(D, M * D)."""

    def __init__(self, dim: int, num_rows: int) -> None:
        super().__init__()
        self.emb = _TimestepEmbedding(dim)
        self.linear = nn.Linear(dim, num_rows * dim)

    def forward(self, timesteps_N: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``timesteps_N`` (already scaled by the timestep multiplier) -> (modulation ``[N, M * D]``,
        embedding ``[N, D]``)."""
        embedded_ND = self.emb.timestep_embedder(timestep_features(timesteps_N).to(dtype))
        return self.linear(F.silu(embedded_ND)), embedded_ND


class CaptionProjection(nn.Module):
    """LTX-2 text projection: Linear -> tanh-GELU -> Linear."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x_BSC: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x_BSC), approximate="tanh"))


def _table(rows: int, dim: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(rows, dim) / dim**0.5)


def _rms(x_BTD: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm(x_BTD, None, eps)


def _per_token(values_BKRD: torch.Tensor, token_index_BT: torch.Tensor | None) -> list[torch.Tensor]:
    """Split ``R`` modulation rows into per-token tensors: ``[B, 1, D]`` (broadcast) when the sample has one
    timestep, else ``[B, T, D]`` looked up by each token's timestep index."""
    if token_index_BT is None:
        return list(values_BKRD.unbind(2))
    rows_NRD = values_BKRD.flatten(0, 1)
    return [F.embedding(token_index_BT, rows_NRD[:, r]) for r in range(rows_NRD.shape[1])]


# Modulation rows are ``[B, K, D]`` (one row per distinct timestep of each sample) plus a token index ``[B, T]``
# into their ``B * K`` flattened rows, or ``[B, 1, D]`` with no index (broadcast over the tokens). The two
# autograd functions below apply them without keeping any ``[B, T, D]`` modulation tensor, nor the normalised
# tokens, for the backward pass: both are cheap to recompute from small saved tensors. Plain autograd would keep
# the normalised tokens and the looked-up scale of every modulation and the looked-up gate of every gated
# residual: 9 token-sized tensors per block and stream (LTX-2.3), ~20% of the activations a block saves.


def _rows_per_token(rows_BKD: torch.Tensor, index_BT: torch.Tensor | None) -> torch.Tensor:
    if index_BT is None:
        return rows_BKD
    return rows_BKD.flatten(0, 1).index_select(0, index_BT.flatten()).view(*index_BT.shape, rows_BKD.shape[-1])


def _sum_per_row(values_BTD: torch.Tensor, index_BT: torch.Tensor | None, rows_shape: torch.Size) -> torch.Tensor:
    """Gradient of :func:`_rows_per_token`: sum each token's values into its row, accumulating in float32."""
    if index_BT is None:
        return values_BTD.sum(dim=1, keepdim=True, dtype=torch.float32).to(values_BTD.dtype)
    num_rows, dim = rows_shape[0] * rows_shape[1], rows_shape[-1]
    summed = values_BTD.new_zeros((num_rows, dim), dtype=torch.float32).index_add(
        0, index_BT.flatten(), values_BTD.flatten(0, 1).float())
    return summed.view(rows_shape).to(values_BTD.dtype)


class _ModulatedRMSNorm(torch.autograd.Function):
    """``rms_norm(x) * scale[index] + shift[index]``; saves ``x`` and the per-token reciprocal RMS only.

    Returns ``(y, rstd)``; ``rstd`` is a non-differentiable by-product, output so that it can be saved. In-place
    ops below only touch temporaries created here. Saves and computes only what the inputs that need a gradient
    require (``ctx.needs_input_grad``): with a frozen AdaLN (LoRA) the scale and shift get no gradient, and their
    token reductions are skipped.
    """

    # torch.func.vmap runs forward/backward per sample (per-sample gradients in experiments/).
    generate_vmap_rule = True

    @staticmethod
    def forward(x_BTD, scale_BKD, shift_BKD, index_BT, eps):
        rstd_BT1 = reciprocal_rms(x_BTD, eps)
        out = (x_BTD * rstd_BT1).to(x_BTD.dtype)
        out.mul_(_rows_per_token(scale_BKD, index_BT)).add_(_rows_per_token(shift_BKD, index_BT))
        return out, rstd_BT1

    @staticmethod
    def setup_context(ctx, inputs, output):
        x_BTD, scale_BKD, shift_BKD, index_BT, _ = inputs
        need_x, need_scale = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.mark_non_differentiable(output[1])
        # x and rstd feed the gradients of x and scale; scale only that of x; the shift's needs the index only.
        ctx.save_for_backward(x_BTD if need_x or need_scale else None,
                              output[1] if need_x or need_scale else None,
                              scale_BKD if need_x else None, index_BT)
        ctx.scale_shape, ctx.shift_shape = scale_BKD.shape, shift_BKD.shape

    @staticmethod
    def backward(ctx, grad_BTD, _grad_rstd):
        x_BTD, rstd_BT1, scale_BKD, index_BT = ctx.saved_tensors
        need_x, need_scale, need_shift = ctx.needs_input_grad[:3]
        grad_x = grad_scale = grad_shift = None
        if need_shift:
            grad_shift = _sum_per_row(grad_BTD, index_BT, ctx.shift_shape)
        if not (need_x or need_scale):
            return grad_x, grad_scale, grad_shift, None, None
        x_norm = x_BTD * rstd_BT1
        if need_scale:
            grad_scale = _sum_per_row(grad_BTD * x_norm.to(grad_BTD.dtype), index_BT, ctx.scale_shape)
        if need_x:
            grad_norm = grad_BTD * _rows_per_token(scale_BKD, index_BT)
            # d rms_norm: rstd * (g - x_norm * mean(g * x_norm)), computed in float32.
            projection_BT1 = (grad_norm * x_norm).mean(-1, keepdim=True, dtype=torch.float32)
            grad_x = grad_norm.float().addcmul_(x_norm, projection_BT1, value=-1.0).mul_(rstd_BT1).to(x_BTD.dtype)
        return grad_x, grad_scale, grad_shift, None, None


class _GatedAdd(torch.autograd.Function):
    """``x + out * gate[index]``; saves the gate rows if ``out`` needs a gradient and ``out`` if the gate does
    (with a frozen AdaLN, LoRA, ``out`` is not kept)."""

    # torch.func.vmap runs forward/backward per sample (per-sample gradients in experiments/).
    generate_vmap_rule = True

    @staticmethod
    def forward(x_BTD, out_BTD, gate_BKD, index_BT):
        return torch.addcmul(x_BTD, out_BTD, _rows_per_token(gate_BKD, index_BT))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, out_BTD, gate_BKD, index_BT = inputs
        need_out, need_gate = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        ctx.save_for_backward(out_BTD if need_gate else None, gate_BKD if need_out else None, index_BT)
        ctx.gate_shape = gate_BKD.shape

    @staticmethod
    def backward(ctx, grad_BTD):
        out_BTD, gate_BKD, index_BT = ctx.saved_tensors
        need_x, need_out, need_gate = ctx.needs_input_grad[:3]
        grad_out = grad_BTD * _rows_per_token(gate_BKD, index_BT) if need_out else None
        grad_gate = _sum_per_row(grad_BTD * out_BTD, index_BT, ctx.gate_shape) if need_gate else None
        return grad_BTD if need_x else None, grad_out, grad_gate, None


def _modulated_rms(x_BTD: torch.Tensor, scale_BKD: torch.Tensor, shift_BKD: torch.Tensor,
                   index_BT: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _ModulatedRMSNorm.apply(x_BTD, scale_BKD, shift_BKD, index_BT, eps)[0]


def _gated_add(x_BTD: torch.Tensor, out_BTD: torch.Tensor, gate_BKD: torch.Tensor, index_BT: torch.Tensor | None
               ) -> torch.Tensor:
    return _GatedAdd.apply(x_BTD, out_BTD, gate_BKD, index_BT)


class AVTransformerBlock(nn.Module):
    """One dual-stream block. Call with the two token tensors and each stream's :class:`StreamInputs`."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        dim, audio_dim = config.inner_dim, config.audio_inner_dim
        self.norm_eps = config.norm_eps
        attention = partial(Attention, norm_eps=config.norm_eps, rope_type=config.rope_type,
                            gated=config.apply_gated_attention)
        video_heads = {"num_heads": config.num_heads, "head_dim": config.head_dim}
        audio_heads = {"num_heads": config.audio_num_heads, "head_dim": config.audio_head_dim}
        rows = config.num_adaln_rows

        self.attn1 = attention(dim, **video_heads)
        self.attn2 = attention(dim, config.cross_attention_dim, **video_heads)
        self.ff = FeedForward(dim, bias=config.ff_bias)
        self.scale_shift_table = _table(rows, dim)

        self.audio_attn1 = attention(audio_dim, **audio_heads)
        self.audio_attn2 = attention(audio_dim, config.audio_cross_attention_dim, **audio_heads)
        self.audio_ff = FeedForward(audio_dim, bias=config.audio_ff_bias)
        self.audio_scale_shift_table = _table(rows, audio_dim)

        # Both directions use the audio head geometry.
        self.audio_to_video_attn = attention(dim, audio_dim, **audio_heads)
        self.video_to_audio_attn = attention(audio_dim, dim, **audio_heads)
        # Rows: (scale, shift) for A2V, (scale, shift) for V2A, output gate.
        self.scale_shift_table_a2v_ca_audio = _table(5, audio_dim)
        self.scale_shift_table_a2v_ca_video = _table(5, dim)

        if config.cross_attention_adaln:
            self.prompt_scale_shift_table = _table(2, dim)
            self.audio_prompt_scale_shift_table = _table(2, audio_dim)
        else:
            self.prompt_scale_shift_table = None
            self.audio_prompt_scale_shift_table = None

    def forward(
        self,
        video_x_BTD: torch.Tensor | None,
        audio_x_BTD: torch.Tensor | None,
        video: StreamInputs | None,
        audio: StreamInputs | None,
        skips: BlockSkips | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Returns the updated ``(video_x, audio_x)``; a stream that is absent or disabled comes back as is."""
        skips = BlockSkips() if skips is None else skips
        vx, ax = video_x_BTD, audio_x_BTD
        has_v = video is not None and vx is not None and vx.numel() > 0
        has_a = audio is not None and ax is not None and ax.numel() > 0
        run_v = has_v and video.enabled
        run_a = has_a and audio.enabled

        if run_v:
            vx = self._self_and_text_attention(vx, video, self.attn1, self.attn2, self.scale_shift_table,
                                               self.prompt_scale_shift_table, skips.video_self_attn)
        if run_a:
            ax = self._self_and_text_attention(ax, audio, self.audio_attn1, self.audio_attn2,
                                               self.audio_scale_shift_table, self.audio_prompt_scale_shift_table,
                                               skips.audio_self_attn)

        run_a2v, run_v2a = run_v and has_a, run_a and has_v
        if run_a2v or run_v2a:
            # Both directions read the tokens as they were before either cross-attention. The AdaLN rows are
            # per sample ([B, 1, D], from the other stream's sigma) or per distinct own timestep (LTX-2.5).
            v_rows = _cross_rows(self.scale_shift_table_a2v_ca_video, video)
            a_rows = _cross_rows(self.scale_shift_table_a2v_ca_audio, audio)
            v_index, a_index = video.cross_token_index, audio.cross_token_index
            eps = self.norm_eps
            new_vx = vx
            if run_a2v:
                out = self.audio_to_video_attn(
                    _modulated_rms(vx, 1 + v_rows[0], v_rows[1], v_index, eps),
                    _modulated_rms(ax, 1 + a_rows[0], a_rows[1], a_index, eps),
                    rope=(video.cross_rope_cos, video.cross_rope_sin),
                    k_rope=(audio.cross_rope_cos, audio.cross_rope_sin),
                )
                new_vx = _gated_add(vx, _skip(out, skips.a2v), v_rows[4], None)
            if run_v2a:
                out = self.video_to_audio_attn(
                    _modulated_rms(ax, 1 + a_rows[2], a_rows[3], a_index, eps),
                    _modulated_rms(vx, 1 + v_rows[2], v_rows[3], v_index, eps),
                    rope=(audio.cross_rope_cos, audio.cross_rope_sin),
                    k_rope=(video.cross_rope_cos, video.cross_rope_sin),
                )
                ax = _gated_add(ax, _skip(out, skips.v2a), a_rows[4], None)
            vx = new_vx

        if run_v:
            vx = self._feed_forward(vx, video, self.ff, self.scale_shift_table)
        if run_a:
            ax = self._feed_forward(ax, audio, self.audio_ff, self.audio_scale_shift_table)
        return vx, ax

    def _modulation(self, table_MD: torch.Tensor, stream: StreamInputs, rows: slice) -> list[torch.Tensor]:
        """(shift, 1 + scale, gate) rows ``[B, K, D]`` of one AdaLN group (rows 0-2, 3-5 or 6-8)."""
        values_BKRD = table_MD[rows].to(stream.modulation.dtype) + stream.modulation[:, :, rows]
        shift, scale, gate = values_BKRD.unbind(2)
        return [shift, 1 + scale, gate]

    def _self_and_text_attention(
        self,
        x_BTD: torch.Tensor,
        stream: StreamInputs,
        self_attn: Attention,
        text_attn: Attention,
        table_MD: torch.Tensor,
        prompt_table_2D: torch.Tensor | None,
        skip_B: torch.Tensor | None,
    ) -> torch.Tensor:
        index = stream.token_index
        shift, scale1, gate = self._modulation(table_MD, stream, slice(0, 3))
        out = self_attn(
            _modulated_rms(x_BTD, scale1, shift, index, self.norm_eps),
            mask=stream.self_attention_mask,
            rope=(stream.rope_cos, stream.rope_sin),
            value_passthrough_B=skip_B,
        )
        x_BTD = _gated_add(x_BTD, out, gate, index)

        if prompt_table_2D is None:
            return x_BTD + text_attn(_rms(x_BTD, self.norm_eps), stream.context, mask=stream.context_mask)
        shift, scale1, gate = self._modulation(table_MD, stream, slice(6, 9))
        if stream.prompt_modulation is None:  # LTX-2.5 without prompt AdaLN: the table alone, no sigma
            kv_shift, kv_scale = prompt_table_2D.to(stream.context.dtype).unbind(0)
        else:
            kv_shift, kv_scale = (prompt_table_2D.to(stream.prompt_modulation.dtype)
                                  + stream.prompt_modulation).unbind(2)
        context_BSD = stream.context * (1 + kv_scale) + kv_shift
        out = text_attn(_modulated_rms(x_BTD, scale1, shift, index, self.norm_eps), context_BSD,
                        mask=stream.context_mask)
        return _gated_add(x_BTD, out, gate, index)

    def _feed_forward(self, x_BTD: torch.Tensor, stream: StreamInputs, ff: FeedForward, table_MD: torch.Tensor
                      ) -> torch.Tensor:
        shift, scale1, gate = self._modulation(table_MD, stream, slice(3, 6))
        index = stream.token_index
        return _gated_add(x_BTD, ff(_modulated_rms(x_BTD, scale1, shift, index, self.norm_eps)), gate, index)


def _cross_rows(table_5D: torch.Tensor, stream: StreamInputs) -> list[torch.Tensor]:
    """Audio<->video AdaLN rows: A2V (scale, shift), V2A (scale, shift) ``[B, K, D]``, gate ``[B, 1, D]``."""
    table_5D = table_5D.to(stream.cross_modulation.dtype)
    scale_shift_BK4D = table_5D[:4] + stream.cross_modulation
    return [*scale_shift_BK4D.unbind(2), table_5D[4] + stream.cross_gate]


def _skip(out_BTD: torch.Tensor, skip_B: torch.Tensor | None) -> torch.Tensor:
    """Zero the cross-attention output of the samples whose branch is switched off (STG)."""
    return out_BTD if skip_B is None else out_BTD.masked_fill(skip_B.view(-1, 1, 1), 0.0)


# -------------------------------------------------------------------------------------------------------------
# The model


class AVTransformer(nn.Module):
    """The LTX-2 / LTX-2.3 audio-video transformer.

    ``model(video=Modality | None, audio=Modality | None, perturbations=Perturbations | None)`` returns the
    velocities ``(video [B, T, out_channels] | None, audio [B, Ta, audio_out_channels] | None)``.

    Args:
        config: the architecture.
        max_distinct_timesteps: AdaLN is evaluated for at most this many distinct per-token timesteps per
            sample (a sample with more raises); None evaluates it per token, like the reference.
    """

    def __init__(self, config: TransformerConfig, *, max_distinct_timesteps: int | None = DEFAULT_MAX_DISTINCT_TIMESTEPS
                 ) -> None:
        super().__init__()
        if max_distinct_timesteps is not None and max_distinct_timesteps < 1:
            raise ValueError(f"max_distinct_timesteps must be >= 1 or None, got {max_distinct_timesteps}")
        self.config = config
        self.max_distinct_timesteps = max_distinct_timesteps
        dim, audio_dim, rows = config.inner_dim, config.audio_inner_dim, config.num_adaln_rows

        self.patchify_proj = nn.Linear(config.in_channels, dim)
        self.adaln_single = AdaLNSingle(dim, rows)
        self.scale_shift_table = _table(2, dim)
        self.proj_out = nn.Linear(dim, config.out_channels)

        self.audio_patchify_proj = nn.Linear(config.audio_in_channels, audio_dim)
        self.audio_adaln_single = AdaLNSingle(audio_dim, rows)
        self.audio_scale_shift_table = _table(2, audio_dim)
        self.audio_proj_out = nn.Linear(audio_dim, config.audio_out_channels)

        if config.has_caption_projection:
            self.caption_projection = CaptionProjection(config.caption_channels, dim)
            self.audio_caption_projection = CaptionProjection(config.caption_channels, audio_dim)
        else:
            self.caption_projection = self.audio_caption_projection = None
        if config.has_prompt_adaln:
            self.prompt_adaln_single = AdaLNSingle(dim, 2)
            self.audio_prompt_adaln_single = AdaLNSingle(audio_dim, 2)
        else:
            self.prompt_adaln_single = self.audio_prompt_adaln_single = None

        # Audio<->video AdaLN, driven by the other stream's sigma: (scale, shift) x 2 and a gate, per stream.
        self.av_ca_video_scale_shift_adaln_single = AdaLNSingle(dim, 4)
        self.av_ca_audio_scale_shift_adaln_single = AdaLNSingle(audio_dim, 4)
        self.av_ca_a2v_gate_adaln_single = AdaLNSingle(dim, 1)
        self.av_ca_v2a_gate_adaln_single = AdaLNSingle(audio_dim, 1)

        if config.keyframes_embedding:
            self.keyframes_abs_pos_embedding = nn.Parameter(torch.zeros(1, dim))
        else:
            self.register_parameter("keyframes_abs_pos_embedding", None)

        self.transformer_blocks = nn.ModuleList([AVTransformerBlock(config) for _ in range(config.num_layers)])

    # ---- preprocessing ------------------------------------------------------------------------------------

    def _compute_dtype(self) -> torch.dtype:
        return self.patchify_proj.weight.dtype

    def _distinct_timesteps(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[B, K]`` timesteps to evaluate AdaLN at, and each token's flat row ``[B, T]`` (None: K == 1)."""
        if timesteps.ndim == 3:
            timesteps = timesteps.squeeze(-1)
        if timesteps.ndim == 1:
            return timesteps[:, None], None
        batch, num_tokens = timesteps.shape
        if num_tokens == 1:
            return timesteps, None
        if self.max_distinct_timesteps is None:
            rows_BT = torch.arange(batch * num_tokens, device=timesteps.device).view(batch, num_tokens)
            return timesteps, rows_BT
        # The K largest distinct values per sample, found by repeated "largest value below the last one" (no
        # host sync, static shapes). Once a sample runs out, its last value repeats; repeats are never indexed.
        num_values = min(self.max_distinct_timesteps, num_tokens)
        values = [timesteps.amax(dim=1)]
        for _ in range(num_values - 1):
            below_BT = torch.where(timesteps < values[-1][:, None], timesteps, -math.inf)
            below_B = below_BT.amax(dim=1)
            values.append(torch.where(below_B == -math.inf, values[-1], below_B))
        values_BK = torch.stack(values, dim=1)
        # A token's value is the k-th largest when exactly k distinct candidates are larger.
        index_BT = (values_BK[:, None, :] > timesteps[:, :, None]).sum(-1)
        covered = torch.gather(values_BK, 1, index_BT.clamp(max=num_values - 1)) == timesteps
        self._check_covered(covered.all())
        rows_BT = index_BT + num_values * torch.arange(batch, device=timesteps.device)[:, None]
        return values_BK, rows_BT

    def _check_covered(self, all_covered: torch.Tensor) -> None:
        message = (f"a sample has more than max_distinct_timesteps={self.max_distinct_timesteps} distinct per-token "
                   "timesteps; build the AVTransformer with a larger max_distinct_timesteps (or None)")
        if all_covered.device.type == "cpu" and not torch.compiler.is_compiling():
            if not bool(all_covered):
                raise ValueError(message)
        else:
            torch._assert_async(all_covered, message)

    def _adaln(self, adaln: AdaLNSingle, timesteps: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
        modulation, embedded = adaln(timesteps.flatten() * self.config.timestep_scale_multiplier, dtype)
        return modulation.view(*shape, -1, embedded.shape[-1]), embedded.view(*shape, -1)

    def prepare_stream(self, kind: str, modality: Modality, other: Modality | None
                       ) -> tuple[torch.Tensor, StreamInputs, torch.Tensor]:
        """Tokens ``[B, T, D]``, the block inputs, and the output-head embedding ``[B, K, D]`` of one stream."""
        cfg = self.config
        video = kind == "video"
        pre = "" if video else "audio_"
        dim = cfg.inner_dim if video else cfg.audio_inner_dim
        num_heads = cfg.num_heads if video else cfg.audio_num_heads
        dtype = self._compute_dtype()
        batch = modality.latent.shape[0]

        x_BTD = getattr(self, f"{pre}patchify_proj")(modality.latent.to(dtype))
        if video and self.keyframes_abs_pos_embedding is not None and modality.keyframes_mask is not None:
            keyframes_BT1 = modality.keyframes_mask.reshape(batch, -1, 1)
            x_BTD = x_BTD + (keyframes_BT1 > 0).to(dtype) * self.keyframes_abs_pos_embedding.to(dtype)

        values_BK, token_index_BT = self._distinct_timesteps(modality.timesteps)
        modulation_BKMD, embedded_BKD = self._adaln(getattr(self, f"{pre}adaln_single"), values_BK,
                                                    tuple(values_BK.shape), dtype)

        prompt_adaln = getattr(self, f"{pre}prompt_adaln_single")
        prompt_B12D = None
        if prompt_adaln is not None:
            prompt_B12D, _ = self._adaln(prompt_adaln, modality.sigma, (batch, 1), dtype)

        context = modality.context.to(dtype)
        projection = getattr(self, f"{pre}caption_projection")
        if projection is not None:
            context = projection(context)
        if context.shape[-1] != dim:
            raise ValueError(f"{kind} context width is {context.shape[-1]}, the model expects {dim}")

        context_mask = None
        if modality.context_mask is not None:
            # 1 -> 0, 0 -> -max: padded text tokens get no attention weight.
            keep_B11S = (modality.context_mask != 0).view(batch, 1, 1, -1)
            context_mask = torch.zeros(keep_B11S.shape, dtype=dtype, device=x_BTD.device).masked_fill(
                ~keep_B11S, -torch.finfo(dtype).max)

        self_mask = None
        if modality.attention_mask is not None:
            # [0, 1] weights -> additive log-space bias; 0 is blocked with the dtype's most negative value.
            weights = modality.attention_mask
            finfo = torch.finfo(dtype)
            log_w = torch.log(weights.clamp(min=finfo.tiny)).to(dtype)
            self_mask = log_w.masked_fill(weights <= 0, finfo.min).unsqueeze(1)

        rope = partial(build_rope, rope_type=cfg.rope_type, theta=cfg.positional_embedding_theta,
                       double_precision=cfg.double_precision_rope, dtype=dtype)
        max_pos = cfg.positional_embedding_max_pos if video else cfg.audio_positional_embedding_max_pos
        rope_cos, rope_sin = rope(modality.positions, dim=dim, num_heads=num_heads, max_pos=max_pos)

        cross = (None, None, None, None, None)
        if other is not None:
            # Time axis only, in seconds for both streams: this is what synchronises audio and video. The tables
            # are spread over this stream's head count, as in the reference.
            cross_max_pos = max(cfg.positional_embedding_max_pos[0], cfg.audio_positional_embedding_max_pos[0])
            cross_cos, cross_sin = rope(modality.positions[:, :1], dim=cfg.audio_cross_attention_dim,
                                        num_heads=num_heads, max_pos=[cross_max_pos])
            other_sigma = other.sigma * cfg.timestep_scale_multiplier
            scale_shift_adaln = getattr(self, f"av_ca_{kind}_scale_shift_adaln_single")
            if cfg.cross_modulation_from_own_timesteps:
                scale_shift, _ = self._adaln(scale_shift_adaln, values_BK, tuple(values_BK.shape), dtype)
                scale_shift = scale_shift.view(*values_BK.shape, 4, dim)
                cross_index = token_index_BT
            else:
                scale_shift, _ = scale_shift_adaln(other_sigma, dtype)
                scale_shift, cross_index = scale_shift.view(batch, 1, 4, dim), None
            gate_adaln = self.av_ca_a2v_gate_adaln_single if video else self.av_ca_v2a_gate_adaln_single
            factor = cfg.av_ca_timestep_scale_multiplier / cfg.timestep_scale_multiplier
            gate, _ = gate_adaln(other_sigma * factor, dtype)
            cross = (cross_cos, cross_sin, scale_shift, gate.view(batch, 1, dim), cross_index)

        stream = StreamInputs(
            modulation=modulation_BKMD,
            token_index=token_index_BT,
            context=context,
            context_mask=context_mask,
            rope_cos=rope_cos,
            rope_sin=rope_sin,
            self_attention_mask=self_mask,
            cross_rope_cos=cross[0],
            cross_rope_sin=cross[1],
            cross_modulation=cross[2],
            cross_gate=cross[3],
            cross_token_index=cross[4],
            prompt_modulation=prompt_B12D,
            enabled=modality.enabled,
        )
        return x_BTD, stream, embedded_BKD

    def _output_head(self, kind: str, x_BTD: torch.Tensor, embedded_BKD: torch.Tensor,
                     token_index_BT: torch.Tensor | None) -> torch.Tensor:
        pre = "" if kind == "video" else "audio_"
        table_2D = getattr(self, f"{pre}scale_shift_table").to(embedded_BKD.dtype)
        shift, scale = _per_token(table_2D + embedded_BKD[:, :, None], token_index_BT)
        x_BTD = F.layer_norm(x_BTD, (x_BTD.shape[-1],), eps=self.config.norm_eps)
        velocity_BTC = getattr(self, f"{pre}proj_out")(x_BTD * (1 + scale) + shift)
        # F.linear returns a view for 3-D inputs; hand out an owning tensor (tiny, C = 128) so that FSDP2's
        # pre-backward hook cannot be bypassed by an in-place edit of the output.
        return velocity_BTC.clone() if velocity_BTC._base is not None else velocity_BTC

    # ---- forward ------------------------------------------------------------------------------------------

    def forward(
        self,
        video: Modality | None = None,
        audio: Modality | None = None,
        perturbations: Perturbations | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Velocities for the given streams (see the class docstring)."""
        if video is None and audio is None:
            raise ValueError("AVTransformer needs at least one of video / audio")
        if video is not None and audio is not None and video.latent.shape[0] != audio.latent.shape[0]:
            raise ValueError(f"video and audio batch sizes differ: {video.latent.shape[0]} vs "
                             f"{audio.latent.shape[0]}")
        batch = (video or audio).latent.shape[0]
        if perturbations is not None:
            for f in dataclasses.fields(perturbations):
                mask = getattr(perturbations, f.name)
                if mask is not None and tuple(mask.shape) != (batch, self.config.num_layers):
                    raise ValueError(f"Perturbations.{f.name} must be [B, L] = {(batch, self.config.num_layers)}, "
                                     f"got {tuple(mask.shape)}")
            perturbations = perturbations.to((video or audio).latent.device)

        vx = ax = v_in = a_in = v_emb = a_emb = None
        if video is not None:
            vx, v_in, v_emb = self.prepare_stream("video", video, audio)
        if audio is not None:
            ax, a_in, a_emb = self.prepare_stream("audio", audio, video)

        for index, block in enumerate(self.transformer_blocks):
            skips = None if perturbations is None else perturbations.for_block(index)
            vx, ax = block(vx, ax, v_in, a_in, skips)

        video_out = None if video is None else self._output_head("video", vx, v_emb, v_in.token_index)
        audio_out = None if audio is None else self._output_head("audio", ax, a_emb, a_in.token_index)
        return video_out, audio_out


# -------------------------------------------------------------------------------------------------------------
# Checkpoint I/O


def _transformer_select(key: str) -> str | None:
    return checkpoint.strip_prefix(checkpoint.TRANSFORMER_PREFIX, checkpoint.TEXT_CONNECTOR_SUBPREFIXES)(key)


def _cross_check_weights(config: TransformerConfig, path: Path) -> None:
    """Compare the config with what the weights say (header only, no tensor data read)."""
    prefix = checkpoint.TRANSFORMER_PREFIX
    keys = {name for key in checkpoint.list_keys(path) if (name := _transformer_select(key)) is not None}
    if not keys:
        raise ValueError(f"{path}: no transformer tensors (keys under '{prefix}') in the checkpoint")
    described = f"the config ({config.version}, cross_attention_adaln={config.cross_attention_adaln}, " \
                f"apply_gated_attention={config.apply_gated_attention})"

    has_caption = any(k.startswith("caption_projection.") for k in keys)
    if has_caption != config.has_caption_projection:
        raise ValueError(
            f"{path}: {described} {'expects' if config.has_caption_projection else 'does not expect'} "
            f"caption_projection.* weights, but the checkpoint {'has' if has_caption else 'has none'} "
            "(LTX-2 keeps the caption projection in the transformer, LTX-2.3 does not)"
        )
    has_gate = any(".to_gate_logits." in k for k in keys)
    if has_gate != config.apply_gated_attention:
        raise ValueError(
            f"{path}: {described} {'expects' if config.apply_gated_attention else 'does not expect'} "
            f"to_gate_logits weights, but the checkpoint {'has' if has_gate else 'has none'}"
        )
    for present, expected, what, key in (
        (any(k.startswith("prompt_adaln_single.") for k in keys), config.has_prompt_adaln,
         "prompt_adaln_single weights", "cross_attention_adaln / use_prompt_adaln_single"),
        (any(k.startswith("transformer_blocks.") and k.endswith(".ff.net.2.bias") and ".audio_ff." not in k
             for k in keys), config.ff_bias, "video feed-forward biases (ff.net.*.bias)", "ff_bias"),
        (any(k.endswith(".audio_ff.net.2.bias") for k in keys), config.audio_ff_bias,
         "audio feed-forward biases (audio_ff.net.*.bias)", "audio_ff_bias"),
        ("keyframes_abs_pos_embedding" in keys, config.keyframes_embedding, "keyframes_abs_pos_embedding",
         "use_keyframes_abs_pos_embedding"),
    ):
        if present != expected:
            raise ValueError(
                f"{path}: the config ({key} = {expected}) {'expects' if expected else 'does not expect'} {what}, "
                f"but the checkpoint {'has' if present else 'has none'}: the weights and the config disagree"
            )
    adaln_key = prefix + "adaln_single.linear.weight"
    shapes = checkpoint.read_tensor_shapes(path, [adaln_key])
    if adaln_key in shapes:
        expected = (config.num_adaln_rows * config.inner_dim, config.inner_dim)
        found = shapes[adaln_key]
        if tuple(found) != expected:
            rows = found[0] / found[1] if len(found) == 2 and found[1] else float("nan")
            raise ValueError(
                f"{path}: {described} implies adaln_single.linear.weight of shape {expected} "
                f"({config.num_adaln_rows} x D, D={config.inner_dim}), but the checkpoint has {tuple(found)} "
                f"({rows:g} x {found[-1]}): the weights and the config disagree about the model version"
            )


def read_transformer_config(path: str | Path) -> TransformerConfig:
    """The :class:`TransformerConfig` of a checkpoint file (monolith or LTX-2.5 split transformer file): its
    ``transformer`` config section plus its ``model_version`` metadata (header only)."""
    path = Path(path)
    metadata = checkpoint.read_metadata(path)
    config_dict = checkpoint.read_config(path)
    return TransformerConfig.from_checkpoint_config(checkpoint.config_section(config_dict, "transformer", path),
                                                    path=path, model_version=metadata.get("model_version"))


def build_transformer_on_meta(
    path: str | Path, *, max_distinct_timesteps: int | None = DEFAULT_MAX_DISTINCT_TIMESTEPS
) -> AVTransformer:
    """The transformer of an official checkpoint, built on the ``meta`` device (no memory, no weights read).

    Reads the config (and ``model_version``) from the file's metadata, detects the version with the reference
    rules and cross-checks it against the weight names and shapes in the header. Inject LoRA, parallelize, then
    fill it with :func:`load_transformer_weights_`.
    """
    path = Path(path)
    config = read_transformer_config(path)
    _cross_check_weights(config, path)
    with torch.device("meta"):
        return AVTransformer(config, max_distinct_timesteps=max_distinct_timesteps)


def load_transformer_weights_(
    model: AVTransformer,
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    not_in_file: Callable[[str], bool] = lambda key: False,
    transform: TensorTransform | None = None,
    on_unit: UnitCallback | None = None,
) -> AVTransformer:
    """Fill a transformer built by :func:`build_transformer_on_meta` (possibly LoRA-injected and sharded) from
    ``path``, block by block, each tensor cast to its parameter's dtype (see :mod:`ltxf.models.materialize`)."""
    return materialize_(model, path, _transformer_select, device=device,
                        units=block_units(model, "transformer_blocks"), not_in_file=not_in_file,
                        transform=transform, on_unit=on_unit)


def load_transformer(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    max_distinct_timesteps: int | None = DEFAULT_MAX_DISTINCT_TIMESTEPS,
) -> AVTransformer:
    """Load the transformer of an official checkpoint: an LTX-2 / LTX-2.3 single file or an LTX-2.5 split-pack
    transformer file (same ``model.diffusion_model.`` layout; the text connectors it holds are skipped here).

    Builds it on ``meta`` (:func:`build_transformer_on_meta`, which checks the config against the weights), then
    reads only the transformer tensors (``model.diffusion_model.*`` minus the text connectors) block by block,
    casting each to ``dtype`` as it is read, and loads them strictly. Any inconsistency is a ``ValueError``
    naming the file.
    """
    path = Path(path)
    model = build_transformer_on_meta(path, max_distinct_timesteps=max_distinct_timesteps).to(dtype)
    load_transformer_weights_(model, path, device=device)
    logger.info("loaded %s transformer (%d blocks, %.2fB parameters) from %s", model.config.version,
                model.config.num_layers, sum(p.numel() for p in model.parameters()) / 1e9, path)
    return model


def save_transformer(model: AVTransformer, path: str | Path, config: Mapping,
                     extra_metadata: Mapping[str, str] = ()) -> Path:
    """Write the transformer in the official layout (``model.diffusion_model.`` keys, ``config`` metadata).

    ``config`` is the full checkpoint config (all sections); its ``transformer`` section must describe ``model``.
    ``extra_metadata`` is written alongside (an LTX-2.5 export keeps the pack's ``model_version``,
    ``gemma_source_checkpoint`` and ``license``).
    """
    section = checkpoint.config_section(config, "transformer", path)
    described = TransformerConfig.from_checkpoint_config(section, path=path,
                                                         model_version=dict(extra_metadata).get("model_version"))
    if described != model.config:
        diff = {f.name: (getattr(described, f.name), getattr(model.config, f.name))
                for f in dataclasses.fields(TransformerConfig)
                if getattr(described, f.name) != getattr(model.config, f.name)}
        raise ValueError(f"{path}: the config's transformer section does not describe this model "
                         f"(config vs model: {diff})")
    tensors = {checkpoint.TRANSFORMER_PREFIX + k: v for k, v in model.state_dict().items()}
    return checkpoint.write_checkpoint(path, tensors, config, extra_metadata)

