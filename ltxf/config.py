"""Training configuration: frozen keyword-only dataclasses, validated in ``__post_init__``.

Importing this module loads no torch, model or media code (``train.py --help`` stays fast): the sections that
other modules use (:class:`LoraConfig` for ``ltxf.lora``, :class:`ValidationConfig` for ``ltxf.validation``) are
defined here and re-exported there. A strategy owns its section: ``strategy`` holds the config class that the
strategy registered (``ltxf.strategies.registry``), looked up by ``strategy.name`` when the config is built.

Presets are Python functions in ``experiments/`` returning a :class:`TrainConfig`; ``train.py`` lets tyro override
any field from the command line (``--optim.learning_rate 2e-4``). Attribute docstrings become the ``--help`` text.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import tyro

from ltxf.conditions import SampleCondition

if TYPE_CHECKING:
    from ltxf.sampling import GuidanceConfig

DType = Literal["bfloat16", "float32"]
"""The dtype names a config accepts (each the name of the torch dtype)."""

if TYPE_CHECKING:
    import torch


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a config dtype name ('bfloat16', 'float32'): the one dtype table of ltxf."""
    import torch  # here, not at the top: reading a config must not import torch

    if name not in ("bfloat16", "float32"):
        raise ValueError(f"unknown dtype {name!r}; expected 'bfloat16' or 'float32'")
    return getattr(torch, name)

DEFAULT_NEGATIVE_PROMPT = "worst quality, inconsistent motion, blurry, jittery, distorted"
"""The official trainer's default negative prompt for validation samples."""


