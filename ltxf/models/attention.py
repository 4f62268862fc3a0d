"""Multi-head attention of the LTX-2 / LTX-2.3 transformer and text connectors.

One module covers every attention in the model: self-attention, text cross-attention, audio<->video
cross-attention and the connector blocks. Its state-dict names are those of the official checkpoints:
``to_q``, ``to_k``, ``to_v``, ``to_out.0`` (all with bias), ``q_norm`` / ``k_norm`` (RMSNorm with a weight over
the whole inner width, applied before RoPE) and, for LTX-2.3, ``to_gate_logits`` (one logit per head; the head's
output is multiplied by ``2 * sigmoid(logit)``, so a zero-initialised gate is the identity).

Shape legend: B batch, T query tokens, S key/value tokens, C input width, D inner width (H * d), H heads,
d head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ltxf.models.rope import ROPE_TYPES, RopeType, apply_rope

RopeTables = tuple[torch.Tensor, torch.Tensor]


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim, computed in float32; same values as
    ``F.rms_norm``. A fused autograd function: it keeps ``x`` and the per-row reciprocal RMS for backward (like
    ``F.rms_norm``) but its backward is a handful of fused passes instead of autograd's composite one."""
    return _RMSNorm.apply(x, weight, eps)[0]


def reciprocal_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / sqrt(mean(x^2) + eps)`` over the last dim, float32 with a kept last dim (one fused reduction)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    return torch.rsqrt(norm.square_().div_(x.shape[-1]).add_(eps))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, eps):
        rstd = reciprocal_rms(x, eps)
        out = (x * rstd).to(x.dtype)
        if weight is not None:
            out.mul_(weight)
        return out, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _ = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, weight, output[1])

    @staticmethod
    def backward(ctx, grad, _grad_rstd):
        x, weight, rstd = ctx.saved_tensors
        x_norm = x.float() * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:  # a frozen q/k norm (LoRA) skips this reduction over all tokens
            grad_weight = (grad * x_norm).flatten(0, -2).sum(0, dtype=torch.float32).to(weight.dtype)
        if not ctx.needs_input_grad[0]:
            return None, grad_weight, None
        if weight is not None:
            grad = grad * weight
        # d/dx of x * rstd: rstd * (g - x_norm * mean(g * x_norm)), in float32.
        projection = (grad * x_norm).mean(-1, keepdim=True, dtype=torch.float32)
        grad_x = grad.float().addcmul_(x_norm, projection, value=-1.0).mul_(rstd) if weight is not None else \
            (grad.float() - x_norm * projection).mul_(rstd)
        return grad_x.to(x.dtype), grad_weight, None


