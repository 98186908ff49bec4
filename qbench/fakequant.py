"""Fake quantization of activations and the KV cache inside a model (weights are quantized by the solvers).

- Activations: every Linear inside the decoder blocks gets an `input_quantizer` submodule run by a forward
  pre-hook, registered after any online rotation (so it sees the rotated input the weight multiplies) and
  before the pipeline's capture hooks (so X̃, H and G include the activation error, as in the paper).
- KV cache: keys (after RoPE) and values are quantized per head inside attention, through a transformers
  attention function registered under the name `qbench_kv+<base>` that wraps the model's own one. With
  QuaRot, R3 (a Hadamard on q and k after RoPE, exact since ⟨Rq, Rk⟩ = ⟨q, k⟩) spreads key outliers
  before they are quantized. Per-token scales make quantizing inside attention identical to quantizing
  what a generation cache would store.

`set_enabled(module, False)` turns the quantizers off in a module tree (the float reference copy of a block).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qbench.models import decoder_blocks, linear_groups
from qbench.quantizers import MX_BLOCK, DynamicSpec, quantize_dynamic
from qbench.transforms.hadamard import factorize, hadamard_transform
from qbench.transforms.rotation import rotation_signs

INPUT_ATTR = "input_quantizer"
KV_ATTR = "kv_quantizer"
KV_PREFIX = "qbench_kv+"


class InputQuantizer(nn.Module):
    """Dynamic fake quantization of a Linear's input (per token, or MX blocks of 32)."""

    def __init__(self, spec: DynamicSpec) -> None:
        super().__init__()
        self.spec = spec
        self.enabled = True

    def forward(self, x: Tensor) -> Tensor:
        return quantize_dynamic(x, self.spec) if self.enabled else x

    def extra_repr(self) -> str:
        return f"{self.spec}, enabled={self.enabled}"


class KVQuantizer(nn.Module):
    """Per-head fake quantization of keys and values, after an optional R3 Hadamard on queries and keys."""

    def __init__(self, spec: DynamicSpec, head_dim: int, r3_signs: Tensor | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.enabled = True
        self.r3 = r3_signs is not None
        if self.r3:
            factorize(head_dim)  # one line if head_dim has no Hadamard matrix
            self.register_buffer("r3_signs", r3_signs.detach().clone().float(), persistent=False)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.r3:  # exact: attention scores only see ⟨q, k⟩
            query = hadamard_transform(query, self.r3_signs)
            key = hadamard_transform(key, self.r3_signs)
        if self.enabled:
            key, value = quantize_dynamic(key, self.spec), quantize_dynamic(value, self.spec)
        return query, key, value

    def extra_repr(self) -> str:
        return f"{self.spec}, r3={self.r3}, enabled={self.enabled}"


def _quantize_input_hook(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook (module-level so deepcopy keeps it): x → module.input_quantizer(x)."""
    if not args:
        return None
    return (getattr(module, INPUT_ATTR)(args[0]), *args[1:])


def check_fits(model: nn.Module, activations: DynamicSpec, kv: DynamicSpec) -> None:
    """One-line ValueError if a group size does not divide the dimension it groups (before any work)."""
    if activations.enabled:
        group_size = MX_BLOCK if activations.format == "mxfp4" else activations.group_size
        for block in decoder_blocks(model)[:1]:  # every block has the same shapes
            for group in linear_groups(block):
                for name, layer in group:
                    if group_size not in (-1, None) and layer.in_features % group_size:
                        what = "MXFP4 blocks" if activations.format == "mxfp4" else "quant.a_group_size"
                        raise ValueError(f"{what} of {group_size} do not divide the {layer.in_features} input "
                                         f"features of {name}; choose a group size that does")
    if kv.enabled and kv.group_size not in (-1, None):
        head_dim = decoder_blocks(model)[0].self_attn.head_dim
        if head_dim % kv.group_size:
            raise ValueError(f"quant.kv_group_size={kv.group_size} does not divide head_dim={head_dim}")


def attach_input_quantizers(model: nn.Module, spec: DynamicSpec) -> int:
    """Quantize the input of every Linear inside the decoder blocks; returns how many were hooked."""
    check_fits(model, spec, DynamicSpec())
    count = 0
    for block in decoder_blocks(model):
        for group in linear_groups(block):
            for _name, layer in group:
                if hasattr(layer, INPUT_ATTR):
                    raise ValueError(f"{type(layer).__name__} already quantizes its input")
                setattr(layer, INPUT_ATTR, InputQuantizer(spec))
                layer.register_forward_pre_hook(_quantize_input_hook)
                count += 1
    return count


def _kv_attention(base: str):
    """An attention function that routes q, k, v through the module's KVQuantizer, then runs `base`."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
        quantizer = getattr(module, KV_ATTR, None)
        if quantizer is not None:
            query, key, value = quantizer(query, key, value)
        if base == "eager":
            from transformers.models.llama.modeling_llama import eager_attention_forward

            return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return ALL_ATTENTION_FUNCTIONS[base](module, query, key, value, attention_mask, **kwargs)

    return attention


def _register_kv_attention(base: str) -> str:
    """Register `qbench_kv+<base>` (attention and mask) with transformers once; returns the name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    name = KV_PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        if base != "eager" and base not in ALL_ATTENTION_FUNCTIONS:
            raise ValueError(f"KV-cache quantization cannot wrap attention implementation {base!r}")
        AttentionInterface.register(name, _kv_attention(base))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def attach_kv_quantizers(model: nn.Module, spec: DynamicSpec, r3_seed: int | None = None) -> dict:
    """Quantize keys and values per head in every attention layer; R3 with seeded signs when r3_seed is set.

    Returns what was done (for the results row)."""
    base = model.config._attn_implementation or "eager"
    if base.startswith(KV_PREFIX):
        raise ValueError("the KV cache of this model is already quantized")
    check_fits(model, DynamicSpec(), spec)
    head_dim = decoder_blocks(model)[0].self_attn.head_dim
    for b, block in enumerate(decoder_blocks(model)):
        signs = None if r3_seed is None else rotation_signs(head_dim, r3_seed, "R3", b)
        setattr(block.self_attn, KV_ATTR, KVQuantizer(spec, head_dim, signs))
    model.set_attn_implementation(_register_kv_attention(base))
    return {"kv_attention": base, "kv_r3": r3_seed is not None}


def set_enabled(module: nn.Module, enabled: bool) -> None:
    """Switch every activation and KV quantizer under `module` on or off (rotations stay)."""
    for m in module.modules():
        if isinstance(m, (InputQuantizer, KVQuantizer)):
            m.enabled = enabled


def has_fake_quant(module: nn.Module) -> bool:
    return any(isinstance(m, (InputQuantizer, KVQuantizer)) for m in module.modules())


@torch.no_grad()
def attach(model: nn.Module, activations: DynamicSpec, kv: DynamicSpec, r3_seed: int | None) -> dict:
    """Attach what the quant config asks for; nothing when both are at 16 bits."""
    report: dict = {}
    if activations.enabled:
        report["activation_quantizers"] = attach_input_quantizers(model, activations)
    if kv.enabled:
        report.update(attach_kv_quantizers(model, kv, r3_seed))
    return report
