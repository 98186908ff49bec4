"""SmoothQuant equalization (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models", ICML 2023), folded into the model so the float function is unchanged.

For a source op whose output channel j feeds the input channel j of one or more sink Linears,

    s_j = max|X_j|^α / max_sinks max_i |W_{i,j}|^(1−α)

and the source's output channel j is divided by s_j while the sinks' input columns j are multiplied by s_j:
the activations the sinks see become X_j / s_j (outlier channels flattened), their weights W_{:,j}·s_j, and
every product is unchanged. α = 0.5 is SmoothQuant's default; the Qronos paper uses α = 0.3 (design.md §4).

Pairs folded in every decoder block (Llama-family names):

    input_layernorm            → q_proj, k_proj, v_proj     norm weight /= s;    q/k/v columns *= s
    self_attn.v_proj           → self_attn.o_proj           v_proj rows /= s;    o_proj columns *= s (GQA, below)
    post_attention_layernorm   → gate_proj, up_proj         norm weight /= s;    gate/up columns *= s
      (Gemma 3: pre_feedforward_layernorm, its MLP input norm)
    mlp.up_proj                → mlp.down_proj              up_proj rows /= s;   down_proj columns *= s

v → o is exact because attention mixes tokens, never channels: o_proj's input is, per query head, a convex
combination of that head's KV head's values. With grouped-query attention o_proj has H·d input channels and
v_proj H_kv·d outputs; query head h reads KV head h // (H/H_kv) (transformers' `repeat_kv`), so the value
channel (g, c) feeds o_proj's columns (h, c) for every query head h of group g. Its scale is therefore one
number per KV channel: the activation statistic is the max over the group's query heads of o_proj's input
maxima, the weight statistic the max over the same heads' o_proj columns, and the scale is repeated across
the group's heads on o_proj's columns. up → down is exact because act = φ(gate)·up is linear in up.

Order inside a block: v → o and up → down first, then the two norm pairs. The scale of a pair depends on its
sinks' column maxima; the inner pairs change the rows of v_proj and up_proj, which are sinks of the norm pairs,
while the norm pairs change no sink of the inner pairs. In this order every scale is computed from the
weights as they are when it is folded, and all statistics can be measured once on the original model
(folding never changes the input of a Linear that a later pair reads statistics for, except the pair's own).

Conventions matched to Brevitas 0.13.4 (`brevitas/graph/equalize.py::_cross_layer_equalization`):
- the sinks' weight statistic is the max over all sinks of the per-input-channel max |W| (q, k and v share
  one scale vector; so do gate and up);
- a channel whose activation or weight statistic is ≤ 1e-9 (Brevitas's EPSILON) is not equalized (s = 1),
  instead of being clamped, which would make 1/s huge;
- the formula s = act^α / w^(1−α) (Brevitas's `scaling_factors` are sinks^(1−α) / srcs^α = 1/s: the same
  transform seen from the source side). Brevitas's 'fx' mode additionally averages the activation range with
  the source weight range (co_optimize_act_weights); qbench does not (plain SmoothQuant).
The result is also clamped to ≥ 1e-5, SmoothQuant's reference `smooth_lm` clamp.
Weight arithmetic is done in float64 and cast back to each parameter's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_ALPHA",
    "EPSILON",
    "MIN_SCALE",
    "PAPER_ALPHA",
    "apply_smoothquant",
    "fold_linear_to_linear",
    "fold_norm_to_linears",
    "kv_group_max",
    "repeat_over_heads",
    "smoothquant_scales",
]

DEFAULT_ALPHA = 0.5  # SmoothQuant's default migration strength
PAPER_ALPHA = 0.3  # the Qronos paper's setting (design.md §4)
EPSILON = 1e-9  # Brevitas: channels with a range at or below this are left alone (s = 1)
MIN_SCALE = 1e-5  # SmoothQuant's reference clamp


def smoothquant_scales(act_absmax: Tensor, weight_absmax: Tensor, alpha: float) -> Tensor:
    """s_j = act_absmax_j^α / weight_absmax_j^(1−α), in float64.

    Channels with either statistic ≤ EPSILON get s_j = 1 (no-op); the result is clamped to ≥ MIN_SCALE.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    a = act_absmax.detach().to(torch.float64).flatten()
    w = weight_absmax.detach().to(torch.float64).flatten()
    if a.shape != w.shape:
        raise ValueError(f"activation statistic has {a.numel()} channels, weight statistic {w.numel()}")
    skip = (a <= EPSILON) | (w <= EPSILON) | ~torch.isfinite(a) | ~torch.isfinite(w)
    a = torch.where(skip, torch.ones_like(a), a)
    w = torch.where(skip, torch.ones_like(w), w)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    return s.clamp(min=MIN_SCALE)


