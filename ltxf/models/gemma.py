"""Gemma 3 text encoder for LTX-2 / LTX-2.3 prompts, through ``transformers``, from a local model directory.

Prompts are tokenized with left padding to a fixed length (1024 tokens, as the official pipeline does: the
connectors fill the padding with registers, so the length matters) and run through the Gemma 3 language model.
Every hidden state (the embedding output plus one per decoder layer) is kept and stacked; the feature extractor
of :mod:`ltxf.models.text` turns them into the per-token features that are cached on disk.

Nothing is ever downloaded (``local_files_only=True``). Either a ``Gemma3ForConditionalGeneration`` directory
(``model_type: gemma3``, e.g. ``google/gemma-3-12b-it``) or a plain Gemma 3 causal-LM directory
(``model_type: gemma3_text``) works; only the language model is kept.

Shape legend: B prompts, S tokens (``max_length``), D Gemma hidden width, L hidden states (layers + 1),
C feature width.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from ltxf.models.text import EmbeddingsProcessor

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 1024


class PromptFeatures(NamedTuple):
    """What the preprocessing caches per prompt; the field names are the keys of the on-disk ``.pt`` files."""

    video_prompt_embeds: torch.Tensor
    """``[B, S, Cv]``."""
    audio_prompt_embeds: torch.Tensor
    """``[B, S, Ca]`` (LTX-2: the same tensor as the video features)."""
    prompt_attention_mask: torch.Tensor
    """``[B, S]`` int64, 1 for real tokens, left-padded."""


class GemmaTextEncoder:
    """A Gemma 3 language model and its tokenizer, frozen, returning all hidden states of padded prompts.

    Args:
        model: the language model (``Gemma3TextModel``: the ``.model`` of a causal LM or the
            ``.model.language_model`` of a ``Gemma3ForConditionalGeneration``).
        tokenizer: its tokenizer. Padding is always on the left; without a pad token the EOS token is used.
        max_length: every prompt is padded (and truncated) to this many tokens.
    """

    def __init__(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, *, max_length: int = DEFAULT_MAX_LENGTH
    ) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError("the Gemma tokenizer has neither a pad token nor an EOS token to pad with")
            tokenizer.pad_token = tokenizer.eos_token
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_hidden_states(self) -> int:
        """Decoder layers + 1 (the embedding output)."""
        return self.model.config.num_hidden_layers + 1

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> ``(input_ids [B, S], attention_mask [B, S])`` int64 on the CPU, left-padded to ``max_length``.

        Prompts are stripped of surrounding whitespace first (as the reference tokenizer does); longer prompts are
        truncated, with a warning.
        """
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts:
            raise ValueError("no prompts to encode")
        texts = [t.strip() for t in texts]
        lengths = [len(ids) for ids in self.tokenizer(texts)["input_ids"]]
        too_long = [i for i, n in enumerate(lengths) if n > self.max_length]
        if too_long:
            logger.warning("prompts %s are longer than %d tokens (%s) and are truncated", too_long, self.max_length,
                           [lengths[i] for i in too_long])
        encoded = self.tokenizer(
            texts, padding="max_length", max_length=self.max_length, truncation=True, padding_side="left",
            return_tensors="pt",
        )
        return encoded["input_ids"].to(torch.int64), encoded["attention_mask"].to(torch.int64)

    @torch.no_grad()
    def encode_prompts(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> ``(hidden_states [B, S, D, L], attention_mask [B, S])`` on the model's device.

        ``hidden_states[..., 0]`` is the embedding output and ``hidden_states[..., l]`` the output of decoder layer
        ``l``. Positions are ``0..S-1`` over the padded sequence, as in the reference pipeline; values at padded
        positions are meaningless (the feature extractors zero them).
        """
        input_ids_BS, mask_BS = self.tokenize(prompts)
        device = self.device
        input_ids_BS, mask_BS = input_ids_BS.to(device), mask_BS.to(device)
        outputs = self.model(input_ids=input_ids_BS, attention_mask=mask_BS, output_hidden_states=True,
                             use_cache=False)
        return torch.stack(outputs.hidden_states, dim=-1), mask_BS

    @torch.no_grad()
    def encode_text(self, prompts: str | Sequence[str], processor: EmbeddingsProcessor) -> PromptFeatures:
        """Prompts -> the features the trainer caches: Gemma, then ``processor``'s feature extractor (not its
        connectors). The hidden states are moved to the feature extractor's device and dtype."""
        hidden_BSDL, mask_BS = self.encode_prompts(prompts)
        if processor.feature_extractor is None:
            raise ValueError("encode_text needs an EmbeddingsProcessor loaded with its feature extractor")
        weight = next(processor.feature_extractor.parameters())
        hidden_BSDL = hidden_BSDL.to(device=weight.device, dtype=weight.dtype)
        mask_BS = mask_BS.to(weight.device)
        video_BSC, audio_BSC = processor.extract_features(hidden_BSDL, mask_BS)
        return PromptFeatures(video_BSC, audio_BSC, mask_BS)


