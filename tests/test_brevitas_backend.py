"""algorithm.backend=brevitas: Brevitas's GPTQ, GPFQ and Qronos on qbench's model, calibration and grid."""

import copy
import math

import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("brevitas")

from qbench import brevitas_backend, pipeline  # noqa: E402
from qbench.config import ConfigError, validate  # noqa: E402
from qbench.models import decoder_blocks, linear_groups  # noqa: E402
from qbench.quantizers import GridSpec, build_grid  # noqa: E402

OPTIONS = {"rtn": {}, "optq": {"percdamp": 0.01, "act_order": True}, "gpfq": {"act_order": True},
           "qronos": {"alpha": 1e-6, "act_order": True}}


def calibration_ids(n=8, seqlen=64, seed=0):
    ids = torch.randint(2, 258, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 0  # BOS first, as data.calibration_windows does
    return ids


def both_backends(model, algorithm, spec, options, ids):
    """(native-quantized copy, brevitas-quantized copy) of `model`."""
    native, brevitas = copy.deepcopy(model), copy.deepcopy(model)
    pipeline.quantize_model(native, spec, OmegaConf.create({"name": algorithm}), ids, options=options, progress=False)
    reports, _ = brevitas_backend.quantize_model(brevitas, spec, algorithm, ids, options, progress=False)
    return native, brevitas, reports


def block_weights(model):
    return {f"{i}.{name}": layer.weight.data for i, block in enumerate(decoder_blocks(model))
            for group in linear_groups(block) for name, layer in group}


def mean_nll(model, ids):
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


@pytest.mark.parametrize("spec", [GridSpec(bits=4), GridSpec(bits=3), GridSpec(bits=3, group_size=32),
                                  GridSpec(bits=1.58, sym=True), GridSpec(bits=4, sym=True)])
def test_brevitas_quantizer_is_the_qbench_grid(spec):
    """Brevitas's weight quantizer, initialised from the float weights, rounds them exactly as qbench's grid."""
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 24, bias=False)
    linear.weight.data = torch.randn(24, 64, generator=g)
    linear.weight.data[3] = linear.weight.data[3].abs()  # a row without negative weights: zero point at 0
    W = linear.weight.data.clone()
    holder = torch.nn.Module()
    holder.layer = linear
    brevitas_backend.to_quant_linears(holder, ["layer"], spec)
    assert type(holder.layer).__name__ == "QuantLinear"
    Q = holder.layer.quant_weight().value.detach()
    torch.testing.assert_close(Q, build_grid(W, spec).quantize(W), rtol=0, atol=0)


def test_exact_ties_round_the_same_way():
    """Weights that sit on a coarser grid (as dequantized GGUF weights do) hit exact ties: scale 1 and odd
    zero point 7 put every half-integer weight half-way between codes; both break ties on the code."""
    g = torch.Generator().manual_seed(1)
    halves = torch.randint(-14, 17, (16, 62), generator=g) / 2.0
    W = torch.cat([torch.full((16, 1), -7.0), torch.full((16, 1), 8.0), halves], dim=1)
    linear = torch.nn.Linear(64, 16, bias=False)
    linear.weight.data = W.clone()
    holder = torch.nn.Module()
    holder.layer = linear
    brevitas_backend.to_quant_linears(holder, ["layer"], GridSpec(bits=4))
    grid = build_grid(W, GridSpec(bits=4))
    assert torch.all(grid.scale == 1) and torch.all(grid.zero == 7)
    torch.testing.assert_close(holder.layer.quant_weight().value.detach(), grid.quantize(W), rtol=0, atol=0)


@pytest.mark.parametrize("algorithm", ["rtn", "optq", "gpfq"])
def test_brevitas_solvers_equal_native_on_the_tiny_model(tiny_llama, one_thread, algorithm):
    """Same data, grid, act-order and damping: RTN, GPTQ and GPFQ give the native weights bit for bit."""
    native, brevitas, reports = both_backends(tiny_llama, algorithm, GridSpec(bits=3), OPTIONS[algorithm],
                                              calibration_ids())
    assert len(reports) == 14 and all(0 < r.weight_rel_error < 1 for r in reports)
    floats, ours, theirs = block_weights(tiny_llama), block_weights(native), block_weights(brevitas)
    for name, Q in theirs.items():
        assert torch.equal(Q, ours[name]), name
        assert not torch.equal(Q, floats[name]), name
    for (name, p), (_, q) in zip(tiny_llama.named_parameters(), brevitas.named_parameters()):
        if "proj" not in name:  # embeddings, norms, lm_head untouched
            assert torch.equal(p, q), name
    assert all(type(m).__name__ != "QuantLinear" for m in brevitas.modules())