def _column_absmax(linears: list[nn.Linear]) -> Tensor:
    """max over the Linears of max_i |W[i, j]|: the sinks' per-input-channel weight range, float64 on CPU."""
    return torch.stack([layer.weight.detach().abs().amax(dim=0).to("cpu", torch.float64) for layer in linears]
                       ).amax(dim=0)


def _norm_offset(norm: nn.Module) -> float:
    """1 for norms that multiply by (1 + weight) (Gemma), else 0."""
    return 1.0 if type(norm).__name__.startswith("Gemma") else 0.0


@torch.no_grad()
def _scale_columns(layer: nn.Linear, s: Tensor) -> None:
    W = layer.weight
    W.copy_((W.to(torch.float64) * s.to(W.device)).to(W.dtype))


@torch.no_grad()
def _scale_rows(layer: nn.Linear, s: Tensor) -> None:
    W = layer.weight
    W.copy_((W.to(torch.float64) * s.to(W.device)[:, None]).to(W.dtype))
    if layer.bias is not None:
        b = layer.bias
        b.copy_((b.to(torch.float64) * s.to(b.device)).to(b.dtype))


@torch.no_grad()
def fold_norm_to_linears(norm: nn.Module, sinks: list[nn.Linear], s: Tensor) -> None:
    """Norm weight /= s (output channel j of the norm), sinks' input columns *= s. Exact for an RMSNorm/LayerNorm
    whose affine weight multiplies the normalized input channel-wise (bias too, if any)."""
    s = s.to(torch.float64)
    inv = 1.0 / s
    offset = _norm_offset(norm)
    w = norm.weight
    w.copy_(((w.to(torch.float64) + offset) * inv.to(w.device) - offset).to(w.dtype))
    if getattr(norm, "bias", None) is not None:
        b = norm.bias
        b.copy_((b.to(torch.float64) * inv.to(b.device)).to(b.dtype))
    for layer in sinks:
        _scale_columns(layer, s)


def kv_group_max(x: Tensor, head_dim: int, repeat: int) -> Tensor:
    """[H·d] over o_proj's input channels (query heads h = g·repeat + r) -> [H_kv·d]: max over each KV group."""
    return x.reshape(-1, repeat, head_dim).amax(dim=1).reshape(-1)


def repeat_over_heads(s: Tensor, head_dim: int, repeat: int) -> Tensor:
    """[H_kv·d] per KV channel -> [H·d] on o_proj's input channels: KV channel (g, c) to (g·repeat + r, c) ∀r."""
    return s.reshape(-1, 1, head_dim).expand(-1, repeat, -1).reshape(-1)


@torch.no_grad()
def fold_linear_to_linear(source: nn.Linear, sink: nn.Linear, s: Tensor, head_dim: int = 1, repeat: int = 1) -> None:
    """Source output rows /= s (and its bias), sink input columns *= s.

    `repeat` > 1 is grouped-query attention: s has one entry per KV channel (H_kv·d, d = `head_dim`) and is
    repeated over the `repeat` query heads of each KV group on the sink's columns.
    """
    s = s.to(torch.float64)
    if s.numel() != source.out_features or s.numel() * repeat != sink.in_features:
        raise ValueError(f"scale of {s.numel()} channels does not fit {source.out_features} source outputs and "
                         f"{sink.in_features} sink inputs ({repeat} heads per group)")
    _scale_rows(source, 1.0 / s)
    _scale_columns(sink, repeat_over_heads(s, head_dim, repeat) if repeat > 1 else s)


def _attention_layout(block: nn.Module) -> tuple[int, int]:
    """(head_dim, query heads per KV head) of the block's self-attention, from its shapes."""
    attn = block.self_attn
    n_kv_channels = attn.v_proj.out_features
    n_q_channels = attn.o_proj.in_features
    if n_q_channels % n_kv_channels:
        raise ValueError(f"o_proj input {n_q_channels} is not a multiple of v_proj output {n_kv_channels}")
    repeat = n_q_channels // n_kv_channels
    head_dim = getattr(attn, "head_dim", None)
    if head_dim is None:
        config = getattr(attn, "config", None)
        head_dim = getattr(config, "head_dim", None) or n_q_channels // config.num_attention_heads
    if n_kv_channels % head_dim:
        raise ValueError(f"v_proj output {n_kv_channels} is not a multiple of head_dim {head_dim}")
    return int(head_dim), int(repeat)


