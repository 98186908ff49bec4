"""SmoothQuant equalization: the scale formula, the grouped-query layout of v → o, exact invariance of a tiny
random GQA Llama, flattened activation maxima, and the block-by-block statistics of `input_absmax`."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_LLAMA
from torch import nn

from qbench.models import decoder_blocks, tiny_model
from qbench.pipeline import input_absmax
from qbench.transforms.equalize import (
    EPSILON,
    MIN_SCALE,
    apply_smoothquant,
    fold_norm_to_linears,
    kv_group_max,
    repeat_over_heads,
    smoothquant_scales,
)


pytestmark = pytest.mark.usefixtures("one_thread")


class RMSNorm64(nn.Module):
    """RMSNorm computed in the input's dtype. transformers' LlamaRMSNorm upcasts to float32 and casts back
    (`hidden_states.to(torch.float32)` ... `.to(input_dtype)`), which caps a float64 model at float32 precision."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _gqa_llama(dtype: torch.dtype) -> nn.Module:
    """TINY_LLAMA (4 heads, 2 KV heads) with random, outlier-heavy norm weights; float64 uses RMSNorm64."""
    assert TINY_LLAMA["num_key_value_heads"] < TINY_LLAMA["num_attention_heads"]
    model = tiny_model(TINY_LLAMA, seed=0).to(dtype)
    g = torch.Generator().manual_seed(1)
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RMSNorm"):
            w = torch.exp(0.5 * torch.randn(module.weight.shape, generator=g, dtype=torch.float64))
            w[torch.randperm(w.numel(), generator=g)[:3]] *= 10.0  # outlier channels
            with torch.no_grad():
                module.weight.copy_(w.to(dtype))
            if dtype == torch.float64:
                parent_name, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent_name), attr, RMSNorm64(module.weight, module.variance_epsilon))
    return model


