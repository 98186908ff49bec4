"""Model-level rotations applied before calibration: Hadamard incoherence processing and QuaRot.

Both are exact in real arithmetic: an orthogonal R is folded into a weight on one side of a product and
its inverse Rᵀ either into the weight on the other side or applied online to the activation, so the float
model computes the same function while weights and activations lose their outlier channels (QuIP/QuIP#
incoherence, Chee et al. 2023 / Tseng et al. 2024; QuaRot, Ashkboos et al. 2024).

Conventions (design.md §4): W is [M, N] (out, in); a Linear computes W x. Every R here is
R = H_n·diag(s)/√n (hadamard.orthonormal_hadamard), so "x → R x" on a row-major batch is
hadamard_transform(x, s) and "W ← W Rᵀ" is hadamard_transform(W, s), both O(n·(K + Σb)) per row.

`preprocess.rotation`:
- `hadamard`: apply_incoherence, every Linear of every decoder block gets W ← W Rᵀ and an online x → R x.
- `quarot`: apply_quarot, rotations fused into the weights (R1, R2) plus one online Hadamard before
  down_proj (R4).
- `quarot+hadamard`: both, QuaRot first.

Online rotations are small submodules (`layer.input_rotation`) run by a forward pre-hook, so they move
with `.to(device/dtype)`, survive `copy.deepcopy`, and every pre-hook registered later (the pipeline's
capture hooks) sees the rotated input the quantized weight actually multiplies.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from qbench.models import SUPPORTED_MODEL_TYPES, decoder_blocks, linear_groups
from qbench.transforms.hadamard import (
    factorize,
    hadamard_transform,
    is_supported,
    random_signs,
)

__all__ = [
    "QUAROT_MODEL_TYPES",
    "ROTATIONS",
    "OnlineHadamard",
    "add_online_rotation",
    "apply_incoherence",
    "apply_quarot",
    "apply_rotation",
    "has_online_rotation",
]

ROTATIONS = ("none", "hadamard", "quarot", "quarot+hadamard")
# Architectures whose blocks are exactly Llama's as far as QuaRot cares: pre-norm RMSNorm x/rms(x)·γ before
# q/k/v and gate/up, a final RMSNorm before lm_head, residual stream untouched between blocks. (Qwen3's
# per-head q/k norms act after q/k_proj, on vectors R1 and R2 do not touch.) Gemma's (1 + γ) norms,
# post-norms and scaled embeddings break the fusion as written here.
QUAROT_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ROTATION_ATTR = "input_rotation"


# --------------------------------------------------------------------------------------------------------
# Online rotation of a Linear's input


class OnlineHadamard(nn.Module):
    """x → R x along the last dim, R = H_n·diag(s)/√n: the activation half of an exact rotation pair.

    `signs` is a buffer so `.to(device, dtype)` moves it and `copy.deepcopy` copies it; it is not
    persistent (kept out of `state_dict`) so the model's checkpoint keys stay the architecture's own;
    a rotated model is rebuilt by re-applying the transform, not by loading extra keys.
    """

    def __init__(self, n: int, signs: Tensor | None = None) -> None:
        super().__init__()
        factorize(n)  # raises HadamardError (one line) if there is no H_n
        if signs is None:
            signs = torch.ones(n)
        if signs.shape != (n,):
            raise ValueError(f"signs must have shape ({n},), got {tuple(signs.shape)}")
        self.n = n
        self.register_buffer("signs", signs.detach().clone().to(torch.float32), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return hadamard_transform(x, self.signs)

    def matrix(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The dense R (tests and debugging): R = H_n·diag(s)/√n."""
        return hadamard_transform(torch.eye(self.n, dtype=dtype), self.signs).T

    def extra_repr(self) -> str:
        return f"n={self.n}"