def check_reference_downscale_factor(factor: int, width: int, height: int, name: str) -> None:
    """``factor >= 1``; when ``> 1``, ``width`` and ``height`` divisible by it with multiples of 32 as quotients."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {factor!r}")
    if factor == 1:
        return
    for side, value in (("width", width), ("height", height)):
        if value % factor or (value // factor) % 32:
            raise ValueError(
                f"{name}={factor}: the {side} {value} must be divisible by {factor} and {side}/{factor} must be a "
                f"multiple of 32 (the reference is encoded at 1/{factor} of the output size)"
            )


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Which Linear layers get adapters, and their shape."""

    rank: int = 64
    """Adapter rank r: lora_A is [r, in], lora_B is [out, r]."""
    alpha: float = 64
    """The adapter output is scaled by alpha / rank (PEFT without rsLoRA)."""
    dropout: float = 0.0
    """Dropout on the adapter input only; the base path never sees it."""
    target_modules: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")
    """PEFT-style patterns: a module matches if its name equals a pattern or ends with "." + pattern."""
    exclude_audio: bool = False
    """Give no adapter to audio-stream or audio<->video modules (see ``is_audio_module``)."""

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be an integer >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoraConfig.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str):
            raise ValueError(
                f"LoraConfig.target_modules must be a sequence of patterns, got the string {self.target_modules!r}"
            )
        targets = tuple(self.target_modules)
        if not targets or not all(isinstance(t, str) and t and not t.startswith(".") for t in targets):
            raise ValueError(
                f"LoraConfig.target_modules must be non-empty module-name patterns, got {self.target_modules!r}"
            )
        object.__setattr__(self, "target_modules", targets)  # a list from a CLI/JSON becomes a tuple

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True, kw_only=True)
class ValidationConfig:
    """Validation sampling during training (one clip per prompt, the same seed for every prompt)."""

    prompts: tuple[str, ...] = ()
    """Prompts to sample; empty disables validation."""
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    """Negative prompt for classifier-free guidance."""
    images: tuple[Path, ...] | None = None
    """First-frame images (image-to-video), one per prompt."""
    reference_videos: tuple[Path, ...] | None = None
    """IC-LoRA reference videos, one per prompt."""
    reference_downscale_factor: int = 1
    """References are used at 1/n of the output size, positions scaled by n (the IC-LoRA's training ratio)."""
    video_dims: tuple[int, int, int] = (512, 288, 49)
    """(width, height, frames): width and height multiples of 32, frames 8k + 1."""
    frame_rate: float = 25.0
    seed: int = 42
    """Seed of the initial noise, the same for every prompt."""
    inference_steps: int = 30
    interval: int | None = 100
    """Sample every N optimizer steps (and at step 0 unless skip_initial_validation); None disables."""
    guidance_scale: float = 3.0
    """Video classifier-free guidance scale (official 1.2 default 3); 1 disables CFG."""
    stg_scale: float = 1.0
    """Video spatio-temporal guidance scale; 0 disables STG (and its perturbed pass)."""
    stg_blocks: tuple[int, ...] | None = (28,)
    """Transformer blocks whose self-attention the STG pass skips (official 1.2: 28); None means every block."""
    stg_mode: Literal["stg_av", "stg_v"] = "stg_av"
    """stg_av skips video and audio self-attention in stg_blocks; stg_v only video."""
    guidance_rescale: float = 0.7
    """Std-rescaling of the guided prediction toward the conditional one (official 1.2: 0.7; 0 disables)."""
    modality_guidance_scale: float = 3.0
    """Video modality-isolation guidance (a pass without the audio<->video cross-attention; 1 disables; used only
    with audio)."""
    audio_guidance_scale: float = 7.0
    """Audio classifier-free guidance scale (official 1.2 default 7)."""
    audio_stg_scale: float = 1.0
    """Audio spatio-temporal guidance scale."""
    audio_modality_guidance_scale: float = 3.0
    """Audio modality-isolation guidance (used only with video)."""
    generate_audio: bool = True
    """Generate an audio track jointly (loads the audio VAE decoder and the vocoder)."""
    generate_video: bool = True
    """Generate video; False with generate_audio gives text-to-audio samples, written as .wav."""
    # Not a command-line flag (tyro cannot parse nested condition structs): set in Python, e.g. in a preset.
    conditions: Annotated[tuple[tuple[SampleCondition, ...], ...] | None, tyro.conf.Suppress] = None
    """Per-prompt conditions (one tuple per prompt; ltxf.conditions.SampleCondition: first_frame, prefix, suffix,
    spatial_crop, mask, reference, video_to_audio, audio_to_video), given in Python (README)."""
    skip_initial_validation: bool = False
    """Do not sample at step 0."""
    include_reference_in_output: bool = False
    """IC-LoRA: show the reference (resized to the output height) to the left of each sample."""
    text_encoder_path: Path | None = None
    """Gemma 3 model directory or packed text-encoder file (LTX-2.5), used once at start to embed the prompts,
    then freed; default: model.text_encoder."""
    text_encoder_8bit: bool = False
    """Load Gemma in 8-bit (bitsandbytes, CUDA only) for the one-off prompt embedding."""
    prompt_features_path: Path | None = None
    """Precomputed prompt features instead of Gemma: a .pt written by ltxf.validation.save_prompt_features."""
    offload_optimizer: bool = False
    """Move the optimizer state to the CPU while sampling (the training loop does it; not under FSDP)."""

    def __post_init__(self) -> None:
        for name in ("prompts", "images", "reference_videos", "video_dims", "stg_blocks"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(f"validation.{name} must be a sequence, got the string {value!r}")
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if self.conditions is not None:
            object.__setattr__(self, "conditions", tuple(tuple(c) for c in self.conditions))
            if len(self.conditions) != len(self.prompts):
                raise ValueError(f"validation.conditions has {len(self.conditions)} entries but validation.prompts has "
                                 f"{len(self.prompts)}; give one tuple of conditions per prompt")
        if not (self.generate_video or self.generate_audio):
            raise ValueError("validation.generate_video and validation.generate_audio are both False: nothing to "
                             "sample")
        for name in ("images", "reference_videos"):
            paths = getattr(self, name)
            if paths is None:
                continue
            if len(paths) != len(self.prompts):
                raise ValueError(f"validation.{name} has {len(paths)} entries but validation.prompts has "
                                 f"{len(self.prompts)}; give one per prompt")
            object.__setattr__(self, name, tuple(Path(p) for p in paths))
        if len(self.video_dims) != 3:
            raise ValueError(f"validation.video_dims must be (width, height, frames), got {self.video_dims}")
        width, height, num_frames = self.video_dims
        for side, value in (("width", width), ("height", height)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 32 or value % 32:
                raise ValueError(f"validation.video_dims: {side} must be a positive multiple of 32, got {value!r}")
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % 8:
            raise ValueError(f"validation.video_dims: frames must be 8k + 1 (1, 9, ..., 49, 97, 121), got "
                             f"{num_frames!r}")
        check_reference_downscale_factor(self.reference_downscale_factor, width, height,
                                         "validation.reference_downscale_factor")
        if not self.frame_rate > 0:
            raise ValueError(f"validation.frame_rate must be > 0, got {self.frame_rate}")
        if isinstance(self.inference_steps, bool) or not isinstance(self.inference_steps, int) \
                or self.inference_steps < 1:
            raise ValueError(f"validation.inference_steps must be an integer >= 1, got {self.inference_steps!r}")
        if self.interval is not None and (isinstance(self.interval, bool) or not isinstance(self.interval, int)
                                          or self.interval < 1):
            raise ValueError(f"validation.interval must be an integer >= 1 or None, got {self.interval!r}")
        if not self.guidance_scale >= 1.0:
            raise ValueError(f"validation.guidance_scale must be >= 1 (1 disables CFG), got {self.guidance_scale}")
        if not self.stg_scale >= 0.0:
            raise ValueError(f"validation.stg_scale must be >= 0 (0 disables STG), got {self.stg_scale}")
        if self.stg_mode not in ("stg_av", "stg_v"):
            raise ValueError(f"validation.stg_mode must be 'stg_av' or 'stg_v', got {self.stg_mode!r}")
        if self.stg_blocks is not None and any(isinstance(b, bool) or not isinstance(b, int) or b < 0
                                               for b in self.stg_blocks):
            raise ValueError(f"validation.stg_blocks must be non-negative block indices or None, got "
                             f"{self.stg_blocks}")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ValueError(f"validation.guidance_rescale must be in [0, 1], got {self.guidance_rescale}")
        if self.include_reference_in_output and self.reference_videos is None:
            raise ValueError("validation.include_reference_in_output needs validation.reference_videos")

    @property
    def enabled(self) -> bool:
        """Whether any sampling happens (prompts given and an interval set)."""
        return bool(self.prompts) and self.interval is not None

    @property
    def guidance(self) -> GuidanceConfig:
        """The video stream's guidance (ltx-core MultiModalGuider parameters)."""
        from ltxf.sampling import GuidanceConfig  # the sampler (torch) loads only when a run samples

        return GuidanceConfig(cfg_scale=self.guidance_scale, stg_scale=self.stg_scale, stg_blocks=self.stg_blocks,
                              stg_mode=self.stg_mode, guidance_rescale=self.guidance_rescale,
                              modality_scale=self.modality_guidance_scale)

    @property
    def audio_guidance(self) -> GuidanceConfig:
        """The audio stream's guidance (same STG blocks: one perturbed pass serves both streams)."""
        from ltxf.sampling import GuidanceConfig

        return GuidanceConfig(cfg_scale=self.audio_guidance_scale, stg_scale=self.audio_stg_scale,
                              stg_blocks=self.stg_blocks, stg_mode=self.stg_mode,
                              guidance_rescale=self.guidance_rescale, modality_scale=self.audio_modality_guidance_scale)

    def should_run(self, step: int) -> bool:
        """Step 0 unless ``skip_initial_validation``, then every ``interval`` steps; never when disabled."""
        if not self.enabled:
            return False
        if step == 0:
            return not self.skip_initial_validation
        return step % self.interval == 0

    def check_paths(self) -> None:
        """Every input file exists (checked at run start, so configs can be built without the files)."""
        for name in ("images", "reference_videos"):
            for i, path in enumerate(getattr(self, name) or ()):
                if not Path(path).is_file():
                    raise ValueError(f"validation.{name}[{i}]: file not found: {path}")
        if self.prompt_features_path is not None:
            if not Path(self.prompt_features_path).is_file():
                raise ValueError(f"validation.prompt_features_path: file not found: {self.prompt_features_path}")
        elif self.text_encoder_path is not None and not Path(self.text_encoder_path).exists():
            raise ValueError(f"validation.text_encoder_path: Gemma directory or packed text-encoder file not found: "
                             f"{self.text_encoder_path}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    checkpoint: Path | None = None
    """Official LTX-2 / LTX-2.3 single-file checkpoint (.safetensors), or the transformer file of an LTX-2.5
    split pack; both hold the transformer and the text connectors. Version is detected from the config metadata
    and ``model_version``."""

    text_encoder: Path | None = None
    """Text encoder of the model: the LTX-2.5 packed Gemma 4 file (it holds the feature extractor) or a Gemma 3
    directory. Checked against the transformer's ``gemma_source_checkpoint`` at start; validation embeds its
    prompts with it unless validation.text_encoder_path is set."""

    video_vae: Path | None = None
    """Video VAE file (LTX-2.5: the conv or the diffusion-decoder VAE); default: inside model.checkpoint (single
    files only)."""

    audio_vae: Path | None = None
    """Audio VAE + vocoder file; default: inside model.checkpoint (single files only)."""

    training_mode: Literal["lora", "full"] = "lora"
    """'lora' trains adapters on a frozen base; 'full' trains every transformer weight."""

    dtype: DType = "bfloat16"
    """Dtype of the frozen base weights and of the forward pass (full fine-tuning keeps fp32 master weights
    in the optimizer state when this is bfloat16)."""

    train_connectors: bool = False
    """Also train the text connectors (video and audio embeddings connectors). Off by default, as in the
    official trainer."""

    init_lora: Path | None = None
    """Start LoRA training from this LoRA file (ltxf, ComfyUI or PEFT layout; same targets and rank) instead of
    a zero-initialised B. A resumed run ignores it (the checkpoint holds the adapters)."""

    quantization: Literal["none", "fp8", "int8", "nf4"] = "none"
    """Store the frozen base weight-only quantized, LoRA on top (see ltxf/quantization.py): 'fp8' (e4m3, block
    scales of 128), 'int8' (block 64) or 'nf4' (block 64); quantized block by block while loading. 'none' keeps
    the model dtype (an official fp8 file keeps its fp8 layers). LoRA only."""

    def __post_init__(self) -> None:
        for name in ("checkpoint", "text_encoder", "video_vae", "audio_vae"):
            value = getattr(self, name)
            if value is not None and str(value).startswith(("http:/", "https:/")):
                raise ValueError(f"model.{name} must be a local file or folder, got the URL {value}")
        if self.quantization != "none" and self.training_mode != "lora":
            raise ValueError(f"model.quantization={self.quantization!r} needs model.training_mode='lora' (a quantized "
                             "base is frozen); use model.quantization='none' for full fine-tuning")


@dataclass(frozen=True, kw_only=True)
class StrategyConfig:
    """The fields every strategy shares. A strategy with options of its own registers a subclass as its
    ``config_type``; ``TrainConfig`` turns a plain ``StrategyConfig`` into that class (keeping the shared values),
    so ``StrategyConfig(name=...)`` and ``--strategy.name ...`` work for every registered strategy."""

    name: str = "text_to_video"
    """Registered strategy: 'text_to_video' (optionally with joint audio and first-frame conditioning),
    'video_to_video' (IC-LoRA: clean reference tokens first, no loss on them), or any strategy added to
    ltxf.strategies.registry."""

    first_frame_conditioning_p: float = 0.1
    """Probability, drawn per sample, that the first latent frame is given clean (timestep 0, no loss)."""

    with_audio: bool = False
    """Train audio jointly (needs audio_latents/ in the dataset); adds an audio loss term."""

    audio_loss_weight: float = 1.0
    """Weight of the audio loss term in the total loss (video weight is 1)."""

    independent_audio_sigma: bool = False
    """Draw the audio sigma independently of the video sigma (the official trainer shares one sigma)."""

    keyframes_mask: Literal["first_frame", "none"] = "first_frame"
    """LTX-2.5 keyframe embedding in training (models without it ignore this). 'first_frame' marks the first
    latent frame of every target, as inference (the official pipelines and validation) always does: that latent
    encodes pixel frame 0 alone in training data too, so the model is trained in the regime it is sampled in.
    'none' leaves the mask unset, as ltx-trainer 1.2 does (upstream issue #283): the embedding is then never
    applied in training but is at inference."""

    def __post_init__(self) -> None:
        if self.keyframes_mask not in ("first_frame", "none"):
            raise ValueError(f"strategy.keyframes_mask must be 'first_frame' or 'none', got {self.keyframes_mask!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"strategy.name must be a registered strategy name, got {self.name!r}")
        if not 0.0 <= self.first_frame_conditioning_p <= 1.0:
            raise ValueError(
                f"strategy.first_frame_conditioning_p must be in [0, 1], got {self.first_frame_conditioning_p}"
            )
        if self.audio_loss_weight < 0:
            raise ValueError(f"strategy.audio_loss_weight must be >= 0, got {self.audio_loss_weight}")

    def check_train_config(self, cfg: TrainConfig) -> None:
        """Checks that need the whole run config (e.g. a strategy that only trains LoRA); raise ``ValueError``."""


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    learning_rate: float = 1e-4
    """Peak learning rate."""

    steps: int = 2000
    """Number of optimizer steps."""

    batch_size: int = 1
    """Micro-batch size per process."""

    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step (global batch = batch_size x accumulation x processes)."""

    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""

    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    """AdamW in fp32, or 8-bit AdamW with block-wise quantised moments (bitsandbytes kernels)."""

    betas: tuple[float, float] = (0.9, 0.999)
    """Adam beta1 and beta2."""

    eps: float = 1e-8
    """Adam epsilon."""

    weight_decay: float = 0.01
    """Decoupled weight decay."""

    scheduler: Literal["constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "step"] = "linear"
    """Learning-rate schedule over `steps` (linear decays to 10% of the peak, as the official trainer)."""

    warmup_steps: int = 0
    """Linear warmup steps before the schedule."""

    scheduler_params: tuple[tuple[str, float], ...] = ()
    """Extra schedule parameters as name/value pairs, e.g. (('end_factor', 0.0),)."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"optim.{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"optim.learning_rate must be > 0, got {self.learning_rate}")
        if self.max_grad_norm < 0:
            raise ValueError(f"optim.max_grad_norm must be >= 0, got {self.max_grad_norm}")
        if not (0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1):
            raise ValueError(f"optim.betas must be in [0, 1), got {self.betas}")
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
            raise ValueError(f"optim.warmup_steps must be in [0, steps), got {self.warmup_steps}")


@dataclass(frozen=True, kw_only=True)
class FlowConfig:
    timestep_sampling: Literal["shifted_logit_normal", "uniform"] = "shifted_logit_normal"
    """How training sigmas are drawn: the official shifted logit-normal (shift from the token count), or
    uniform."""

    logit_std: float = 1.0
    """Std of the logit-normal."""

    eps: float = 1e-3
    """Reflection threshold near sigma 0 and lower end of the uniform fallback."""

    uniform_prob: float = 0.1
    """Fraction of shifted-logit-normal samples drawn uniformly instead."""

    uniform_min: float = 0.0
    """Lower bound for 'uniform' sampling."""

    uniform_max: float = 1.0
    """Upper bound for 'uniform' sampling."""

    def __post_init__(self) -> None:
        if self.logit_std <= 0:
            raise ValueError(f"flow.logit_std must be > 0, got {self.logit_std}")
        if not 0 <= self.uniform_prob <= 1:
            raise ValueError(f"flow.uniform_prob must be in [0, 1], got {self.uniform_prob}")
        if not 0 <= self.uniform_min < self.uniform_max <= 1:
            raise ValueError(f"flow.uniform_min/max must satisfy 0 <= min < max <= 1, got "
                             f"{self.uniform_min}, {self.uniform_max}")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    root: Path | None = None
    """Preprocessed dataset: a folder holding latents/ and conditions/ (or a .precomputed/ subfolder)."""

    num_workers: int = 2
    """DataLoader worker processes per rank."""

    skip_bad_samples: bool = False
    """Skip (and count) corrupt or missing sample files instead of stopping with an error."""

    text_length: int | None = 1024
    """Left-pad text features to this many tokens (the tokenizer length; trimmed conditions files from newer
    preprocessors need it for batches above 1). None keeps them as stored."""

    check_finite: bool = True
    """Check every loaded sample for NaN/Inf values and stop with an error naming the file (cheap next to a
    training step; False skips the check)."""

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    data_parallel: Literal["auto", "fsdp", "replicate"] = "auto"
    """How to spread work over processes, all through FSDP2 on a (replicate x shard) device mesh: 'fsdp' shards
    parameters over parallel.shard_size processes (default all) and replicates across the groups (HSDP),
    'replicate' keeps a full copy per process (shard size 1), 'auto' is replicate for LoRA and fsdp for full
    fine-tuning. One process without 'fsdp' runs the plain model."""

    shard_size: int | None = None
    """Processes per shard group (the mesh's inner dimension; it must divide the number of processes), e.g. the
    GPUs of one node to shard inside nodes and replicate across them. None: all processes under 'fsdp'."""

    activation_checkpointing: bool = True
    """Recompute transformer blocks in the backward pass to save activation memory (which blocks: below)."""

    checkpoint_every: int = 1
    """With activation_checkpointing: recompute every k-th block (0, k, 2k, ...); 1 = every block."""

    checkpoint_first: int | None = None
    """With activation_checkpointing: recompute only the first N blocks (instead of checkpoint_every)."""

    blocks_to_swap: int = 0
    """LoRA: keep the frozen weights of the last N blocks in pinned host memory, copied to the device one block
    ahead of use (ltxf/block_swap.py). Saves memory only for checkpointed blocks; not with FSDP or compile."""

    offload_text_connectors: bool = False
    """Frozen text connectors live in host memory and stream to the device block by block when they run (3.8 GiB
    for the 22B; not with model.train_connectors)."""

    compile: bool = False
    """torch.compile each transformer block (CUDA only)."""

    reduce_dtype: DType = "float32"
    """Dtype of gradient reduction across processes."""

    def __post_init__(self) -> None:
        if self.shard_size is not None and self.shard_size < 1:
            raise ValueError(f"parallel.shard_size must be >= 1 or None, got {self.shard_size}")
        if self.shard_size not in (None, 1) and self.data_parallel == "replicate":
            raise ValueError(f"parallel.shard_size={self.shard_size} contradicts parallel.data_parallel='replicate' "
                             "(a full copy per process); use 'fsdp' to shard")
        if isinstance(self.checkpoint_every, bool) or not isinstance(self.checkpoint_every, int) \
                or self.checkpoint_every < 1:
            raise ValueError(f"parallel.checkpoint_every must be an integer >= 1, got {self.checkpoint_every!r}")
        if self.checkpoint_first is not None and (not isinstance(self.checkpoint_first, int)
                                                  or self.checkpoint_first < 0):
            raise ValueError(f"parallel.checkpoint_first must be an integer >= 0 or None, got "
                             f"{self.checkpoint_first!r}")
        if self.checkpoint_first is not None and self.checkpoint_every != 1:
            raise ValueError("parallel.checkpoint_first and parallel.checkpoint_every select the checkpointed "
                             "blocks in two different ways; set only one of them")
        if isinstance(self.blocks_to_swap, bool) or not isinstance(self.blocks_to_swap, int) \
                or self.blocks_to_swap < 0:
            raise ValueError(f"parallel.blocks_to_swap must be an integer >= 0, got {self.blocks_to_swap!r}")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    interval: int | None = 250
    """Save a resumable checkpoint every N steps (and always at the end); None saves only at the end. The weights
    are exported once, at the end of the run (exports/)."""

    keep_last_n: int = 2
    """Keep only the newest N resumable checkpoints (<= 0 keeps all)."""

    export_dtype: DType = "bfloat16"
    """Dtype of exported weights (LoRA or full model)."""

    resume: bool = True
    """Resume automatically from the newest checkpoint in the output directory."""

    def __post_init__(self) -> None:
        if self.interval is not None and self.interval < 1:
            raise ValueError(f"checkpoints.interval must be >= 1 or None, got {self.interval}")


@dataclass(frozen=True, kw_only=True)
class LogConfig:
    every: int = 10
    """Log scalars to TensorBoard (and the console) every N steps."""

    console_every_s: float = 10.0
    """At most one progress line per this many seconds (plus the first and last step)."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    """Sample clips with the model being trained (off unless validation.prompts are given)."""

    output_dir: Path = Path("outputs/run")
    """Run directory: checkpoints/, exports/, tensorboard/, config.json."""

    seed: int = 42
    """Seed of every derived random stream (noise, sigmas, conditioning draws, data order)."""

    nonfinite_loss: Literal["stop", "skip"] = "stop"
    """What a non-finite loss does: stop the run (last checkpoint intact, exit code 3) or skip the update (a
    warning names the step and its samples; the total is reported at the end)."""

    max_skipped_steps: int | None = 20
    """With nonfinite_loss='skip': stop the run (exit code 3) once more than this many steps were skipped in the
    whole run, resumes included; None never stops."""

    demo_model: bool = False
    """Build a tiny random-initialised LTX-2.3-architecture checkpoint, a synthetic dataset and validation prompt
    features in the output directory and train on them (the README's demo); model.checkpoint, data.root and
    validation.prompt_features_path then point there."""

    def __post_init__(self) -> None:
        if self.max_skipped_steps is not None and self.max_skipped_steps < 0:
            raise ValueError(f"max_skipped_steps must be >= 0 or None, got {self.max_skipped_steps}")
        from ltxf.strategies.registry import resolve_strategy_config

        object.__setattr__(self, "strategy", resolve_strategy_config(self.strategy))
        self.strategy.check_train_config(self)
        v = self.validation
        if v.prompts and v.text_encoder_path is None and v.prompt_features_path is None \
                and self.model.text_encoder is None and not self.demo_model:
            raise ValueError("validation.text_encoder_path (a Gemma 3 directory or packed text-encoder file) or "
                             "model.text_encoder is required to embed validation.prompts, unless "
                             "validation.prompt_features_path gives precomputed features")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of the resolved config."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def check_paths(cfg: TrainConfig) -> None:
    """Validate the files and folders a run needs, with errors that name them (run time, not parse time, so
    presets can be built without the files)."""
    checkpoint = cfg.model.checkpoint
    if cfg.demo_model and (checkpoint is None or cfg.data.root is None):
        raise ValueError("demo_model is set but its assets are not built: pass the config through "
                         "ltxf.demo.prepare_demo(cfg) first (train.py does)")
    if checkpoint is None:
        raise ValueError("--model.checkpoint is required: an official LTX-2 / LTX-2.3 .safetensors file")
    if cfg.data.root is None:
        raise ValueError("--data.root is required: a preprocessed dataset folder (latents/, conditions/, ...)")
    if not Path(checkpoint).is_file():
        raise ValueError(f"model.checkpoint: file not found: {checkpoint}")
    for name in ("text_encoder", "video_vae", "audio_vae"):
        value = getattr(cfg.model, name)
        if value is not None and not Path(value).exists():
            raise ValueError(f"model.{name}: not found: {value}")
    if cfg.model.init_lora is not None and not Path(cfg.model.init_lora).is_file():
        raise ValueError(f"model.init_lora: file not found: {cfg.model.init_lora}")
    root = Path(cfg.data.root)
    if not root.is_dir():
        raise ValueError(f"data.root: folder not found: {root}")
    if (root / ".precomputed").is_dir():
        root = root / ".precomputed"
    from ltxf.strategies.registry import build_strategy

    sources = build_strategy(cfg).data_sources()  # folder names, or a mapping role -> folder
    required = list(dict.fromkeys(sources.values() if isinstance(sources, dict) else sources))
    missing = [name for name in required if not (root / name).is_dir()]
    if missing:
        raise ValueError(f"data.root: {root} is missing the folder(s) {missing} needed by strategy "
                         f"'{cfg.strategy.name}'" + (" with audio" if cfg.strategy.with_audio else ""))
    if cfg.validation.enabled:
        cfg.validation.check_paths()
