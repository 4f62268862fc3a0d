"""The strategy registry: the ONLY place a strategy name maps to a strategy.

Built-in strategies are listed by import path and loaded on first use, so reading a config does not import torch.
A new strategy is a new file with a class following :class:`ltxf.strategies.base.Strategy`, added to
``_BUILT_IN`` below (or registered at run time with :func:`register`, e.g. from a research script)::

    register("my_strategy", MyStrategy)              # MyStrategy.config_type may add its own fields
    cfg = TrainConfig(strategy=StrategyConfig(name="my_strategy"))   # becomes MyStrategy.config_type(...)
    strategy = build_strategy(cfg)
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING

from ltxf.config import StrategyConfig

if TYPE_CHECKING:
    from ltxf.config import TrainConfig
    from ltxf.strategies.base import Strategy

__all__ = ["build_strategy", "get_strategy", "register", "resolve_strategy_config", "strategy_names"]

_BUILT_IN: dict[str, str] = {
    "flexible": "ltxf.strategies.flexible:Flexible",
    "text_to_video": "ltxf.strategies.text_to_video:TextToVideo",
    "video_to_video": "ltxf.strategies.video_to_video:VideoToVideo",
}
_registry: dict[str, type[Strategy] | str] = dict(_BUILT_IN)


def register(name: str, strategy: type[Strategy] | str, *, overwrite: bool = False) -> None:
    """Register ``strategy`` (a class, or ``"module:Class"`` to import on first use) under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register: a strategy name must be a non-empty string, got {name!r}")
    if name in _registry and not overwrite:
        raise ValueError(f"register: strategy {name!r} is already registered (pass overwrite=True to replace it)")
    _registry[name] = strategy


def strategy_names() -> tuple[str, ...]:
    """The registered names, sorted."""
    return tuple(sorted(_registry))


def get_strategy(name: str) -> type[Strategy]:
    """The strategy class registered under ``name``; ``ValueError`` naming the registered ones otherwise."""
    entry = _registry.get(name)
    if entry is None:
        raise ValueError(f"strategy.name: unknown strategy {name!r}; registered: {', '.join(strategy_names())}")
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
        if entry.name != name:
            raise ValueError(f"strategy {entry.__name__} is registered as {name!r} but its name is {entry.name!r}")
        _registry[name] = entry
    return entry


def resolve_strategy_config(config: StrategyConfig) -> StrategyConfig:
    """``config`` as an instance of its strategy's ``config_type``: a plain :class:`StrategyConfig` (an old
    config, or ``--strategy.name`` switched on the command line) is converted keeping every shared field."""
    config_type = get_strategy(config.name).config_type
    if isinstance(config, config_type):
        return config
    if not issubclass(config_type, type(config)):
        raise ValueError(f"strategy.name={config.name!r} needs a {config_type.__name__} section, got a "
                         f"{type(config).__name__}")
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return config_type(**shared)


def build_strategy(cfg: TrainConfig) -> Strategy:
    """The configured strategy, ready to use."""
    return get_strategy(cfg.strategy.name)(cfg.strategy, flow=cfg.flow)
