"""Pure-PyTorch LTX-2 / LTX-2.3 components and the loaders for official checkpoints."""
