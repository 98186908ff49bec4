"""The embedded corpus splits deterministically by article; calibration windows are seeded, BOS first."""

import pytest
import torch

from qbench import data
from qbench.models import byte_tokenizer


def test_split_is_a_stable_function_of_the_title():
    assert data.split_of("Autism") == data.split_of("Autism")
    counts = {s: 0 for s in data.SPLITS}
    for i in range(2000):
        counts[data.split_of(f"article {i}")] += 1
    assert 0.75 < counts["train"] / 2000 < 0.85 and counts["validation"] > 100 and counts["test"] > 100


def test_enwiki_excerpt_splits_are_disjoint_and_sized():
    texts = {s: data.load_text("enwiki-excerpt", s) for s in data.SPLITS}
    titles = {s: {line for line in t.splitlines() if line.startswith("= ") and line.endswith(" =")}
              for s, t in texts.items()}
    assert not (titles["train"] & titles["test"]) and not (titles["train"] & titles["validation"])
    assert len(texts["train"]) > 2_000_000 and len(texts["test"]) > 100_000 and len(texts["validation"]) > 100_000
    for title in titles["test"]:
        assert data.split_of(title[2:-2]) == "test"
    assert "'''" not in texts["test"]  # wiki bold/italic quotes stripped
    assert data.load_text("enwiki-excerpt", "test") == texts["test"]  # cached and stable


def test_calibration_windows_are_seeded_and_start_with_bos():
    tokens = torch.arange(10, 1010)
    a = data.calibration_windows(tokens, nsamples=8, seqlen=32, seed=0, bos_token_id=1)
    b = data.calibration_windows(tokens, nsamples=8, seqlen=32, seed=0, bos_token_id=1)
    c = data.calibration_windows(tokens, nsamples=8, seqlen=32, seed=1, bos_token_id=1)
    assert a.shape == (8, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == 1).all()
    assert ((a[:, 2:] - a[:, 1:-1]) == 1).all()  # contiguous text after the BOS


def test_too_much_calibration_is_refused():
    with pytest.raises(data.DataError, match="exceeds"):
        data.calibration_windows(torch.arange(100), nsamples=8, seqlen=32, seed=0, bos_token_id=None)


def test_hub_datasets_fail_with_one_line_offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(data.DataError) as info:
        data.load_text("wikitext2", "test")
    assert "\n" not in str(info.value) and "enwiki-excerpt" in str(info.value)


def test_byte_tokenizer_round_numbers():
    assert data.tokenize(byte_tokenizer(), "ab").tolist() == [99, 100]