def gemma_load_kwargs(
    *, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu", load_in_8bit: bool = False
) -> dict[str, Any]:
    """Keyword arguments for ``from_pretrained`` of the Gemma model.

    8-bit (bitsandbytes LLM.int8) weights need a CUDA device, and transformers' bitsandbytes integration needs
    ``accelerate``; both are checked here with a clear error. Without 8-bit the model is loaded on the CPU and
    moved by :func:`load_gemma_text_encoder`.
    """
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": dtype}
    if not load_in_8bit:
        return kwargs
    device = torch.device(device)
    if not torch.cuda.is_available():
        raise ValueError("load_in_8bit=True: 8-bit Gemma (bitsandbytes LLM.int8) needs a CUDA device, and none is "
                         "available; load it in bfloat16 instead")
    if device.type != "cuda":
        raise ValueError(f"load_in_8bit=True needs a CUDA device, got device={str(device)!r}")
    from transformers import BitsAndBytesConfig
    from transformers.utils import is_accelerate_available

    if not is_accelerate_available():
        raise ValueError("load_in_8bit=True: transformers' bitsandbytes loader needs the 'accelerate' package, which "
                         "is not installed; install it or load Gemma in bfloat16")
    kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    kwargs["device_map"] = {"": device.index if device.index is not None else torch.cuda.current_device()}
    return kwargs


def load_gemma_text_encoder(
    model_dir: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    load_in_8bit: bool = False,
    max_length: int = DEFAULT_MAX_LENGTH,
    tokenizer_dir: str | Path | None = None,
) -> GemmaTextEncoder:
    """Load a Gemma 3 text encoder from a local directory (nothing is downloaded).

    Args:
        model_dir: a Hugging Face Gemma 3 directory: ``Gemma3ForConditionalGeneration`` (``model_type: gemma3``;
            the vision tower is dropped after loading) or a causal LM (``model_type: gemma3_text``).
        dtype: weight dtype (bf16 by default; the non-quantised parts of an 8-bit model too).
        device: where the model runs.
        load_in_8bit: bitsandbytes LLM.int8 weights (CUDA only; see :func:`gemma_load_kwargs`).
        max_length: padded prompt length (1024 in the official pipeline).
        tokenizer_dir: where the tokenizer files are, if not in ``model_dir``.
    """
    from transformers import AutoConfig, AutoTokenizer, Gemma3ForCausalLM, Gemma3ForConditionalGeneration

    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise ValueError(f"Gemma model path is not a directory: {model_dir}")
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} has no config.json; expected a Hugging Face Gemma 3 model directory")
    kwargs = gemma_load_kwargs(dtype=dtype, device=device, load_in_8bit=load_in_8bit)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if config.model_type == "gemma3":
        full_model = Gemma3ForConditionalGeneration.from_pretrained(model_dir, **kwargs)
        language_model = full_model.model.language_model
    elif config.model_type == "gemma3_text":
        full_model = Gemma3ForCausalLM.from_pretrained(model_dir, **kwargs)
        language_model = full_model.model
    else:
        raise ValueError(f"{model_dir / 'config.json'}: model_type is {config.model_type!r}; expected 'gemma3' "
                         "(Gemma3ForConditionalGeneration) or 'gemma3_text' (Gemma 3 causal LM)")
    del full_model  # the vision tower / lm_head are not referenced any more and are freed
    if not load_in_8bit:
        language_model = language_model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir, local_files_only=True)
    logger.info("loaded Gemma 3 text encoder from %s (%d layers, width %d, %s%s) on %s", model_dir,
                language_model.config.num_hidden_layers, language_model.config.hidden_size, dtype,
                ", 8-bit" if load_in_8bit else "", device)
    return GemmaTextEncoder(language_model, tokenizer, max_length=max_length)


__all__ = [
    "DEFAULT_MAX_LENGTH",
    "GemmaTextEncoder",
    "PromptFeatures",
    "gemma_load_kwargs",
    "load_gemma_text_encoder",
]
