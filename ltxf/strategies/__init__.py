"""Training strategies: how a batch of precomputed latents becomes model inputs, targets and a loss.

The protocol is :class:`ltxf.strategies.base.Strategy`; ``registry.py`` maps names to strategies
(``get_strategy(name)``, ``build_strategy(cfg)``, ``register(name, cls)``); one file per strategy. Importing this
package loads nothing heavy: import the strategy modules (or use the registry) for the implementations.
"""
