"""The feed-forward layer shared by the transformer blocks and the text connector blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _GeluProjection(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """Linear(D, 4D) -> tanh-GELU -> Linear(4D, D); keys ``net.0.proj`` and ``net.2`` (``net.1`` holds nothing,
    as in the official checkpoints)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.ModuleList([_GeluProjection(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)])

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x_BTD))
