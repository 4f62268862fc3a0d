"""Pure-PyTorch LTX-2 / LTX-2.3 / LTX-2.5 components and the loaders for official single-file checkpoints and
LTX-2.5 split packs (:mod:`ltxf.models.pack` says which file holds which component).

Each loader reads the config from the checkpoint's metadata, builds the module on the meta device, reads only
its own tensors (cast to ``dtype`` as they are read) and loads them strictly.
"""

from ltxf.models.audio_vae import (
    AudioDecoder,
    AudioEncoder,
    encode_audio,
    load_audio_vae_decoder,
    load_audio_vae_encoder,
)
from ltxf.models.checkpoint import detect_version, read_config
from ltxf.models.gemma import GemmaTextEncoder, load_gemma_text_encoder, load_packed_text_encoder, load_text_encoder
from ltxf.models.pack import ModelPack, check_gemma_pairing, resolve_pack
from ltxf.models.text import EmbeddingsProcessor, TextContext, load_embeddings_processor
from ltxf.models.transformer import (
    AVTransformer,
    Modality,
    Perturbations,
    TransformerConfig,
    load_transformer,
    save_transformer,
)
from ltxf.models.video_vae import (
    VideoDecoder,
    VideoEncoder,
    decode_video,
    encode_video,
    load_video_vae_decoder,
    load_video_vae_encoder,
)
from ltxf.models.vocoder import decode_audio, load_vocoder

__all__ = [
    "AVTransformer",
    "AudioDecoder",
    "AudioEncoder",
    "EmbeddingsProcessor",
    "GemmaTextEncoder",
    "ModelPack",
    "Modality",
    "Perturbations",
    "TextContext",
    "TransformerConfig",
    "VideoDecoder",
    "VideoEncoder",
    "check_gemma_pairing",
    "decode_audio",
    "decode_video",
    "detect_version",
    "encode_audio",
    "encode_video",
    "load_audio_vae_decoder",
    "load_audio_vae_encoder",
    "load_embeddings_processor",
    "load_gemma_text_encoder",
    "load_packed_text_encoder",
    "load_text_encoder",
    "load_transformer",
    "load_video_vae_decoder",
    "load_video_vae_encoder",
    "load_vocoder",
    "read_config",
    "resolve_pack",
    "save_transformer",
]