def test_brevitas_qronos_equals_native_given_its_sigma_estimate(tiny_llama, one_thread, monkeypatch):
    """The one systematic difference in Qronos is λ = alpha·σ_max(H): Brevitas estimates σ_max with 30 power
    iterations. Give qbench that estimate and, where λ dominates float rounding (alpha = 1e-2), the two agree
    bit for bit on every Linear (act_order off: Brevitas's estimate depends on the column order)."""
    from brevitas.graph.utils import power_iteration

    import qbench.algorithms._linalg as linalg

    monkeypatch.setattr(linalg, "sigma_max", lambda H, **_: float(power_iteration(H, 30)))
    options = {"alpha": 1e-2, "act_order": False}
    native, brevitas, _ = both_backends(tiny_llama, "qronos", GridSpec(bits=3), options, calibration_ids())
    ours, theirs = block_weights(native), block_weights(brevitas)
    for name, Q in theirs.items():
        assert torch.equal(Q, ours[name]), name


def test_brevitas_qronos_defaults_on_the_grid_and_close_to_native(tiny_llama, one_thread):
    """At alpha = 1e-6 the tiny model's o_proj input is nearly rank deficient (4 heads over 2 KV heads,
    cond(H) ~ 1e5), so float32 rounding flips some roundings: the weights stay on the same grid and the
    perplexity of the two backends agrees closely."""
    ids = calibration_ids()
    native, brevitas, _ = both_backends(tiny_llama, "qronos", GridSpec(bits=3), OPTIONS["qronos"], ids)
    floats, theirs = block_weights(tiny_llama), block_weights(brevitas)
    for name, Q in theirs.items():
        grid = build_grid(floats[name], GridSpec(bits=3))
        assert torch.equal(grid.quantize(Q), Q), name  # Q is on the grid fixed from the float weights
    held_out = calibration_ids(n=4, seqlen=128, seed=5)
    nll_native, nll_brevitas = mean_nll(native, held_out), mean_nll(brevitas, held_out)
    assert abs(math.exp(nll_brevitas) / math.exp(nll_native) - 1) < 0.01


def test_brevitas_runs_a_bf16_model(tiny_llama, one_thread):
    """bf16 weights: Brevitas solves in float32 (its buffers) and writes bf16 values back. Its scales and zero
    points are computed and kept in the weights' dtype (bf16), qbench's in float32: the grid values then
    differ by bf16 rounding (of scale, zero point and each value): a few values, at the ends of the range,
    land one code beyond qbench's."""
    model = tiny_llama.to(torch.bfloat16)
    floats = {k: v.float() for k, v in block_weights(model).items()}
    reports, budget = brevitas_backend.quantize_model(model, GridSpec(bits=4), "optq", calibration_ids(),
                                                      OPTIONS["optq"], progress=False)
    assert budget.statistics > 0 and len(reports) == 14
    for name, Q in block_weights(model).items():
        assert Q.dtype == torch.bfloat16
        grid = build_grid(floats[name], GridSpec(bits=4))
        nearest = grid.quantize(Q.float()).to(torch.bfloat16)  # qbench's grid point, in bf16
        off = (Q.float() - nearest.float()).abs()
        assert bool((off <= grid.scale * 1.05).all()), name  # never more than one step away
        assert float((off > 0.5 * grid.scale).float().mean()) < 0.01, name  # nearly all on the same code


def make(*overrides):
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from qbench.config import register_configs

    GlobalHydra.instance().clear()
    register_configs()
    conf = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(config_name="config", overrides=["model=tiny-llama", *overrides])


@pytest.mark.parametrize("overrides,expected", [
    (["quant=w4a4"], "quant.a_bits/kv_bits < 16"),
    (["calibration.stream=dual"], "calibration.stream=dual"),
    (["preprocess=quarot"], "preprocess.rotation=quarot"),
    (["quant=w4a4_mxfp4", "quant.a_bits=16"], "quant.w_format=mxfp4"),
    (["quant.w_scale=mse"], "quant.w_scale=mse"),
    (["quant=w2"], "quant.w_shrink=0.8"),
    (["algorithm=optq", "algorithm.block_size=8"], "algorithm.block_size=8"),
    (["algorithm.backend=nope"], "algorithm.backend='nope' must be one of"),
])
def test_brevitas_backend_refuses_what_it_cannot_map_in_one_line(overrides, expected):
    backend = [] if any(o.startswith("algorithm.backend") for o in overrides) else ["algorithm.backend=brevitas"]
    cfg = make(*overrides, *backend)
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")) as info:
        validate(cfg)
    assert "\n" not in str(info.value)


