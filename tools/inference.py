"""Generate a video (with audio) from an LTX-2 / LTX-2.3 checkpoint, optionally with a trained LoRA.

Modes: text-to-video; image-to-video (``--condition_image``); IC-LoRA video-to-video (``--reference_video``, with
the LoRA trained for it); and the other conditions of the official 1.2 validation (``ltxf.conditions``): video
``--prefix_video/--suffix_video/--crop_video/--mask_video``, audio ``--prefix_audio/--suffix_audio/--mask_audio/
--reference_audio``, ``--video_to_audio`` (Foley: the given clip is frozen and muxed in), ``--audio_to_video``, and
text-to-audio (``--skip_video True``, written as .wav). Examples::

    python tools/inference.py --checkpoint ltx-2.3.safetensors --text_encoder_path gemma-3-12b-it \\
        --prompt "a red fox runs through fresh snow" --output fox.mp4
    python tools/inference.py ... --lora_path outputs/run/exports/lora_weights_step_002000.safetensors \\
        --reference_video depth.mp4 --include_reference_in_output --output v2v.mp4

The prompt is embedded first and Gemma is freed before the transformer is loaded, so the two never share memory.
The LoRA is fused into the weights (``W + strength * scale * B @ A``, the scale read from the file). The output is
an H.264 MP4 with a stereo AAC track at the vocoder's rate, or a PNG when ``--num_frames 1``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ltxf.cli import parse  # noqa: E402
from ltxf.config import torch_dtype  # noqa: E402
from ltxf.generate import (  # noqa: E402
    DEFAULT_NEGATIVE_PROMPT,
    GeneratedClip,
    GenerationModels,
    GenerationRequest,
    SampleCondition,
    apply_lora,
    describe_clip,
    encode_prompts,
    free_memory,
    generate,
    save_clip,
)
from ltxf.lora_formats import LoraFile, linear_shapes, load_lora_file, match_lora  # noqa: E402
from ltxf.media import write_audio  # noqa: E402
from ltxf.models.checkpoint import config_from  # noqa: E402
from ltxf.sampling import GuidanceConfig  # noqa: E402

logger = logging.getLogger("ltxf.tools.inference")

@dataclass(frozen=True, kw_only=True)
class InferenceArgs:
    """Generate one clip with an LTX-2 / LTX-2.3 model."""

    checkpoint: Path
    """Official LTX-2 / LTX-2.3 checkpoint (.safetensors) with the transformer, text side, VAEs and vocoder, or the
    transformer file of an LTX-2.5 split pack (then pass --video_vae_path and --audio_vae_path)."""
    text_encoder_path: Path
    """Gemma 3 model directory (e.g. gemma-3-12b-it), or the LTX-2.5 packed text-encoder file, used to embed the
    prompts; freed before sampling."""
    prompt: str
    """What to generate."""
    output: Path
    """Output file: .mp4 (video + audio) or .png (with --num_frames 1)."""
    lora_path: Path | None = None
    """LoRA to fuse into the transformer (ltxf, ComfyUI, kohya, PEFT or diffusers layout; its scale is read from the
    file). Checked against the transformer before Gemma runs."""
    lora_strength: float = 1.0
    """Multiplier of the LoRA delta (0 disables it)."""
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    """Negative prompt for classifier-free guidance."""
    height: int = 544
    """Output height in pixels, a multiple of 32."""
    width: int = 960
    """Output width in pixels, a multiple of 32."""
    num_frames: int = 97
    """Number of frames, 8k + 1 (1, 9, ..., 97, 121)."""
    frame_rate: float = 25.0
    """Frames per second of the output (also sets the audio length and the temporal positions)."""
    num_inference_steps: int = 30
    """Denoising steps."""
    guidance_scale: float = 4.0
    """Classifier-free guidance scale; 1 disables CFG."""
    stg_scale: float = 1.0
    """Spatio-temporal guidance scale; 0 disables STG."""
    stg_blocks: tuple[int, ...] | None = (29,)
    """Transformer blocks whose self-attention the STG pass skips (None: every block)."""
    stg_mode: Literal["stg_av", "stg_v"] = "stg_av"
    """stg_av skips video and audio self-attention in the STG blocks; stg_v only video."""
    guidance_rescale: float = 0.0
    """Rescale the guided prediction's std toward the conditional one (0 disables; 0.7 is common)."""
    seed: int = 42
    """Seed of the initial noise: the same seed gives the same clip."""
    condition_image: Path | None = None
    """Image for the first frame (image-to-video); resized to cover the output and center-cropped."""
    reference_video: Path | None = None
    """IC-LoRA reference video (video-to-video); read up to --num_frames frames."""
    reference_downscale_factor: int | None = None
    """Use the reference at 1/n of the output size (default: the LoRA's reference_downscale_factor, else 1)."""
    include_reference_in_output: bool = False
    """Show the reference to the left of the output (needs --reference_video)."""
    skip_audio: bool = False
    """Generate video only (no audio VAE or vocoder is loaded)."""
    skip_video: bool = False
    """Generate audio only (text-to-audio; --output must be a .wav)."""
    audio_guidance_scale: float | None = None
    """Audio classifier-free guidance scale (default: --guidance_scale; the official 1.2 validation uses 7)."""
    audio_stg_scale: float | None = None
    """Audio STG scale (default: --stg_scale)."""
    modality_guidance_scale: float = 1.0
    """Video modality-isolation guidance (a pass without the audio<->video cross-attention; 1 disables)."""
    audio_modality_guidance_scale: float | None = None
    """Audio modality-isolation guidance (default: --modality_guidance_scale)."""
    reference_temporal_scale_factor: int | None = None
    """The reference keeps frames 0, S, 2S, ... (default: the LoRA's reference_temporal_scale_factor, else 1)."""
    prefix_video: Path | None = None
    """Video extension: hold the first --prefix_frames frames of this clip."""
    prefix_frames: int = 9
    """Pixel frames of --prefix_video, 8k + 1."""
    suffix_video: Path | None = None
    """Backward extension: hold the last --suffix_frames // 8 latent frames of this clip at the end."""
    suffix_frames: int = 8
    """Pixel frames of --suffix_video, a multiple of 8."""
    crop_video: Path | None = None
    """Outpainting: hold --spatial_region of this clip on every frame."""
    spatial_region: tuple[int, int, int, int] | None = None
    """Pixel region (y1, x1, y2, x2) of --crop_video that is kept."""
    mask_video: Path | None = None
    """Inpainting: the clip whose masked part is kept (with --video_mask)."""
    video_mask: Path | None = None
    """Mask image or video for --mask_video (bright = kept)."""
    prefix_audio: Path | None = None
    """Audio extension: hold the first --prefix_duration seconds of this audio."""
    prefix_duration: float = 0.32
    """Seconds of --prefix_audio (0.32 s = the 8 latent steps audio_extend_lora trains on)."""
    suffix_audio: Path | None = None
    """Hold the last --suffix_duration seconds of this audio at the end."""
    suffix_duration: float = 0.32
    """Seconds of --suffix_audio."""
    mask_audio: Path | None = None
    """Audio inpainting: the audio whose masked part is kept (with --audio_mask)."""
    audio_mask: Path | None = None
    """Mask for --mask_audio: a .pt tensor or a sound file (loud = kept)."""
    reference_audio: Path | None = None
    """Audio IC-LoRA reference, appended after the audio with its own positions."""
    video_to_audio: Path | None = None
    """Foley: this clip is given (frozen) and the audio generated; the output muxes both."""
    audio_to_video: Path | None = None
    """This audio is given (frozen) and the video generated; the output muxes both."""
    audio_output: Path | None = None
    """Also write the audio track as a 16-bit .wav file."""
    device: str = "cuda"
    """Device to run on (cuda, cuda:1, cpu)."""
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Weights and compute dtype of Gemma, the transformer and the video VAE (audio decoding stays float32)."""
    text_encoder_8bit: bool = False
    """Load Gemma in 8-bit (bitsandbytes, CUDA only) to save memory while embedding the prompt."""
    config_from: Path | None = None
    """Single checkpoint file whose config applies when --checkpoint has none in its metadata (a split-off file)."""
    video_vae_path: Path | None = None
    """Video VAE file (LTX-2.5: the conv VAE; the diffusion-decoder VAE is not supported for decoding);
    default: inside --checkpoint."""
    audio_vae_path: Path | None = None
    """Audio VAE + vocoder file (LTX-2.5); default: inside --checkpoint."""


@dataclass(frozen=True, kw_only=True, eq=False)
class InferenceResult:
    output: Path
    clip: GeneratedClip
    request: GenerationRequest
    audio_output: Path | None = None


def check_args(args: InferenceArgs) -> None:
    """Fail before loading anything: missing files and incompatible options are ``ValueError`` naming the flag."""
    if not args.checkpoint.is_file():
        raise ValueError(f"--checkpoint: file not found: {args.checkpoint}")
    if not args.text_encoder_path.exists():
        raise ValueError(f"--text_encoder_path: Gemma model directory or packed text-encoder file not found: "
                         f"{args.text_encoder_path}")
    for name in ("lora_path", "condition_image", "reference_video", "config_from", "video_vae_path", "audio_vae_path",
                 "prefix_video", "suffix_video", "crop_video", "mask_video", "video_mask", "prefix_audio",
                 "suffix_audio", "mask_audio", "audio_mask", "reference_audio", "video_to_audio", "audio_to_video"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            raise ValueError(f"--{name}: file not found: {path}")
    for pair in (("mask_video", "video_mask"), ("mask_audio", "audio_mask"), ("crop_video", "spatial_region")):
        if (getattr(args, pair[0]) is None) != (getattr(args, pair[1]) is None):
            raise ValueError(f"--{pair[0]} and --{pair[1]} go together")
    suffix = args.output.suffix.lower()
    if args.skip_video and suffix != ".wav":
        raise ValueError(f"--skip_video True writes audio only: --output must end in .wav, got {args.output}")
    if suffix not in (".mp4", ".png", ".wav") or (suffix == ".wav" and not args.skip_video):
        raise ValueError(f"--output must end in .mp4 or .png (.wav with --skip_video True), got {args.output}")
    if suffix == ".png" and args.num_frames != 1:
        raise ValueError(f"--output {args.output} is a .png, which holds one frame: use --num_frames 1 or .mp4")
    if args.audio_output is not None:
        if args.skip_audio:
            raise ValueError("--audio_output cannot be combined with --skip_audio")
        if args.audio_output.suffix.lower() != ".wav":
            raise ValueError(f"--audio_output must end in .wav, got {args.audio_output}")
    if args.include_reference_in_output and args.reference_video is None:
        raise ValueError("--include_reference_in_output needs --reference_video")


def _reference_factor(args: InferenceArgs, metadata: dict[str, str]) -> int:
    if args.reference_downscale_factor is not None:
        return args.reference_downscale_factor
    value = metadata.get("reference_spatial_scale_factor", metadata.get("reference_downscale_factor"))
    if value is None:
        return 1
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--lora_path {args.lora_path}: metadata reference_downscale_factor={value!r} is not an "
                         "integer; pass --reference_downscale_factor") from None


def read_lora(args: InferenceArgs) -> LoraFile | None:
    """The ``--lora_path`` file matched against the transformer that ``--checkpoint`` describes (built on ``meta``
    from its config, so nothing is loaded): a LoRA for another model fails here, before Gemma runs."""
    from ltxf.models.checkpoint import config_section, read_config
    from ltxf.models.transformer import AVTransformer, TransformerConfig

    if args.lora_path is None:
        return None
    section = config_section(read_config(args.checkpoint), "transformer", args.checkpoint)
    with torch.device("meta"):
        shapes = linear_shapes(AVTransformer(TransformerConfig.from_checkpoint_config(section, path=args.checkpoint)))
    try:
        return match_lora(load_lora_file(args.lora_path), shapes, source=args.lora_path)
    except ValueError as error:
        raise ValueError(f"--lora_path: {error}") from None


def _metadata_factor(args: InferenceArgs, metadata: dict[str, str], key: str) -> int:
    value = metadata.get(key)
    try:
        return 1 if value is None else int(value)
    except ValueError:
        raise ValueError(f"--lora_path {args.lora_path}: metadata {key}={value!r} is not an integer") from None


def sample_conditions(args: InferenceArgs, metadata: dict[str, str]) -> tuple[SampleCondition, ...]:
    """The flags' conditions (:mod:`ltxf.conditions`); a reference subsampled in time becomes one as well."""
    conditions = []
    if args.prefix_video is not None:
        conditions.append(SampleCondition(type="prefix", path=args.prefix_video, num_frames=args.prefix_frames))
    if args.suffix_video is not None:
        conditions.append(SampleCondition(type="suffix", path=args.suffix_video, num_frames=args.suffix_frames))
    if args.crop_video is not None:
        conditions.append(SampleCondition(type="spatial_crop", path=args.crop_video,
                                          spatial_region=args.spatial_region))
    if args.mask_video is not None:
        conditions.append(SampleCondition(type="mask", path=args.mask_video, mask_path=args.video_mask))
    if args.prefix_audio is not None:
        conditions.append(SampleCondition(type="prefix", modality="audio", path=args.prefix_audio,
                                          duration=args.prefix_duration))
    if args.suffix_audio is not None:
        conditions.append(SampleCondition(type="suffix", modality="audio", path=args.suffix_audio,
                                          duration=args.suffix_duration))
    if args.mask_audio is not None:
        conditions.append(SampleCondition(type="mask", modality="audio", path=args.mask_audio,
                                          mask_path=args.audio_mask))
    if args.reference_audio is not None:
        conditions.append(SampleCondition(type="reference", modality="audio", path=args.reference_audio))
    if args.video_to_audio is not None:
        conditions.append(SampleCondition(type="video_to_audio", path=args.video_to_audio))
    if args.audio_to_video is not None:
        conditions.append(SampleCondition(type="audio_to_video", path=args.audio_to_video))
    temporal = (args.reference_temporal_scale_factor if args.reference_temporal_scale_factor is not None
                else _metadata_factor(args, metadata, "reference_temporal_scale_factor"))
    if args.reference_video is not None and temporal != 1:
        conditions.append(SampleCondition(type="reference", path=args.reference_video,
                                          downscale_factor=_reference_factor(args, metadata),
                                          temporal_scale_factor=temporal))
    return tuple(conditions)


