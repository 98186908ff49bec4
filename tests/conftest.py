"""Shared fixtures: an isolated qbench cache, offline switches, tiny random models."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")

TINY_LLAMA = dict(model_type="llama", vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)


@pytest.fixture(scope="session", autouse=True)
def qbench_cache(tmp_path_factory):
    """Every test session converts and extracts into its own cache (QBENCH_TEST_CACHE reuses one)."""
    path = os.environ.get("QBENCH_TEST_CACHE") or str(tmp_path_factory.mktemp("qbench-cache"))
    os.environ["QBENCH_CACHE"] = path
    return path


@pytest.fixture
def tiny_llama():
    from qbench.models import tiny_model

    return tiny_model(TINY_LLAMA, seed=0)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Many small ops: one intra-op thread avoids OpenMP barrier stalls on a shared CPU (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
