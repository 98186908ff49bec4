"""`algorithm.backend=brevitas`: the same run, with the solve done by Brevitas's own GPTQ, GPFQ and Qronos.

qbench keeps everything around the solve: the model, the calibration windows, the block-by-block loop
(one decoder block on the device) and the evaluation. For each block, its Linears become Brevitas
`QuantLinear`s (`brevitas.graph.quantize.layerwise_quantize`) with Brevitas's own weight quantizer, and
the block is driven through `brevitas.graph.gptq.gptq_mode` or `brevitas.graph.gpfq.gpfq_mode` (GPFQ, or
Qronos through `algorithm_impl`) exactly as `brevitas_examples/llm/llm_quant/gpxq.py` does: one pass of
every calibration batch per Linear, then `update()`. The quantized weights Brevitas produces are then
written into the original `nn.Linear`s, and the next block is fed this block's quantized output.
Brevitas's example script itself is not used: its block loop sends every batch to 'cuda'.

What is the same as the native backend, by construction or checked in tests/test_brevitas_backend.py:
- calibration windows, batches, block inputs X̃ (the quantized stream), and X for GPFQ/Qronos (Brevitas
  re-runs the current block with quantization disabled, i.e. on `weight_orig`, from the same X̃);
- the asymmetric grid: ShiftedUint8WeightPerChannelFloat (or ...GroupQuantFloat) with
  `scaling_impl_type='parameter_from_stats'` and `ParameterFromStatsFromParameterZeroPoint`, as the
  LLM example configures it, so scale and integer zero point are fixed from the float weights at
  initialisation (min-max): the same grid point for point;
- act_order, OPTQ's percdamp (λ = percdamp·mean(diag H)), Qronos's alpha (λ = alpha·σ_max(H)) and the
  lazy batch of ceil(N/100) columns (Brevitas's num_blocks=100).

What differs is listed in `DIFFERENCES` (and the README); what cannot be mapped at all is refused by
`unsupported` with one line, before a model loads.
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from qbench.models import decoder_blocks, linear_groups
from qbench.pipeline import (Budget, LayerReport, _block_output, _collapsed_groups, _nbytes, capture_block_inputs,
                             naming_out_of_memory, out_of_memory_advice)
from qbench.quantizers import GridSpec

log = logging.getLogger(__name__)

DIFFERENCES = (
    "symmetric grids: Brevitas's signed quantizer uses the narrow range [-(2^(b-1)-1), 2^(b-1)-1] with "
    "scale max|w|/(2^(b-1)-1); qbench has the same scale but also the code -2^(b-1), which a solver may "
    "reach when an updated weight falls below the float minimum (ternary 1.58-bit grids are identical)",
    "act-order sorts diag(H) with an unstable argsort in Brevitas, a stable one in qbench (ties only)",
    "Qronos's sigma_max(H): Brevitas takes 30 power iterations from a seeded random start, which stays "
    "below sigma_max when the top eigenvalues are close (4% low on a test H); qbench runs Lanczos to "
    "convergence. lambda = alpha sigma_max differs by that much",
    "float32 routes: GPTQ: Brevitas inverts H by cholesky -> cholesky_inverse -> Cholesky of the inverse, "
    "qbench by one Cholesky of the reversed H and a triangular inverse, and H/G are accumulated in a "
    "different order (Brevitas rescales a running mean per batch); the same rounding up to ties, but the "
    "column-by-column sweep amplifies a single flipped rounding into later columns. Qronos at alpha 1e-6: "
    "Brevitas forms (H + lambda I)^-1 explicitly and downdates that inverse (Sherman-Morrison); with an "
    "ill-conditioned H that loses digits (given the same H and G, Brevitas's float32 weights differ from "
    "a float64 solve several times more often than qbench's)",
    "a failed Cholesky: Brevitas warns and leaves that Linear round-to-nearest (GPTQ) or unchanged "
    "(Qronos); qbench raises the damping x10 until it succeeds",
    "dead inputs (diag H = 0): both zero the weight column; Brevitas's GPFQ/Qronos keep G's column, "
    "qbench clears it (q = Q(0) either way)",
    "q/k/v and gate/up: Brevitas solves each Linear after its own calibration pass (same H, so the same "
    "result), qbench stacks their rows into one solve",
    "bf16/fp16 models: Brevitas computes and keeps scale and zero point in the weights' dtype, qbench in "
    "float32, so grid values differ by that rounding and edge codes can sit one step apart",
    "no per-Linear output error or damping telemetry: Brevitas frees H inside update()",
)


def unsupported(cfg) -> Optional[str]:
    """Why this config cannot run on Brevitas's solvers with qbench's data and grid, or None (no imports)."""
    q, a, p = cfg.quant, cfg.algorithm, cfg.preprocess
    if int(q.a_bits) < 16 or int(q.kv_bits) < 16:
        return ("quant.a_bits/kv_bits < 16 use qbench's own activation and KV quantizers, which Brevitas's "
                "solvers would not see; use algorithm.backend=qbench")
    if cfg.calibration.stream != "quantized":
        return f"Brevitas feeds blocks the quantized stream only; calibration.stream={cfg.calibration.stream} needs backend=qbench"
    if p.rotation != "none":
        return (f"preprocess.rotation={p.rotation} leaves online rotations on the Linears, which Brevitas's "
                "QuantLinear replacement would drop; use backend=qbench")
    if q.w_format != "int":
        return f"quant.w_format={q.w_format} is not an integer grid; only int grids are mapped to Brevitas"
    if q.w_scale != "minmax":
        return f"quant.w_scale={q.w_scale}: Brevitas's MSE search is not qbench's; only minmax grids match"
    if float(q.w_shrink) != 1.0:
        return f"quant.w_shrink={q.w_shrink}: Brevitas's min-max quantizer has no range shrink"
    if math.isclose(float(q.w_bits), 1.58) and not q.w_sym:
        return "quant.w_bits=1.58 needs quant.w_sym=true"
    if a.get("block_size") is not None:
        return f"algorithm.block_size={a.block_size}: Brevitas's lazy batch is fixed at ceil(N/100) columns"
    return None


def weight_quantizer(spec: GridSpec):
    """Brevitas's weight quantizer for the qbench grid `spec` (int, min-max, scales fixed at init)."""
    from brevitas.core.zero_point import ParameterFromStatsFromParameterZeroPoint
    from brevitas.quant.scaled_int import Int8WeightPerChannelFloat
    from brevitas.quant.shifted_scaled_int import ShiftedUint8WeightGroupQuantFloat, ShiftedUint8WeightPerChannelFloat

    ternary = math.isclose(spec.bits, 1.58)
    bits = 2 if ternary else int(spec.bits)
    per_group = spec.group_size not in (-1, None)
    if spec.sym:
        if per_group:  # the LLM example's symmetric group quantizer
            from brevitas_examples.common.generative.quantizers import IntWeightSymmetricGroupQuant as base
        else:
            base = Int8WeightPerChannelFloat
        quant = base.let(bit_width=bits, narrow_range=True)
    else:
        base = ShiftedUint8WeightGroupQuantFloat if per_group else ShiftedUint8WeightPerChannelFloat
        quant = base.let(bit_width=bits, narrow_range=False, quantize_zero_point=True)
    if per_group:
        quant = quant.let(group_size=int(spec.group_size))
    quant = quant.let(scaling_impl_type="parameter_from_stats")
    if not spec.sym:
        quant = quant.let(zero_point_impl=ParameterFromStatsFromParameterZeroPoint)
    return quant


