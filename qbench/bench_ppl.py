"""Perplexity speed: qbench's `gptq` protocol against lm-eval's rolling-loglikelihood path, same text,
same model, same context length.

    python -m qbench.bench_ppl                      # 100 KB of the enwiki-excerpt test split, embedded model
    python -m qbench.bench_ppl kb=50 eval.seqlen=1024 model=tiny-llama

lm-eval scores a document with `HFLM.loglikelihood_rolling`: disjoint windows of max_length tokens,
every token scored once (the first one after a prefix token). qbench's `gptq` protocol scores
non-overlapping windows of eval.seqlen the same way, keeping only the logits it needs. Both run in this
process on the same tokens; the result is one JSON line with tokens/s for each.
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch
from hydra import compose, initialize_config_dir

from qbench import data, evaluate, models
from qbench.cli import CONF_DIR
from qbench.config import register_configs, validate


def excerpt(text: str, kilobytes: float) -> str:
    """The first `kilobytes` x 1000 bytes of the text (cut on a character boundary)."""
    return text.encode("utf-8")[: int(kilobytes * 1000)].decode("utf-8", errors="ignore")


def time_qbench(model, tokenizer, text: str, seqlen: int, batch_size: int) -> dict:
    tokens = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    windows = evaluate.windows_for("gptq", tokens, seqlen, None)
    start = time.perf_counter()
    result = evaluate.perplexity(model, windows, "gptq", batch_size=batch_size)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens_scored": result.tokens, "tokens_per_s": result.tokens / seconds,
            "ppl": result.ppl}


def time_lm_eval(model, tokenizer, text: str, seqlen: int, batch_size: int) -> dict:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=seqlen, batch_size=batch_size)
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    scored = len(lm.tok_encode(text))
    start = time.perf_counter()
    (loglikelihood,) = lm.loglikelihood_rolling([request], disable_tqdm=True)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens_scored": scored, "tokens_per_s": scored / seconds,
            "ppl": math.exp(-loglikelihood / scored)}


def main(argv: list[str]) -> None:
    kilobytes, batch_size, overrides = 100.0, 1, []
    for arg in argv:
        if arg.startswith("kb="):
            kilobytes = float(arg.split("=", 1)[1])
        elif arg.startswith("batch_size="):
            batch_size = int(arg.split("=", 1)[1])
        else:
            overrides.append(arg)
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    validate(cfg)
    loaded = models.load(cfg.model)
    model = loaded.model.eval()
    text = excerpt(data.load_text(cfg.eval.datasets[0], "test"), kilobytes)
    seqlen = int(cfg.eval.seqlen)
    with torch.no_grad():
        model(input_ids=torch.ones(1, 8, dtype=torch.long))  # warm-up outside the timings
    runs = {"qbench_gptq": time_qbench(model, loaded.tokenizer, text, seqlen, batch_size),
            "lm_eval_rolling": time_lm_eval(model, loaded.tokenizer, text, seqlen, batch_size)}
    speedup = runs["qbench_gptq"]["tokens_per_s"] / runs["lm_eval_rolling"]["tokens_per_s"]
    print(json.dumps({"model": cfg.model.name, "text_bytes": len(text.encode("utf-8")), "seqlen": seqlen,
                      "batch_size": batch_size, "threads": torch.get_num_threads(), **runs,
                      "qbench_speedup_per_token": speedup}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
