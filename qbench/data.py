"""Corpora, calibration windows and evaluation text; every draw is seeded.

`enwiki-excerpt` is the embedded corpus: the Wikipedia dump excerpt that the gensim wheel ships as
test data (design.md §3), split by article (a stable hash of the title) into train / validation /
test. WikiText-2 and C4 load through `datasets` where the hub or a local copy is reachable.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import tempfile
from pathlib import Path

import torch

from qbench import faults
from qbench.models import cache_dir

ENWIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SPLITS = ("train", "validation", "test")


class DataError(RuntimeError):
    """Data that cannot be had or is too small; the message is one line meant for the user."""


def split_of(title: str) -> str:
    """Deterministic article split: 80% train, 10% validation, 10% test, by SHA-1 of the title."""
    bucket = int(hashlib.sha1(title.encode("utf-8")).hexdigest(), 16) % 10
    return "train" if bucket < 8 else ("validation" if bucket == 8 else "test")


def _clean_wiki(markup: str) -> str:
    """Plain text of one article: gensim strips the markup; we drop bold/italic quotes and blank runs."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(markup).replace("'''", "").replace("''", "")
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def build_enwiki_excerpt(target: Path) -> None:
    """Extract, clean and split the gensim excerpt into target/{train,validation,test}.txt (atomically)."""
    import bz2

    from gensim.corpora.wikicorpus import extract_pages

    spec = importlib.util.find_spec("gensim")
    if spec is None:
        raise DataError("data=enwiki-excerpt needs the gensim package; run `pip install gensim` (make run does)")
    source = Path(spec.submodule_search_locations[0]) / ENWIKI_FILE
    if not source.is_file():
        raise DataError(f"{source} is missing; reinstall gensim")
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    with bz2.open(source, "rb") as f:
        for title, markup, _pageid in extract_pages(f):
            if markup.lstrip().lower().startswith("#redirect"):
                continue
            text = _clean_wiki(markup)
            if len(text) < 200:  # stubs and disambiguation leftovers carry no prose
                continue
            parts[split_of(title)].append(f"= {title} =\n\n{text}")
    target.mkdir(parents=True, exist_ok=True)
    for split, articles in parts.items():
        faults.remove_orphans(target, split)
        fd, tmp = tempfile.mkstemp(dir=target, prefix=faults.temp_prefix(split))
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write("\n\n".join(articles))
        faults.failpoint("extract")
        os.replace(tmp, target / f"{split}.txt")


def text_file(path: str, split: str) -> Path:
    """`<data.path>/<split>.txt` of a local corpus, or a one-line DataError if it is missing or empty."""
    folder = Path(os.path.expanduser(path))
    if not folder.is_dir():
        raise DataError(f"data.path={path!r} is not a folder; give a folder holding train.txt, validation.txt "
                        "and/or test.txt")
    file = folder / f"{split}.txt"
    if not file.is_file():
        raise DataError(f"data.path={path!r} has no {split}.txt, which this run reads; add it or change data.path")
    if file.stat().st_size == 0 or not file.read_text(encoding="utf-8", errors="replace").strip():
        raise DataError(f"{file} is empty; put text in it or change data.path")
    return file


def load_text(source: str, split: str, path: str | None = None) -> str:
    """The raw text of one split of a corpus (`text`: the local folder `path`)."""
    if split not in SPLITS:
        raise DataError(f"split={split!r} must be one of {list(SPLITS)}")
    if source == "text":
        return text_file(path or "", split).read_text(encoding="utf-8", errors="replace")
    if source == "enwiki-excerpt":
        folder = cache_dir() / "data" / "enwiki-excerpt-v1"
        if not all((folder / f"{s}.txt").is_file() for s in SPLITS):
            build_enwiki_excerpt(folder)
        return (folder / f"{split}.txt").read_text(encoding="utf-8")
    if source == "wikitext2":
        return "\n\n".join(_hub_dataset("wikitext", "wikitext-2-raw-v1", split)["text"])
    if source == "c4":
        # the validation shard is what GPTQ evaluates; its first train shard is what it calibrates on
        shard = {"train": "en/c4-train.00000-of-01024.json.gz",
                 "validation": "en/c4-validation.00000-of-00008.json.gz",
                 "test": "en/c4-validation.00000-of-00008.json.gz"}[split]
        rows = _hub_dataset("allenai/c4", None, "train", data_files={"train": shard})
        return "\n\n".join(rows["text"][:5000] if split != "train" else rows["text"])
    raise DataError(f"data source {source!r} is unknown; choose enwiki-excerpt, wikitext2, c4 or text")


def _hub_dataset(path: str, name: str | None, split: str, **kwargs):
    try:
        from datasets import load_dataset

        return load_dataset(path, name, split=split, **kwargs)
    except Exception as exc:  # offline, not cached, or missing: one line, not a traceback
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise DataError(f"dataset {path}{'/' + name if name else ''} ({split}) cannot be loaded: {reason}; "
                        "it needs the Hugging Face hub or a local cache (use data=enwiki-excerpt offline)") from None


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of token ids, without special tokens."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def calibration_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int,
                        bos_token_id: int | None) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at seeded random offsets, BOS first: [nsamples, seqlen]."""
    body = seqlen - 1 if bos_token_id is not None else seqlen
    if tokens.numel() < body + 1:
        raise DataError(f"calibration text has {tokens.numel()} tokens, fewer than data.seqlen={seqlen}")
    if nsamples * body > tokens.numel():
        raise DataError(f"data.nsamples·data.seqlen = {nsamples}·{seqlen} exceeds the {tokens.numel()} tokens "
                        "of the calibration text; lower data.nsamples or data.seqlen")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - body + 1, (nsamples,), generator=generator)
    windows = torch.stack([tokens[s:s + body] for s in starts.tolist()])
    if bos_token_id is not None:
        windows = torch.cat([torch.full((nsamples, 1), bos_token_id, dtype=torch.long), windows], dim=1)
    return windows
