"""The catalogue of bad inputs (issue 9): each is caught before any model loads, or at the first moment it
can be known, with one line naming the field, the value and what would be valid; exit status 2; nothing
written (no results folder, no outputs/, no logs)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

QBENCH = str(Path(sys.executable).parent / "qbench")
TINY = ["model=tiny-llama", "data.seqlen=64", "data.nsamples=4", "eval.seqlen=128", "eval.max_tokens=1024"]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """Files some entries point at, kept outside the folder each command runs in."""
    root = tmp_path_factory.mktemp("inputs")
    bert = root / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    (root / "corpus-empty").mkdir()
    (root / "corpus-empty" / "train.txt").write_text("  \n")
    (root / "corpus-no-test").mkdir()
    (root / "corpus-no-test" / "train.txt").write_text("Some calibration text. " * 100)
    (root / "a-file").write_text("not a folder")
    _nan_model(root / "nan-llama")
    return root


@pytest.fixture(scope="module")
def startup():
    """Seconds a fresh interpreter needs to import torch, transformers and hydra on this machine now
    (the baseline the time limit is measured against)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, transformers, hydra, transformers.models.llama"],
                   check=True, timeout=300)
    return time.perf_counter() - start


def _nan_model(folder: Path) -> None:
    """A tiny local Llama checkpoint (with a small word-level tokenizer) whose weights hold one NaN."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from qbench.models import tiny_model

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import TINY_LLAMA

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(c): i + 3 for i, c in enumerate(range(32, 127))}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    model = tiny_model({**TINY_LLAMA, "vocab_size": len(vocab), "bos_token_id": 1, "eos_token_id": 2})
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(folder)
    fast.save_pretrained(folder)


# (id, arguments, expected words of the one line); "{root}" is the fixtures folder
CATALOGUE = [
    ("model path missing", ["model.path=/nonexistent"], "model.path='/nonexistent' does not exist"),
    ("hub id offline", ["model=llama3.2-1b"], "is a hub id that is not in the local Hugging Face cache"),
    ("architecture (local folder)", ["model.path={root}/bert"],
     "is a 'bert' model; supported architectures: ['llama'"),
    ("architecture (tiny)", ["model=tiny-llama", "model.tiny.model_type=gpt2"],
     "model.tiny.model_type='gpt2' is not supported"),
    ("weight bits", ["quant.w_bits=0"], "quant.w_bits=0 is not supported; use 1.58, an integer 2..8, or 16"),
    ("weight bits fractional", ["quant.w_bits=2.5"], "quant.w_bits=2.5 is not supported"),
    ("group size sign", ["quant.w_group_size=-3"], "quant.w_group_size=-3 must be -1 (per-channel)"),
    ("group size divides", [*TINY, "quant.w_group_size=48"],
     "quant.w_group_size=48 does not divide the 64 input features of model.layers.0.self_attn.q_proj"),
    ("unknown algorithm", ["algorithm=nope"], "algorithm=nope is not a preset; choose one of: gpfq, optq, qronos, rtn"),
    ("unknown quant", ["quant=w5bits"], "quant=w5bits is not a preset; choose one of:"),
    ("unknown preprocess", ["preprocess=spinquant"], "preprocess=spinquant is not a preset; choose one of:"),
    ("unknown eval", ["eval=mmlu-pro"], "eval=mmlu-pro is not a preset; choose one of:"),
    ("calibration too long", [*TINY, "algorithm=optq", "data.nsamples=100000"],
     "data.nsamples·data.seqlen = 100000·64 exceeds the"),
    ("seqlen above context", [*TINY[:1], "data.seqlen=1024", "eval.seqlen=128"],
     "data.seqlen=1024 exceeds the model's context of 512 tokens"),
    ("data folder missing", ["data.source=text", "data.path={root}/nowhere"], "is not a folder"),
    ("data file empty", ["data.source=text", "data.path={root}/corpus-empty"], "train.txt is empty"),
    ("data file missing", ["data.source=text", "data.path={root}/corpus-no-test", "eval.datasets=[text]"],
     "has no test.txt, which this run reads"),
    ("hadamard size", [*TINY, "model.tiny.intermediate_size=136", "preprocess=quarot"],
     "intermediate_size has size 136, which has no Hadamard matrix"),
    ("G from a stream Brevitas cannot feed", ["algorithm=gpfq", "algorithm.backend=brevitas", "calibration.stream=dual"],
     "algorithm.backend=brevitas: Brevitas feeds blocks the quantized stream only; calibration.stream=dual"),
    ("activation bits", ["quant.a_bits=3"], "quant.a_bits=3 has no activation grid; use one of [4, 8, 16]"),
    ("kv bits", ["quant.kv_bits=2"], "quant.kv_bits=2 has no KV-cache grid"),
    ("activation group size", [*TINY, "quant=w4a4", "quant.a_group_size=48"],
     "quant.a_group_size of 48 do not divide the 64 input features of self_attn.q_proj"),
    ("results dir unwritable", ["tracking.dir={root}/a-file/results"], "is not writable"),
    ("wandb online without key", ["tracking.wandb_mode=online"], "tracking.wandb_mode=online needs WANDB_API_KEY"),
    ("zero-shot task offline", ["eval.tasks=[piqaa]"],
     "eval.tasks contains 'piqaa', which lm-eval would load from the Hugging Face hub, but the hub is off"),
    ("zero-shot limit", ["eval=zeroshot", "eval.limit=0"], "eval.limit=0.0 must be null, a document count >= 1"),
    ("zero-shot batch size", ["eval=zeroshot", "eval.lm_eval_batch_size=0"], "eval.lm_eval_batch_size=0 must be positive"),
    ("lm-eval context above the model's", [*TINY, "eval=zeroshot"],
     "eval.lm_eval_max_length=2048 exceeds the model's context of 512 tokens"),
    ("NaN in the weights", ["model.path={root}/nan-llama", "model.name=nan-llama", "data.seqlen=64", "eval.seqlen=128"],
     "hold NaN or Inf (in model.layers.1.mlp.up_proj.weight)"),
]


# known only once the calibration corpus is tokenized (the whole train split)
NEEDS_THE_CORPUS = {"calibration too long"}


@pytest.mark.parametrize("entry,args,expected", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_fails_fast_in_one_line_and_writes_nothing(tmp_path, fixtures, startup, entry, args, expected):
    args = [a.replace("{root}", str(fixtures)) for a in args]
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    start = time.perf_counter()
    if not any(a.startswith("tracking.dir=") for a in args):
        args.append("tracking.dir=out")
    proc = subprocess.run([QBENCH, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**env, "HYDRA_FULL_ERROR": "0"})
    seconds = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qbench: error: ") and expected in lines[0], proc.stderr
    # seconds, not minutes: at most a few times what importing torch and transformers costs right now
    limit = max(5.0, (10 if entry in NEEDS_THE_CORPUS else 4) * startup)
    assert seconds < limit, f"took {seconds:.1f} s (startup {startup:.1f} s)"
    assert list(tmp_path.iterdir()) == []  # no results dir, no outputs/, no logs
