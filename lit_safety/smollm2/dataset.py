"""The SmolLM2 research set: the requests of ``requests.py`` with the base model's own answers.

Harmful completions are the base model's greedy answers (it is helpful-only, so they are the harmful
behaviour a defense must remove) — the analogue of the circuit-breaker set without writing harmful
text by hand. Refusals come from one short template. Benign and borderline completions (the retain
targets) are the base model's answers too. Generated once, greedy and in float32, so a rebuild gives
the same files; cached by ``lit_safety.cache`` under a hash of everything that determines them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator

from lit_safety.cache import home, is_complete, lock, publish, staging
from lit_safety.data.loaders import write_records
from lit_safety.data.records import Record
from lit_safety.smollm2 import requests

VERSION = 3  # bump when the requests, splits or record layout change
REFUSAL = "I'm sorry, but I can't help with that."
TARGET_WORDS = 6  # an attack's target: the first words of the base model's harmful answer
KINDS = {"harmful": requests.HARMFUL, "benign": {"everyday": requests.BENIGN},
         "borderline": {"borderline": requests.BORDERLINE}}
DEV_KINDS = {"harmful": requests.HARMFUL_DEV, "benign": {"everyday": requests.BENIGN_DEV},
             "borderline": {"borderline": requests.BORDERLINE_DEV}}
NAMES = [f"{kind}_{split}" for kind in KINDS for split in ("train", "dev", "test")]  # one JSONL file each


def split_of(index: int) -> str:
    """Every third request of each category is held out for testing (the dev requests are their own)."""
    return "test" if index % 3 == 2 else "train"


def all_requests() -> Iterator[tuple[str, str, str, str]]:
    """(kind, category, text, split) of every request of the set."""
    for kinds, split in ((KINDS, None), (DEV_KINDS, "dev")):
        for kind, categories in kinds.items():
            for category, texts in categories.items():
                for i, text in enumerate(texts):
                    yield kind, category, text, split or split_of(i)


def _key(model: str, max_new_tokens: int) -> str:
    spec = {"model": model, "max_new_tokens": max_new_tokens, "version": VERSION, "requests": KINDS,
            "dev": DEV_KINDS}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def build_dataset(model: str = "smollm2", max_new_tokens: int = 64, batch_size: int = 16) -> str:
    """The dataset directory (``{harmful,benign,borderline}_{train,dev,test}.jsonl``), generated on first use.

    Args:
        model: the model whose answers become the completions (any name ``load_causal_lm`` accepts).
        max_new_tokens: length of each generated answer.
    """
    final = os.path.join(home(), f"smollm2-data-{_key(model, max_new_tokens)}")
    if is_complete(final):
        return final
    with lock(os.path.basename(final)):
        if not is_complete(final):
            tmp = staging(final)
            for name, records in _generate(model, max_new_tokens, batch_size).items():
                write_records(records, os.path.join(tmp, f"{name}.jsonl"))
            publish(tmp, final)
    return final


def _generate(model_name: str, max_new_tokens: int, batch_size: int) -> dict[str, list[Record]]:
    from lit_safety.backbone import load_causal_lm, load_tokenizer
    from lit_safety.data.formatting import ChatFormatter
    from lit_safety.evaluation.generation import generate

    tokenizer = load_tokenizer(model_name)
    model = load_causal_lm(model_name)
    formatter = ChatFormatter(tokenizer)
    records = [Record(kind=kind, messages=[{"role": "user", "content": text}],
                      refusal=REFUSAL if kind == "harmful" else None, meta={"category": category, "split": split})
               for kind, category, text, split in all_requests()]
    answers = generate(model, formatter, records, max_new_tokens=max_new_tokens, batch_size=batch_size)
    out: dict[str, list[Record]] = {name: [] for name in NAMES}
    for record, answer in zip(records, answers):
        record.completion = answer
        if record.kind == "harmful":
            record.target = " ".join(answer.split()[:TARGET_WORDS])
        out[f"{record.kind}_{record.meta['split']}"].append(record)
    return out


def dataset_path(name: str) -> str:
    """Resolve ``smollm2:<name>`` (harmful_train, benign_test, ...) to a JSONL file, building the set
    with SmolLM2's answers on first use."""
    if name not in NAMES:
        raise FileNotFoundError(f"the SmolLM2 set has no dataset {name!r}; available: {', '.join(NAMES)}")
    return os.path.join(build_dataset(), f"{name}.jsonl")
