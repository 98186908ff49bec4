"""Perplexity under named protocols (design.md §6), and zero-shot tasks through lm-eval-harness.

Protocols differ across papers: never mix them.
- `gptq`: the test split tokenized as one stream (the tokenizer's defaults, as GPTQ does), cut into
  non-overlapping windows of `seqlen`; every token after the first of each window is scored.
- `brevitas`: the validation split cut into non-overlapping windows of `seqlen` (BOS first when
  `bos`); only the last seqlen/2 tokens of each window are scored, the first half is context.
Each perplexity comes with a percentile-bootstrap confidence interval over its windows.

Zero-shot tasks run the in-memory model through lm-eval's `HFLM` and `simple_evaluate`, with lm-eval's
own task definitions (offline: the same definitions on local data, see qbench.tasks).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

PROTOCOL_SPLIT = {"gptq": "test", "brevitas": "validation"}


@dataclass
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    windows: int
    window_nll: list[float] = field(default_factory=list)  # summed NLL (nats) of each window's scored tokens
    window_tokens: list[int] = field(default_factory=list)  # scored tokens of each window


def windows_for(protocol: str, tokens: Tensor, seqlen: int, bos_token_id: int | None) -> Tensor:
    """Cut a 1-D token stream into the protocol's [n, seqlen] windows (incomplete tail dropped)."""
    if protocol == "gptq":
        n = tokens.numel() // seqlen
        return tokens[: n * seqlen].view(n, seqlen)
    if protocol == "brevitas":
        body = seqlen - 1 if bos_token_id is not None else seqlen
        n = tokens.numel() // body
        w = tokens[: n * body].view(n, body)
        if bos_token_id is not None:
            w = torch.cat([torch.full((n, 1), bos_token_id, dtype=w.dtype), w], dim=1)
        return w
    raise ValueError(f"unknown perplexity protocol {protocol!r}")


