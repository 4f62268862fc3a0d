"""Training strategies: how a batch of precomputed latents becomes model inputs, targets and a loss.

A strategy is a pure function ``prepare_*(batch, context, generators=...) -> ModelInputs``; the loss is
``compute_losses(inputs, video_pred, audio_pred)`` (per sample). All randomness comes from one explicit generator per
sample, derived from (seed, step, index of the sample in the global batch), so a step is reproducible and does not
depend on how the global batch is split across processes.
"""

from ltxf.strategies.base import ModelInputs, StepLosses, compute_losses, masked_mse_per_sample
from ltxf.strategies.text_to_video import prepare_text_to_video
from ltxf.strategies.video_to_video import prepare_video_to_video

__all__ = [
    "ModelInputs",
    "StepLosses",
    "compute_losses",
    "masked_mse_per_sample",
    "prepare_text_to_video",
    "prepare_video_to_video",
]
