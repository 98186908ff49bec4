"""Calibration and write-back: the only module that knows about decoder blocks, hooks and devices.

One decoder block at a time is moved to the device; the rest of the model stays on the host. Inside a
block the Linears are solved in execution order (q/k/v share one input, then o_proj, gate/up, down_proj)
and every later sub-layer sees the already-quantized earlier ones. Two calibration streams:

- `quantized` (Brevitas, the paper's tables): every block is fed X̃, the output of the already
  quantized blocks; X is the input the *float* version of the current block produces from that X̃.
- `dual`: the float model's own activations are carried from block to block beside X̃, so
  G = XX̃ᵀ/m measures the error of everything quantized so far ("correcting the past" in full).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qbench import fakequant, faults
from qbench.algorithms import REGISTRY, Solver, all_finite
from qbench.models import decoder_blocks, linear_groups
from qbench.quantizers import GridSpec, build_grid

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the wanted input has been captured."""


class DeviceOutOfMemory(RuntimeError):
    """A decoder block did not fit on the device; the message names the block and what would fit."""


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's out-of-memory error (CUDA, MPS, XPU), or the CPU allocator's refusal (a RuntimeError)."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def out_of_memory_advice(windows: int, batch_size: int, activation_bytes: int, cache_bytes: int,
                         float_cache_gb: float, device_type: str = "cuda") -> str:
    """The settings that shrink what one block holds on the device, each with what it saves.

    The block's calibration activations (X̃, and X for `dual`) scale with `data.nsamples`; one forward
    pass's peak with `calibration.batch_size`; the per-block caches are bounded by
    `calibration.float_cache_gb` (below it they are recomputed instead: same numbers, more passes).
    """
    ways = []
    if cache_bytes > 0:
        smaller = math.floor(cache_bytes / 2**30 / 2 * 100) / 100
        ways.append(f"calibration.float_cache_gb={smaller:g} (the block's caches hold {_gib(cache_bytes)} "
                    f"under the current {float_cache_gb:g}; 0 recomputes everything: same numbers, more passes)")
    if batch_size > 1:
        ways.append(f"calibration.batch_size={batch_size // 2} (halves one forward pass's peak)")
    if windows > 1:
        ways.append(f"data.nsamples={windows // 2} (the calibration activations take {_gib(activation_bytes)})")
    ways.append(_last_resort(device_type))
    return "try " + ", or ".join(ways)


def _last_resort(device_type: str) -> str:
    return "a machine with more memory" if device_type == "cpu" else "device=cpu (the host's memory)"


@contextlib.contextmanager
def naming_out_of_memory(where: str, device: torch.device, advice):
    """Turn an out-of-memory error inside the block loop into one DeviceOutOfMemory line: `where` it
    happened and `advice()` (called only on failure, when the sizes are known)."""
    try:
        yield
    except RuntimeError as exc:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeviceOutOfMemory(f"{where} did not fit on {device} ({first[:160]}); {advice()}") from None


@dataclass
class LayerReport:
    """Telemetry of one quantized Linear."""

    block: int
    name: str
    out_features: int
    in_features: int
    weight_rel_error: float  # ‖W − Q‖_F / ‖W‖_F
    output_rel_error: Optional[float]  # ‖X̃ᵀ(W − Q)ᵀ‖_F / ‖X̃ᵀWᵀ‖_F on the calibration tokens
    damping: float
    cholesky_retries: int
    dead_inputs: int
    collapsed_groups: int  # (row, group) ranges with max = min: every weight there is 0, kept exactly
    solve_s: float  # the shared solve of a q/k/v or gate/up group is split by rows


@dataclass
class Budget:
    """FLOPs spent, by kind, for the speed report (design.md §7)."""

    statistics: float = 0.0  # accumulating H and G
    tokens: int = 0


def solver_options(cfg_algorithm) -> dict:
    """The solver's keyword options: the algorithm config minus its name; null fields take the solver's
    default (qbench.config.solver_options resolves them from the whole config instead)."""
    return {k: v for k, v in dict(cfg_algorithm).items() if k not in ("name", "backend") and v is not None}


