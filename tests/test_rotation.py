"""Model-level rotations: exact invariance of the logits, the weights really rotated, online rotations that
survive deepcopy/.to() and come before later pre-hooks, incoherence, and clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qbench.models import decoder_blocks, linear_groups, tiny_model
from qbench.pipeline import _capture_input, capture_block_inputs
from qbench.transforms.hadamard import orthonormal_hadamard, random_signs
from qbench.transforms.rotation import (
    OnlineHadamard,
    _derive_seed,
    add_online_rotation,
    apply_incoherence,
    apply_quarot,
    apply_rotation,
    has_online_rotation,
)

BASE = {"model_type": "llama", "vocab_size": 61, "num_hidden_layers": 2, "max_position_embeddings": 64,
        "bos_token_id": 0, "eos_token_id": 1, "rms_norm_eps": 1e-6}
CONFIGS = {
    # hidden 48 = 12·4, head_dim 12, GQA 4:2, intermediate 80 = 20·4, tied embeddings
    "llama-48-gqa-tied": dict(BASE, hidden_size=48, intermediate_size=80, num_attention_heads=4,
                              num_key_value_heads=2, tie_word_embeddings=True),
    # powers of two, untied, with every bias Llama allows (R1 on o/down biases, R2 on v biases)
    "llama-64-bias-untied": dict(BASE, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                 num_key_value_heads=2, tie_word_embeddings=False, attention_bias=True,
                                 mlp_bias=True),
    # hidden 96 = 12·8, head_dim 24 = 12·2, multi-query (1 KV head), intermediate 160 = 20·8
    "llama-96-mqa-tied": dict(BASE, hidden_size=96, intermediate_size=160, num_attention_heads=4,
                              num_key_value_heads=1, tie_word_embeddings=True),
    # Qwen3: biases on q/k/v and per-head q/k RMSNorms after the projections
    "qwen3-48": dict(BASE, model_type="qwen3", hidden_size=48, intermediate_size=80, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=12, tie_word_embeddings=True, attention_bias=True),
}
KINDS = ("hadamard", "quarot", "quarot+hadamard")


@pytest.fixture(autouse=True)
def _float64_rmsnorm(monkeypatch):
    """transformers' RMSNorms compute in float32 whatever the input dtype; float64 invariance needs float64.

    Same numbers as the original for float32/16 inputs (promote_types keeps float32 there)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        h = hidden_states.to(torch.promote_types(dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)

    for cls in (LlamaRMSNorm, Qwen3RMSNorm):
        monkeypatch.setattr(cls, "forward", forward)


def _model(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """Tiny random model with non-trivial RMSNorm γ (random positive) and biases, so folding is tested."""
    model = tiny_model(CONFIGS[name], seed=seed).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=g))
            elif isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.copy_(0.05 * torch.randn(module.bias.shape, generator=g))
    return model


