"""Training configuration: frozen keyword-only dataclasses, validated in ``__post_init__``.

Presets are Python functions in ``experiments/`` returning a :class:`TrainConfig`; ``train.py`` lets tyro override
any field from the command line (``--optim.learning_rate 2e-4``). Attribute docstrings become the ``--help`` text.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ltxf.lora import LoraConfig
from ltxf.validation import ValidationConfig

DType = Literal["bfloat16", "float32"]


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    checkpoint: Path | None = None
    """Official LTX-2 / LTX-2.3 single-file checkpoint (.safetensors) holding the transformer and the text
    connectors. Version is detected from its config metadata."""

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

    def __post_init__(self) -> None:
        if self.checkpoint is not None and str(self.checkpoint).startswith(("http:/", "https:/")):
            raise ValueError(f"model.checkpoint must be a local file, got the URL {self.checkpoint}")


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
class StrategyConfig:
    name: Literal["flexible", "text_to_video", "video_to_video"] = "text_to_video"
    """'flexible' (official 1.2: per-modality generation and conditions, see video/audio), or the older
    'text_to_video' (optionally with joint audio and first-frame conditioning) and 'video_to_video' (IC-LoRA),
    kept so older configs run; the presets use 'flexible'."""

    video: ModalityConfig | None = None
    """flexible: the video modality (None: no video stream)."""

    audio: ModalityConfig | None = None
    """flexible: the audio modality (None: no audio stream)."""

    first_frame_conditioning_p: float = 0.1
    """text_to_video / video_to_video: probability, drawn per sample, that the first latent frame is given clean
    (timestep 0, no loss)."""

    with_audio: bool = False
    """text_to_video: train audio jointly (needs audio_latents/ in the dataset); adds an audio loss term."""

    audio_loss_weight: float = 1.0
    """Weight of the audio loss term in the total loss (video weight is 1)."""

    independent_audio_sigma: bool = False
    """text_to_video: draw the audio sigma independently of the video sigma (that strategy shares one sigma;
    flexible always draws one per generated modality)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.first_frame_conditioning_p <= 1.0:
            raise ValueError(
                f"strategy.first_frame_conditioning_p must be in [0, 1], got {self.first_frame_conditioning_p}"
            )
        if self.audio_loss_weight < 0:
            raise ValueError(f"strategy.audio_loss_weight must be >= 0, got {self.audio_loss_weight}")
        if self.name == "video_to_video" and self.with_audio:
            raise ValueError("strategy.with_audio is not supported with strategy.name='video_to_video' (IC-LoRA is "
                             "video only)")
        if self.name == "flexible":
            self._check_flexible()
        elif self.video is not None or self.audio is not None:
            raise ValueError(f"strategy.video / strategy.audio are fields of strategy.name='flexible', not "
                             f"{self.name!r}")

    def _check_flexible(self) -> None:
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
            references = [c for c in modality.conditions if c.type == "reference"]
            if len(references) > 1:
                raise ValueError(f"strategy.{name}.conditions: at most one 'reference' condition, got "
                                 f"{len(references)}")


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

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    data_parallel: Literal["auto", "fsdp", "replicate"] = "auto"
    """How to spread work over processes: 'fsdp' shards parameters (FSDP2), 'replicate' keeps a full copy per
    process and all-reduces gradients, 'auto' uses replicate for LoRA and fsdp for full fine-tuning."""

    activation_checkpointing: bool = True
    """Recompute each transformer block in the backward pass to save activation memory."""

    compile: bool = False
    """torch.compile each transformer block (CUDA only)."""

    reduce_dtype: DType = "float32"
    """Dtype of gradient reduction across processes."""


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    interval: int | None = 250
    """Save a resumable checkpoint (and an export) every N steps; None saves only at the end."""

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
    """What a non-finite loss does: stop the run (last checkpoint intact) or skip the update."""

    demo_model: bool = False
    """Build a tiny random-initialised LTX-2.3-architecture checkpoint, a synthetic dataset and validation prompt
    features in the output directory and train on them (the README's demo); model.checkpoint, data.root and
    validation.prompt_features_path then point there."""

    def __post_init__(self) -> None:
        if self.strategy.name == "video_to_video" and self.model.training_mode != "lora":
            raise ValueError("strategy.name='video_to_video' (IC-LoRA) needs model.training_mode='lora'")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of the resolved config."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def check_paths(cfg: TrainConfig) -> None:
    """Validate the files and folders a run needs, with errors that name them (run time, not parse time, so
    presets can be built without the files)."""
    checkpoint = cfg.model.checkpoint
    if checkpoint is None:
        raise ValueError("--model.checkpoint is required: an official LTX-2 / LTX-2.3 .safetensors file")
    if cfg.data.root is None:
        raise ValueError("--data.root is required: a preprocessed dataset folder (latents/, conditions/, ...)")
    if not Path(checkpoint).is_file():
        raise ValueError(f"model.checkpoint: file not found: {checkpoint}")
    if cfg.model.init_lora is not None and not Path(cfg.model.init_lora).is_file():
        raise ValueError(f"model.init_lora: file not found: {cfg.model.init_lora}")
    root = Path(cfg.data.root)
    if not root.is_dir():
        raise ValueError(f"data.root: folder not found: {root}")
    if (root / ".precomputed").is_dir():
        root = root / ".precomputed"
    required = ["latents", "conditions"]
    if cfg.strategy.with_audio:
        required.append("audio_latents")
    if cfg.strategy.name == "video_to_video":
        required.append("reference_latents")
    if cfg.strategy.name == "flexible":
        from ltxf.strategies.flexible import data_sources

        required = list(dict.fromkeys(data_sources(cfg.strategy).values()))
    missing = [name for name in required if not (root / name).is_dir()]
    if missing:
        raise ValueError(f"data.root: {root} is missing the folder(s) {missing} needed by strategy "
                         f"'{cfg.strategy.name}'" + (" with audio" if cfg.strategy.with_audio else ""))
    if cfg.validation.enabled:
        cfg.validation.check_paths()