def _capture_input(block: nn.Module, layer: nn.Module, hidden: Tensor, kwargs: dict) -> Tensor:
    """Run `block` on `hidden` just far enough to see the input of `layer`; return it as [tokens, n]."""
    seen: list[Tensor] = []

    def hook(_module, args):
        seen.append(args[0])
        raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    try:
        block(hidden, **kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])


def _block_output(block: nn.Module, hidden: Tensor, kwargs: dict) -> Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class OutputCache:
    """Outputs, per calibration batch, of the parts of a block that are final: quantized already.

    Sub-layer groups are solved in execution order, so once every Linear inside a submodule (a Linear
    itself, or e.g. `self_attn` once q/k/v and o are done) is quantized, that submodule's input and output
    no longer change. The passes that capture later groups' inputs, and the block's output pass, replay
    those outputs instead of recomputing them: same numbers (the same ops on the same inputs), about half
    the forward FLOPs of the quantized stream.
    """

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.modules = {name: module for name, module in block.named_modules() if name}
        self.linears = {name: {n for n, m in self.modules.items()
                               if isinstance(m, nn.Linear) and (n == name or n.startswith(name + "."))}
                        for name in self.modules}
        self.solved: set[str] = set()
        self.outputs: dict[str, dict[int, object]] = {}

    def mark_solved(self, names: list[str]) -> None:
        """These Linears are quantized: their submodules may have become final."""
        self.solved.update(names)
        final = [n for n, ls in self.linears.items() if ls and ls <= self.solved]
        self.outputs = {n: self.outputs.get(n, {}) for n in sorted(final, key=lambda n: n.count("."))}

    @contextlib.contextmanager
    def replay(self, batch: int):
        """Within: final submodules return their recorded output for `batch`, or record it on first use.

        Outermost first: a recorded submodule is replayed whole; one not recorded yet runs (and is
        recorded) with its recorded children replayed, whose entries are then no longer needed."""
        patched, handles, replayed = [], [], []
        for name, recorded in self.outputs.items():  # parents before children
            if any(name.startswith(p + ".") for p in replayed):
                continue
            module = self.modules[name]
            if batch in recorded:
                module.forward = lambda *args, _out=recorded[batch], **kwargs: _out
                patched.append(module)
                replayed.append(name)
            else:
                handles.append(module.register_forward_hook(
                    lambda _m, _args, out, _rec=recorded: _rec.__setitem__(batch, out)))
        try:
            yield
        finally:
            for module in patched:
                del module.forward  # back to the class's forward
            for handle in handles:
                handle.remove()
            for name, recorded in self.outputs.items():
                if batch in recorded:
                    for child, below in self.outputs.items():
                        if child.startswith(name + "."):
                            below.pop(batch, None)


