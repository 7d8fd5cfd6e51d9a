"""The SmolLM2 research set: the requests of ``requests.jsonl`` with the base model's own answers.

``requests.jsonl`` is data: one request per line with its ``kind`` (harmful, benign, borderline),
``category`` and ``split`` (train, dev, test), so adding a request never moves another across
splits. Harmful requests span eight categories; benign requests are everyday tasks; borderline ones
use a harmful-sounding word in a harmless sense (as in XSTest), so a defense that refuses them
over-refuses. The dev split is for choosing a method's settings; the test split stays held out.

``harmbench_val`` and ``harmbench_test`` are HarmBench's standard behaviours (``harmbench:val``,
``harmbench:test``) with the base model's answers in the same fields, so gradient attacks toward the
base's whole answer, and the check that a defense no longer reproduces it, run on HarmBench too.

Harmful completions are the base model's greedy answers (it is helpful-only, so they are the harmful
behaviour a defense must remove), the analogue of the circuit-breaker set without writing harmful
text by hand. Refusals come from one short template. Benign and borderline completions (the retain
targets) are the base model's answers too. Generated once, greedy and in float32, so a rebuild gives
the same files; cached by ``lit_safety.cache`` under a hash of the requests file's bytes and of
everything else that determines them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator

from lit_safety.cache import built, home
from lit_safety.data.loaders import write_records
from lit_safety.data.records import DataError, Record

VERSION = 4  # bump when the record layout or the generation changes
REQUESTS = os.path.join(os.path.dirname(__file__), "requests.jsonl")
REFUSAL = "I'm sorry, but I can't help with that."
TARGET_WORDS = 6  # an attack's target: the first words of the base model's harmful answer
KINDS, SPLITS = ("harmful", "benign", "borderline"), ("train", "dev", "test")
NAMES = [f"{kind}_{split}" for kind in KINDS for split in SPLITS]  # one JSONL file each
HARMBENCH = {"harmbench_val": "val", "harmbench_test": "test"}  # name -> HarmBench split


def all_requests(path: str = REQUESTS) -> Iterator[tuple[str, str, str, str]]:
    """(kind, category, text, split) of every request of the set, in file order."""
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            row = json.loads(line)
            if row.get("kind") not in KINDS or row.get("split") not in SPLITS or not row.get("request"):
                raise DataError(f"{path}:{line_number}: needs kind in {KINDS}, split in {SPLITS} and a request")
            yield row["kind"], row["category"], row["request"], row["split"]


def _key(model: str, max_new_tokens: int, requests_file: str = REQUESTS) -> str:
    with open(requests_file, "rb") as f:
        requests = hashlib.sha256(f.read()).hexdigest()
    spec = {"model": model, "max_new_tokens": max_new_tokens, "version": VERSION, "requests": requests}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def build_dataset(model: str = "smollm2", max_new_tokens: int = 64, batch_size: int = 16) -> str:
    """The dataset directory (``{harmful,benign,borderline}_{train,dev,test}.jsonl``), generated on first use.

    Args:
        model: the model whose answers become the completions (any name ``load_causal_lm`` accepts).
        max_new_tokens: length of each generated answer.
    """

    def write(directory: str) -> None:
        for name, records in _generate(model, max_new_tokens, batch_size).items():
            write_records(records, os.path.join(directory, f"{name}.jsonl"))

    return built(os.path.join(home(), f"smollm2-data-{_key(model, max_new_tokens)}"), write)


def harmbench_answered(split: str, model: str = "smollm2", max_new_tokens: int = 64, batch_size: int = 16) -> str:
    """The JSONL file of HarmBench's standard ``split`` (val or test) behaviours with ``model``'s
    answers, generated on first use and cached under the CSV's bytes."""
    from lit_safety.data.harmbench import packaged_csv, read_behaviours

    csv_path = packaged_csv(split)

    def write(directory: str) -> None:
        records = read_behaviours(csv_path)
        for record in records:
            record.refusal = REFUSAL
        _answer(model, records, max_new_tokens, batch_size)
        write_records(records, os.path.join(directory, "behaviours.jsonl"))

    final = built(os.path.join(home(), f"smollm2-harmbench-{split}-{_key(model, max_new_tokens, csv_path)}"), write)
    return os.path.join(final, "behaviours.jsonl")


def _answer(model_name: str, records: list[Record], max_new_tokens: int, batch_size: int) -> None:
    """Set each record's completion to ``model_name``'s greedy answer (and a harmful one's target to
    its first words)."""
    from lit_safety.backbone import load_causal_lm, load_tokenizer
    from lit_safety.data.formatting import ChatFormatter
    from lit_safety.evaluation.generation import generate

    formatter = ChatFormatter(load_tokenizer(model_name))
    answers = generate(load_causal_lm(model_name), formatter, records, max_new_tokens=max_new_tokens,
                       batch_size=batch_size)
    for record, answer in zip(records, answers):
        record.completion = answer
        if record.kind == "harmful":
            record.target = " ".join(answer.split()[:TARGET_WORDS])


def _generate(model_name: str, max_new_tokens: int, batch_size: int) -> dict[str, list[Record]]:
    records = [Record(kind=kind, messages=[{"role": "user", "content": text}],
                      refusal=REFUSAL if kind == "harmful" else None, meta={"category": category, "split": split})
               for kind, category, text, split in all_requests()]
    _answer(model_name, records, max_new_tokens, batch_size)
    out: dict[str, list[Record]] = {name: [] for name in NAMES}
    for record in records:
        out[f"{record.kind}_{record.meta['split']}"].append(record)
    return out


def dataset_path(name: str) -> str:
    """Resolve ``smollm2:<name>`` (harmful_train, benign_test, ..., harmbench_test) to a JSONL file,
    building it with SmolLM2's answers on first use."""
    if name in HARMBENCH:
        return harmbench_answered(HARMBENCH[name])
    if name not in NAMES:
        raise FileNotFoundError(f"the SmolLM2 set has no dataset {name!r}; available: {', '.join([*NAMES, *HARMBENCH])}")
    return os.path.join(build_dataset(), f"{name}.jsonl")
