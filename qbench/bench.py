"""Benchmark of whole-model quantization time per algorithm (design.md §7), with its own baselines.

    python -m qbench.bench                          # W4, 16 x 256 calibration tokens, all algorithms
    python -m qbench.bench algorithm_names=[optq,qronos] quant=w3

Every algorithm quantizes a fresh copy of the same model on the same calibration windows. Each is
timed, then run once more under torch's FlopCounterMode to count the matmul FLOPs it needed (the
forward passes, the H/G accumulation and the blocked solver updates). The floor is those FLOPs at the
fp32 matmul rate measured in the same process (a 4096² GEMM), so "x floor" is time / floor. Brevitas's
figure is the one design.md §7 records for this machine (Qronos 247 s, GPTQ 172 s, same model, W4,
16 x 256 tokens): it is quoted, not re-measured here.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch.utils.flop_counter import FlopCounterMode

from qbench import data, models, pipeline
from qbench.cli import CONF_DIR, pick_device
from qbench.config import register_configs, validate
from qbench.quantizers import spec_from_config

BREVITAS_SECONDS = {"qronos": 247.0, "optq": 172.0}  # design.md §7, quantization alone, this CPU


def matmul_rate(n: int = 4096, repeats: int = 3) -> float:
    """Achieved fp32 GEMM FLOP/s on this machine right now (the baseline of the floor)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def quantize_once(cfg, calibration, device, count_flops: bool):
    """Quantize a freshly loaded model; return (seconds, counted FLOPs or None, telemetry)."""
    model = models.load(cfg.model).model
    counter = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
    start = time.perf_counter()
    with counter:
        reports, _ = pipeline.quantize_model(model, spec_from_config(cfg.quant), cfg.algorithm, calibration,
                                             cfg.calibration.stream, cfg.calibration.batch_size, device,
                                             progress=False, float_cache_gb=cfg.calibration.float_cache_gb)
    seconds = time.perf_counter() - start
    return seconds, (counter.get_total_flops() if count_flops else None), reports


def main(argv: list[str]) -> None:
    algorithm_names = ["rtn", "optq", "gpfq", "qronos"]
    overrides = []
    for arg in argv:
        if arg.startswith("algorithm_names="):
            algorithm_names = arg.split("=", 1)[1].strip("[]").split(",")
        else:
            overrides.append(arg)
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base = compose(config_name="config", overrides=["quant=w4", "data.nsamples=16", "data.seqlen=256", *overrides])
    device = pick_device(base.device)
    loaded = models.load(base.model)
    tokens = data.tokenize(loaded.tokenizer, data.load_text(base.data.source, "train"))
    calibration = data.calibration_windows(tokens, base.data.nsamples, base.data.seqlen, base.data.seed,
                                           getattr(loaded.tokenizer, "bos_token_id", None))
    rate = matmul_rate()
    print(f"model {base.model.name}, {base.quant.name}, calibration {base.data.nsamples} x {base.data.seqlen} tokens, "
          f"stream {base.calibration.stream}, device {device}, torch threads {torch.get_num_threads()}")
    print(f"fp32 GEMM rate measured now: {rate / 1e9:.0f} GFLOP/s")
    results = {}
    for name in algorithm_names:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"algorithm={name}", "quant=w4", "data.nsamples=16",
                                                            "data.seqlen=256", *overrides])
        validate(cfg)
        seconds, _, reports = quantize_once(cfg, calibration, device, count_flops=False)
        _, flops, _ = quantize_once(cfg, calibration, device, count_flops=True)
        floor = flops / rate
        solve = sum(r.solve_s for r in reports)
        results[name] = dict(seconds=seconds, tflop=flops / 1e12, floor_s=floor, x_floor=seconds / floor if floor else None,
                             solve_s=solve, achieved_gflops=flops / seconds / 1e9)
        brevitas = BREVITAS_SECONDS.get(name)
        results[name]["brevitas_s"] = brevitas
        print(f"{name:7s} {seconds:7.1f} s  solves {solve:6.1f} s  {flops / 1e12:6.2f} TFLOP counted  "
              f"{flops / seconds / 1e9:6.0f} GFLOP/s  {seconds / floor if floor else float('nan'):5.2f} x floor"
              + (f"  Brevitas {brevitas:.0f} s -> {brevitas / seconds:4.1f} x faster" if brevitas else ""))
    if "optq" in results and "qronos" in results:
        ratio = results["qronos"]["seconds"] / results["optq"]["seconds"]
        print(f"Qronos / OPTQ time ratio: {ratio:.2f} (target <= 1.3)")
        results["qronos_over_optq"] = ratio
    out = Path(base.tracking.dir) / "bench" / f"quant_speed_{base.quant.name}_{base.calibration.stream}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(gemm_gflops=rate / 1e9, overrides=overrides, results=results), indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
