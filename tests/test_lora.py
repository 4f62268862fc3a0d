import math

import pytest
import torch
from torch import nn

from ltxf import optim
from ltxf.lora import (
    LoraConfig,
    LoRALinear,
    init_lora_parameters,
    inject_lora,
    is_audio_module,
    load_lora_weights,
    lora_parameters,
    lora_state_dict,
    merge_lora,
)

D, DA = 16, 8  # video / audio widths of the toy model


class Attention(nn.Module):
    def __init__(self, dim_q: int, dim_kv: int, inner: int):
        super().__init__()
        self.to_q = nn.Linear(dim_q, inner)
        self.to_k = nn.Linear(dim_kv, inner)
        self.to_v = nn.Linear(dim_kv, inner)
        self.to_out = nn.Sequential(nn.Linear(inner, dim_q), nn.Identity())

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        return self.to_out(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([nn.Module(), nn.GELU(), nn.Linear(2 * dim, dim)])
        self.net[0].proj = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[1](self.net[0].proj(x)))


class Block(nn.Module):
    """Module names as in the official LTX-2 checkpoint (attn1/attn2/ff, audio_*, a2v/v2a)."""

    def __init__(self):
        super().__init__()
        self.attn1 = Attention(D, D, D)
        self.attn2 = Attention(D, D, D)
        self.ff = FeedForward(D)
        self.audio_attn1 = Attention(DA, DA, DA)
        self.audio_attn2 = Attention(DA, DA, DA)
        self.audio_ff = FeedForward(DA)
        self.audio_to_video_attn = Attention(D, DA, DA)
        self.video_to_audio_attn = Attention(DA, D, DA)

    def forward(self, vx: torch.Tensor, ax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vx = vx + self.attn1(vx, vx)
        vx = vx + self.attn2(vx, vx)
        ax = ax + self.audio_attn1(ax, ax)
        ax = ax + self.audio_attn2(ax, ax)
        vx, ax = vx + self.audio_to_video_attn(vx, ax), ax + self.video_to_audio_attn(ax, vx)
        return vx + self.ff(vx), ax + self.audio_ff(ax)


class ToyAVModel(nn.Module):
    def __init__(self, num_blocks: int = 2):
        super().__init__()
        self.patchify_proj = nn.Linear(4, D)
        self.audio_patchify_proj = nn.Linear(4, DA)
        self.transformer_blocks = nn.ModuleList(Block() for _ in range(num_blocks))
        self.proj_out = nn.Linear(D, 4)
        self.audio_proj_out = nn.Linear(DA, 4)

    def forward(self, video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vx, ax = self.patchify_proj(video), self.audio_patchify_proj(audio)
        for block in self.transformer_blocks:
            vx, ax = block(vx, ax)
        return self.proj_out(vx), self.audio_proj_out(ax)


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 6, 4, generator=gen), torch.randn(2, 5, 4, generator=gen)


def _model(seed: int = 0, **kw) -> ToyAVModel:
    torch.manual_seed(seed)
    return ToyAVModel(**kw)


ATTN = ("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")


def test_inject_targets_keys_and_freezing():
    model = _model()
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    base_params = dict(model.named_parameters())
    names = inject_lora(model, LoraConfig(rank=4, alpha=8), generator=torch.Generator().manual_seed(0))
    expected = sorted(
        f"transformer_blocks.{i}.{a}.{p}" for i in range(2) for a in ATTN for p in ("to_k", "to_q", "to_v", "to_out.0")
    )
    assert names == expected
    sd = model.state_dict()
    lora_keys = sorted(k for k in sd if k not in base_sd)
    assert lora_keys == sorted(f"{n}.lora_{ab}.weight" for n in names for ab in "AB")
    # base keys unchanged: the base checkpoint loads strictly apart from the adapters
    result = model.load_state_dict(base_sd, strict=False)
    assert sorted(result.missing_keys) == lora_keys and not result.unexpected_keys
    # the very same Parameter objects (no copies), all frozen; adapters trainable with PEFT shapes
    for k, p in base_params.items():
        assert dict(model.named_parameters())[k] is p and not p.requires_grad
    trainable = sorted(k for k, p in model.named_parameters() if p.requires_grad)
    assert trainable == lora_keys == list(lora_parameters(model))
    q = model.transformer_blocks[0].audio_to_video_attn.to_q
    assert isinstance(q, LoRALinear) and isinstance(q, nn.Linear)
    assert q.lora_A.weight.shape == (4, D) and q.lora_B.weight.shape == (DA, 4) and q.scaling == 2.0
    bound = 1 / math.sqrt(D)  # kaiming_uniform(a=sqrt(5)) on fan_in = in_features
    assert 0 < q.lora_A.weight.abs().max() <= bound and torch.count_nonzero(q.lora_B.weight) == 0


def test_zero_b_is_identity_and_adapter_formula():
    model = _model()
    video, audio = _inputs()
    with torch.no_grad():
        ref = model(video, audio)
    inject_lora(model, LoraConfig(rank=4, target_modules=("to_q", "ff.net.2")))
    with torch.no_grad():
        out = model(video, audio)
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))

    layer = model.transformer_blocks[1].ff.net[2]
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 2 * D)
    expected = x @ layer.weight.T + layer.bias + layer.scaling * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(layer(x), expected)