def test_brevitas_backend_validates_the_weight_only_presets():
    for algorithm in ("rtn", "optq", "gpfq", "qronos"):
        for quant in ("w4", "w3", "w4g128"):
            validate(make(f"algorithm={algorithm}", f"quant={quant}", "algorithm.backend=brevitas"))


def test_cli_records_a_brevitas_row(tmp_path):
    """`qbench algorithm.backend=brevitas` runs end to end and its row says who solved."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    qbench = str(Path(sys.executable).parent / "qbench")
    args = ["model=tiny-llama", "data.seqlen=64", "data.nsamples=4", "eval.seqlen=128", "eval.max_tokens=1024",
            "tracking.wandb_mode=disabled", "algorithm=optq", "algorithm.backend=brevitas", "quant=w3"]
    proc = subprocess.run([qbench, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(p.read_text()) for p in (tmp_path / "results" / "rows").glob("*.json")]
    row = next(r for r in rows if r["algorithm"] == "optq")
    assert row["backend"] == "brevitas" and row["config"]["algorithm"]["backend"] == "brevitas"
    assert row["layers_quantized"] == 14 and row["statistics_gflop"] > 0 and row["ppl/enwiki-excerpt/gptq"] > 1
    assert next(r for r in rows if r["algorithm"] == "float")["backend"] is None


def test_qronos_float32_routes_against_a_float64_solve(tiny_llama, one_thread, monkeypatch):
    """What remains of the Qronos difference at alpha = 1e-6 is the float32 route through an ill-conditioned
    H (the tiny model's o_proj input: cond ~1e5): Brevitas forms (H + λI)⁻¹ explicitly (cholesky_inverse,
    a Sherman-Morrison downdate of that inverse, then the Cholesky of the inverse), qbench the inverse
    Cholesky factor once (its trailing block is the Schur complement's). Given the same H and G, qbench's
    float32 weights sit closer to a float64 solve, whichever of the two σ_max estimates that solve uses."""
    from brevitas.graph.qronos import Qronos
    from brevitas.graph.utils import power_iteration

    import qbench.algorithms._linalg as linalg
    from qbench.algorithms import qronos

    seen = {}
    original = pipeline._solve_group

    def spy(group, H, G, solver, spec, options, block):
        seen[(block, group[0][0])] = (H.clone(), G.clone(), group[0][1].weight.data.clone())
        return original(group, H, G, solver, spec, options, block)

    monkeypatch.setattr(pipeline, "_solve_group", spy)
    pipeline.quantize_model(tiny_llama, GridSpec(bits=3), OmegaConf.create({"name": "qronos"}), calibration_ids(),
                            options=OPTIONS["qronos"], progress=False)
    H, G, W = seen[(0, "self_attn.o_proj")]
    grid = build_grid(W, GridSpec(bits=3))
    holder = torch.nn.Module()
    holder.layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    holder.layer.weight.data = W.clone()
    brevitas_backend.to_quant_linears(holder, ["layer"], GridSpec(bits=3))
    theirs = Qronos(holder.layer, "layer", True, 1, True, num_blocks=100, alpha=1e-6)
    theirs.H, theirs.G = H.clone()[None], G.clone()[None]
    theirs.single_layer_update()
    Q_brevitas = holder.layer.quant_weight().value.detach()
    Q_qbench = qronos.quantize(W, H, G, grid, alpha=1e-6, act_order=True)
    references = [qronos.quantize(W.double(), H.double(), G.double(), grid, alpha=1e-6, act_order=True)]
    monkeypatch.setattr(linalg, "sigma_max", lambda A, **_: float(power_iteration(A.float(), 30)))
    references.append(qronos.quantize(W.double(), H.double(), G.double(), grid, alpha=1e-6, act_order=True))
    for Q64 in references:
        ours, brevitas = int((Q_qbench != Q64.float()).sum()), int((Q_brevitas != Q64.float()).sum())
        assert ours < brevitas / 2, (ours, brevitas)
