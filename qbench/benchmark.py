"""Benchmark of whole-model quantization, qbench's solvers against Brevitas's, in one run (design.md §7).

    python -m qbench.benchmark                              # W4, 16 x 256 tokens, four algorithms, both backends
    python -m qbench.benchmark algorithms=[optq,qronos] backends=[qbench] quant=w3
    python -m qbench.benchmark count_brevitas=true          # also count Brevitas's FLOPs (another run each)

Every (algorithm, backend) quantizes a freshly loaded model on the same calibration windows in its own
child process, so that each has its own peak host memory and nothing is cached between them. Loading
and data preparation are not timed; the timed part is the whole block-by-block calibration (capture,
forward passes, statistics, solves, write-back), split by phase. A second run of each native algorithm
counts its matmul FLOPs by phase under torch's FlopCounterMode (plus the in-place, matrix-vector,
Cholesky, triangular and CPU-attention ops it misses: qbench.meter) and, on the CPU, tracks the device
working set (qbench.memory). The floor of an algorithm is its counted FLOPs at this machine's matmul
rate (a 4096² GEMM in the model's dtype, best of several, measured at the start and at the end; the
higher is used): "x floor" = time / floor. Brevitas's runs do the same work (same windows, grid and
layers), so they are set against the same floor. Any Hydra override of `qbench` works (quant=, data.*,
device=, model=); the table goes to <tracking.dir>/benchmark/.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

DEFAULTS = ["quant=w4", "data.nsamples=16", "data.seqlen=256"]
ALGORITHMS = ["rtn", "optq", "gpfq", "qronos"]
BACKENDS = ["qbench", "brevitas"]


def compose_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from qbench.cli import CONF_DIR
    from qbench.config import register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*DEFAULTS, *overrides])
    validate(cfg)
    return cfg


def matmul_rate(device, dtype, n: int = 4096, repeats: int = 5) -> float:
    """Best achieved GEMM FLOP/s of one n x n x n product on `device` in `dtype` (after a warm-up)."""
    import torch

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first product is the warm-up
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def measure(overrides: list[str], algorithm: str, backend: str, count: bool) -> dict:
    """One quantization of a freshly loaded model (run in a child process): time, phases, memory, FLOPs."""
    import torch

    from qbench import data, models, pipeline
    from qbench.cli import pick_device
    from qbench.config import solver_options
    from qbench.memory import DevicePeak, host_current_mb, host_peak_mb
    from qbench.meter import Meter
    from qbench.quantizers import spec_from_config

    cfg = compose_config([*overrides, f"algorithm={algorithm}", f"algorithm.backend={backend}"])
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    loaded = models.load(cfg.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    calibration = None
    if algorithm != "rtn":
        tokens = data.tokenize(tokenizer, data.load_text(cfg.data.source, "train"))
        calibration = data.calibration_windows(tokens, cfg.data.nsamples, cfg.data.seqlen, cfg.data.seed,
                                               getattr(tokenizer, "bos_token_id", None))
    spec, options = spec_from_config(cfg.quant), solver_options(cfg)
    if backend == "brevitas":
        from qbench import brevitas_backend
        import brevitas.graph.gpfq, brevitas.graph.gptq, brevitas.graph.qronos, brevitas.nn  # noqa: E401,F401

        def run(meter):
            return brevitas_backend.quantize_model(model, spec, algorithm, calibration, options,
                                                   batch_size=cfg.calibration.batch_size, device=device,
                                                   progress=False, meter=meter)
    else:
        def run(meter):
            return pipeline.quantize_model(model, spec, cfg.algorithm, calibration, cfg.calibration.stream,
                                           cfg.calibration.batch_size, device, progress=False,
                                           float_cache_gb=cfg.calibration.float_cache_gb, options=options,
                                           meter=meter)
    meter = Meter(count_flops=count, device=device)
    host_before = host_current_mb()
    track_device = device.type == "cuda" or count  # the CPU tracker slows every op: counted runs only
    peak = DevicePeak(device) if track_device else None
    start = time.perf_counter()
    if peak is not None:
        with peak:
            reports, budget = run(meter)
    else:
        reports, budget = run(meter)
    seconds = time.perf_counter() - start
    return {"algorithm": algorithm, "backend": backend, "counted": count, "seconds": seconds,
            "phase_s": dict(meter.seconds), "phase_flops": dict(meter.flops),
            "solve_s": sum(r.solve_s for r in reports), "layers": len(reports),
            "statistics_flops_analytic": budget.statistics,
            "host_before_mb": host_before, "host_peak_mb": host_peak_mb(),
            "device_peak_mb": None if peak is None else peak.peak_bytes / 2**20,
            "device_peak_method": None if peak is None else peak.method,
            "threads": torch.get_num_threads(), "device": str(device)}


def in_child(overrides: list[str], algorithm: str, backend: str, count: bool) -> dict:
    """`measure` in a fresh spawned process (its own memory peak, nothing shared)."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(measure, (overrides, algorithm, backend, count))