def _mlp_input_norm(block: nn.Module) -> nn.Module:
    """The norm whose output is the MLP input: Gemma 3's pre_feedforward_layernorm, else post_attention_layernorm."""
    norm = getattr(block, "pre_feedforward_layernorm", None)
    return norm if norm is not None else block.post_attention_layernorm


def _stat(act_absmax: dict[str, Tensor], names: list[str]) -> Tensor:
    """Elementwise max of the statistics of Linears that share one input (they are equal; any may be missing)."""
    found = [act_absmax[n].detach().to("cpu", torch.float64).flatten() for n in names if n in act_absmax]
    if not found:
        raise KeyError(f"no input statistics for any of {names}")
    return torch.stack(found).amax(dim=0)


@torch.no_grad()
def apply_smoothquant(model: nn.Module, act_absmax: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """Fold SmoothQuant scales into every decoder block of `model`, in place; the float model is unchanged.

    `act_absmax` maps a Linear's full module name (e.g. "model.layers.3.self_attn.q_proj") to the per-input-
    channel max |x| of its input over the calibration tokens (`qbench.pipeline.input_absmax`), measured on the
    model *before* this call. Returns the folded scales keyed by the source's full name
    ("model.layers.3.input_layernorm", ".self_attn.v_proj" (one entry per KV channel), the MLP input norm,
    ".mlp.up_proj"). A pair whose statistics are missing is skipped, and so is a pair whose sink rotates
    its input online (QuaRot's R4 before down_proj, Hadamard incoherence): the source scales the
    unrotated channels, so the sink's columns could not absorb them.
    """
    from qbench.models import decoder_blocks
    from qbench.transforms.rotation import has_online_rotation

    def foldable(*sinks: nn.Linear) -> bool:
        return not any(has_online_rotation(sink) for sink in sinks)

    prefix = {id(m): n for n, m in model.named_modules()}
    scales: dict[str, Tensor] = {}
    for block in decoder_blocks(model):
        base = prefix[id(block)]
        attn, mlp = block.self_attn, block.mlp

        def full(rel: str, base: str = base) -> str:
            return f"{base}.{rel}"

        # v -> o, grouped-query aware: one scale per KV channel
        if full("self_attn.o_proj") in act_absmax and foldable(attn.o_proj):
            head_dim, repeat = _attention_layout(block)
            a = kv_group_max(_stat(act_absmax, [full("self_attn.o_proj")]), head_dim, repeat)
            w = kv_group_max(_column_absmax([attn.o_proj]), head_dim, repeat)
            s = smoothquant_scales(a, w, alpha)
            fold_linear_to_linear(attn.v_proj, attn.o_proj, s, head_dim, repeat)
            scales[full("self_attn.v_proj")] = s
        # up -> down
        if full("mlp.down_proj") in act_absmax and foldable(mlp.down_proj):
            s = smoothquant_scales(_stat(act_absmax, [full("mlp.down_proj")]), _column_absmax([mlp.down_proj]), alpha)
            fold_linear_to_linear(mlp.up_proj, mlp.down_proj, s)
            scales[full("mlp.up_proj")] = s
        # input_layernorm -> q, k, v
        qkv = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
        if any(full(n) in act_absmax for n in qkv) and foldable(attn.q_proj, attn.k_proj, attn.v_proj):
            sinks = [attn.q_proj, attn.k_proj, attn.v_proj]
            s = smoothquant_scales(_stat(act_absmax, [full(n) for n in qkv]), _column_absmax(sinks), alpha)
            fold_norm_to_linears(block.input_layernorm, sinks, s)
            scales[full("input_layernorm")] = s
        # MLP input norm -> gate, up
        gate_up = ["mlp.gate_proj", "mlp.up_proj"]
        if any(full(n) in act_absmax for n in gate_up) and foldable(mlp.gate_proj, mlp.up_proj):
            norm = _mlp_input_norm(block)
            sinks = [mlp.gate_proj, mlp.up_proj]
            s = smoothquant_scales(_stat(act_absmax, [full(n) for n in gate_up]), _column_absmax(sinks), alpha)
            fold_norm_to_linears(norm, sinks, s)
            scales[prefix[id(norm)]] = s
    return scales
