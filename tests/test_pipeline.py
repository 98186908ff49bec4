"""The pipeline quantizes every Linear inside the decoder blocks, and nothing else."""

import torch
from omegaconf import OmegaConf

from qbench.models import decoder_blocks, linear_groups
from qbench.pipeline import capture_block_inputs, quantize_model
from qbench.quantizers import GridSpec, build_grid


def test_rtn_pipeline_puts_block_linears_on_the_grid(tiny_llama):
    float_state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    spec = GridSpec(bits=3)
    reports, _ = quantize_model(tiny_llama, spec, OmegaConf.create({"name": "rtn"}), None, progress=False)
    assert len(reports) == 2 * 7  # 2 blocks x (q, k, v, o, gate, up, down)
    assert [r.name for r in reports[:7]] == [name for group in linear_groups(decoder_blocks(tiny_llama)[0])
                                             for name, _ in group]
    for k, v in tiny_llama.state_dict().items():
        if "proj" in k:
            grid = build_grid(float_state[k], spec)  # scales come from the float weights
            torch.testing.assert_close(v, grid.quantize(float_state[k]))
            assert not torch.equal(v, float_state[k])
        else:  # embeddings, norms, lm_head stay float
            assert torch.equal(v, float_state[k]), k
    assert all(0 < r.weight_rel_error < 1 for r in reports)


def test_block_inputs_are_the_embeddings(tiny_llama):
    ids = torch.randint(2, 258, (4, 16), generator=torch.Generator().manual_seed(0))
    hidden, kwargs = capture_block_inputs(tiny_llama, ids, batch_size=2, device=torch.device("cpu"))
    assert len(hidden) == 2 and hidden[0].shape == (2, 16, 64)
    torch.testing.assert_close(torch.cat(hidden), tiny_llama.model.embed_tokens(ids))
    assert "position_embeddings" in kwargs[0]
    # feeding the captured inputs through the blocks reproduces the model's last hidden state
    x = hidden[0]
    for block in decoder_blocks(tiny_llama):
        out = block(x, **kwargs[0])
        x = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(tiny_llama.model.norm(x), tiny_llama.model(ids[:2]).last_hidden_state)