@pytest.fixture(scope="module")
def ids():
    return torch.randint(2, TINY_LLAMA["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(0))


def test_scales_formula():
    a = torch.tensor([4.0, 1.0, 0.25, 9.0, 0.0, 2.0])
    w = torch.tensor([1.0, 4.0, 0.5, 0.0, 3.0, 1e-12])
    s = smoothquant_scales(a, w, 0.5)
    assert s.dtype == torch.float64
    torch.testing.assert_close(s[:3], torch.tensor([2.0, 0.5, 0.5 ** 0.5], dtype=torch.float64))
    assert (s[3:] == 1).all()  # a zero (≤ EPSILON) statistic on either side: not equalized
    s3 = smoothquant_scales(a[:3], w[:3], 0.3)
    torch.testing.assert_close(s3, a[:3].double() ** 0.3 / w[:3].double() ** 0.7)
    torch.testing.assert_close(smoothquant_scales(a[:3], w[:3], 1.0), a[:3].double())
    torch.testing.assert_close(smoothquant_scales(a[:3], w[:3], 0.0), 1 / w[:3].double())
    tiny = smoothquant_scales(torch.tensor([2 * EPSILON]), torch.tensor([1e6]), 0.5)
    assert tiny.item() == MIN_SCALE
    # after the fold, max|X_j / s_j| and max|W_{:,j} s_j| are balanced: a^(1-α) w^α each way
    x_max, w_max = a[:3].double() / s[:3], w[:3].double() * s[:3]
    torch.testing.assert_close(x_max, w_max)
    with pytest.raises(ValueError):
        smoothquant_scales(a, w, 1.5)


def test_gqa_layout_matches_repeat_kv():
    """KV channel (g, c) feeds o_proj columns (h, c) for the query heads h of group g, as repeat_kv lays them out."""
    from transformers.models.llama.modeling_llama import repeat_kv

    n_kv, rep, d = 2, 3, 4
    v = torch.arange(n_kv * d, dtype=torch.float64)  # value channel ids, laid out [n_kv, d]
    heads = repeat_kv(v.view(1, n_kv, 1, d), rep)  # [1, n_kv·rep, 1, d]
    o_in = heads.reshape(-1)  # o_proj input channel h·d + c holds value channel ...
    torch.testing.assert_close(repeat_over_heads(v, d, rep), o_in)
    x = torch.rand(n_kv * rep * d, dtype=torch.float64)
    expect = torch.stack([x[o_in == j].max() for j in range(n_kv * d)])
    torch.testing.assert_close(kv_group_max(x, d, rep), expect)


@pytest.mark.parametrize("dtype,alpha,tol", [(torch.float64, 0.3, 1e-9), (torch.float32, 0.5, 1e-4)])
def test_smoothquant_leaves_logits_unchanged(ids, dtype, alpha, tol):
    model = _gqa_llama(dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        ref = model(ids).logits
    stats = input_absmax(model, ids, batch_size=2)
    scales = apply_smoothquant(model, stats, alpha)
    with torch.no_grad():
        out = model(ids).logits
    rel = float((out - ref).abs().max() / ref.abs().max())
    assert rel < tol, f"SmoothQuant changed the {dtype} logits by {rel:.2e} (max abs diff / max abs logit)"

    L = TINY_LLAMA["num_hidden_layers"]
    assert len(scales) == 4 * L
    hd = TINY_LLAMA["hidden_size"] // TINY_LLAMA["num_attention_heads"]
    n_kv_ch = TINY_LLAMA["num_key_value_heads"] * hd
    assert scales["model.layers.0.self_attn.v_proj"].shape == (n_kv_ch,)  # one scale per KV channel
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    for i in range(L):
        for rel_name in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                         "self_attn.v_proj.weight", "self_attn.o_proj.weight", "mlp.up_proj.weight",
                         "mlp.down_proj.weight"):
            assert f"model.layers.{i}.{rel_name}" in changed

    after = input_absmax(model, ids, batch_size=2)
    # the activation maxima are flattened across channels
    for rel_name in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj", "self_attn.o_proj"):
        for i in range(L):
            name = f"model.layers.{i}.{rel_name}"
            ratio_before = float(stats[name].max() / stats[name].mean())
            ratio_after = float(after[name].max() / after[name].mean())
            assert ratio_after < ratio_before, (name, ratio_before, ratio_after)
    # exactness of the fold seen from the statistics: the o_proj input is divided by the repeated KV scale
    rep = TINY_LLAMA["num_attention_heads"] // TINY_LLAMA["num_key_value_heads"]
    s_o = repeat_over_heads(scales["model.layers.1.self_attn.v_proj"], hd, rep)
    torch.testing.assert_close(after["model.layers.1.self_attn.o_proj"].double(),
                               stats["model.layers.1.self_attn.o_proj"].double() / s_o,
                               rtol=10 * tol, atol=0)


def test_v_scale_is_per_kv_channel(ids):
    model = _gqa_llama(torch.float32)
    stats = input_absmax(model, ids, names_filter={"self_attn.o_proj"})
    assert set(stats) == {f"model.layers.{i}.self_attn.o_proj" for i in range(TINY_LLAMA["num_hidden_layers"])}
    hd = TINY_LLAMA["hidden_size"] // TINY_LLAMA["num_attention_heads"]
    rep = TINY_LLAMA["num_attention_heads"] // TINY_LLAMA["num_key_value_heads"]
    o = decoder_blocks(model)[0].self_attn.o_proj
    a = kv_group_max(stats["model.layers.0.self_attn.o_proj"].double(), hd, rep)
    w = kv_group_max(o.weight.detach().abs().amax(dim=0).double(), hd, rep)
    scales = apply_smoothquant(model, stats, 0.5)
    assert set(scales) == {f"model.layers.{i}.self_attn.v_proj" for i in range(TINY_LLAMA["num_hidden_layers"])}
    torch.testing.assert_close(scales["model.layers.0.self_attn.v_proj"], smoothquant_scales(a, w, 0.5))


def test_input_absmax_matches_one_full_forward(ids):
    """Block-by-block statistics equal those of hooks on one ordinary forward of the whole model."""
    model = _gqa_llama(torch.float32)
    expect: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("model.layers."):
            def hook(_m, args, name=name):
                amax = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0)
                expect[name] = amax if name not in expect else torch.maximum(expect[name], amax)
            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    got = input_absmax(model, ids, batch_size=3)  # uneven batches: 3 + 1
    assert set(got) == set(expect) and len(got) == 7 * TINY_LLAMA["num_hidden_layers"]
    for name, value in expect.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6)
    first = input_absmax(model, ids, names_filter=lambda n: n.startswith("model.layers.0."))
    assert set(first) == {n for n in expect if n.startswith("model.layers.0.")}


def test_gemma_style_norm_fold():
    """Norms that multiply by (1 + weight) are folded as (1 + w)/s − 1."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    g = torch.Generator().manual_seed(0)
    norm = Gemma3RMSNorm(8).double()
    lin = nn.Linear(8, 5, bias=False).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8, generator=g, dtype=torch.float64))
    x = torch.randn(3, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ref = lin(norm(x.float()).double())  # Gemma3RMSNorm computes in float32
        fold_norm_to_linears(norm, [lin], torch.rand(8, generator=g, dtype=torch.float64) + 0.5)
        out = lin(norm(x.float()).double())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
