"""Presets (``presets.py``: functions returning a TrainConfig) and research scripts over ltxf's functional API:
``custom_loop.py`` (a loop over train_step), ``per_sample_grads.py`` (vmap of grad), ``lora_sweep.py`` (K LoRA
variants on one frozen base)."""