def to_quant_linears(module: nn.Module, names: list[str], spec: GridSpec) -> dict[str, nn.Linear]:
    """Replace the named Linears of `module` by Brevitas QuantLinears (sharing their weight tensors) and
    initialise their weight quantizers from the current (float) weights. Returns the replaced Linears."""
    import brevitas.nn as qnn
    from brevitas.graph.quantize import layerwise_quantize

    originals = {name: module.get_submodule(name) for name in names}
    layer_map = {nn.Linear: (qnn.QuantLinear, {"weight_quant": weight_quantizer(spec), "input_quant": None,
                                                "output_quant": None, "bias_quant": None,
                                                "return_quant_tensor": False})}
    others = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and n not in originals]
    layerwise_quantize(module, compute_layer_map=layer_map, name_blacklist=others)
    for name in names:
        module.get_submodule(name).quant_weight()  # parameter_from_stats: scale and zero point fixed now
    return originals


def restore_linears(block: nn.Module, originals: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """Write each QuantLinear's quantized weight into its original nn.Linear and put that back in place."""
    quantized = {}
    for name, linear in originals.items():
        qlayer = block.get_submodule(name)
        Q = qlayer.quant_weight().value.detach()
        linear.weight.data = Q.to(dtype=linear.weight.dtype, device=qlayer.weight.device)
        parent_name, _, leaf = name.rpartition(".")
        setattr(block.get_submodule(parent_name) if parent_name else block, leaf, linear)
        quantized[name] = linear.weight.data
    return quantized


def _mode(block: nn.Module, algorithm: str, options: dict, device: torch.device):
    """The Brevitas context manager that runs `algorithm` on the block, with the LLM example's settings."""
    act_order = bool(options.get("act_order", False))
    common = dict(act_order=act_order, create_weight_orig=True, device=str(device), dtype=torch.float32)
    if algorithm == "optq":
        from brevitas.graph.gptq import GPTQ, gptq_mode

        percdamp = float(options.get("percdamp", 0.01))

        class DampedGPTQ(GPTQ):  # gptq_mode calls single_layer_update() with Brevitas's default 0.01
            def single_layer_update(self, percdamp: float = percdamp, c: float = 1e4):
                return super().single_layer_update(percdamp=percdamp, c=c)

        return gptq_mode(block, use_quant_activations=False, gptq_class=DampedGPTQ, **common)
    from brevitas.graph.gpfq import GPFQ, gpfq_mode

    if algorithm == "gpfq":
        return gpfq_mode(block, algorithm_impl=GPFQ, **common)
    if algorithm == "qronos":
        from brevitas.graph.qronos import Qronos

        return gpfq_mode(block, algorithm_impl=partial(Qronos, alpha=float(options["alpha"])), **common)
    raise ValueError(f"algorithm {algorithm!r} has no Brevitas counterpart")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def quantize_model(model: nn.Module, spec: GridSpec, algorithm: str, calibration_ids: Optional[torch.Tensor],
                   options: dict, batch_size: int = 4, device: str | torch.device = "cpu",
                   progress: bool = True, meter=None) -> tuple[list[LayerReport], Budget]:
    """Quantize every Linear inside the decoder blocks with Brevitas's solver, block by block, in place.

    Same contract as qbench.pipeline.quantize_model: per-Linear reports and the token budget. `meter`
    (qbench.meter.Meter) times Brevitas's calibration forwards (which accumulate H and G in hooks) as
    phase "forward+statistics", its update() as "solve" and the QuantLinear swaps as "setup".
    """
    from qbench.meter import NULL_METER

    meter = NULL_METER if meter is None else meter
    device = torch.device(device)
    blocks = decoder_blocks(model)
    reports: list[LayerReport] = []
    budget = Budget()
    data_free = algorithm == "rtn"
    if not data_free and calibration_ids is None:
        raise ValueError(f"algorithm {algorithm} needs calibration data")
    windows = 0 if calibration_ids is None else calibration_ids.shape[0]
    hidden: list[torch.Tensor] = []
    if not data_free:
        with meter.phase("forward"):
            hidden, kwargs = capture_block_inputs(model, calibration_ids, batch_size, device)
        budget.tokens = sum(x.shape[0] * x.shape[1] for x in hidden)
    for i, block in enumerate(tqdm(blocks, desc=f"brevitas {algorithm} blocks", disable=not progress)):
        with naming_out_of_memory(f"block {i}", device, lambda: out_of_memory_advice(
                windows, batch_size, _nbytes(hidden), 0, 0.0, device.type)):
            block.to(device)
            floats = {name: layer.weight.data.to(torch.float32, copy=True) for group in linear_groups(block)
                      for name, layer in group}
            with meter.phase("setup"):  # QuantLinears in, weight quantizers initialised
                originals = to_quant_linears(block, [name for group in linear_groups(block) for name, _ in group], spec)
            solve_s: dict[str, float] = {}
            if not data_free:
                with _mode(block, algorithm, options, device) as gpxq:
                    for _ in range(gpxq.num_layers):
                        with meter.phase("forward+statistics"):
                            for x, kw in zip(hidden, kwargs):
                                block(x, **kw)
                        names = sorted(gpxq.current_layer.layer_names)
                        with meter.phase("solve"):
                            start = time.perf_counter()
                            gpxq.update()
                            _sync(device)
                        for name in names:
                            solve_s[name] = (time.perf_counter() - start) / len(names)
                            n = originals[name].in_features  # Brevitas's own H (and G) products for this Linear
                            budget.statistics += (1 if algorithm == "optq" else 2) * 2.0 * n * n * budget.tokens
            with meter.phase("setup"):
                quantized = restore_linears(block, originals)
            for name, Q in quantized.items():
                W = floats[name]
                reports.append(LayerReport(
                    block=i, name=name, out_features=W.shape[0], in_features=W.shape[1],
                    weight_rel_error=float((W - Q.float()).norm() / W.norm().clamp(min=1e-30)),
                    output_rel_error=None, damping=math.nan, cholesky_retries=0, dead_inputs=0,
                    collapsed_groups=_collapsed_groups(W, W.shape[1] if spec.group_size in (-1, None) else spec.group_size),
                    solve_s=solve_s.get(name, 0.0)))
            if not data_free:
                with meter.phase("forward"):
                    hidden = [_block_output(block, x, kw) for x, kw in zip(hidden, kwargs)]
            block.to("cpu")
    return reports, budget