def run(args: InferenceArgs) -> InferenceResult:
    """Embed the prompts, load the models, generate and write the outputs."""
    check_args(args)
    with config_from(args.config_from):
        return _run(args)


def _run(args: InferenceArgs) -> InferenceResult:
    from ltxf.models.audio_vae import load_audio_vae_decoder, load_audio_vae_encoder
    from ltxf.models.pack import resolve_pack
    from ltxf.models.text import load_embeddings_processor
    from ltxf.models.transformer import load_transformer
    from ltxf.models.video_vae import load_video_vae_decoder, load_video_vae_encoder
    from ltxf.models.vocoder import load_vocoder

    pack = resolve_pack(args.checkpoint, text_encoder=args.text_encoder_path, video_vae=args.video_vae_path,
                        audio_vae=args.audio_vae_path)
    pack.video_vae_file()  # a split pack without its VAE files fails here, before anything is loaded
    if not args.skip_audio or args.audio_to_video is not None or any(
            getattr(args, name) is not None for name in ("prefix_audio", "suffix_audio", "mask_audio",
                                                         "reference_audio")):
        pack.audio_vae_file()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    dtype = torch_dtype(args.dtype)
    lora = read_lora(args)
    guidance = GuidanceConfig(cfg_scale=args.guidance_scale, stg_scale=args.stg_scale, stg_blocks=args.stg_blocks,
                              stg_mode=args.stg_mode, guidance_rescale=args.guidance_rescale,
                              modality_scale=args.modality_guidance_scale)
    audio_guidance = dataclasses.replace(
        guidance,
        cfg_scale=args.guidance_scale if args.audio_guidance_scale is None else args.audio_guidance_scale,
        stg_scale=args.stg_scale if args.audio_stg_scale is None else args.audio_stg_scale,
        modality_scale=(args.modality_guidance_scale if args.audio_modality_guidance_scale is None
                        else args.audio_modality_guidance_scale))
    metadata = lora.metadata if lora else {}
    conditions = sample_conditions(args, metadata)
    subsampled_reference = any(c.type == "reference" and c.modality == "video" for c in conditions)
    # Built before anything is loaded, so bad sizes fail at once.
    request = GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt, width=args.width, height=args.height,
        num_frames=args.num_frames, frame_rate=args.frame_rate, num_inference_steps=args.num_inference_steps,
        seed=args.seed, guidance=guidance, audio_guidance=audio_guidance, condition_image=args.condition_image,
        reference_video=None if subsampled_reference else args.reference_video,
        reference_downscale_factor=_reference_factor(args, metadata),
        include_reference_in_output=args.include_reference_in_output, generate_audio=not args.skip_audio,
        generate_video=not args.skip_video, conditions=conditions,
    )

    uses_cfg = guidance.uses_cfg or audio_guidance.uses_cfg
    texts = [args.prompt] + ([args.negative_prompt] if uses_cfg else [])
    features = encode_prompts(args.text_encoder_path, args.checkpoint, texts, device=device, dtype=dtype,
                              load_in_8bit=args.text_encoder_8bit)
    request = dataclasses.replace(request, prompt=None, prompt_features=features[0],
                                  negative_prompt_features=features[1] if uses_cfg else None)

    transformer = load_transformer(args.checkpoint, dtype=dtype, device=device)
    if lora is not None:
        apply_lora(transformer, lora, strength=args.lora_strength)
    if guidance.uses_stg and guidance.stg_blocks is not None:
        bad = [b for b in guidance.stg_blocks if b >= transformer.config.num_layers]
        if bad:
            raise ValueError(f"--stg_blocks {bad} out of range: the transformer has {transformer.config.num_layers} "
                             "blocks")
    needs_encoder = args.condition_image is not None or args.reference_video is not None or any(
        c.modality == "video" for c in conditions)
    needs_audio = not args.skip_audio or args.audio_to_video is not None
    models = GenerationModels(
        transformer=transformer,
        text_processor=load_embeddings_processor(args.checkpoint, dtype=dtype, device=device,
                                                 with_feature_extractor=False),
        video_encoder=load_video_vae_encoder(pack.video_vae_file(), dtype=dtype, device=device)
        if needs_encoder else None,
        video_decoder=load_video_vae_decoder(pack.video_decoder_file(), dtype=dtype, device=device),
        audio_encoder=(load_audio_vae_encoder(pack.audio_vae_file(), device=device)
                       if any(c.modality == "audio" for c in conditions) else None),
        audio_decoder=load_audio_vae_decoder(pack.audio_vae_file(), device=device) if needs_audio else None,
        vocoder=load_vocoder(pack.audio_vae_file(), device=device) if needs_audio else None,
        autocast_dtype=None if dtype == torch.float32 else dtype,
    )
    clip = generate(models, request)
    del models, transformer
    free_memory()

    output = save_clip(args.output, clip)
    audio_output = None
    if args.audio_output is not None and clip.audio is not None:
        write_audio(args.audio_output, clip.audio, clip.audio_sample_rate)
        audio_output = args.audio_output
    logger.info("wrote %s: %s%s", output, describe_clip(clip), f" (+ {audio_output})" if audio_output else "")
    return InferenceResult(output=output, clip=clip, request=request, audio_output=audio_output)


def parse_args(argv: Sequence[str] | None = None) -> InferenceArgs:
    from ltxf.faults import parse_errors_as_one_line

    with parse_errors_as_one_line():  # a bad flag: one "error:" line and exit 2 (run_command)
        return parse(InferenceArgs, args=argv, description=__doc__.split("\n\n")[0])


def main(argv: Sequence[str] | None = None) -> InferenceResult:
    """Command-line entry point (``argv`` defaults to ``sys.argv[1:]``)."""
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


def _command(argv: Sequence[str]) -> int:
    main(argv)
    return 0


if __name__ == "__main__":
    from ltxf.faults import run_command

    sys.exit(run_command(_command))  # user errors: one "error:" line, exit 2 (see ltxf.faults)
