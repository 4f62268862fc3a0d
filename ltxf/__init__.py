"""ltxf: a functional fine-tuning toolkit for the LTX-2 / LTX-2.3 audio-video diffusion models."""

__version__ = "0.1.0"