def _ids(model: nn.Module, batch: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(2, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _linears(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{i}.{name}": layer.weight.detach().clone()
            for i, block in enumerate(decoder_blocks(model)) for group in linear_groups(block) for name, layer in group}


# ------------------------------------------------------------------------------------------------ invariance


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_unchanged_float64(name, kind):
    model = _model(name)
    ids = _ids(model)
    before = _logits(model, ids)
    apply_rotation(model, kind, seed=3)
    assert _rel(_logits(model, ids), before) < 1e-9


@pytest.mark.parametrize("kind", KINDS)
def test_logits_unchanged_float32(kind):
    model = _model("llama-48-gqa-tied", torch.float32)
    ids = _ids(model)
    before = _logits(model, ids)
    report = apply_rotation(model, kind, seed=0)
    assert _rel(_logits(model, ids), before) < 1e-4
    assert report["seconds"] >= 0 and report["rotation"] == kind


def test_composition_of_the_two_functions_equals_dispatch():
    a, b = _model("llama-96-mqa-tied"), _model("llama-96-mqa-tied")
    apply_quarot(a, seed=5)
    apply_incoherence(a, seed=5)
    apply_rotation(b, "quarot+hadamard", seed=5)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name
    down = decoder_blocks(a)[0].mlp.down_proj
    assert isinstance(down.input_rotation, nn.Sequential) and len(down.input_rotation) == 2  # R4, then incoherence
    assert sum(1 for _ in down._forward_pre_hooks.values()) == 1  # composed in one hook, order kept


def test_none_is_a_no_op():
    model = _model("llama-48-gqa-tied")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert apply_rotation(model, "none", seed=0)["rotation"] == "none"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_incoherence_on_gemma3():
    """Incoherence touches only Linear pairs (W Rᵀ)(R x), so it holds for any supported block layout."""
    model = tiny_model({"model_type": "gemma3_text", "vocab_size": 61, "hidden_size": 48, "intermediate_size": 80,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 12})
    ids = _ids(model)
    before = _logits(model, ids)
    assert apply_incoherence(model, seed=0)["layers_rotated"] == 14
    assert _rel(_logits(model, ids), before) < 1e-4


# ------------------------------------------------------------------------------------------------ the weights


def test_incoherence_folds_dense_rotation_into_every_linear():
    model = _model("llama-48-gqa-tied")
    before = _linears(model)
    report = apply_incoherence(model, seed=7)
    assert report["layers_rotated"] == 7 * 2
    for b, block in enumerate(decoder_blocks(model)):
        for j, group in enumerate(linear_groups(block)):
            n = group[0][1].in_features
            R = orthonormal_hadamard(n, _derive_seed(7, "incoherence", b, j))
            for name, layer in group:
                assert has_online_rotation(layer), name
                torch.testing.assert_close(layer.weight, before[f"{b}.{name}"] @ R.T, rtol=0, atol=1e-12)
                torch.testing.assert_close(layer.input_rotation.matrix(), R, rtol=0, atol=1e-15)
                assert not torch.allclose(layer.weight, before[f"{b}.{name}"], atol=1e-3)
            # layers sharing an input share R: the pipeline solves q/k/v and gate/up from one captured input
            assert all(torch.equal(layer.input_rotation.signs, group[0][1].input_rotation.signs) for _, layer in group)


@pytest.mark.parametrize("name", ["llama-48-gqa-tied", "llama-64-bias-untied"])
def test_quarot_weights(name):
    model = _model(name)
    config = model.config
    embed0 = model.get_input_embeddings().weight.detach().clone()
    head0 = model.get_output_embeddings().weight.detach().clone()
    final_gamma = model.model.norm.weight.detach().clone()
    blocks0 = copy.deepcopy(decoder_blocks(model))
    report = apply_quarot(model, seed=2)

    hd, kv, heads = model.model.layers[0].self_attn.head_dim, config.num_key_value_heads, config.num_attention_heads
    R1 = orthonormal_hadamard(config.hidden_size, _derive_seed(2, "R1"))
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert report["untied"] == CONFIGS[name]["tie_word_embeddings"]
    assert head.weight is not embed.weight and not config.tie_word_embeddings
    torch.testing.assert_close(embed.weight, embed0 @ R1.T, rtol=0, atol=1e-12)  # rows e → R1 e
    torch.testing.assert_close(head.weight, head0 * final_gamma @ R1.T, rtol=0, atol=1e-12)
    assert torch.equal(model.model.norm.weight, torch.ones_like(final_gamma))
    for b, (block, old) in enumerate(zip(decoder_blocks(model), blocks0)):
        attn, mlp, a0, m0 = block.self_attn, block.mlp, old.self_attn, old.mlp
        assert torch.equal(block.input_layernorm.weight, torch.ones_like(old.input_layernorm.weight))
        assert torch.equal(block.post_attention_layernorm.weight, torch.ones_like(old.post_attention_layernorm.weight))
        g1, g2 = old.input_layernorm.weight, old.post_attention_layernorm.weight
        R2 = orthonormal_hadamard(hd, _derive_seed(2, "R2", b))
        R4 = orthonormal_hadamard(mlp.down_proj.in_features, _derive_seed(2, "R4", b))
        # q/k: norm folded, R1 on the input
        for new, ref in ((attn.q_proj, a0.q_proj), (attn.k_proj, a0.k_proj)):
            torch.testing.assert_close(new.weight, ref.weight * g1 @ R1.T, rtol=0, atol=1e-12)
        # v: also R2 on each KV head's output rows
        Wv = (ref_v := a0.v_proj).weight * g1 @ R1.T
        torch.testing.assert_close(attn.v_proj.weight, torch.block_diag(*[R2] * kv) @ Wv, rtol=0, atol=1e-12)
        # o: R2ᵀ on each query head's input columns, R1 on the output rows
        Wo = R1 @ a0.o_proj.weight @ torch.block_diag(*[R2.T] * heads)
        torch.testing.assert_close(attn.o_proj.weight, Wo, rtol=0, atol=1e-12)
        for new, ref in ((mlp.gate_proj, m0.gate_proj), (mlp.up_proj, m0.up_proj)):
            torch.testing.assert_close(new.weight, ref.weight * g2 @ R1.T, rtol=0, atol=1e-12)
        torch.testing.assert_close(mlp.down_proj.weight, R1 @ m0.down_proj.weight @ R4.T, rtol=0, atol=1e-12)
        torch.testing.assert_close(mlp.down_proj.input_rotation.matrix(), R4, rtol=0, atol=1e-15)
        assert has_online_rotation(mlp.down_proj)
        assert not any(has_online_rotation(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                                                        mlp.gate_proj, mlp.up_proj))
        if ref_v.bias is not None:  # biases: R2 per head on v, R1 on o and down; input-side biases untouched
            torch.testing.assert_close(attn.v_proj.bias, torch.block_diag(*[R2] * kv) @ ref_v.bias, rtol=0, atol=1e-12)
            torch.testing.assert_close(attn.o_proj.bias, R1 @ a0.o_proj.bias, rtol=0, atol=1e-12)
            torch.testing.assert_close(mlp.down_proj.bias, R1 @ m0.down_proj.bias, rtol=0, atol=1e-12)
            assert torch.equal(attn.q_proj.bias, a0.q_proj.bias)


def test_quarot_untied_head_survives_save_and_reload(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model("llama-48-gqa-tied", torch.float32)
    apply_quarot(model, seed=0)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert not loaded.config.tie_word_embeddings
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert not torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)


def test_seed_controls_the_signs():
    a, b, c = (_model("llama-48-gqa-tied") for _ in range(3))
    apply_quarot(a, seed=0), apply_quarot(b, seed=0), apply_quarot(c, seed=1)
    assert torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    assert not torch.allclose(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


# ------------------------------------------------------------------------------------------------ online rotation


@torch.no_grad()
def _out(block: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def test_online_rotation_survives_deepcopy_and_to():
    model = _model("llama-64-bias-untied", torch.float32)
    ids = _ids(model)
    hidden, kwargs = capture_block_inputs(model, ids, batch_size=2, device=torch.device("cpu"))
    reference = copy.deepcopy(decoder_blocks(model)[0])
    apply_incoherence(model, seed=0)
    block = decoder_blocks(model)[0]
    x, kw = hidden[0], kwargs[0]
    kw64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else
                tuple(t.double() for t in v) if isinstance(v, tuple) else v) for k, v in kw.items()}
    twin = copy.deepcopy(block).to("cpu", torch.float32)
    twin64 = copy.deepcopy(block).to("cpu", torch.float64)
    want, own, got = _out(reference, x, kw), _out(block, x, kw), _out(twin, x, kw)
    got64 = _out(twin64, x.double(), kw64)
    assert torch.equal(got, own)
    assert _rel(got, want) < 1e-5 and _rel(got64.float(), want) < 1e-5
    for copied in (twin, twin64):
        for _, layer in (pair for group in linear_groups(copied) for pair in group):
            assert has_online_rotation(layer)
            assert layer.input_rotation.signs.data_ptr() != block.self_attn.q_proj.input_rotation.signs.data_ptr()
    assert twin64.mlp.down_proj.input_rotation.signs.dtype == torch.float64
    # not vacuous: without the online rotation the rotated weights give a different output
    twin.mlp.down_proj._forward_pre_hooks.clear()
    assert _rel(_out(twin, x, kw), want) > 1e-2


def test_later_pre_hooks_see_the_rotated_input():
    layer = nn.Linear(48, 5, dtype=torch.float64)
    W, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    R, signs = orthonormal_hadamard(48, 11), random_signs(48, 11)
    with torch.no_grad():
        layer.weight.copy_(W @ R.T)
    add_online_rotation(layer, OnlineHadamard(48, signs))
    seen = []
    layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    x = torch.randn(3, 48, dtype=torch.float64)
    y = layer(x)
    torch.testing.assert_close(seen[0], x @ R.T, rtol=0, atol=1e-13)  # each row x → R x
    torch.testing.assert_close(y, x @ W.T + bias, rtol=0, atol=1e-13)


def test_pipeline_capture_sees_rotated_input():
    """The pipeline's own capture hook (registered later) returns R x, the input the rotated W multiplies."""
    model = _model("llama-48-gqa-tied", torch.float32)
    hidden, kwargs = capture_block_inputs(model, _ids(model), batch_size=2, device=torch.device("cpu"))
    block = decoder_blocks(model)[0]
    plain = {name: _capture_input(block, layer, hidden[0], kwargs[0]) for name, layer in
             (group[0] for group in linear_groups(block))}
    apply_incoherence(model, seed=0)
    for name, layer in (group[0] for group in linear_groups(block)):
        R = layer.input_rotation.matrix(torch.float32)
        torch.testing.assert_close(_capture_input(block, layer, hidden[0], kwargs[0]), plain[name] @ R.T,
                                   rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ purpose


def _incoherence(t: torch.Tensor) -> float:
    """max|t| / rms(t): √N for one spike, ~3-4 for Gaussian data."""
    t = t.detach()
    return float(t.abs().max() / t.pow(2).mean().sqrt())


def test_incoherence_spreads_planted_outliers():
    model = _model("llama-64-bias-untied", torch.float32)
    block = decoder_blocks(model)[0]
    with torch.no_grad():
        block.self_attn.q_proj.weight[3, 17] = 1.0  # ~50σ weight outlier
        block.input_layernorm.weight[5] = 40.0  # an outlier activation channel into q/k/v
    hidden, kwargs = capture_block_inputs(model, _ids(model), batch_size=2, device=torch.device("cpu"))
    q = block.self_attn.q_proj
    w_before, x_before = _incoherence(q.weight), _incoherence(_capture_input(block, q, hidden[0], kwargs[0]))
    apply_incoherence(model, seed=0)
    w_after, x_after = _incoherence(q.weight), _incoherence(_capture_input(block, q, hidden[0], kwargs[0]))
    assert w_after < w_before / 4, (w_before, w_after)
    assert x_after < x_before / 2, (x_before, x_after)


# ------------------------------------------------------------------------------------------------ errors


def _one_line_error(fn, *match: str) -> str:
    with pytest.raises(ValueError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for m in match:
        assert m in message, message
    return message


def test_unsupported_architectures():
    gpt2 = tiny_model({"model_type": "gpt2", "vocab_size": 32, "n_embd": 16, "n_layer": 1, "n_head": 2,
                       "n_positions": 16})
    _one_line_error(lambda: apply_rotation(gpt2, "hadamard", 0), "GPT2LMHeadModel", "gpt2")
    _one_line_error(lambda: apply_rotation(gpt2, "quarot", 0), "GPT2LMHeadModel", "gpt2")
    gemma = tiny_model({"model_type": "gemma3_text", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
                        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8})
    _one_line_error(lambda: apply_quarot(gemma, 0), "gemma3_text")


def test_order_size_and_kind_errors():
    model = _model("llama-48-gqa-tied")
    _one_line_error(lambda: apply_rotation(model, "spinquant", 0), "spinquant")
    bad = _model("llama-48-gqa-tied")
    bad.model.layers[0].mlp.down_proj = nn.Linear(50, 48, dtype=torch.float64)  # 50 = 2·25: no H_50
    state = {k: v.clone() for k, v in bad.state_dict().items()}
    _one_line_error(lambda: apply_incoherence(bad, 0), "size 50")
    assert all(torch.equal(v, bad.state_dict()[k]) for k, v in state.items())  # checked before any change
    apply_incoherence(model, 0)
    _one_line_error(lambda: apply_quarot(model, 0), "before hadamard")
    again = _model("llama-48-gqa-tied")
    apply_quarot(again, 0)
    _one_line_error(lambda: apply_quarot(again, 0), "only once")
