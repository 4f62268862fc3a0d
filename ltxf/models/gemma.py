"""The Gemma text encoders of LTX-2 / LTX-2.3 (Gemma 3, a local HF directory) and LTX-2.5 (an LTX-fine-tuned
Gemma 4, one packed ``.safetensors`` file), through ``transformers``.

Prompts are stripped, tokenized without padding, given a leading BOS when the tokenizer did not add one (the
Gemma 4 tokenizer does not, Gemma 3's does: the official 1.2 rule, so both give ``<bos> text``), and left-padded
with the pad token to a fixed length (1024 tokens, as the official pipeline does: the connectors fill the padding
with registers, so the length matters). The language model runs on positions ``0..S-1`` over the padded sequence.
Every hidden state (the embedding output plus one per decoder layer, the last one after the final norm) is kept
and stacked; the feature extractor of :mod:`ltxf.models.text` turns them into the per-token features that are
cached on disk.

Nothing is ever downloaded (``local_files_only=True``). Accepted: a ``Gemma3ForConditionalGeneration`` directory
(``model_type: gemma3``, e.g. ``google/gemma-3-12b-it``), a plain Gemma 3 causal-LM directory
(``model_type: gemma3_text``), or a packed text-encoder file (:func:`load_packed_text_encoder`: the LTX-2.5
``gemma4-*-with-proj-ltx-2.5.safetensors``); only the language model is kept.

Every encoder has an :attr:`GemmaTextEncoder.identity` (the packed config's ``gemma_version``, else the model
family, e.g. ``"gemma3"``) that the preprocessing writes into each conditions file, so features cached with one
Gemma are refused for a model paired with another (:func:`ltxf.models.pack.check_conditions_text_encoder`).

Shape legend: B prompts, S tokens (``max_length``), D Gemma hidden width, L hidden states (layers + 1),
C feature width.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from ltxf.models.text import EmbeddingsProcessor

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 1024
# Tensor and metadata names of the packed text-encoder format (LTX-2.5).
PACKED_CONFIG_KEY = "gemma_config"
PACKED_TOKENIZER_KEY = "tokenizer_json"
PACKED_ASSET_PREFIX = "hf_asset__"
_PACKED_FLAT_MARKER = "model.layers.0.post_feedforward_layernorm.weight"
_PACKED_LM_PREFIX = "model."


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
            ``.model.language_model`` of a ``Gemma3ForConditionalGeneration``; or a Gemma 4 text model).
        tokenizer: its tokenizer. Padding is always on the left; without a pad token the EOS token is used.
        max_length: every prompt is padded (and truncated) to this many tokens.
        identity: which text encoder this is (recorded in conditions files); defaults to the model family.
    """

    def __init__(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, *, max_length: int = DEFAULT_MAX_LENGTH,
        identity: str | None = None,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (BOS + one token), got {max_length}")
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError("the Gemma tokenizer has neither a pad token nor an EOS token to pad with")
            tokenizer.pad_token = tokenizer.eos_token
        bos_token_id = tokenizer.bos_token_id
        if bos_token_id is None:
            bos_token_id = getattr(model.config, "bos_token_id", None)
        if bos_token_id is None:
            raise ValueError("the Gemma tokenizer has no BOS token and the model config no bos_token_id; the prompt "
                             "encoding needs one (every prompt starts with BOS)")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.bos_token_id = int(bos_token_id)
        self.identity = identity or text_encoder_family(getattr(model.config, "model_type", "gemma"))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_hidden_states(self) -> int:
        """Decoder layers + 1 (the embedding output)."""
        return self.model.config.num_hidden_layers + 1

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> ``(input_ids [B, S], attention_mask [B, S])`` int64 on the CPU, left-padded to ``max_length``.

        Prompts are stripped of surrounding whitespace first (as the reference tokenizer does); BOS is prepended
        when the tokenizer did not put it first; no EOS. Longer prompts keep their first ``max_length`` tokens
        (BOS included), with a warning.
        """
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts:
            raise ValueError("no prompts to encode")
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.full((len(texts), self.max_length), pad_id, dtype=torch.int64)
        mask = torch.zeros((len(texts), self.max_length), dtype=torch.int64)
        too_long: list[tuple[int, int]] = []
        for row, text in enumerate(texts):
            ids = list(self.tokenizer(text.strip())["input_ids"])
            if not ids or ids[0] != self.bos_token_id:
                ids.insert(0, self.bos_token_id)
            if len(ids) > self.max_length:
                too_long.append((row, len(ids)))
                ids = ids[: self.max_length]
            input_ids[row, self.max_length - len(ids):] = torch.tensor(ids, dtype=torch.int64)
            mask[row, self.max_length - len(ids):] = 1
        if too_long:
            logger.warning("prompts (index, tokens) %s are longer than %d tokens and are truncated", too_long,
                           self.max_length)
        return input_ids, mask

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


def text_encoder_family(model_type: str) -> str:
    """``"gemma3"`` for the Gemma 3 model types, ``"gemma4"`` for the Gemma 4 ones, else the type itself."""
    for family in ("gemma3", "gemma4"):
        if model_type.startswith(family):
            return family
    return model_type


def read_packed_text_encoder_config(path: str | Path) -> dict:
    """The HF config (JSON in the ``gemma_config`` metadata) of a packed text-encoder file, with a clear error
    for anything else."""
    from ltxf.models.checkpoint import read_metadata

    path = Path(path)
    metadata = read_metadata(path)
    if PACKED_CONFIG_KEY not in metadata:
        raise ValueError(f"{path} is not a packed text-encoder file: its metadata has no '{PACKED_CONFIG_KEY}' entry "
                         f"(found: {sorted(metadata) or 'none'}); pass a Gemma 3 model directory or an LTX-2.5 "
                         "gemma*-with-proj-*.safetensors file")
    try:
        config = json.loads(metadata[PACKED_CONFIG_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: the '{PACKED_CONFIG_KEY}' metadata entry is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"{path}: the '{PACKED_CONFIG_KEY}' metadata entry must be an HF config with a model_type")
    return config


def text_encoder_identity(path: str | Path) -> str:
    """Which Gemma a text-encoder path holds: the config's top-level ``gemma_version`` when it has one (LTX packs),
    else the model family (``"gemma3"`` for a Gemma 3 directory). Header / config only."""
    path = Path(path).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{path} has no config.json; expected a Hugging Face Gemma model directory")
        config = json.loads(config_file.read_text())
    else:
        config = read_packed_text_encoder_config(path)
    return str(config.get("gemma_version") or text_encoder_family(str(config.get("model_type", ""))))


def _packed_tokenizer(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                      max_length: int) -> PreTrainedTokenizerBase:
    """The tokenizer rebuilt in memory from the packed ``tokenizer_json`` bytes and ``tokenizer_config.json`` (a
    ``hf_asset__`` tensor, or a metadata string in older packs)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    def text_of(name: str) -> str:
        return bytes(tensors[name].numpy().tobytes()).decode("utf-8")

    if PACKED_TOKENIZER_KEY not in tensors:
        raise ValueError(f"{path}: packed text encoder without a '{PACKED_TOKENIZER_KEY}' tensor")
    tokenizer_config: dict = {}
    config_key = PACKED_ASSET_PREFIX + "tokenizer_config.json"
    if config_key in tensors:
        tokenizer_config = json.loads(text_of(config_key))
    else:
        raw = metadata.get("tokenizer_config.json") or metadata.get("tokenizer_config")
        if raw is None:
            raise ValueError(f"{path}: packed text encoder without tokenizer_config.json (neither a "
                             f"'{config_key}' tensor nor a 'tokenizer_config.json' metadata entry)")
        tokenizer_config = json.loads(raw)
    special = {name: tokenizer_config[name] for name in ("bos_token", "eos_token", "pad_token", "unk_token",
                                                         "mask_token")
               if isinstance(tokenizer_config.get(name), str)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(text_of(PACKED_TOKENIZER_KEY)),
                                        model_max_length=max_length, padding_side="left", **special)
    return tokenizer


def load_packed_text_encoder(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    max_length: int = DEFAULT_MAX_LENGTH,
) -> GemmaTextEncoder:
    """Load the text encoder of a packed LTX text-encoder file (the LTX-2.5 ``gemma4-*-with-proj-*`` format).

    The file holds the HF config as JSON metadata (``gemma_config``, with a top-level ``gemma_version``), the
    tokenizer as bytes (``tokenizer_json`` plus ``hf_asset__*.json`` files), the language model in flat ("Comfy")
    names ``model.embed_tokens.weight``, ``model.layers.N.*``, ``model.norm.weight``, multimodal embedders that a
    text encoder never uses (not read) and the feature extractor's ``text_embedding_projection.*`` (read by
    :func:`ltxf.models.text.load_embeddings_processor`). Only the text model is built, from ``text_config``,
    through ``transformers`` (``gemma4_unified`` -> ``Gemma4UnifiedTextModel``, ``gemma3`` -> ``Gemma3TextModel``);
    it is what the official encoder runs for text-only input. Nothing is downloaded.
    """
    import transformers
    from safetensors import safe_open

    from ltxf.models.checkpoint import list_keys

    path = Path(path).expanduser()
    config = read_packed_text_encoder_config(path)
    family = text_encoder_family(config["model_type"])
    classes = {"gemma4": ("Gemma4UnifiedTextConfig", "Gemma4UnifiedTextModel"),
               "gemma3": ("Gemma3TextConfig", "Gemma3TextModel")}
    if config["model_type"] == "gemma4":
        classes["gemma4"] = ("Gemma4TextConfig", "Gemma4TextModel")
    if family not in classes:
        raise ValueError(f"{path}: packed text encoder of model_type {config['model_type']!r}; expected a Gemma 3 or "
                         "Gemma 4 config ('gemma3', 'gemma4_unified', 'gemma4')")
    config_cls, model_cls = (getattr(transformers, name, None) for name in classes[family])
    if config_cls is None or model_cls is None:
        raise ValueError(f"{path}: this transformers {transformers.__version__} has no {classes[family][1]}; "
                         f"a {config['model_type']} text encoder needs a newer transformers")
    keys = list_keys(path)
    if _PACKED_FLAT_MARKER not in keys:
        raise ValueError(f"{path}: packed text encoder without '{_PACKED_FLAT_MARKER}': only the flat (Comfy) layout "
                         "of the LTX packer is supported")
    text_config = config_cls(**config.get("text_config", config))
    with safe_open(str(path), framework="pt", device="cpu") as f:
        assets = {k: f.get_tensor(k) for k in keys
                  if k == PACKED_TOKENIZER_KEY or k.startswith(PACKED_ASSET_PREFIX)}
        state = {}
        for key in keys:
            if key.startswith(_PACKED_LM_PREFIX):
                tensor = f.get_tensor(key)
                state[key[len(_PACKED_LM_PREFIX):]] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    # from_pretrained(None, state_dict=...) builds on meta, assigns the weights, and initialises the derived
    # non-persistent buffers (RoPE frequencies, embedding scale) exactly as a from_pretrained of a directory.
    model = model_cls.from_pretrained(None, config=text_config, state_dict=state, dtype=dtype)
    missing = [name for name in model.state_dict() if name not in state]
    if missing:
        raise ValueError(f"{path}: the packed language model lacks {len(missing)} tensors, e.g. {missing[:5]}")
    from ltxf.models.checkpoint import read_metadata

    tokenizer = _packed_tokenizer(path, assets, read_metadata(path), max_length)
    identity = str(config.get("gemma_version") or family)
    logger.info("loaded packed %s text encoder %r from %s (%d layers, width %d, %s) on %s", config["model_type"],
                identity, path, text_config.num_hidden_layers, text_config.hidden_size, dtype, device)
    return GemmaTextEncoder(model.to(device), tokenizer, max_length=max_length, identity=identity)


def load_text_encoder(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    load_in_8bit: bool = False,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> GemmaTextEncoder:
    """A Gemma 3 model directory (:func:`load_gemma_text_encoder`) or a packed text-encoder file
    (:func:`load_packed_text_encoder`; 8-bit loading is only offered for directories)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return load_gemma_text_encoder(path, dtype=dtype, device=device, load_in_8bit=load_in_8bit,
                                       max_length=max_length)
    if not path.is_file():
        raise ValueError(f"text encoder not found: {path} (expected a Gemma 3 directory or a packed .safetensors)")
    if load_in_8bit:
        raise ValueError(f"{path}: 8-bit loading is only supported for Gemma 3 directories, not packed files")
    return load_packed_text_encoder(path, dtype=dtype, device=device, max_length=max_length)


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
    config_file = json.loads((model_dir / "config.json").read_text())
    identity = str(config_file.get("gemma_version") or text_encoder_family(config.model_type))
    return GemmaTextEncoder(language_model, tokenizer, max_length=max_length, identity=identity)


__all__ = [
    "DEFAULT_MAX_LENGTH",
    "GemmaTextEncoder",
    "PromptFeatures",
    "gemma_load_kwargs",
    "load_gemma_text_encoder",
    "load_packed_text_encoder",
    "load_text_encoder",
    "read_packed_text_encoder_config",
    "text_encoder_family",
    "text_encoder_identity",
]
