"""The pipeline quantizes every Linear inside the decoder blocks, and nothing else."""

import pytest
import torch
from omegaconf import OmegaConf

from qbench.models import decoder_blocks, linear_groups
from qbench.pipeline import capture_block_inputs, quantize_model
from qbench.quantizers import GridSpec, build_grid


def test_rtn_pipeline_puts_block_linears_on_the_grid(tiny_llama):
    float_state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    spec = GridSpec(bits=3)
    reports, _ = quantize_model(tiny_llama, spec, OmegaConf.create({"name": "rtn"}), None, progress=False)
    assert len(reports) == 2 * 7  # 2 blocks x (q, k, v, o, gate, up, down)
    assert [r.name for r in reports[:7]] == [name for group in linear_groups(decoder_blocks(tiny_llama)[0])
                                             for name, _ in group]
    for k, v in tiny_llama.state_dict().items():
        if "proj" in k:
            grid = build_grid(float_state[k], spec)  # scales come from the float weights
            torch.testing.assert_close(v, grid.quantize(float_state[k]))
            assert not torch.equal(v, float_state[k])
        else:  # embeddings, norms, lm_head stay float
            assert torch.equal(v, float_state[k]), k
    assert all(0 < r.weight_rel_error < 1 for r in reports)


def test_block_inputs_are_the_embeddings(tiny_llama):
    ids = torch.randint(2, 258, (4, 16), generator=torch.Generator().manual_seed(0))
    hidden, kwargs = capture_block_inputs(tiny_llama, ids, batch_size=2, device=torch.device("cpu"))
    assert len(hidden) == 2 and hidden[0].shape == (2, 16, 64)
    torch.testing.assert_close(torch.cat(hidden), tiny_llama.model.embed_tokens(ids))
    assert "position_embeddings" in kwargs[0]
    # feeding the captured inputs through the blocks reproduces the model's last hidden state
    x = hidden[0]
    for block in decoder_blocks(tiny_llama):
        out = block(x, **kwargs[0])
        x = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(tiny_llama.model.norm(x), tiny_llama.model(ids[:2]).last_hidden_state)


class RecordingSolver:
    """Stands in for a registered solver: records the statistics it is given, answers with RTN."""

    module = "recording"

    def __init__(self, needs_G):
        self.needs_H, self.needs_G, self.seen = True, needs_G, {}

    def quantize(self, W, H, G, quantizer, *, info=None):
        self.seen[self.current] = (H.clone(), None if G is None else G.clone())
        return quantizer(W, torch.arange(W.shape[1]))


def layer_inputs(model, ids, path):
    """Inputs of one Linear over a full forward of `model`, as [tokens, n]."""
    seen = []
    handle = model.get_submodule(path).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])


def run_recording(model, ids, stream, monkeypatch, float_cache_gb):
    import qbench.pipeline as pipeline

    solver = RecordingSolver(needs_G=True)
    original = pipeline._solve_group

    def solve(group, H, G, _solver, spec, options, block):
        solver.current = (block, group[0][0])
        return original(group, H, G, solver, spec, options, block)

    monkeypatch.setitem(pipeline.REGISTRY, "recording", solver)
    monkeypatch.setattr(pipeline, "_solve_group", solve)
    quantize_model(model, GridSpec(bits=2), OmegaConf.create({"name": "recording"}), ids, stream=stream,
                   batch_size=2, progress=False, float_cache_gb=float_cache_gb)
    return solver.seen


