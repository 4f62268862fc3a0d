"""The public surface the issues promise: ``ltxf.models`` exports Modality and every loader."""

import inspect

import ltxf.models as models


def test_models_exports_modality_and_loaders():
    for name in ("load_transformer", "load_embeddings_processor", "load_video_vae_encoder", "load_video_vae_decoder",
                 "load_audio_vae_encoder", "load_audio_vae_decoder", "load_vocoder"):
        params = list(inspect.signature(getattr(models, name)).parameters)
        assert params[:3] == ["path", "dtype", "device"], (name, params)
    assert {"latent", "sigma", "timesteps", "positions", "context", "context_mask", "attention_mask",
            "enabled"} <= set(models.Modality.__dataclass_fields__)
    assert list(inspect.signature(models.AVTransformer.forward).parameters)[1:4] == ["video", "audio",
                                                                                      "perturbations"]
