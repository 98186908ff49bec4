"""Both perplexity protocols on a tiny random Llama against a direct token-by-token computation."""

import math

import pytest
import torch

from qbench.evaluate import bootstrap_ci, first_scored, perplexity, windows_for


def direct_ppl(model, windows, start):
    """exp of the mean over scored tokens of -log p(token | all earlier tokens of its window)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(input_ids=w[None]).logits[0].double(), dim=-1)
            for t in range(start, w.numel()):
                total -= logp[t - 1, w[t]].item()
                count += 1
    return math.exp(total / count), count


@pytest.mark.parametrize("protocol", ["gptq", "brevitas"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_protocol_matches_direct_computation(tiny_llama, protocol, batch_size):
    tokens = torch.randint(2, 258, (5 * 32 + 7,), generator=torch.Generator().manual_seed(0))
    windows = windows_for(protocol, tokens, seqlen=32, bos_token_id=0)
    result = perplexity(tiny_llama, windows, protocol, batch_size=batch_size)
    expected, count = direct_ppl(tiny_llama, windows, first_scored(protocol, 32))
    assert result.tokens == count
    assert result.ppl == pytest.approx(expected, rel=1e-5)


def test_window_layouts():
    tokens = torch.arange(2, 102)
    gptq = windows_for("gptq", tokens, 16, bos_token_id=0)
    assert gptq.shape == (6, 16) and torch.equal(gptq.flatten(), tokens[:96])  # non-overlapping, no BOS added
    brev = windows_for("brevitas", tokens, 16, bos_token_id=0)
    assert brev.shape == (6, 16) and (brev[:, 0] == 0).all()  # BOS first, 15 text tokens each
    assert torch.equal(brev[:, 1:].flatten(), tokens[:90])
    assert first_scored("gptq", 16) == 1 and first_scored("brevitas", 16) == 8  # last half scored
    with pytest.raises(ValueError):
        windows_for("lm-eval", tokens, 16, None)


def test_window_sums_add_up_to_the_totals(tiny_llama):
    tokens = torch.randint(2, 258, (6 * 32,), generator=torch.Generator().manual_seed(1))
    result = perplexity(tiny_llama, windows_for("brevitas", tokens, 32, 0), "brevitas", batch_size=4)
    assert len(result.window_nll) == result.windows == len(result.window_tokens)
    assert sum(result.window_tokens) == result.tokens and set(result.window_tokens) == {16}
    assert math.exp(sum(result.window_nll) / result.tokens) == pytest.approx(result.ppl, rel=1e-12)


def test_bootstrap_interval_brackets_the_estimate_and_is_seeded():
    gen = torch.Generator().manual_seed(0)
    nll = (torch.rand(40, generator=gen, dtype=torch.float64) * 2 + 2) * 100  # mean NLL 2..4 nats per token
    counts = [100] * 40
    point = math.exp(nll.sum().item() / 4000)
    low, high = bootstrap_ci(nll.tolist(), counts, iters=2000, seed=0)
    assert low < point < high
    assert (low, high) == bootstrap_ci(nll.tolist(), counts, iters=2000, seed=0)
    assert (low, high) != bootstrap_ci(nll.tolist(), counts, iters=2000, seed=1)
    # four times the windows from the same distribution: about half the width
    wide = high - low
    nll4 = torch.cat([nll, (torch.rand(120, generator=gen, dtype=torch.float64) * 2 + 2) * 100])
    low4, high4 = bootstrap_ci(nll4.tolist(), [100] * 160, iters=2000, seed=0)
    assert 0.3 < (high4 - low4) / wide < 0.8
    # the percentiles of the resampled statistic, computed the slow way
    rng = torch.Generator().manual_seed(0)
    stats = sorted(math.exp(nll[idx].sum().item() / 4000) for idx in torch.randint(0, 40, (2000, 40), generator=rng))
    assert low == pytest.approx(stats[int(0.025 * 1999)], rel=2e-3) and high == pytest.approx(stats[int(0.975 * 1999)], rel=2e-3)


def test_bootstrap_interval_degenerate_cases():
    assert bootstrap_ci([300.0] * 10, [100] * 10, iters=500) == pytest.approx((math.exp(3.0), math.exp(3.0)))
    assert all(math.isnan(v) for v in bootstrap_ci([300.0], [100], iters=500))  # one window: no interval
    assert all(math.isnan(v) for v in bootstrap_ci([1.0, 2.0], [1, 1], iters=0))
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, 2.0], [1], iters=10)
