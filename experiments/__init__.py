"""Presets and research scripts. Presets are Python functions returning a TrainConfig (see presets.py)."""
