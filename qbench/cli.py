"""`qbench`: the Hydra entry point. Validates the config, loads the model, (float-)evaluates, quantizes,
evaluates again and records one row per run in the results table (and a W&B run).

    qbench                                   # RTN W4 on the embedded SmolLM2-135M
    qbench algorithm=optq quant=w3
    qbench -m algorithm=rtn,optq,gpfq,qronos quant=w3,w4
"""

from __future__ import annotations

import logging
import math
import os
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import hydra

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "quant", "algorithm", "preprocess", "data", "eval", "tracking", "experiment")
OFFLINE_DEFAULTS = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_UPDATE_DOWNLOAD_COUNTS": "0",
                    "TOKENIZERS_PARALLELISM": "false", "WANDB_SILENT": "true"}

log = logging.getLogger("qbench")


class UsageError(Exception):
    """Bad input detected before heavy work: printed as one line, exit status 2."""


def fail(message: str) -> None:
    print(f"qbench: error: {message}", file=sys.stderr)
    sys.exit(2)


def check_group_choices(argv: list[str]) -> None:
    """Unknown presets (`algorithm=nope`) get one line listing the valid ones, before Hydra starts."""
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, value = arg.split("=", 1)
        group = key.lstrip("+~")
        if group not in GROUPS or "(" in value or value in ("null", ""):
            continue
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        for choice in value.split(","):
            if choice not in options:
                fail(f"{group}={choice} is not a preset; choose one of: {', '.join(options) or '(none yet)'}")


def main() -> None:
    for name, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(name, value)
    check_group_choices(sys.argv[1:])
    from qbench.config import register_configs

    register_configs()
    _hydra_entry()


def _hydra_main(cfg) -> None:
    """Body of the Hydra task: every expected failure becomes one line and a non-zero exit."""
    from qbench.config import ConfigError, validate
    from qbench.data import DataError

    try:
        validate(cfg)
        run(cfg)
    except (ConfigError, DataError, UsageError, PermissionError, FileNotFoundError) as exc:
        fail(str(exc))


_hydra_entry = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(_hydra_main)


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device={name} but no CUDA device is visible; use device=cpu or device=auto")
    return torch.device(name)