def first_scored(protocol: str, seqlen: int) -> int:
    """Index of the first position whose token is scored in a window."""
    return 1 if protocol == "gptq" else seqlen // 2


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, protocol: str, batch_size: int = 1,
               device: str | torch.device = "cpu", desc: str = "") -> Perplexity:
    """Mean NLL of the scored positions of every window, and its exponential."""
    seqlen = windows.shape[1]
    start = first_scored(protocol, seqlen)
    keep = seqlen - start + 1  # logits at start-1 .. seqlen-1; the last one predicts past the window
    window_nll: list[float] = []
    for b in tqdm(range(0, windows.shape[0], batch_size), desc=desc or f"ppl/{protocol}", leave=False):
        ids = windows[b:b + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits[:, :-1]
        labels = ids[:, start:]
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        window_nll += nll.view(labels.shape).double().sum(dim=1).tolist()
    window_tokens = [seqlen - start] * len(window_nll)
    total_nll, total_tokens = math.fsum(window_nll), sum(window_tokens)
    mean = total_nll / max(total_tokens, 1)
    return Perplexity(ppl=math.exp(mean), nll=mean, tokens=total_tokens, windows=windows.shape[0],
                      window_nll=window_nll, window_tokens=window_tokens)


def bootstrap_ci(window_nll: list[float], window_tokens: list[int], iters: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of exp(Σ NLL / Σ tokens), resampling whole windows with replacement.

    Windows, not tokens, are resampled: tokens within a window are strongly dependent. Returns
    (nan, nan) with fewer than two windows or iters == 0, where no interval can be estimated.
    """
    n = len(window_nll)
    if n != len(window_tokens):
        raise ValueError(f"{n} window NLL sums but {len(window_tokens)} token counts")
    if n < 2 or iters <= 0:
        return math.nan, math.nan
    nll = torch.tensor(window_nll, dtype=torch.float64)
    tokens = torch.tensor(window_tokens, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    resampled = []
    for chunk in range(0, iters, 256):  # bounded memory for long splits
        idx = torch.randint(0, n, (min(256, iters - chunk), n), generator=generator)
        resampled.append(torch.exp(nll[idx].sum(dim=1) / tokens[idx].sum(dim=1)))
    stats = torch.cat(resampled)
    alpha = (1.0 - level) / 2
    bounds = torch.quantile(stats, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64))
    return float(bounds[0]), float(bounds[1])


# ---------------------------------------------------------------------------------------------
# zero-shot tasks through lm-eval-harness


@dataclass(frozen=True)
class ZeroShotSettings:
    """What is passed to lm-eval; every field is recorded in the results row.

    include_path: folder of task YAMLs that override lm-eval's built-ins (qbench.tasks), or None to use
    the built-ins as they are (their data comes from the Hugging Face hub).
    """

    tasks: tuple[str, ...]
    batch_size: int
    max_length: int
    limit: Optional[float] = None
    num_fewshot: int = 0
    fewshot_as_multiturn: bool = False
    bootstrap_iters: int = 100000
    include_path: Optional[str] = None


@contextlib.contextmanager
def preserved_rng():
    """simple_evaluate seeds Python's, NumPy's and torch's global generators; give the caller its own back."""
    import random

    import numpy as np

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


@functools.lru_cache(maxsize=4)
def task_manager(include_path: Optional[str]):
    """lm-eval's task index (it scans every built-in YAML: seconds), built once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def zeroshot(model: nn.Module, tokenizer: Any, settings: ZeroShotSettings, cache: Optional[str] = None) -> dict:
    """lm-eval's `simple_evaluate` on the in-memory model (on whatever device it sits); its results dict.

    `cache` is the path prefix of lm-eval's response database (CachingLM); it must be unique to this
    model's weights: lm-eval keys answers by request text alone.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    # explicit max_length: otherwise HFLM takes the model's max_position_embeddings (8192 for SmolLM2)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size, max_length=settings.max_length)
    limit = settings.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    with preserved_rng():
        results = simple_evaluate(
            model=lm, tasks=list(settings.tasks), num_fewshot=settings.num_fewshot, limit=limit,
            use_cache=cache, task_manager=task_manager(settings.include_path),
            fewshot_as_multiturn=settings.fewshot_as_multiturn, apply_chat_template=False,
            bootstrap_iters=settings.bootstrap_iters, log_samples=False)
    if results is None:
        raise RuntimeError("lm-eval returned no results (not rank 0)")
    return results


def paper_average(metrics: dict[str, float]) -> Optional[float]:
    """The Qronos paper's zero-shot average over PIQA, ARC-e, ARC-c, Winogrande and HellaSwag
    (acc_norm; acc for Winogrande, see qbench.tasks.PAPER_METRIC), or None unless all five are there."""
    from qbench.tasks import PAPER_METRIC

    values = [metrics.get(f"lm_eval/{task}/{metric}") for task, metric in PAPER_METRIC.items()]
    if any(v is None or not math.isfinite(v) for v in values):
        return None
    return sum(values) / len(values)


def zeroshot_metrics(results: dict) -> dict[str, Any]:
    """Flatten lm-eval's results into row columns `lm_eval/<task>/<metric>` (filter "none" only),
    with each task's version, document count and shots, and the paper's average as `zeroshot_avg`."""
    row: dict[str, Any] = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if filt != "none" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # aliases, other filters, and "N/A" stderrs
            row[f"lm_eval/{task}/{metric}"] = float(value)
        row[f"lm_eval/{task}/version"] = results.get("versions", {}).get(task)
        row[f"lm_eval/{task}/num_fewshot"] = results.get("n-shot", {}).get(task)
        samples = results.get("n-samples", {}).get(task, {})
        row[f"lm_eval/{task}/docs"] = samples.get("effective")
        row[f"lm_eval/{task}/docs_total"] = samples.get("original")
    average = paper_average(row)
    if average is not None:
        row["zeroshot_avg"] = average
    return row