@pytest.mark.parametrize("float_cache_gb", [4.0, 0.0])  # X from one float pass, or recomputed per group
@pytest.mark.parametrize("stream", ["quantized", "dual"])
def test_statistics_match_full_model_forwards(tiny_llama, stream, float_cache_gb, monkeypatch):
    """H = X̃X̃ᵀ/m and G = XX̃ᵀ/m, X̃ from the quantized model, X as the stream defines it."""
    import copy

    ids = torch.randint(2, 258, (4, 24), generator=torch.Generator().manual_seed(1))
    float_model = copy.deepcopy(tiny_llama)
    seen = run_recording(tiny_llama, ids, stream, monkeypatch, float_cache_gb)  # tiny_llama is now quantized
    m = ids.numel()
    for block, name in [(0, "self_attn.q_proj"), (1, "self_attn.q_proj"), (1, "mlp.down_proj")]:
        path = f"model.layers.{block}.{name}"
        Xq = layer_inputs(tiny_llama, ids, path)  # a Linear's input never depends on its own weight
        if stream == "dual":
            X = layer_inputs(float_model, ids, path)
        else:  # the float copy of this block, fed the quantized model's input of the block
            hybrid = copy.deepcopy(tiny_llama)
            hybrid.model.layers[block].load_state_dict(float_model.model.layers[block].state_dict())
            X = layer_inputs(hybrid, ids, path)
        H, G = seen[(block, name)]
        torch.testing.assert_close(H, Xq.T @ Xq / m, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(G, X.T @ Xq / m, rtol=1e-4, atol=1e-5)
    # the dual stream sees the past: at block 1, X (float model) differs from X̃ (quantized model)
    H, G = seen[(1, "self_attn.q_proj")]
    assert (stream == "dual") == (not torch.allclose(G, H, rtol=1e-3, atol=1e-4))


@pytest.mark.parametrize("algorithm", ["rtn", "optq", "gpfq", "qronos"])
def test_stacked_group_solve_equals_separate_solves(algorithm):
    """q/k/v (and gate/up) are solved as one stacked matrix: exactly the per-layer solutions."""
    from qbench.algorithms import REGISTRY
    from qbench.pipeline import _solve_group

    g = torch.Generator().manual_seed(3)
    n, m = 24, 200
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    X = A @ torch.randn(n, m, generator=g, dtype=torch.float64)
    Xq = X + 0.1 * torch.randn(n, m, generator=g, dtype=torch.float64)
    H, G = (Xq @ Xq.T / m).float(), (X @ Xq.T / m).float()
    layers = [(f"l{i}", torch.nn.Linear(n, rows, bias=False)) for i, rows in enumerate([24, 8, 8])]
    spec = GridSpec(bits=3, group_size=8)
    options = {"rtn": {}, "optq": {"act_order": True}, "gpfq": {"act_order": True}, "qronos": {"act_order": True}}[algorithm]
    solver = REGISTRY[algorithm]
    expected = [solver.quantize(layer.weight.data.clone(), H, G, build_grid(layer.weight.data, spec), **options)
                for _, layer in layers]
    reports = _solve_group(layers, H, G, solver, spec, options, block=0)
    for (_, layer), Q in zip(layers, expected):
        torch.testing.assert_close(layer.weight.data, Q, rtol=1e-5, atol=1e-6)
    assert [r.out_features for r in reports] == [24, 8, 8]


def test_mxfp4_weights_land_on_the_mx_grid(tiny_llama):
    from qbench.quantizers import mx_quantize

    float_state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    quantize_model(tiny_llama, GridSpec(bits=4, format="mxfp4"), OmegaConf.create({"name": "rtn"}), None,
                   progress=False)
    for k, v in tiny_llama.state_dict().items():
        if "proj" in k:
            assert torch.equal(v, mx_quantize(float_state[k])), k


@pytest.mark.parametrize("algorithm", ["optq", "qronos"])
def test_replaying_final_outputs_changes_nothing_but_the_work(tiny_llama, one_thread, algorithm):
    """The outputs of already-quantized submodules are replayed, not recomputed: the same weights, bit for
    bit, as a run that reruns the block prefix for every group (caches off), with fewer forward FLOPs."""
    import copy

    from qbench.meter import Meter

    ids = torch.randint(2, 258, (4, 32), generator=torch.Generator().manual_seed(2))
    options = {"optq": {"act_order": True}, "qronos": {"alpha": 1e-6, "act_order": True}}[algorithm]
    runs = {}
    for cache_gb in (4.0, 0.0):
        model = copy.deepcopy(tiny_llama)
        meter = Meter(count_flops=True)
        quantize_model(model, GridSpec(bits=3), OmegaConf.create({"name": algorithm}), ids, batch_size=2,
                       progress=False, float_cache_gb=cache_gb, options=options, meter=meter)
        runs[cache_gb] = (model.state_dict(), meter.flops)
    (cached, cached_flops), (plain, plain_flops) = runs[4.0], runs[0.0]
    for name, value in cached.items():
        assert torch.equal(value, plain[name]), name
    assert cached_flops["forward"] < 0.7 * plain_flops["forward"]
    assert cached_flops["statistics"] == plain_flops["statistics"] and cached_flops["solve"] == plain_flops["solve"]


def _failing_solve(block_index, error):
    """A _solve_group stand-in that raises `error` when it reaches `block_index`."""
    from qbench import pipeline

    real = pipeline._solve_group

    def solve(group, H, G, solver, spec, options, i):
        if i == block_index:
            raise error
        return real(group, H, G, solver, spec, options, i)

    return solve


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 2147483648 bytes. Error code 12 (Cannot allocate memory)"),
])
def test_out_of_memory_names_the_block_and_the_settings_that_fit(tiny_llama, monkeypatch, error):
    from qbench import pipeline

    monkeypatch.setattr(pipeline, "_solve_group", _failing_solve(1, error))
    ids = torch.randint(2, 258, (8, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(pipeline.DeviceOutOfMemory) as caught:
        quantize_model(tiny_llama, GridSpec(bits=4), OmegaConf.create({"name": "qronos"}), ids,
                       batch_size=4, progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("block 1 did not fit on cpu (")
    # the caches of this block are tiny but present, the batch can halve, the windows can halve
    assert "calibration.float_cache_gb=0 " in message
    assert "calibration.batch_size=2 " in message
    assert "data.nsamples=4 " in message and message.endswith("or a machine with more memory")
    # X̃ of 8 windows x 16 tokens x 64 hidden, float32
    assert f"take {8 * 16 * 64 * 4 / 2**30:.2f} GiB" in message


def test_other_runtime_errors_pass_through(tiny_llama, monkeypatch):
    from qbench import pipeline

    monkeypatch.setattr(pipeline, "_solve_group", _failing_solve(0, RuntimeError("shape mismatch")))
    ids = torch.randint(2, 258, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        quantize_model(tiny_llama, GridSpec(bits=4), OmegaConf.create({"name": "optq"}), ids, progress=False)


def test_out_of_memory_advice_sizes_the_cache_setting():
    from qbench.pipeline import out_of_memory_advice

    advice = out_of_memory_advice(windows=1, batch_size=1, activation_bytes=2**30, cache_bytes=3 * 2**30,
                                  float_cache_gb=4.0)
    # half of what the caches held, so this block's caches are recomputed; nothing else can shrink
    assert advice == ("try calibration.float_cache_gb=1.5 (the block's caches hold 3.00 GiB under the current 4; "
                      "0 recomputes everything: same numbers, more passes), or device=cpu (the host's memory)")