def test_dropout_applies_to_adapter_input_only():
    model = nn.Sequential(nn.Linear(6, 5))
    inject_lora(model, LoraConfig(rank=2, dropout=0.5, target_modules=("0",)))
    layer = model[0]
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 6)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    expected = nn.functional.linear(x, layer.weight, layer.bias) + layer.scaling * layer.lora_B(layer.lora_A(dropped))
    torch.testing.assert_close(out, expected)
    layer.eval()
    expected_eval = nn.functional.linear(x, layer.weight, layer.bias) + layer.scaling * layer.lora_B(layer.lora_A(x))
    torch.testing.assert_close(layer(x), expected_eval)


def test_fp32_adapters_on_bf16_base():
    """fp32 master adapters compute in the activation dtype (bf16): the same products bf16 autocast computes,
    with fp32 gradients for the optimizer, and no fp32 copy of the input."""
    model = nn.Sequential(nn.Linear(8, 6, dtype=torch.bfloat16))
    inject_lora(model, LoraConfig(rank=2, target_modules=("0",)), dtype=torch.float32)
    layer = model[0]
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    bf16 = torch.bfloat16
    hidden = nn.functional.linear(x, layer.lora_A.weight.to(bf16))
    expected = nn.functional.linear(x, layer.weight, layer.bias) + nn.functional.linear(
        hidden, (layer.lora_B.weight * layer.scaling).to(bf16))
    assert torch.equal(out, expected)
    with torch.autocast("cpu", dtype=bf16):
        assert torch.equal(layer(x), out)
    # Within bf16 rounding of the fp32 formula (values O(10): a few bf16 ulps).
    adapter = layer.scaling * (x.float() @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    reference = nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float()) + adapter
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=0.1)
    out.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and layer.weight.grad is None


class _PlainLoRA(nn.Module):
    """The textbook adapter on the same Parameters, through autograd (no shared input, no recompute)."""

    def __init__(self, layer: LoRALinear):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lay = self.layer
        adapter = lay.lora_B(lay.lora_A(lay.lora_dropout(x))) * lay.scaling
        return nn.functional.linear(x, lay.weight, lay.bias) + adapter


def _real_attention(gated: bool, seed: int = 0, *, lora: bool = True, dtype: torch.dtype = torch.float32):
    """ltxf's attention (frozen, in ``dtype``) with fp32 rank-4 adapters on q/k/v/out and a non-zero B."""
    from ltxf.models.attention import Attention as RealAttention

    torch.manual_seed(seed)
    attention = RealAttention(D, num_heads=2, head_dim=8, gated=gated).to(dtype)
    attention.requires_grad_(False)
    if lora:
        inject_lora(attention, LoraConfig(rank=4, alpha=8), generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float32)
        for name, param in attention.named_parameters():
            if name.endswith("lora_B.weight"):
                nn.init.normal_(param)
    return attention


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("cross", [False, True])
def test_attention_lora_shared_input_and_recomputed_heads_match_plain_autograd(gated, cross):
    """The attention's LoRA path (q/k/v sharing one adapter input, to_out recomputing gate * heads in the
    backward) gives the textbook adapter's outputs and gradients (fp32; tolerance: summation order only)."""
    attention = _real_attention(gated)
    if gated:
        nn.init.normal_(attention.to_gate_logits.weight)
        attention.to_gate_logits.requires_grad_(True)  # the gate's gradient flows through the recompute too
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, D, generator=gen, requires_grad=True)
    context = torch.randn(2, 5, D, generator=gen, requires_grad=True) if cross else None
    grad = torch.randn(2, 7, D, generator=gen)
    results = []
    for plain in (False, True):
        if plain:
            for name in ("to_q", "to_k", "to_v"):
                setattr(attention, name, _PlainLoRA(getattr(attention, name)))
            attention.to_out[0] = _PlainLoRA(attention.to_out[0])
        params = [p for p in attention.parameters() if p.requires_grad]
        inputs = [x] if context is None else [x, context]
        out = attention(x, context)
        results.append((out, *torch.autograd.grad(out, inputs + params, grad)))
    for ours, plain in zip(*results, strict=True):
        torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)