def _float_pass(block: nn.Module, names: list[str], sources: list[Tensor], kwargs: list[dict],
                keep_output: bool) -> tuple[list[dict[str, Tensor]], Optional[list[Tensor]]]:
    """One forward of the (float) block per batch, keeping the input of each named Linear as [tokens, n].

    The float block never changes, so one pass serves every sub-layer group; without `keep_output`
    the pass stops at the last named Linear.
    """
    layers = dict(block.named_modules())
    seen: dict[str, Tensor] = {}

    def hook_for(name: str, stop: bool):
        def hook(_module, args):
            seen[name] = args[0].reshape(-1, args[0].shape[-1])
            if stop:
                raise _Stop

        return hook

    handles = [layers[name].register_forward_pre_hook(hook_for(name, not keep_output and name == names[-1]))
               for name in names]
    inputs, outputs = [], []
    try:
        for x, kw in zip(sources, kwargs):
            try:
                out = _block_output(block, x, kw)
                outputs.append(out)
            except _Stop:
                pass
            inputs.append(dict(seen))
            seen.clear()
    finally:
        for handle in handles:
            handle.remove()
    return inputs, (outputs if keep_output else None)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: Tensor, batch_size: int,
                         device: torch.device) -> tuple[list[Tensor], list[dict]]:
    """Inputs (hidden states and keyword arguments) of the first decoder block, per calibration batch."""
    body = model.model
    first = decoder_blocks(model)[0]
    hosts = [m for m in (body.embed_tokens, getattr(body, "rotary_emb", None)) if m is not None]
    for m in hosts:
        m.to(device)
    hidden, kwargs = [], []

    def hook(_module, args, kw):
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in range(0, input_ids.shape[0], batch_size):
            try:
                body(input_ids=input_ids[b:b + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
        if device.type != "cpu":
            for m in hosts:
                m.to("cpu")
    return hidden, kwargs


def relative_output_change(W: Tensor, Q: Tensor, H: Tensor) -> float:
    """‖X̃ᵀ(W − Q)ᵀ‖_F / ‖X̃ᵀWᵀ‖_F from H = X̃X̃ᵀ/m: tr(D H Dᵀ) is the squared output error per token."""
    D = W - Q
    num = torch.einsum("ij,jk,ik->", D, H, D).clamp(min=0)
    den = torch.einsum("ij,jk,ik->", W, H, W).clamp(min=1e-30)
    return float((num / den).sqrt())


def _collapsed_groups(W: Tensor, group_size: int) -> int:
    """Groups whose range including 0 is empty, i.e. all-zero groups (the grid gets a unit scale there)."""
    M, N = W.shape
    Wg = W.reshape(M, N // group_size, group_size)
    return int((Wg.amax(dim=2).clamp(min=0) == Wg.amin(dim=2).clamp(max=0)).sum())


def _solve_group(group: list[tuple[str, nn.Linear]], H: Optional[Tensor], G: Optional[Tensor], solver: Solver,
                 spec: GridSpec, options: dict, block: int) -> list[LayerReport]:
    """Quantize the Linears that share one input (q/k/v, gate/up) in place, as one solve.

    Every solver treats the rows of W independently given H and G, and act-order and damping depend on
    H alone, so stacking the layers' rows is exact and turns several column sweeps into one.
    """
    Ws = [layer.weight.data.to(torch.float32) for _, layer in group]
    grids = [build_grid(W, spec) for W in Ws]  # scales fixed per layer from its own float weights
    W = torch.cat(Ws) if len(Ws) > 1 else Ws[0]
    grid = grids[0] if len(grids) == 1 else type(grids[0]).cat(grids)
    info: dict = {}
    start = time.perf_counter()
    Q = solver.quantize(W, H, G, grid, info=info, **options)
    solve_s = time.perf_counter() - start
    if not all_finite(Q):
        raise FloatingPointError(f"block {block} {group[0][0]}: the {solver.module} solver produced NaN/Inf")
    reports, row = [], 0
    for (name, layer), W_i in zip(group, Ws):
        rows = slice(row, row + W_i.shape[0])
        row += W_i.shape[0]
        Q_i = Q[rows]
        D = W_i - Q_i
        output_rel_error = None if H is None else relative_output_change(W_i, Q_i, H)
        layer.weight.data.copy_(Q_i.to(layer.weight.dtype))
        reports.append(LayerReport(
            block=block, name=name, out_features=W_i.shape[0], in_features=W_i.shape[1],
            weight_rel_error=float(D.norm() / W_i.norm().clamp(min=1e-30)), output_rel_error=output_rel_error,
            damping=float(info.get("damping", 0.0)), cholesky_retries=int(info.get("cholesky_retries", 0)),
            dead_inputs=int(info.get("dead_inputs", 0)), collapsed_groups=_collapsed_groups(W_i, grid.group_size),
            solve_s=solve_s * W_i.shape[0] / W.shape[0]))
    return reports


@torch.no_grad()
def quantize_model(model: nn.Module, spec: GridSpec, algorithm, calibration_ids: Optional[Tensor],
                   stream: str = "quantized", batch_size: int = 4, device: str | torch.device = "cpu",
                   progress: bool = True, float_cache_gb: float = 4.0,
                   options: Optional[dict] = None, meter=None) -> tuple[list[LayerReport], Budget]:
    """Replace every Linear weight inside the decoder blocks by its quantized value, block by block.

    `options` are the solver's keyword options (default: from `algorithm`). Activation and KV quantizers
    attached to the model (qbench.fakequant) stay on in the quantized stream, so X̃ includes their error,
    and are switched off in the float reference copy of each block, so X does not.
    `float_cache_gb` bounds each of the two per-block caches: the float inputs X of the block's sub-layer
    groups from one float pass, and the outputs of its quantized parts (OutputCache); above it, X is
    recomputed group by group, and the quantized prefix rerun (more forward passes, same numbers).
    `meter` (qbench.meter.Meter) times, or counts the FLOPs of, the phases forward, statistics and solve.
    """
    from qbench.meter import NULL_METER

    meter = NULL_METER if meter is None else meter
    device = torch.device(device)
    solver = REGISTRY[algorithm.name]
    options = solver_options(algorithm) if options is None else options
    blocks = decoder_blocks(model)
    reports: list[LayerReport] = []
    budget = Budget()
    if not solver.needs_H:  # data-free: no forward passes at all
        for i, block in enumerate(tqdm(blocks, desc=f"{algorithm.name}", disable=not progress)):
            with naming_out_of_memory(f"block {i}", device, lambda: "try " + _last_resort(device.type)):
                block.to(device)
                for group in linear_groups(block):
                    with meter.phase("solve"):
                        reports += _solve_group(group, None, None, solver, spec, options, i)
                block.to("cpu")
        return reports, budget
    if calibration_ids is None:
        raise ValueError(f"algorithm {algorithm.name} needs calibration data")
    windows = calibration_ids.shape[0]
    hidden_bytes = 4 * calibration_ids.numel() * model.config.hidden_size
    with meter.phase("forward"), naming_out_of_memory("the inputs of block 0", device, lambda: out_of_memory_advice(
            windows, batch_size, hidden_bytes, 0, float_cache_gb, device.type)):
        x_q, kwargs = capture_block_inputs(model, calibration_ids, batch_size, device)
    budget.tokens = sum(x.shape[0] * x.shape[1] for x in x_q)
    carry_float = solver.needs_G and stream == "dual"
    x_f = [x.clone() for x in x_q] if carry_float else None
    for i, block in enumerate(tqdm(blocks, desc=f"{algorithm.name} blocks", disable=not progress)):
        sizes = {"cache": 0}
        with naming_out_of_memory(f"block {i}", device, lambda: out_of_memory_advice(
                windows, batch_size, _nbytes(x_q) + _nbytes(x_f), sizes["cache"], float_cache_gb, device.type)):
            block.to(device)
            groups = linear_groups(block)
            float_block, float_layers, float_inputs = None, {}, None
            if solver.needs_G:
                float_block = copy.deepcopy(block)
                fakequant.set_enabled(float_block, False)
                float_layers = dict(float_block.named_modules())
                firsts = [group[0][0] for group in groups]
                cache_bytes = 4 * budget.tokens * sum(group[0][1].in_features for group in groups)
                if cache_bytes <= float_cache_gb * 2**30:  # X of every group from one float pass
                    sizes["cache"] += cache_bytes
                    with meter.phase("forward"):
                        float_inputs, float_outputs = _float_pass(
                            float_block, firsts, x_f if carry_float else x_q, kwargs, keep_output=carry_float)
                    if carry_float:
                        x_f = float_outputs
            linears_out = sum(layer.out_features for group in groups for _, layer in group)
            memo = OutputCache(block) if 4 * budget.tokens * linears_out <= float_cache_gb * 2**30 else None
            sizes["cache"] += 4 * budget.tokens * linears_out if memo else 0
            for group in groups:
                first_name, first = group[0]
                n = first.in_features
                # H = H_same + H_diff and G = H_same + G_diff, where "same" batches have X ≡ X̃ (e.g. the
                # q/k/v input in the quantized stream): their G contribution is H's, no second product
                H = torch.zeros(n, n, dtype=torch.float32, device=device)
                G = torch.zeros(n, n, dtype=torch.float32, device=device) if solver.needs_G else None
                H_same = torch.zeros_like(H) if solver.needs_G else None
                m = 0
                for b in range(len(x_q)):
                    with meter.phase("forward"), (memo.replay(b) if memo else contextlib.nullcontext()):
                        Xq = _capture_input(block, first, x_q[b], kwargs[b])  # X̃ᵀ: [tokens, n]
                        if G is not None and float_inputs is None:  # over the cache budget: X for this group only
                            source = x_f[b] if carry_float else x_q[b]
                            Xf = _capture_input(float_block, float_layers[first_name], source, kwargs[b])
                        elif G is not None:
                            Xf = float_inputs[b][first_name]
                    with meter.phase("statistics"):
                        _accumulate(H, G, H_same, Xq.float(), None if G is None else Xf.float(), budget)
                    m += Xq.shape[0]
                with meter.phase("statistics"):
                    if G is not None:
                        H += H_same
                        G += H_same
                    H /= m
                    if G is not None:
                        G /= m
                if not all_finite(H, *([] if G is None else [G])):
                    raise FloatingPointError(f"block {i} {first_name}: the calibration inputs hold NaN or Inf "
                                             "(a transform or an activation quantizer broke the model)")
                with meter.phase("solve"):
                    reports += _solve_group(group, H, G, solver, spec, options, i)
                if memo:
                    memo.mark_solved([name for name, _ in group])
            with meter.phase("forward"):
                for b in range(len(x_q)):
                    with memo.replay(b) if memo else contextlib.nullcontext():
                        x_q[b] = _block_output(block, x_q[b], kwargs[b])
                if carry_float and float_inputs is None:
                    x_f = [_block_output(float_block, x_f[b], kwargs[b]) for b in range(len(x_f))]
            del float_block, float_layers, float_inputs, memo
            block.to("cpu")
        faults.failpoint("calibration")
    return reports, budget


def _nbytes(tensors: Optional[list[Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors or [])


def _accumulate(H: Tensor, G: Optional[Tensor], H_same: Optional[Tensor], Xq: Tensor, Xf: Optional[Tensor],
                budget: Budget) -> None:
    """Add one batch's X̃ᵀX̃ to H and XᵀX̃ to G (all [tokens, n] inputs, float32 sums); a batch whose X equals
    X̃ adds its X̃ᵀX̃ once, to H_same, which later counts for both."""
    n = Xq.shape[1]
    if G is None:
        H.addmm_(Xq.T, Xq)
    elif torch.equal(Xf, Xq):
        H_same.addmm_(Xq.T, Xq)
    else:
        H.addmm_(Xq.T, Xq)
        G.addmm_(Xf.T, Xq)  # G[i, j] = <X_i, X̃_j>
        budget.statistics += 2.0 * n * n * Xq.shape[0]
    budget.statistics += 2.0 * n * n * Xq.shape[0]


def reports_as_rows(reports: list[LayerReport]) -> list[dict]:
    return [asdict(r) for r in reports]


def summarize(reports: list[LayerReport]) -> dict:
    """Aggregates of the telemetry for the results row."""
    if not reports:
        return {}
    errors = [r.output_rel_error for r in reports if r.output_rel_error is not None]
    return {
        "layers_quantized": len(reports),
        "mean_weight_rel_error": sum(r.weight_rel_error for r in reports) / len(reports),
        "mean_output_rel_error": (sum(errors) / len(errors)) if errors else math.nan,
        "max_damping": max(r.damping for r in reports),
        "cholesky_retries": sum(r.cholesky_retries for r in reports),
        "dead_inputs": sum(r.dead_inputs for r in reports),
        "collapsed_groups": sum(r.collapsed_groups for r in reports),
        "solve_time_s": sum(r.solve_s for r in reports),
    }


# ---- statistics for preprocessing transforms


def _linear_wanted(full_name: str, rel_name: str, names_filter) -> bool:
    """`names_filter`: None (every Linear), a callable on the full name, or a collection of full or
    block-relative names (e.g. "model.layers.3.self_attn.o_proj" or "self_attn.o_proj")."""
    if names_filter is None:
        return True
    if callable(names_filter):
        return bool(names_filter(full_name))
    return full_name in names_filter or rel_name in names_filter


@torch.no_grad()
def input_absmax(model: nn.Module, calibration_ids: Tensor, names_filter=None, batch_size: int = 4,
                 device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Per-input-channel max |x| over the calibration tokens of every Linear inside the decoder blocks.

    Keyed by the Linear's full module name ("model.layers.3.self_attn.o_proj"); tensors of length in_features
    on the host, float32 (float64 for a float64 model). Runs the model block by block, one block on `device` at a time, each block fed
    the previous block's output (the model as it is: call before a transform changes it). Stops after the
    last block that holds a wanted Linear.
    """
    device = torch.device(device)
    prefix = {id(m): n for n, m in model.named_modules()}
    blocks = decoder_blocks(model)
    wanted: list[list[tuple[str, nn.Linear]]] = []
    for block in blocks:
        base = prefix[id(block)]
        wanted.append([(f"{base}.{rel}", module) for rel, module in block.named_modules()
                       if isinstance(module, nn.Linear) and _linear_wanted(f"{base}.{rel}", rel, names_filter)])
    last = max((i for i, w in enumerate(wanted) if w), default=-1)
    stats: dict[str, Tensor] = {}
    if last < 0:
        return stats

    def hook_for(name: str):
        def hook(_module, args):
            x = args[0].detach()
            amax = x.reshape(-1, x.shape[-1]).abs().amax(dim=0)
            if amax.dtype not in (torch.float32, torch.float64):
                amax = amax.float()
            stats[name] = amax if name not in stats else torch.maximum(stats[name], amax)

        return hook

    hidden, kwargs = capture_block_inputs(model, calibration_ids, batch_size, device)
    for i, block in enumerate(blocks[:last + 1]):
        block.to(device)
        handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in wanted[i]]
        try:
            hidden = [_block_output(block, x, kw) for x, kw in zip(hidden, kwargs)]
        finally:
            for handle in handles:
                handle.remove()
            block.to("cpu")
    return {name: value.to("cpu") for name, value in stats.items()}


@torch.no_grad()
def apply_magr(model: nn.Module, calibration_ids: Tensor, alpha: float, batch_size: int = 4,
               device: str | torch.device = "cpu", iters: int | None = None, progress: bool = False) -> list[dict]:
    """MagR (qbench.transforms.magr) on every Linear inside the decoder blocks, in place, true-sequentially.

    Block by block on the float model (one block on `device` at a time): for each sub-layer group (q/k/v,
    o, gate/up, down) H = XXᵀ/m of the group's input is measured with the earlier groups of the block already
    MagR'd, the group's stacked weights are reduced (rows are independent given H), and the block's output
    (of the MagR'd block) feeds the next block. H is accumulated in float32 (float64 for a float64 model).
    (Brevitas's LLM example instead measures every H in one forward of the untouched model.)
    Returns one dict per Linear: block, name, rel_output_change = sqrt(tr(DHDᵀ)/tr(WHWᵀ)) with D = W − W'
    on this layer's calibration input, max_abs_before, max_abs_after, solve_s.
    """
    from qbench.transforms.magr import DEFAULT_ITERS, magr

    iters = DEFAULT_ITERS if iters is None else iters
    device = torch.device(device)
    reports: list[dict] = []
    hidden, kwargs = capture_block_inputs(model, calibration_ids, batch_size, device)
    for i, block in enumerate(tqdm(decoder_blocks(model), desc="MagR blocks", disable=not progress)):
        block.to(device)
        for group in linear_groups(block):
            first = group[0][1]
            acc = torch.float64 if first.weight.dtype == torch.float64 else torch.float32
            n = first.in_features
            H = torch.zeros(n, n, dtype=acc, device=device)
            m = 0
            for b in range(len(hidden)):
                X = _capture_input(block, first, hidden[b], kwargs[b]).to(acc)
                H.addmm_(X.T, X)
                m += X.shape[0]
            H /= max(m, 1)
            Ws = [layer.weight.data.to(acc) for _, layer in group]
            W = torch.cat(Ws) if len(Ws) > 1 else Ws[0]
            start = time.perf_counter()
            Wp = magr(W, H, alpha, iters=iters)
            solve_s = time.perf_counter() - start
            row = 0
            for (name, layer), W_i in zip(group, Ws):
                Wp_i = Wp[row:row + W_i.shape[0]]
                row += W_i.shape[0]
                reports.append({"block": i, "name": name, "rel_output_change": relative_output_change(W_i, Wp_i, H),
                                "max_abs_before": float(W_i.abs().max()),
                                "max_abs_after": float(Wp_i.abs().max()),
                                "solve_s": solve_s * W_i.shape[0] / W.shape[0]})
                layer.weight.data.copy_(Wp_i.to(layer.weight.dtype))
        hidden = [_block_output(block, hidden[b], kwargs[b]) for b in range(len(hidden))]
        block.to("cpu")
    return reports
