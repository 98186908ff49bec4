"""Device memory that does not grow with depth; bf16/fp16 models with float32 statistics; CUDA where present."""

import copy

import pytest
import torch
from omegaconf import OmegaConf

from qbench import pipeline
from qbench.memory import DevicePeak
from qbench.models import decoder_blocks, linear_groups, tiny_model
from qbench.quantizers import GridSpec, build_grid

from conftest import TINY_LLAMA

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
QRONOS = OmegaConf.create({"name": "qronos"})
OPTIONS = {"alpha": 1e-6, "act_order": True}


def calibration_ids(n=8, seqlen=64):
    ids = torch.randint(2, 258, (n, seqlen), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 0
    return ids


def peak_bytes(layers: int, device: str, dtype=torch.float32) -> int:
    model = tiny_model({**TINY_LLAMA, "num_hidden_layers": layers}, seed=0).to(dtype)
    with DevicePeak(device) as peak:
        pipeline.quantize_model(model, GridSpec(bits=4), QRONOS, calibration_ids(), device=device, options=OPTIONS,
                                progress=False)
    return peak.peak_bytes


def test_device_peak_is_the_same_for_4_and_16_layers(one_thread):
    """On the CPU the tracker follows every tensor the pipeline allocates (the model's own weights are
    resident already): one block's activations, statistics, float copy and solver temporaries."""
    four, sixteen = peak_bytes(4, "cpu"), peak_bytes(16, "cpu")
    activations = 8 * 64 * TINY_LLAMA["hidden_size"] * 4  # X̃ of one block input, float32
    assert four > 2 * activations  # it sees real allocations ...
    assert abs(sixteen / four - 1) < 0.10, (four, sixteen)  # ... and they do not grow with depth


def test_the_tracker_sees_memory_that_grows_with_depth(one_thread, monkeypatch):
    """Control: a pipeline that kept every block's output alive would fail the test above."""
    kept = []
    original = pipeline._block_output

    def leaky(block, hidden, kwargs):
        out = original(block, hidden, kwargs)
        kept.append(out)
        return out

    monkeypatch.setattr(pipeline, "_block_output", leaky)
    four, sixteen = peak_bytes(4, "cpu"), peak_bytes(16, "cpu")
    assert sixteen > 1.5 * four, (four, sixteen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_float32_statistics(tiny_llama, one_thread, monkeypatch, dtype):
    """A bf16/fp16 model calibrates in its own dtype; H and G are float32 and the weights land on the grid
    fixed from the float weights (in the model's dtype)."""
    seen = []
    original = pipeline._solve_group

    def spy(group, H, G, solver, spec, options, block):
        seen.append((H.dtype, G.dtype))
        return original(group, H, G, solver, spec, options, block)

    monkeypatch.setattr(pipeline, "_solve_group", spy)
    reference = copy.deepcopy(tiny_llama)
    model = tiny_llama.to(dtype)
    floats = {f"{i}.{n}": layer.weight.data.float() for i, b in enumerate(decoder_blocks(model))
              for group in linear_groups(b) for n, layer in group}
    pipeline.quantize_model(model, GridSpec(bits=4), QRONOS, calibration_ids(), options=OPTIONS, progress=False)
    assert seen and all(h == torch.float32 and g == torch.float32 for h, g in seen)
    for i, block in enumerate(decoder_blocks(model)):
        for group in linear_groups(block):
            for name, layer in group:
                Q = layer.weight.data
                assert Q.dtype == dtype
                grid = build_grid(floats[f"{i}.{name}"], GridSpec(bits=4))
                assert torch.equal(grid.quantize(Q.float()).to(dtype), Q), name
    pipeline.quantize_model(reference, GridSpec(bits=4), QRONOS, calibration_ids(), options=OPTIONS, progress=False)
    ids = calibration_ids(4, 128)
    with torch.no_grad():
        half = model(ids).logits.float().log_softmax(-1)
        full = reference(ids).logits.log_softmax(-1)
    assert float((half - full).abs().mean()) < 0.05  # the half-precision run quantizes about as float32 does


@CUDA
def test_cuda_device_peak_is_the_same_for_4_and_16_layers():
    four, sixteen = peak_bytes(4, "cuda"), peak_bytes(16, "cuda")
    assert four > 0 and abs(sixteen / four - 1) < 0.10, (four, sixteen)


@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision_quantization(tiny_llama, dtype):
    model = tiny_llama.to(dtype)
    floats = {f"{i}.{n}": layer.weight.data.float() for i, b in enumerate(decoder_blocks(model))
              for group in linear_groups(b) for n, layer in group}
    pipeline.quantize_model(model, GridSpec(bits=4), QRONOS, calibration_ids(), device="cuda", options=OPTIONS,
                            progress=False)
    for i, block in enumerate(decoder_blocks(model)):
        for group in linear_groups(block):
            for name, layer in group:
                assert layer.weight.device.type == "cpu"  # back on the host
                grid = build_grid(floats[f"{i}.{name}"], GridSpec(bits=4))
                assert torch.equal(grid.quantize(layer.weight.data.float()).to(dtype), layer.weight.data), name


@CUDA
def test_cuda_brevitas_backend_runs(tiny_llama):
    pytest.importorskip("brevitas")
    from qbench import brevitas_backend

    reports, _ = brevitas_backend.quantize_model(tiny_llama, GridSpec(bits=4), "qronos", calibration_ids(),
                                                 OPTIONS, device="cuda", progress=False)
    assert len(reports) == 14 and all(p.device.type == "cpu" for p in tiny_llama.parameters())
