"""RoPE tables and the attention module against ltx-core 1.0.0.

The RoPE tables must be bit-identical (same float64 grid rounded once, same per-axis arithmetic). Rotated
vectors and attention outputs are compared within 1e-6: the rotation is computed as ``x*cos + rot(x)*sin``
rather than the reference's in-place ``addcmul_`` pair, which can differ by one rounding (values here are O(1)).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ltxf.models.attention import Attention, rms_norm
from ltxf.models.rope import apply_rope, build_rope, rope_frequencies
from tests.ltx_reference import import_ltx_core, random_init_

ref_rope = import_ltx_core("ltx_core.model.transformer.rope")
ref_attention = import_ltx_core("ltx_core.model.transformer.attention")


def _positions(batch: int, axes: int, tokens: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([5.0, 1500.0, 1500.0][:axes]).view(1, axes, 1, 1)
    start = torch.rand(batch, axes, tokens, 1, generator=g) * scale
    return torch.cat([start, start + torch.rand(batch, axes, tokens, 1, generator=g)], dim=-1)


def _reference_tables(positions, dim, heads, rope_type, max_pos, double_precision, use_middle=True):
    grid = ref_rope.generate_freq_grid_np if double_precision else ref_rope.generate_freq_grid_pytorch
    return ref_rope.precompute_freqs_cis(positions, dim, torch.float32, theta=10000.0, max_pos=max_pos,
                                         use_middle_indices_grid=use_middle, num_attention_heads=heads,
                                         rope_type=ref_rope.LTXRopeType(rope_type), freq_grid_generator=grid)


@pytest.mark.parametrize("double_precision", [True, False])
def test_frequency_grid_is_bit_identical(double_precision):
    for n in (5, 64, 341, 682, 1024):
        grid = ref_rope.generate_freq_grid_np if double_precision else ref_rope.generate_freq_grid_pytorch
        expected = grid(10000.0, 1, 2 * n)
        assert torch.equal(rope_frequencies(10000.0, n, double_precision=double_precision), expected), n
    assert not torch.equal(rope_frequencies(10000.0, 682, double_precision=True),
                           rope_frequencies(10000.0, 682, double_precision=False))


@pytest.mark.parametrize("rope_type", ["split", "interleaved"])
@pytest.mark.parametrize("axes,dim,heads", [(3, 32, 2), (3, 4096, 32), (1, 16, 2), (1, 2048, 32), (3, 48, 4)])
def test_rope_tables_and_rotation_match_reference(rope_type, axes, dim, heads):
    max_pos = [20, 2048, 2048][:axes]
    positions = _positions(2, axes, 24)
    for double_precision in (True, False):
        ref_cos, ref_sin = _reference_tables(positions, dim, heads, rope_type, max_pos, double_precision)
        cos, sin = build_rope(positions, dim=dim, num_heads=heads, max_pos=max_pos, rope_type=rope_type,
                              double_precision=double_precision)
        if rope_type == "split":  # ours is [B, T, H, d/2], the reference's [B, H, T, d/2]
            ref_cos, ref_sin = ref_cos.transpose(1, 2), ref_sin.transpose(1, 2)
        assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
        x = torch.randn(2, 24, dim)
        x_before = x.clone()
        expected = ref_rope.apply_rotary_emb(x, _reference_tables(positions, dim, heads, rope_type, max_pos,
                                                                  double_precision),
                                             ref_rope.LTXRopeType(rope_type))
        torch.testing.assert_close(apply_rope(x, cos, sin, rope_type), expected, atol=1e-6, rtol=0)
        assert torch.equal(x, x_before)


@pytest.mark.parametrize("rope_type", ["split", "interleaved"])
def test_rope_gradient_matches_reference(rope_type):
    """Our backward is the inverse rotation (a custom autograd function); the reference's is autograd's."""
    positions = _positions(2, 3, 24)
    ref_tables = _reference_tables(positions, 48, 4, rope_type, [20, 2048, 2048], True)
    cos, sin = build_rope(positions, dim=48, num_heads=4, max_pos=[20, 2048, 2048], rope_type=rope_type)
    x = torch.randn(2, 24, 48)
    grad = torch.randn(2, 24, 48)
    x_ref, x_ours = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ref_rope.apply_rotary_emb(x_ref * 1.0, ref_tables, ref_rope.LTXRopeType(rope_type)).backward(grad)
    apply_rope(x_ours, cos, sin, rope_type).backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=1e-6, rtol=0)


def test_rope_start_positions_and_batch_broadcast():
    """Connector style: [1, 1, S] indices without bounds, no midpoint; tables broadcast over the batch."""
    indices = torch.arange(16, dtype=torch.float32)[None, None, :]
    ref_cos, ref_sin = _reference_tables(indices, 24, 2, "interleaved", [4096], True, use_middle=False)
    cos, sin = build_rope(indices, dim=24, num_heads=2, max_pos=[4096], rope_type="interleaved",
                          use_middle_indices_grid=False)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    x = torch.randn(3, 16, 24)
    expected = ref_rope.apply_rotary_emb(x, (ref_cos, ref_sin), ref_rope.LTXRopeType.INTERLEAVED)
    torch.testing.assert_close(apply_rope(x, cos, sin, "interleaved"), expected, atol=1e-6, rtol=0)


def test_rope_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_pos has 1 entries"):
        build_rope(_positions(1, 3, 4), dim=32, num_heads=2, max_pos=[20], rope_type="split")
    with pytest.raises(ValueError, match="divisible by 2 \\* num_heads"):
        build_rope(_positions(1, 1, 4), dim=30, num_heads=4, max_pos=[20], rope_type="split")
    with pytest.raises(ValueError, match="rope_type"):
        build_rope(_positions(1, 1, 4), dim=32, num_heads=2, max_pos=[20], rope_type="spiral")
    with pytest.raises(ValueError, match="needs \\[B, A, T, 2\\]"):
        build_rope(torch.zeros(1, 1, 4), dim=32, num_heads=2, max_pos=[20], rope_type="split")


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("rope_type", ["split", "interleaved"])
def test_attention_matches_reference(gated, rope_type):
    kind = ref_rope.LTXRopeType(rope_type)
    torch.manual_seed(0)
    positions = _positions(2, 3, 12)
    ref_pe = _reference_tables(positions, 32, 2, rope_type, [20, 2048, 2048], True)
    pe = build_rope(positions, dim=32, num_heads=2, max_pos=[20, 2048, 2048], rope_type=rope_type)
    k_positions = _positions(2, 3, 12, seed=1)
    ref_k_pe = _reference_tables(k_positions, 32, 2, rope_type, [20, 2048, 2048], True)
    k_pe = build_rope(k_positions, dim=32, num_heads=2, max_pos=[20, 2048, 2048], rope_type=rope_type)
    x, context = torch.randn(2, 12, 40), torch.randn(2, 7, 24)

    # Cross-attention with a text-style additive mask.
    ref = random_init_(ref_attention.Attention(40, 24, heads=2, dim_head=16, rope_type=kind,
                                               apply_gated_attention=gated), std=0.1)
    ours = Attention(40, 24, num_heads=2, head_dim=16, rope_type=rope_type, gated=gated)
    ours.load_state_dict(ref.state_dict(), strict=True)
    mask = torch.zeros(2, 1, 1, 7)
    mask[1, ..., :3] = -torch.finfo(torch.float32).max
    torch.testing.assert_close(ours(x, context, mask=mask), ref(x, context, mask=mask), atol=1e-6, rtol=0)

    # Self-attention with RoPE (separate key tables), and the STG value pass-through on one sample.
    ref = random_init_(ref_attention.Attention(40, None, heads=2, dim_head=16, rope_type=kind,
                                               apply_gated_attention=gated), std=0.1)
    ours = Attention(40, num_heads=2, head_dim=16, rope_type=rope_type, gated=gated)
    ours.load_state_dict(ref.state_dict(), strict=True)
    torch.testing.assert_close(ours(x, rope=pe, k_rope=k_pe), ref(x, pe=ref_pe, k_pe=ref_k_pe), atol=1e-6, rtol=0)
    blend = torch.tensor([0.0, 1.0]).view(2, 1, 1)  # reference: 0 = pass the value projection through
    expected = ref(x, pe=ref_pe, perturbation_mask=blend)
    got = ours(x, rope=pe, value_passthrough_B=torch.tensor([True, False]))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert (got[0] - ours(x, rope=pe)[0]).abs().max() > 1e-3
    torch.testing.assert_close(ours(x, rope=pe, value_passthrough_B=torch.tensor([True, True])),
                               ref(x, pe=ref_pe, all_perturbed=True), atol=1e-6, rtol=0)


def test_attention_state_dict_names():
    keys = set(Attention(8, 4, num_heads=2, head_dim=4, gated=True).state_dict())
    assert keys == {f"{m}.{p}" for m in ("to_q", "to_k", "to_v", "to_out.0", "to_gate_logits")
                    for p in ("weight", "bias")} | {"q_norm.weight", "k_norm.weight"}


@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_torch(with_weight, dtype):
    """The fused RMS norm (q/k norms, unmodulated norms) against F.rms_norm: values and gradients."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 7, 32, generator=g) * 3).to(dtype)
    weight = (1 + 0.1 * torch.randn(32, generator=g)).to(dtype) if with_weight else None
    grad = torch.randn(2, 7, 32, generator=g).to(dtype)
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    results = []
    for fn in (lambda a, w: F.rms_norm(a, (32,), w, 1e-6), lambda a, w: rms_norm(a, w, 1e-6)):
        xa = x.clone().requires_grad_(True)
        wa = None if weight is None else weight.clone().requires_grad_(True)
        out = fn(xa, wa)
        out.backward(grad)
        results.append((out, xa.grad, None if wa is None else wa.grad))
    (out_t, gx_t, gw_t), (out_o, gx_o, gw_o) = results
    assert out_o.dtype == dtype and gx_o.dtype == dtype
    torch.testing.assert_close(out_o, out_t, **tol)
    torch.testing.assert_close(gx_o, gx_t, **tol)
    if with_weight:
        torch.testing.assert_close(gw_o, gw_t, **tol)


