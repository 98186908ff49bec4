"""Activation and KV-cache fake quantization inside a model: exact when off, per definition when on."""

import copy

import pytest
import torch
from omegaconf import OmegaConf

from qbench import fakequant
from qbench.pipeline import quantize_model
from qbench.quantizers import DynamicSpec, GridSpec, quantize_dynamic
from qbench.transforms.hadamard import hadamard_transform
from qbench.transforms.rotation import apply_incoherence, apply_quarot, rotation_signs

OFF = DynamicSpec(bits=16)
A4 = DynamicSpec(bits=4)


def ids(batch=2, length=24, seed=0):
    return torch.randint(2, 258, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x):
    return model(input_ids=x, use_cache=False).logits


def test_all_widths_at_16_bits_leave_the_float_model_exactly(tiny_llama):
    x = ids()
    reference = logits(tiny_llama, x)
    assert fakequant.attach_input_quantizers(tiny_llama, OFF) == 14
    fakequant.attach_kv_quantizers(tiny_llama, OFF)
    assert tiny_llama.config._attn_implementation == "qbench_kv+sdpa"
    assert torch.equal(logits(tiny_llama, x), reference)


def test_quantizers_change_the_model_and_switch_off_exactly(tiny_llama):
    x = ids()
    reference = logits(tiny_llama, x)
    fakequant.attach(tiny_llama, A4, DynamicSpec(bits=4), r3_seed=None)
    quantized = logits(tiny_llama, x)
    assert not torch.allclose(quantized, reference, atol=1e-3)
    fakequant.set_enabled(tiny_llama, False)
    assert torch.equal(logits(tiny_llama, x), reference)
    fakequant.set_enabled(tiny_llama, True)
    assert torch.equal(logits(tiny_llama, x), quantized)


def test_more_bits_less_error(tiny_llama):
    x = ids()
    reference = logits(tiny_llama, x)
    errors = {}
    for bits in (4, 8):
        model = copy.deepcopy(tiny_llama)
        fakequant.attach(model, DynamicSpec(bits=bits), DynamicSpec(bits=bits), r3_seed=None)
        errors[bits] = (logits(model, x) - reference).norm() / reference.norm()
    assert errors[8] < errors[4] / 4


def test_each_linear_sees_its_per_token_quantized_input(tiny_llama):
    """The quantizer runs after an online rotation: the weight multiplies Q_a(R x)."""
    x = ids()
    raw, seen = [], []
    layer = tiny_llama.model.layers[1].mlp.down_proj
    apply_incoherence(tiny_llama, seed=0)
    raw_hook = layer.register_forward_pre_hook(lambda m, a: raw.append(a[0].clone()), prepend=True)
    fakequant.attach_input_quantizers(tiny_llama, A4)
    seen_hook = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    logits(tiny_llama, x)
    raw_hook.remove(), seen_hook.remove()
    signs = layer.input_rotation.signs
    expected = quantize_dynamic(hadamard_transform(raw[0], signs), A4)
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)


def test_kv_quantizer_quantizes_each_head_vector_of_keys_and_values():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, h, 5, 16, generator=g) for h in (4, 2, 2))
    spec = DynamicSpec(bits=4, group_size=8)
    out_q, out_k, out_v = fakequant.KVQuantizer(spec, head_dim=16)(q, k, v)
    assert torch.equal(out_q, q)
    assert torch.equal(out_k, quantize_dynamic(k, spec)) and torch.equal(out_v, quantize_dynamic(v, spec))
    for vec in out_k.reshape(-1, 8):  # one scale per (token, head, group of 8)
        assert vec.unique().numel() <= 16


def test_r3_is_exact_in_float64(tiny_llama):
    """⟨R3 q, R3 k⟩ = ⟨q, k⟩: adding R3 to a QuaRot-rotated model changes nothing but rounding."""
    model = tiny_llama.double()
    x = ids()
    apply_quarot(model, seed=0)
    reference = logits(model, x)
    fakequant.attach_kv_quantizers(model, OFF, r3_seed=0)
    attn = model.model.layers[1].self_attn
    assert attn.kv_quantizer.r3 and torch.equal(attn.kv_quantizer.r3_signs, rotation_signs(16, 0, "R3", 1).float())
    out = logits(model, x)
    assert ((out - reference).norm() / reference.norm()) < 1e-9


def test_r3_lowers_the_attention_score_error_of_4_bit_keys():
    """Spread outliers quantize better: with one key channel 20x the rest, per-head 4-bit keys distort the
    scores qᵀk far less after R3 (which leaves the float scores unchanged)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(3))
    k[..., 3] *= 20
    scores = q @ k.transpose(-1, -2)
    errors = {}
    for signs in (None, rotation_signs(16, 0, "R3", 0)):
        out_q, out_k, _ = fakequant.KVQuantizer(DynamicSpec(bits=4), 16, signs)(q, k, v)
        errors[signs is not None] = float((out_q @ out_k.transpose(-1, -2) - scores).norm() / scores.norm())
    assert errors[True] < 0.7 * errors[False]  # 0.047 vs 0.082 here


def test_kv_group_size_must_divide_head_dim(tiny_llama):
    with pytest.raises(ValueError, match="does not divide head_dim=16"):
        fakequant.attach_kv_quantizers(tiny_llama, DynamicSpec(bits=4, group_size=5))


def test_eager_attention_is_wrapped_too(tiny_llama):
    tiny_llama.set_attn_implementation("eager")
    x = ids()
    reference = logits(tiny_llama, x)
    fakequant.attach_kv_quantizers(tiny_llama, OFF)
    assert tiny_llama.config._attn_implementation == "qbench_kv+eager"
    assert torch.equal(logits(tiny_llama, x), reference)


def test_calibration_sees_quantized_activations_in_X_tilde_only(tiny_llama, monkeypatch):
    """With A4, X̃ (quantized stream) differs from X (float block) even at the first block's q/k/v, so the
    statistics carry the activation error: G ≠ H there, and H is built from Q_a(x)."""
    import qbench.pipeline as pipeline

    fakequant.attach_input_quantizers(tiny_llama, A4)
    seen = {}

    class Recording:
        module, needs_H, needs_G = "recording", True, True

        @staticmethod
        def quantize(W, H, G, quantizer, *, info=None):
            seen.setdefault("HG", (H.clone(), G.clone()))
            return quantizer(W, torch.arange(W.shape[1]))

    monkeypatch.setitem(pipeline.REGISTRY, "recording", Recording)
    x = ids(4, 24)
    inputs = []
    layer = tiny_llama.model.layers[0].self_attn.q_proj
    hook = layer.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    fakequant.set_enabled(tiny_llama, False)
    logits(tiny_llama, x)
    fakequant.set_enabled(tiny_llama, True)
    logits(tiny_llama, x)
    hook.remove()
    X, Xq = inputs
    quantize_model(tiny_llama, GridSpec(bits=4), OmegaConf.create({"name": "recording"}), x, batch_size=4,
                   progress=False)
    H, G = seen["HG"]
    m = x.numel()
    torch.testing.assert_close(H, Xq.T @ Xq / m, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(G, X.T @ Xq / m, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(G, H, rtol=1e-3, atol=1e-5)
    assert all(q.enabled for q in tiny_llama.modules() if isinstance(q, fakequant.InputQuantizer))