def peak_memory_mb(device) -> dict:
    """Peak resident host memory of this process, and peak allocated device memory on CUDA."""
    import torch

    peak = {"peak_host_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["peak_device_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


def evaluation_windows(cfg, tokenizer) -> dict:
    """(dataset, protocol) -> windows, prepared before any heavy work so that data errors come first."""
    import torch

    from qbench import data, evaluate

    windows = {}
    bos = getattr(tokenizer, "bos_token_id", None) if cfg.eval.bos else None
    for dataset in cfg.eval.datasets:
        for protocol in cfg.eval.protocols:
            text = data.load_text(dataset, evaluate.PROTOCOL_SPLIT[protocol])
            if protocol == "gptq":  # GPTQ tokenizes the split with the tokenizer's defaults
                tokens = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
            else:
                tokens = data.tokenize(tokenizer, text)
            if cfg.eval.max_tokens:
                tokens = tokens[: cfg.eval.max_tokens]
            w = evaluate.windows_for(protocol, tokens, cfg.eval.seqlen, bos)
            if w.shape[0] == 0:
                raise data.DataError(f"{dataset} {evaluate.PROTOCOL_SPLIT[protocol]} split has {tokens.numel()} "
                                     f"tokens, fewer than one eval.seqlen={cfg.eval.seqlen} window")
            windows[(dataset, protocol)] = w
    return windows


def evaluate_all(model, windows: dict, cfg, device) -> dict:
    from qbench import evaluate

    metrics = {}
    model.to(device)
    try:
        for (dataset, protocol), w in windows.items():
            result = evaluate.perplexity(model, w, protocol, cfg.eval.batch_size, device, desc=f"{dataset}/{protocol}")
            if not math.isfinite(result.ppl):
                raise FloatingPointError(f"perplexity on {dataset}/{protocol} is not finite")
            metrics[f"ppl/{dataset}/{protocol}"] = result.ppl
            metrics[f"ppl_tokens/{dataset}/{protocol}"] = result.tokens
    finally:
        model.to("cpu")
    return metrics


def preprocess(model, cfg, calibration, device) -> dict:
    """Apply the configured transforms in a fixed order, before calibration: rotation (exact), SmoothQuant
    (exact), MagR (not exact). Returns what they did and how long each took, for the results row."""
    from qbench import pipeline

    p, report = cfg.preprocess, {}
    if p.rotation != "none":
        from qbench.transforms import rotation

        start = time.perf_counter()
        rotation.apply_rotation(model, p.rotation, p.rotation_seed)
        report["preprocess_rotation_s"] = time.perf_counter() - start
    if p.equalization == "smoothquant":
        from qbench.transforms import equalize

        start = time.perf_counter()
        absmax = pipeline.input_absmax(model, calibration, batch_size=cfg.calibration.batch_size, device=device)
        equalize.apply_smoothquant(model, absmax, p.smoothquant_alpha)
        report["preprocess_smoothquant_s"] = time.perf_counter() - start
    if p.magr:
        start = time.perf_counter()
        layers = pipeline.apply_magr(model, calibration, p.magr_alpha, batch_size=cfg.calibration.batch_size,
                                     device=device)
        report["preprocess_magr_s"] = time.perf_counter() - start
        report["magr_mean_rel_output_change"] = sum(r["rel_output_change"] for r in layers) / max(len(layers), 1)
    return report


def backend_of(cfg) -> str:
    """Who solves: qbench's own solvers or Brevitas's (algorithm.backend)."""
    return str(cfg.algorithm.get("backend", "qbench"))


def base_row(cfg, resolved: dict, key: str, loaded, n_params: int) -> dict:
    from qbench.config import solver_options
    from qbench.tracking import git_sha, qbench_version

    q, a, d = cfg.quant, cfg.algorithm, cfg.data
    options = solver_options(cfg)
    return {
        "run_key": key, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "qbench_version": qbench_version(), "git_sha": git_sha(),
        "model": cfg.model.name, "model_source": loaded.source, "model_note": loaded.note, "params": n_params,
        "algorithm": a.name, "backend": backend_of(cfg), "w_bits": float(q.w_bits), "w_group_size": int(q.w_group_size),
        "w_sym": bool(q.w_sym), "w_scale": q.w_scale, "w_shrink": float(q.w_shrink),
        "w_format": q.w_format, "a_bits": int(q.a_bits), "a_format": q.a_format, "a_sym": bool(q.a_sym),
        "kv_bits": int(q.kv_bits), "kv_sym": bool(q.kv_sym), "kv_group_size": int(q.kv_group_size),
        "quant": q.name, "preprocess": cfg.preprocess.name,
        "act_order": bool(a.get("act_order", False)),
        "damping": options.get("percdamp", options.get("alpha")),
        "calib_set": d.source, "calib_nsamples": int(d.nsamples), "calib_seqlen": int(d.seqlen),
        "calib_seed": int(d.seed), "calib_stream": cfg.calibration.stream,
        "eval_seqlen": int(cfg.eval.seqlen), "eval_max_tokens": cfg.eval.max_tokens,
        "config": resolved,
    }


def run(cfg) -> None:
    """One configuration, end to end."""
    import torch

    from qbench import data, fakequant, models, pipeline, tracking
    from qbench.algorithms import REGISTRY
    from qbench.config import ConfigError, resolved_dict, solver_options
    from qbench.quantizers import activation_spec, kv_spec, spec_from_config

    resolved = tracking.scrub(resolved_dict(cfg))
    key = tracking.run_key(resolved)
    table = tracking.ResultsTable(cfg.tracking.dir)
    table.check_writable()
    if table.finished(key) and not cfg.tracking.force:
        log.info("run %s is already in %s: skipped (tracking.force=true reruns it)", key, table.dir)
        return
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    solver = REGISTRY[cfg.algorithm.name]

    start = time.perf_counter()
    loaded = models.load(cfg.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    context = models.max_context(model, cfg.model)
    for field, value in (("data.seqlen", cfg.data.seqlen), ("eval.seqlen", cfg.eval.seqlen)):
        if value > context:
            raise ConfigError(f"{field}={value} exceeds the model's context of {context} tokens")
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ConfigError(f"the loaded weights of {cfg.model.name} hold NaN or Inf (in {name})")
    try:
        fakequant.check_fits(model, activation_spec(cfg.quant), kv_spec(cfg.quant))
    except ValueError as exc:  # a grid that does not fit this model's shapes
        raise ConfigError(str(exc)) from exc
    windows = evaluation_windows(cfg, tokenizer)
    calibration = None
    p = cfg.preprocess
    needs_data = (solver.needs_H and float(cfg.quant.w_bits) < 16) or p.equalization != "none" or p.magr
    if needs_data:
        bos = getattr(tokenizer, "bos_token_id", None)
        calibration = data.calibration_windows(data.tokenize(tokenizer, data.load_text(cfg.data.source, "train")),
                                               cfg.data.nsamples, cfg.data.seqlen, cfg.data.seed, bos)
    load_s = time.perf_counter() - start
    n_params = models.count_parameters(model)
    log.info("loaded %s (%.1fM parameters) in %.1f s on %s", loaded.source, n_params / 1e6, load_s, device)

    if cfg.eval.float_baseline:
        fkey = tracking.float_key(resolved)
        if not table.finished(fkey) or cfg.tracking.force:
            t0 = time.perf_counter()
            metrics = evaluate_all(model, windows, cfg, device)
            row = base_row(cfg, resolved, fkey, loaded, n_params)
            row.update(algorithm="float", w_bits=16.0, w_group_size=-1, quant="float", preprocess="none",
                       w_format="float", a_bits=16, a_format="float", kv_bits=16, backend=None,
                       act_order=False, damping=None, calib_set=None, calib_nsamples=0, calib_seqlen=0,
                       calib_stream=None, quant_time_s=0.0, eval_time_s=time.perf_counter() - t0,
                       status="ok", **metrics, **peak_memory_mb(device))
            row["config"] = {k: resolved[k] for k in ("model", "eval", "seed", "device")}
            table.write(row)
            _log_run(cfg, row["config"], row, [], name=f"{cfg.model.name}-float")
            _report(row)

    preprocess_report = preprocess(model, cfg, calibration, device)
    if preprocess_report and cfg.eval.after_preprocess:  # what the transforms alone did to the float model
        for name, value in evaluate_all(model, windows, cfg, device).items():
            if name.startswith("ppl/"):
                preprocess_report[name.replace("ppl/", "ppl_preprocessed/", 1)] = value

    # activation and KV quantizers go in before calibration: X̃, H and G then include their error
    r3_seed = p.rotation_seed if "quarot" in p.rotation else None
    preprocess_report.update(fakequant.attach(model, activation_spec(cfg.quant), kv_spec(cfg.quant), r3_seed))
    t0 = time.perf_counter()
    reports, budget = [], None
    if float(cfg.quant.w_bits) < 16 and backend_of(cfg) == "brevitas":
        from qbench import brevitas_backend

        reports, budget = brevitas_backend.quantize_model(
            model, spec_from_config(cfg.quant), cfg.algorithm.name, calibration, options=solver_options(cfg),
            batch_size=cfg.calibration.batch_size, device=device)
    elif float(cfg.quant.w_bits) < 16:
        reports, budget = pipeline.quantize_model(
            model, spec_from_config(cfg.quant), cfg.algorithm, calibration, stream=cfg.calibration.stream,
            batch_size=cfg.calibration.batch_size, device=device, float_cache_gb=cfg.calibration.float_cache_gb,
            options=solver_options(cfg))
    quant_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = evaluate_all(model, windows, cfg, device)
    eval_s = time.perf_counter() - t0

    row = base_row(cfg, resolved, key, loaded, n_params)
    row.update(quant_time_s=quant_s, eval_time_s=eval_s, load_time_s=load_s, status="ok", **metrics,
               **preprocess_report,
               **pipeline.summarize(reports), **peak_memory_mb(device))
    if budget is not None:
        row["statistics_gflop"] = budget.statistics / 1e9
    telemetry = pipeline.reports_as_rows(reports)
    row["telemetry"] = telemetry
    table.write(row)  # the row first: a W&B failure must never lose it
    _log_run(cfg, resolved, row, telemetry, name=f"{cfg.model.name}-{cfg.quant.name}-{cfg.algorithm.name}")
    _report(row)


def _log_run(cfg, config: dict, row: dict, telemetry: list, name: str) -> None:
    """W&B is best effort: the results row is already safe when this runs."""
    from qbench import tracking

    try:
        flat = {k: v for k, v in row.items() if k not in ("telemetry", "config")}
        wandb_id = tracking.log_to_wandb(cfg.tracking, config, flat, telemetry, name=name)
        if wandb_id:
            log.info("W&B run %s (%s) in %s", wandb_id, cfg.tracking.wandb_mode, Path(cfg.tracking.dir) / "wandb")
    except Exception as exc:  # noqa: BLE001
        log.warning("W&B logging failed (%s); the results row is written", exc)


def _report(row: dict) -> None:
    ppl = ", ".join(f"{k.removeprefix('ppl/')} {v:.3f}" for k, v in row.items() if k.startswith("ppl/"))
    label = "float" if row["algorithm"] == "float" else f"{row['algorithm']} {row['quant']}"
    log.info("%-14s %s  (quant %.1f s, eval %.1f s)  key %s", label, ppl, row.get("quant_time_s", 0.0),
             row.get("eval_time_s", 0.0), row["run_key"])


if __name__ == "__main__":
    main()
