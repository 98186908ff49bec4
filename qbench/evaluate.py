"""Perplexity under named protocols (design.md §6). Protocols differ across papers: never mix them.

- `gptq`: the test split tokenized as one stream (the tokenizer's defaults, as GPTQ does), cut into
  non-overlapping windows of `seqlen`; every token after the first of each window is scored.
- `brevitas`: the validation split cut into non-overlapping windows of `seqlen` (BOS first when
  `bos`); only the last seqlen/2 tokens of each window are scored, the first half is context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    total_nll, total_tokens = 0.0, 0
    for b in tqdm(range(0, windows.shape[0], batch_size), desc=desc or f"ppl/{protocol}", leave=False):
        ids = windows[b:b + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits[:, :-1]
        labels = ids[:, start:]
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += labels.numel()
    mean = total_nll / max(total_tokens, 1)
    return Perplexity(ppl=math.exp(mean), nll=mean, tokens=total_tokens, windows=windows.shape[0])