def test_attention_lora_shares_one_dropout_draw():
    """With dropout, q, k and v see one dropped input (one draw, one kept tensor), not three."""
    attention = _real_attention(gated=False)
    for name in ("to_q", "to_k", "to_v", "to_out.0"):
        attention.get_submodule(name).lora_dropout = nn.Dropout(0.5)
    x = torch.randn(1, 6, D)
    torch.manual_seed(5)
    out = attention(x)
    torch.manual_seed(5)
    dropped = nn.functional.dropout(x, 0.5)
    for name in ("to_q", "to_k", "to_v"):
        layer = attention.get_submodule(name)
        layer.lora_dropout = _FixedInput(dropped)
    torch.manual_seed(5)
    nn.functional.dropout(x, 0.5)  # the draw above, so that to_out's dropout sees the same generator state
    torch.testing.assert_close(attention(x), out, rtol=0, atol=0)


class _FixedInput(nn.Module):
    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value


def _saved_bytes(fn) -> int:
    """Bytes of the unique storages autograd saves while ``fn()`` runs."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    del out
    return sum(storages.values())


@pytest.mark.parametrize("gated", [False, True])
def test_attention_lora_keeps_one_copy_of_its_input(gated):
    """bf16 self-attention with fp32 adapters on q/k/v/out keeps, per token, one bf16 copy of the shared input
    plus the four rank-r intermediates beyond what the frozen attention keeps: no fp32 copies, and the heads and
    gates of to_out are the attention's own saved tensors (their product is recomputed). Per token = the slope
    between two token counts (the weights and their per-call casts are per call)."""
    rank, bf16 = 4, torch.bfloat16
    per_token = {}
    for lora in (False, True):
        attention = _real_attention(gated, lora=lora, dtype=bf16)
        sizes = []
        for tokens in (8, 24):
            x = torch.randn(1, tokens, D, dtype=bf16, requires_grad=True)
            sizes.append(_saved_bytes(lambda: attention(x)))  # noqa: B023
        per_token[lora] = (sizes[1] - sizes[0]) / 16
    assert per_token[True] - per_token[False] == D * 2 + 4 * rank * 2


def test_training_changes_only_adapters():
    model = _model()
    inject_lora(model, LoraConfig(rank=4))
    frozen = {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}
    params = lora_parameters(model)
    start = {k: p.detach().clone() for k, p in params.items()}
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1))
    opt_state = tx.init(params)
    for step in range(3):
        video, audio = _inputs(step)
        v, a = model(video, audio)
        (v.square().mean() + a.square().mean()).backward()
        grads = {k: p.grad for k, p in params.items()}
        assert all(g is not None for g in grads.values())
        updates, opt_state = tx.update(grads, opt_state, params)
        optim.apply_updates(params, updates)
        for p in params.values():
            p.grad = None
    for k, p in model.named_parameters():
        if k in frozen:
            assert torch.equal(p, frozen[k]) and p.grad is None, k
    assert all(not torch.equal(params[k], start[k]) for k in params)


def test_functional_call_on_lora_params():
    model = _model()
    inject_lora(model, LoraConfig(rank=4, target_modules=("to_v",)))
    video, audio = _inputs()
    params = lora_parameters(model)
    gen = torch.Generator().manual_seed(1)
    replaced = {k: torch.randn(p.shape, generator=gen) for k, p in params.items()}
    out = torch.func.functional_call(model, replaced, (video, audio))
    with torch.no_grad():  # the same values written into the module
        for k, p in params.items():
            p.copy_(replaced[k])
        ref = model(video, audio)
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))

    def loss_fn(p):
        v, a = torch.func.functional_call(model, p, (video, audio))
        return v.square().mean() + a.square().mean()

    grads = torch.func.grad(loss_fn)({k: p.detach() for k, p in params.items()})
    loss_fn(dict(params)).backward()
    for k, p in params.items():
        torch.testing.assert_close(grads[k], p.grad)


def test_exclude_audio():
    model = _model()
    cfg = LoraConfig(rank=2, target_modules=("to_q", "to_out.0", "patchify_proj", "proj_out"), exclude_audio=True)
    names = inject_lora(model, cfg)
    assert names == sorted(
        ["patchify_proj", "proj_out"]
        + [
            f"transformer_blocks.{i}.{a}.{p}"
            for i in range(2)
            for a in ("attn1", "attn2")
            for p in ("to_q", "to_out.0")
        ]
    )
    assert not any(is_audio_module(n) for n in names)
    for name in (
        "transformer_blocks.3.audio_ff.net.2",
        "audio_patchify_proj",
        "transformer_blocks.0.video_to_audio_attn.to_q",
        "av_ca_a2v_gate_adaln_single.linear",
    ):
        assert is_audio_module(name), name
    for name in ("transformer_blocks.3.ff.net.2", "patchify_proj", "transformer_blocks.0.attn2.to_k"):
        assert not is_audio_module(name), name


def test_merge_equals_unmerged_and_restores_base_keys():
    model = _model()
    base_keys = set(model.state_dict())
    inject_lora(model, LoraConfig(rank=4, alpha=2))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    video, audio = _inputs()
    with torch.no_grad():
        ref = model(video, audio)
        merged = merge_lora(model)
        out = model(video, audio)
    assert len(merged) == 48 and set(model.state_dict()) == base_keys
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    for a, b in zip(out, ref, strict=True):  # float32 reassociation only
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_meta_injection_then_init_matches_eager():
    eager = _model()
    inject_lora(eager, LoraConfig(rank=4), generator=torch.Generator().manual_seed(11))
    with torch.device("meta"):
        lazy = ToyAVModel()
    inject_lora(lazy, LoraConfig(rank=4), generator=torch.Generator().manual_seed(99))
    assert all(p.is_meta for p in lazy.parameters())
    with pytest.raises(ValueError, match="on meta"):
        init_lora_parameters(lazy)
    lazy.to_empty(device="cpu")
    init_lora_parameters(lazy, torch.Generator().manual_seed(11))
    ours, ref = lora_state_dict(lazy), lora_state_dict(eager)
    assert list(ours) == list(ref)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def test_load_lora_weights_and_strength():
    model = _model()
    inject_lora(model, LoraConfig(rank=2))
    gen = torch.Generator().manual_seed(2)
    tensors = {k: torch.randn(v.shape, generator=gen) for k, v in lora_state_dict(model).items()}
    load_lora_weights(model, tensors, strength=0.5)
    got = lora_state_dict(model)
    for k, t in tensors.items():
        assert torch.equal(got[k], t * 0.5 if k.endswith("lora_B.weight") else t), k
    with pytest.raises(ValueError, match="1 missing"):
        load_lora_weights(model, {k: v for k, v in list(tensors.items())[1:]})
    bad = dict(tensors)
    first = next(iter(bad))
    bad[first] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        load_lora_weights(model, bad)


def test_errors():
    model = _model()
    with pytest.raises(ValueError, match=r"no nn.Linear matches .*'to_query'.*Linear modules available: patchify_proj"):
        inject_lora(model, LoraConfig(target_modules=("to_query",)))
    with pytest.raises(ValueError, match="'transformer_blocks.0.attn1.to_out' .* Sequential"):
        inject_lora(_model(), LoraConfig(target_modules=("to_out",)))
    inject_lora(model, LoraConfig(rank=2))
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model, LoraConfig(rank=2))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        init_lora_parameters(_model())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"target_modules": ()}, "target_modules"),
        ({"target_modules": "to_q"}, "string"),
        ({"target_modules": ("to_q", "")}, "target_modules"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


def test_config_defaults_match_reference():
    cfg = LoraConfig(target_modules=["to_q"])
    assert cfg.target_modules == ("to_q",)
    default = LoraConfig()
    assert (default.rank, default.alpha, default.dropout) == (64, 64, 0.0)
    assert default.target_modules == ("to_k", "to_q", "to_v", "to_out.0") and default.scaling == 1.0
