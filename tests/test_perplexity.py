"""Both perplexity protocols on a tiny random Llama against a direct token-by-token computation."""

import math

import pytest
import torch

from qbench.evaluate import first_scored, perplexity, windows_for


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