def _rotate_input_hook(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: replace the Linear's input x by module.input_rotation(x).

    A module-level function (not a closure) so deepcopy/pickle keep it, and it looks the rotation up on
    the module it is called with, so a deep-copied layer uses its own copied buffers. PyTorch hands the
    returned args to the pre-hooks registered after this one and to forward."""
    if not args:
        return None
    return (getattr(module, ROTATION_ATTR)(args[0]), *args[1:])


def has_online_rotation(layer: nn.Module) -> bool:
    """Whether `layer` rotates its input online (an `input_rotation` submodule run by the pre-hook)."""
    return isinstance(getattr(layer, ROTATION_ATTR, None), nn.Module) and any(
        hook is _rotate_input_hook for hook in layer._forward_pre_hooks.values())


def add_online_rotation(layer: nn.Module, rotation: OnlineHadamard) -> None:
    """Make `layer` see `rotation(x)` instead of x. A second call composes: x → R_new(R_old x).

    Composition keeps the single pre-hook (and so its place before any hook registered later) and
    chains the stages in an nn.Sequential under the same attribute."""
    if has_online_rotation(layer):
        old = getattr(layer, ROTATION_ATTR)
        stages = list(old) if isinstance(old, nn.Sequential) else [old]
        setattr(layer, ROTATION_ATTR, nn.Sequential(*stages, rotation.to(device=layer.weight.device)))
        return
    if hasattr(layer, ROTATION_ATTR):
        raise ValueError(f"{type(layer).__name__} already has an attribute {ROTATION_ATTR!r}")
    rotation = rotation.to(device=layer.weight.device)
    setattr(layer, ROTATION_ATTR, rotation)
    layer.register_forward_pre_hook(_rotate_input_hook)


# --------------------------------------------------------------------------------------------------------
# Folding rotations into weights (float64, cast back)


def _derive_seed(seed: int, *tags: object) -> int:
    """A reproducible 63-bit seed for one rotation (e.g. seed, "R2", block 3), independent across tags."""
    digest = hashlib.blake2b("/".join(map(str, (seed, *tags))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def rotation_signs(n: int, seed: int | None, *tags: object) -> Tensor:
    """Random ±1 of length n for the rotation named by tags (all ones when seed is None: plain Hadamard)."""
    if seed is None:
        return torch.ones(n, dtype=torch.float64)
    return random_signs(n, _derive_seed(seed, *tags))


@torch.no_grad()
def _assign(param: Tensor, value: Tensor) -> None:
    """Write a float64 result back into the parameter, in its own dtype (keeps the Parameter object)."""
    param.copy_(value.to(dtype=param.dtype))


@torch.no_grad()
def _rotate_input_side(layer: nn.Module, signs: Tensor) -> None:
    """W ← W Rᵀ: the layer now expects R x where it expected x (the bias does not see x)."""
    _assign(layer.weight, hadamard_transform(layer.weight.double(), signs))


@torch.no_grad()
def _rotate_output_side(layer: nn.Module, signs: Tensor) -> None:
    """W ← R W, b ← R b: the layer now produces R y where it produced y."""
    _assign(layer.weight, hadamard_transform(layer.weight.double().T, signs).T)
    if getattr(layer, "bias", None) is not None:
        _assign(layer.bias, hadamard_transform(layer.bias.double(), signs))


def _check_sizes(sizes: Iterable[tuple[str, int]], what: str) -> None:
    """Fail before touching any weight if some dimension has no Hadamard construction (one line)."""
    for name, n in sizes:
        if not is_supported(n):
            raise ValueError(f"{what}: {name} has size {n}, which has no Hadamard matrix here "
                             f"(need 2^k·K, see qbench.transforms.hadamard.FACTORS)")


def _architecture(model: nn.Module) -> str:
    arch = getattr(getattr(model, "config", None), "model_type", None)
    return f"{type(model).__name__} (model_type={arch!r})"


# --------------------------------------------------------------------------------------------------------
# preprocess.rotation=hadamard


def _blocks_or_raise(model: nn.Module, what: str) -> nn.ModuleList:
    """The decoder blocks, or a one-line ValueError naming the architecture."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    body = getattr(model, "model", None)
    if model_type not in SUPPORTED_MODEL_TYPES or not hasattr(body, "layers"):
        raise ValueError(f"{what} does not support {_architecture(model)}; supported model types: "
                         f"{list(SUPPORTED_MODEL_TYPES)}")
    blocks = decoder_blocks(model)
    if not any(layer for block in blocks for group in linear_groups(block) for layer in group):
        raise ValueError(f"{what}: no Linear layers found in the decoder blocks of {_architecture(model)}")
    return blocks


@torch.no_grad()
def apply_incoherence(model: nn.Module, seed: int | None = 0) -> dict:
    """Incoherence processing of every Linear inside the decoder blocks (the paper's 2- and 1.58-bit setting).

    For each Linear (q, k, v, o, gate, up, down): W ← W Rᵀ in float64, cast back, and an online x → R x
    on its input, with R = H_N·diag(s)/√N, N = in_features. Exact: W x = (W Rᵀ)(R x). The rotated weight
    and input have their mass spread over all N coordinates, so per-channel grids see no outliers.

    Layers that share an input (q/k/v, gate/up) share R: the pipeline solves them as one group from the
    input captured at the first of them. Signs are derived from (seed, block, group); seed=None means
    unsigned Hadamard. A layer that already rotates online (QuaRot's down_proj) gets the new rotation
    composed after the old one. Returns {"rotation", "seed", "layers_rotated", "seconds"}.
    """
    start = time.perf_counter()
    blocks = _blocks_or_raise(model, "preprocess.rotation=hadamard")
    groups = [linear_groups(block) for block in blocks]
    _check_sizes(((name, layer.in_features) for gs in groups for g in gs for name, layer in g),
                 "preprocess.rotation=hadamard")
    rotated = 0
    for b, block_groups in enumerate(groups):
        for j, group in enumerate(block_groups):
            if not group:
                continue
            n = group[0][1].in_features
            signs = rotation_signs(n, seed, "incoherence", b, j)
            for _name, layer in group:
                _rotate_input_side(layer, signs)
                add_online_rotation(layer, OnlineHadamard(n, signs))
                rotated += 1
    return {"rotation": "hadamard", "seed": seed, "layers_rotated": rotated,
            "seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------------------------------------
# preprocess.rotation=quarot


@torch.no_grad()
def _fold_norm(norm: nn.Module, layers: list[nn.Module]) -> None:
    """RMSNorm(x) = x/rms(x)·γ feeds `layers`: W ← W·diag(γ) in each, then γ ← 1 (QuaRot §4, step 1).

    After this the norm is the pure x/rms(x), which commutes with any orthogonal R because
    rms(R x) = ‖R x‖/√n = rms(x): that is what lets R1 pass through every norm unchanged."""
    gamma = norm.weight.double()
    for layer in layers:
        _assign(layer.weight, layer.weight.double() * gamma)
    norm.weight.fill_(1.0)


@torch.no_grad()
def _untie_embeddings(model: nn.Module) -> bool:
    """Give lm_head its own copy of a tied embedding matrix; True if it was tied.

    R1 enters the embedding as E ← E R1ᵀ (rows are residual-stream vectors) and lm_head as W ← W R1ᵀ
    too, but the final norm's γ folds into lm_head only, so the two can no longer be one tensor.
    The config is updated so save_pretrained/from_pretrained keep them apart."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr()
    if tied:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    configs = {id(model.config): model.config}
    if hasattr(model.config, "get_text_config"):
        text = model.config.get_text_config()
        configs[id(text)] = text
    for config in configs.values():
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):  # transformers ≥ 5 caches the tying map at init
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return tied


def _check_quarot(model: nn.Module) -> tuple[int, int, int, int, int]:
    """(hidden, heads, kv_heads, head_dim, intermediate) of a Llama-family model QuaRot can rotate."""
    what = "preprocess.rotation=quarot"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    body = getattr(model, "model", None)
    if (model_type not in QUAROT_MODEL_TYPES or not hasattr(body, "layers") or not hasattr(body, "norm")
            or model.get_output_embeddings() is None):
        raise ValueError(f"{what} does not support {_architecture(model)}; supported model types: "
                         f"{list(QUAROT_MODEL_TYPES)}")
    config = model.config
    hidden = config.hidden_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    attn = decoder_blocks(model)[0].self_attn
    head_dim = attn.head_dim
    intermediate = decoder_blocks(model)[0].mlp.down_proj.in_features
    for block in decoder_blocks(model):
        for group in linear_groups(block):
            for name, layer in group:
                if has_online_rotation(layer):
                    raise ValueError(f"{what} must come first: {name} already rotates its input online "
                                     f"(apply quarot before hadamard, and only once)")
    _check_sizes([("hidden_size", hidden), ("head_dim", head_dim), ("intermediate_size", intermediate)], what)
    return hidden, heads, kv_heads, head_dim, intermediate


@torch.no_grad()
def _rotate_heads_v(v_proj: nn.Linear, kv_heads: int, head_dim: int, signs: Tensor) -> None:
    """W_v[h] ← R2 W_v[h] (and b_v[h] ← R2 b_v[h]) for every KV head's block of head_dim output rows."""
    W = v_proj.weight.double().reshape(kv_heads, head_dim, -1)  # [h, d, hidden]
    _assign(v_proj.weight, hadamard_transform(W.transpose(1, 2), signs).transpose(1, 2).reshape(v_proj.weight.shape))
    if v_proj.bias is not None:
        _assign(v_proj.bias, hadamard_transform(v_proj.bias.double().reshape(kv_heads, head_dim), signs).flatten())


@torch.no_grad()
def _rotate_heads_o(o_proj: nn.Linear, heads: int, head_dim: int, signs: Tensor) -> None:
    """W_o[:, h] ← W_o[:, h] R2ᵀ for every query head's block of head_dim input columns."""
    W = o_proj.weight.double().reshape(o_proj.out_features, heads, head_dim)
    _assign(o_proj.weight, hadamard_transform(W, signs).reshape(o_proj.weight.shape))


@torch.no_grad()
def apply_quarot(model: nn.Module, seed: int = 0) -> dict:
    """QuaRot's fused rotations (Ashkboos et al. 2024) for Llama-family models, exact in float.

    Steps, all weight arithmetic in float64 and cast back to each weight's dtype:
    1. Fold every RMSNorm's γ into the Linears it feeds and set γ = 1: input_layernorm → q/k/v,
       post_attention_layernorm → gate/up, the final norm → lm_head (after untying it from the
       embedding; config.tie_word_embeddings becomes False).
    2. R1 (hidden size, seeded signs) on the residual stream: embedding rows e → R1 e; inputs of
       q/k/v/gate/up/lm_head W ← W R1ᵀ; outputs of o_proj/down_proj W ← R1 W (biases b ← R1 b).
       Exact because the stream is only added to, and γ-free RMSNorm commutes with R1.
    3. R2 (head_dim, seeded per block) between v_proj and o_proj: each KV head's v rows W ← R2 W,
       each query head's o_proj columns W ← W R2ᵀ. Attention mixes a KV head's value vectors
       linearly (softmax weights do not depend on V), so every query head sharing that KV head
       (grouped-query attention) outputs R2·o_h, which its o_proj block undoes.
    4. R4 (intermediate size, seeded per block) before down_proj: W_down ← W_down R4ᵀ plus an
       online x → R4 x on its input (the SwiGLU product is elementwise, so nothing upstream can
       absorb R4: it must run online).
    R3 (a Hadamard on q and k after RoPE) only matters once the KV cache is quantized: it lives with
    the KV quantizers (qbench.fakequant.attach_kv_quantizers), seeded from the same seed.

    Must run before apply_incoherence and only once. Returns a report dict.
    """
    start = time.perf_counter()
    hidden, heads, kv_heads, head_dim, intermediate = _check_quarot(model)
    body = model.model
    blocks = decoder_blocks(model)
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()

    # 1. Norm folding (and untying, so the final γ goes into lm_head only).
    untied = _untie_embeddings(model)
    for block in blocks:
        attn, mlp = block.self_attn, block.mlp
        _fold_norm(block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        _fold_norm(block.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
    _fold_norm(body.norm, [head])

    # 2. R1 on the residual stream.
    r1 = rotation_signs(hidden, seed, "R1")
    _assign(embed.weight, hadamard_transform(embed.weight.double(), r1))  # each row e → R1 e
    _rotate_input_side(head, r1)
    for block in blocks:
        attn, mlp = block.self_attn, block.mlp
        for layer in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _rotate_input_side(layer, r1)
        for layer in (attn.o_proj, mlp.down_proj):
            _rotate_output_side(layer, r1)

    # 3. R2 per head (v_proj output rows, o_proj input columns) and 4. R4 online before down_proj.
    for b, block in enumerate(blocks):
        attn, mlp = block.self_attn, block.mlp
        r2 = rotation_signs(head_dim, seed, "R2", b)
        _rotate_heads_v(attn.v_proj, kv_heads, head_dim, r2)
        _rotate_heads_o(attn.o_proj, heads, head_dim, r2)
        r4 = rotation_signs(intermediate, seed, "R4", b)
        _rotate_input_side(mlp.down_proj, r4)
        add_online_rotation(mlp.down_proj, OnlineHadamard(intermediate, r4))

    return {"rotation": "quarot", "seed": seed, "norms_folded": 2 * len(blocks) + 1, "untied": untied,
            "layers_rotated": 7 * len(blocks) + 1, "online_rotations": len(blocks),
            "hidden": hidden, "head_dim": head_dim, "intermediate": intermediate,
            "seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------------------------------------
# Dispatch


def check_rotation(model: nn.Module, kind: str) -> None:
    """Raise the one-line ValueError `apply_rotation(model, kind)` would raise, without touching a weight
    (so a run can refuse before its float baseline and calibration)."""
    if kind in ("quarot", "quarot+hadamard"):
        _check_quarot(model)
    if kind in ("hadamard", "quarot+hadamard"):
        blocks = _blocks_or_raise(model, "preprocess.rotation=hadamard")
        _check_sizes(((name, layer.in_features) for block in blocks for group in linear_groups(block)
                      for name, layer in group), "preprocess.rotation=hadamard")


def apply_rotation(model: nn.Module, kind: str, seed: int = 0) -> dict:
    """Apply `preprocess.rotation`: "none" | "hadamard" | "quarot" | "quarot+hadamard" (QuaRot, then
    incoherence processing on every Linear input). Returns the report of what was done."""
    if kind == "none":
        return {"rotation": "none", "seconds": 0.0}
    if kind == "hadamard":
        return apply_incoherence(model, seed)
    if kind == "quarot":
        return apply_quarot(model, seed)
    if kind == "quarot+hadamard":
        quarot = apply_quarot(model, seed)
        incoherence = apply_incoherence(model, seed)
        return {"rotation": kind, "seed": seed, "quarot": quarot, "hadamard": incoherence,
                "seconds": quarot["seconds"] + incoherence["seconds"]}
    raise ValueError(f"preprocess.rotation={kind!r} is not one of {list(ROTATIONS)}")