class RMSNorm(nn.Module):
    """RMS norm with a learnable weight over the last dim (state-dict key ``weight``), via :func:`rms_norm`."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def _project(x: torch.Tensor, layers: tuple[nn.Module, ...]) -> list[torch.Tensor]:
    """Apply each layer to ``x``. LoRA layers (those with ``adapter_input``, see ``ltxf.lora.LoRALinear``) with
    equal ``adapter_input_key`` share one prepared adapter input: one dropout draw, one tensor kept for the
    backward, instead of one per projection."""
    shared: dict = {}
    outputs = []
    for layer in layers:
        prepare = getattr(layer, "adapter_input", None)
        if prepare is None:
            outputs.append(layer(x))
            continue
        key = layer.adapter_input_key
        if key not in shared:
            shared[key] = prepare(x)
        outputs.append(layer(x, adapter_input=shared[key]))
    return outputs


class Attention(nn.Module):
    """Multi-head attention with RMS q/k norms, optional RoPE, optional per-head gate and STG pass-through.

    Args:
        query_dim: width of the query input ``x``.
        context_dim: width of the key/value input (defaults to ``query_dim``: self-attention).
        num_heads, head_dim: head geometry; the inner width is ``num_heads * head_dim``.
        norm_eps: epsilon of the q/k RMSNorms.
        rope_type: layout of the RoPE tables passed to :meth:`forward` (``"split"`` or ``"interleaved"``).
        gated: add ``to_gate_logits`` (LTX-2.3 gated attention).
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        *,
        num_heads: int,
        head_dim: int,
        norm_eps: float = 1e-6,
        rope_type: RopeType = "split",
        gated: bool = False,
    ) -> None:
        super().__init__()
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {rope_type!r}")
        context_dim = query_dim if context_dim is None else context_dim
        inner_dim = num_heads * head_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.rope_type: RopeType = rope_type
        self.to_q = nn.Linear(query_dim, inner_dim)
        self.to_k = nn.Linear(context_dim, inner_dim)
        self.to_v = nn.Linear(context_dim, inner_dim)
        self.q_norm = RMSNorm(inner_dim, eps=norm_eps)
        self.k_norm = RMSNorm(inner_dim, eps=norm_eps)
        self.to_gate_logits = nn.Linear(query_dim, num_heads) if gated else None
        # A ModuleList so that the checkpoint key is ``to_out.0.weight``.
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim)])

    def forward(
        self,
        x_BTC: torch.Tensor,
        context_BSC: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        rope: RopeTables | None = None,
        k_rope: RopeTables | None = None,
        value_passthrough_B: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from ``x_BTC`` to ``context_BSC`` (to ``x_BTC`` itself when ``context_BSC`` is None).

        Args:
            x_BTC: queries ``[B, T, query_dim]``.
            context_BSC: keys/values ``[B, S, context_dim]``, or None for self-attention.
            mask: additive float mask (same dtype as ``x``) or boolean mask (True = attend), broadcastable to
                ``[B, H, T, S]``; a 3-D ``[B, T, S]`` mask gets a heads axis. None = attend everywhere (lets SDPA
                pick a flash kernel).
            rope: ``(cos, sin)`` tables from :func:`ltxf.models.rope.build_rope` for the queries, also used for
                the keys unless ``k_rope`` is given. None = no RoPE.
            k_rope: separate tables for the keys (audio<->video cross-attention).
            value_passthrough_B: bool ``[B]``; where True, that sample's attention output is replaced by its
                value projection ``to_v(context)`` (STG "skip attention"). The per-head gate and ``to_out`` still
                apply, as in the reference.

        Returns:
            ``[B, T, query_dim]``.
        """
        context_BSC = x_BTC if context_BSC is None else context_BSC
        batch, num_q, _ = x_BTC.shape
        num_kv = context_BSC.shape[1]
        shape_q = (batch, num_q, self.num_heads, self.head_dim)
        shape_kv = (batch, num_kv, self.num_heads, self.head_dim)

        if context_BSC is x_BTC:
            q_BTD, k_BSD, v_BSD = _project(x_BTC, (self.to_q, self.to_k, self.to_v))
        else:
            (q_BTD,) = _project(x_BTC, (self.to_q,))
            k_BSD, v_BSD = _project(context_BSC, (self.to_k, self.to_v))
        q_BTD = self.q_norm(q_BTD)
        k_BSD = self.k_norm(k_BSD)
        if rope is not None:
            q_BTD = apply_rope(q_BTD, *rope, self.rope_type)
            k_BSD = apply_rope(k_BSD, *(rope if k_rope is None else k_rope), self.rope_type)

        if mask is not None and mask.ndim == 3:
            mask = mask.unsqueeze(1)
        out_BHTd = F.scaled_dot_product_attention(
            q_BTD.view(shape_q).transpose(1, 2),
            k_BSD.view(shape_kv).transpose(1, 2),
            v_BSD.view(shape_kv).transpose(1, 2),
            attn_mask=mask,
        )
        out_BTHd = out_BHTd.transpose(1, 2)

        if value_passthrough_B is not None:
            if num_kv != num_q:
                raise ValueError(f"value_passthrough_B needs as many keys as queries (self-attention); got "
                                 f"{num_kv} keys for {num_q} queries")
            out_BTHd = torch.where(value_passthrough_B.view(batch, 1, 1, 1), v_BSD.view(shape_kv), out_BTHd)
        gate_BTH1 = None
        if self.to_gate_logits is not None:
            gate_BTH1 = 2.0 * torch.sigmoid(self.to_gate_logits(x_BTC)).unsqueeze(-1)
        to_out = self.to_out[0]
        if hasattr(to_out, "forward_heads"):  # a LoRA projection: keeps heads and gates, not their product
            return to_out.forward_heads(out_BTHd, gate_BTH1)
        if gate_BTH1 is not None:
            out_BTHd = out_BTHd * gate_BTH1
        return to_out(out_BTHd.reshape(batch, num_q, self.num_heads * self.head_dim))