def fmt(value: Optional[float], spec: str, missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    """The results as a Markdown table, one line per (algorithm, backend)."""
    head = ("| algorithm | backend | time s | forward s | statistics s | solve s | setup s | TFLOP fwd / stats / solve "
            "| GFLOP/s | x floor | vs Brevitas | peak host MB | peak device MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        f = r.get("flops") or {}
        tflop = " / ".join(fmt(f.get(k, 0) / 1e12 if f else None, ".2f") for k in ("forward", "statistics", "solve")) \
            if f else "–"
        phases = r["phase_s"]
        forward = phases.get("forward", 0.0) + phases.get("forward+statistics", 0.0)
        stats = None if "forward+statistics" in phases else phases.get("statistics")
        lines.append(
            f"| {r['algorithm']} | {r['backend']} | {r['seconds']:.1f} | {forward:.1f}"
            f"{'*' if 'forward+statistics' in phases else ''} | {fmt(stats, '.1f')} | {phases.get('solve', 0.0):.1f} | {fmt(phases.get('setup'), '.1f')} "
            f"| {tflop} | {fmt(r.get('gflops'), '.0f')} | {fmt(r.get('x_floor'), '.2f')} "
            f"| {fmt(r.get('brevitas_over_qbench'), '.1f')} | {r['host_peak_mb']:.0f} | {fmt(r.get('device_peak_mb'), '.1f')} |")
    return "\n".join(lines)


def parse(argv: list[str]) -> tuple[list[str], list[str], bool, list[str]]:
    algorithms, backends, count_brevitas, overrides = list(ALGORITHMS), list(BACKENDS), False, []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "algorithms":
            algorithms = value.strip("[]").split(",")
        elif key == "backends":
            backends = value.strip("[]").split(",")
        elif key == "count_brevitas":
            count_brevitas = value.lower() in ("1", "true", "yes")
        else:
            overrides.append(arg)
    for name in algorithms:
        if name not in ALGORITHMS:
            raise SystemExit(f"qbench.benchmark: error: algorithms contains {name!r}; choose from {ALGORITHMS}")
    for name in backends:
        if name not in BACKENDS:
            raise SystemExit(f"qbench.benchmark: error: backends contains {name!r}; choose from {BACKENDS}")
    return algorithms, backends, count_brevitas, overrides


def main(argv: list[str]) -> None:
    import torch

    from qbench.cli import OFFLINE_DEFAULTS, pick_device

    for name, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(name, value)
    from hydra.errors import HydraException

    from qbench.config import ConfigError

    algorithms, backends, count_brevitas, overrides = parse(argv)
    try:  # refuse what an algorithm or backend cannot run before anything heavy
        for algorithm in algorithms:
            for backend in backends:
                base = compose_config([*overrides, f"algorithm={algorithm}", f"algorithm.backend={backend}"])
    except ConfigError as exc:
        raise SystemExit(f"qbench.benchmark: error: {exc}") from None
    except HydraException as exc:  # e.g. an override of a field this algorithm's config does not have
        why = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise SystemExit(f"qbench.benchmark: error: with algorithm={algorithm}: {why}") from None
    device = pick_device(base.device)
    dtype = getattr(torch, base.model.dtype)
    load_start = os.getloadavg()
    rate_start = matmul_rate(device, dtype)
    print(f"model {base.model.name}, {base.quant.name}, calibration {base.data.nsamples} x {base.data.seqlen} tokens "
          f"(batch {base.calibration.batch_size}), stream {base.calibration.stream}, device {device}, "
          f"torch threads {torch.get_num_threads()}, load average {load_start[0]:.2f}", flush=True)
    print(f"{base.model.dtype} GEMM rate at start: {rate_start / 1e9:.0f} GFLOP/s", flush=True)
    rows, counted = [], {}
    for algorithm in algorithms:
        for backend in backends:
            row = in_child(overrides, algorithm, backend, count=False)
            if backend == "qbench" or count_brevitas:
                extra = in_child(overrides, algorithm, backend, count=True)
                row["phase_flops"] = extra["phase_flops"]
                row["counted_run"] = {k: extra[k] for k in ("seconds", "phase_s", "device_peak_mb", "device_peak_method")}
                if row["device_peak_mb"] is None:
                    row["device_peak_mb"], row["device_peak_method"] = extra["device_peak_mb"], extra["device_peak_method"]
                counted[(algorithm, backend)] = sum(extra["phase_flops"].values())
            rows.append(row)
            print(f"{algorithm:7s} {backend:9s} {row['seconds']:8.1f} s  phases "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in row["phase_s"].items()), flush=True)
    rate_end = matmul_rate(device, dtype)
    rate = max(rate_start, rate_end)
    by_key = {(r["algorithm"], r["backend"]): r for r in rows}
    for r in rows:
        flops = counted.get((r["algorithm"], "qbench"))  # the native count: the same work for both backends
        own = r.get("phase_flops") or {}
        if own:
            r["flops"] = {"forward": own.get("forward", 0) + own.get("forward+statistics", 0),
                          "statistics": own.get("statistics", 0), "solve": own.get("solve", 0)}
        if flops:
            r["floor_s"] = flops / rate
            r["x_floor"] = r["seconds"] / r["floor_s"]
            r["gflops"] = flops / r["seconds"] / 1e9
        native, brevitas = by_key.get((r["algorithm"], "qbench")), by_key.get((r["algorithm"], "brevitas"))
        if native and brevitas and r is native:
            r["brevitas_over_qbench"] = brevitas["seconds"] / native["seconds"]
    summary = {"gemm_gflops_start": rate_start / 1e9, "gemm_gflops_end": rate_end / 1e9, "gemm_gflops": rate / 1e9,
               "load_average_start": load_start[0], "load_average_end": os.getloadavg()[0]}
    if ("optq", "qbench") in by_key and ("qronos", "qbench") in by_key:
        summary["qronos_over_optq"] = by_key[("qronos", "qbench")]["seconds"] / by_key[("optq", "qbench")]["seconds"]
    markdown = table(rows)
    checks = targets(by_key, summary)
    print(f"{base.model.dtype} GEMM rate at end: {rate_end / 1e9:.0f} GFLOP/s; floor at {rate / 1e9:.0f} GFLOP/s")
    print(markdown)
    print("\n".join(checks))
    from qbench.tracking import git_sha

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    summary["git_sha"] = git_sha()
    tag = f"{base.model.name}_{base.quant.name}_{base.data.nsamples}x{base.data.seqlen}_{device.type}"
    out = Path(base.tracking.dir) / "benchmark"
    out.mkdir(parents=True, exist_ok=True)
    header = (f"# Quantization benchmark: {base.model.name}, {base.quant.name}, {base.data.nsamples} x "
              f"{base.data.seqlen} calibration tokens\n\n"
              f"`python -m qbench.benchmark {' '.join(argv)}` at {summary['git_sha']}, {stamp}, device {device}, torch threads "
              f"{rows[0]['threads'] if rows else '?'}, load average {load_start[0]:.2f} at start and "
              f"{summary['load_average_end']:.2f} at end. {base.model.dtype} GEMM rate {rate_start / 1e9:.0f} "
              f"GFLOP/s at start, {rate_end / 1e9:.0f} at end; floors use {rate / 1e9:.0f}.\n\n")
    notes = ("\n\nTimes are whole-model calibration (block inputs, forward passes, statistics, solves, write-back) "
             "without loading or evaluation. TFLOP: counted in a second run (torch FlopCounterMode plus "
             "qbench.meter's extra formulas); GFLOP/s and x floor use the native count for both backends (same "
             "work). * Brevitas accumulates H and G inside its forward hooks: its forward column includes "
             "statistics; setup: replacing its Linears by QuantLinears and back. vs Brevitas: Brevitas's time / qbench's. Peak host MB: the child process's maximum "
             "resident set (model load included). Peak device MB: " + (
                 "torch.cuda.max_memory_allocated." if device.type == "cuda" else
                 "on the CPU, the peak of tensor storages the calibration allocated and held at once "
                 "(qbench.memory, from the counted run; the resident model itself is not included).") + "\n")
    (out / f"{tag}.md").write_text(header + markdown + "\n\n" + "\n".join(f"- {c}" for c in checks) + notes)
    (out / f"{tag}.json").write_text(json.dumps({"argv": argv, "time": stamp, "summary": summary, "rows": rows},
                                                indent=1, default=str))
    print(f"written to {out / tag}.md and .json")


def targets(by_key: dict, summary: dict) -> list[str]:
    """The issue's speed targets, each as a line with its measured value."""
    lines = []
    native_q, brevitas_q = by_key.get(("qronos", "qbench")), by_key.get(("qronos", "brevitas"))
    if native_q and brevitas_q:
        ratio = brevitas_q["seconds"] / native_q["seconds"]
        lines.append(f"Brevitas Qronos / qbench Qronos = {ratio:.2f} (target >= 5): {'met' if ratio >= 5 else 'NOT met'}")
    if "qronos_over_optq" in summary:
        ratio = summary["qronos_over_optq"]
        lines.append(f"qbench Qronos / qbench OPTQ = {ratio:.2f} (target <= 1.3): {'met' if ratio <= 1.3 else 'NOT met'}")
    for name in ("optq", "gpfq", "qronos"):
        row = by_key.get((name, "qbench"))
        if row and row.get("x_floor"):
            met = "met" if row["x_floor"] <= 1.5 else "NOT met"
            lines.append(f"qbench {name} at {row['x_floor']:.2f} x its FLOP floor (target <= 1.5): {met}")
    return lines


if __name__ == "__main__":
    main(sys.argv[1:])