def _plain_modulated_rms(x, scale_BKD, shift_BKD, index_BT, eps):
    def per_token(rows):
        return rows if index_BT is None else rows.flatten(0, 1)[index_BT]
    return F.rms_norm(x, (x.shape[-1],), eps=eps) * per_token(scale_BKD) + per_token(shift_BKD)


@pytest.mark.parametrize("indexed", [False, True])
@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, False),
                                   (False, False, True), (True, False, True)])
def test_modulation_functions_match_autograd_for_every_needed_gradient(indexed, needs):
    """The fused AdaLN norm and gated residual give plain autograd's gradients for whichever inputs need one
    (fp32; summation order only), and keep only the tensors those gradients need: with a frozen gate (LoRA)
    the gated residual keeps nothing token-sized."""
    from ltxf.models.transformer import _gated_add, _modulated_rms

    g = torch.Generator().manual_seed(0)
    B, T, D, K = 2, 9, 16, 3
    index = torch.randint(0, B * K, (B, T), generator=g) if indexed else None
    rows = (B, K, D) if indexed else (B, 1, D)
    x, scale, shift = torch.randn(B, T, D, generator=g), torch.randn(rows, generator=g), torch.randn(rows, generator=g)
    out, grad = torch.randn(B, T, D, generator=g), torch.randn(B, T, D, generator=g)
    for fused, plain, inputs in (
        (lambda a, b, c: _modulated_rms(a, b, c, index, 1e-6), lambda a, b, c: _plain_modulated_rms(a, b, c, index,
                                                                                                   1e-6),
         (x, scale, shift)),
        (lambda a, b, c: _gated_add(a, b, c, index),
         lambda a, b, c: a + b * (c if index is None else c.flatten(0, 1)[index]), (x, out, shift)),
    ):
        if not any(needs):
            continue
        results = []
        for fn in (fused, plain):
            leaves = [t.clone().requires_grad_(n) for t, n in zip(inputs, needs, strict=True)]
            result = fn(*leaves)
            wanted = [t for t in leaves if t.requires_grad]
            results.append((result, *torch.autograd.grad(result, wanted, grad)))
        for ours, reference in zip(*results, strict=True):
            torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _gated_add(x.clone().requires_grad_(), out.clone().requires_grad_(), shift, index)
    assert all(t.numel() < B * T * D for t in saved)
