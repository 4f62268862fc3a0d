"""The feed-forward layer shared by the transformer blocks and the text connector blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _GeluProjection(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """Linear(D, 4D) -> tanh-GELU -> Linear(4D, D); keys ``net.0.proj`` and ``net.2`` (``net.1`` holds nothing,
    as in the official checkpoints). ``bias=False`` drops both biases (the LTX-2.5 video FFN, ``ff_bias: false``)."""

    def __init__(self, dim: int, mult: int = 4, *, bias: bool = True) -> None:
        super().__init__()
        self.net = nn.ModuleList([_GeluProjection(dim, mult * dim, bias), nn.Identity(),
                                  nn.Linear(mult * dim, dim, bias=bias)])

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x_BTD))
