"""Read records from local files (JSONL, JSON, CSV, Parquet), Hugging Face datasets and named sets.

The seeds' real datasets load with configuration alone, by mapping their columns onto the schema:

- circuit-breaker set: ``columns: {prompt: prompt, completion: output}``, ``kind: harmful``
- ``LLM-LAT/harmful-dataset``: ``columns: {prompt: prompt, completion: rejected, refusal: chosen}``
- UltraChat: ``columns: {messages: messages}``, ``kind: benign``
- XSTest: ``columns: {prompt: prompt}``, ``kind: borderline``
- HarmBench behaviours: the named set ``harmbench:test`` (``lit_safety.data.harmbench``); AdvBench
  CSVs: ``columns: {prompt: goal, target: target}``
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lit_safety.data.records import KINDS, DataError, Record, parse_record
from lit_safety.named import DATASET_RESOLVERS

FILE_FORMATS = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class DataSource:
    """Where records come from and how their columns map onto the record schema.

    Args:
        path: a local .jsonl/.json/.csv/.parquet file, a named set such as ``organism:harmful``, or a
            Hugging Face dataset id.
        split: split of a Hugging Face dataset.
        name: configuration name of a Hugging Face dataset.
        columns: schema field -> source column, e.g. ``{prompt: Behavior}``; unmapped fields keep
            their own names.
        kind: kind (harmful, benign, borderline) of records that do not carry one.
        refusal: refusal text for records that do not carry one.
        limit: keep at most this many records (the first ones).
    """

    path: str
    split: str = "train"
    name: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    kind: str | None = None
    refusal: str | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in KINDS:
            raise DataError(f"source {self.path}: unknown kind {self.kind!r}; expected one of {', '.join(KINDS)}")


def _rows_jsonl(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: malformed JSON line ({e.msg} at column {e.colno})") from None


def _rows_json(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}-style files
    if not isinstance(data, list):
        raise DataError(f"{path}: a JSON data file must hold a list of records")
    for index, row in enumerate(data):
        yield f"{path}[{index}]", row


def _rows_csv(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8", newline="") as f:
        # Line 1 is the header, so record k sits on line k + 1 (for single-line cells).
        for number, row in enumerate(csv.DictReader(f), 2):
            yield f"{path}:{number}", {k: (v if v != "" else None) for k, v in row.items()}


def _rows_parquet(path: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    for index, row in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path}[{index}]", row


def _rows_hub(source: DataSource) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(source.path, source.name, split=source.split)
    except Exception as e:  # noqa: BLE001 - the hub raises many types; all mean "cannot load"
        raise DataError(
            f"data source {source.path!r} is neither a local file ({', '.join(FILE_FORMATS)}), a named set "
            f"({', '.join(f'{p}:NAME' for p in DATASET_RESOLVERS.prefixes()) or 'none registered'}), nor a loadable "
            f"Hugging Face dataset: {e}"
        ) from None
    for index, row in enumerate(dataset):
        yield f"{source.path}[{source.split}][{index}]", row


def register_dataset_resolver(prefix: str, resolver: Callable[[str], str]) -> None:
    """Make ``prefix:NAME`` a valid data source, resolved by ``resolver(NAME)`` to a local data file
    (raising ``FileNotFoundError`` or ``ValueError`` for a name it does not know)."""
    DATASET_RESOLVERS[prefix] = resolver


def _resolve_named(path: str) -> str | None:
    prefix, sep, name = path.partition(":")
    resolver = DATASET_RESOLVERS.resolver(prefix) if sep else None
    if resolver is not None:
        try:
            return resolver(name)
        except (FileNotFoundError, ValueError) as e:  # unknown name, or the named model is missing
            raise DataError(f"data source {path!r}: {e}") from None
    return None


def _readable(path: str, rows: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """``rows``, with a file that is not text of its format reported as a ``DataError`` naming it."""
    try:
        yield from rows
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV ({e})") from None


def _rows(source: DataSource) -> Iterator[tuple[str, Any]]:
    path = _resolve_named(source.path) or os.path.expanduser(source.path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix in FILE_FORMATS:
        if not os.path.isfile(path):
            raise DataError(f"data file not found: {path}")
        reader = {".jsonl": _rows_jsonl, ".json": _rows_json, ".csv": _rows_csv, ".parquet": _rows_parquet}[suffix]
        return _readable(path, reader(path))
    if os.path.isdir(path):  # a local Hugging Face dataset directory
        return _rows_hub(DataSource(path, source.split, source.name))
    if os.path.exists(path) or path.startswith((".", "/", "~")):
        raise DataError(f"data source {path}: expected a directory or a file ending in one of {', '.join(FILE_FORMATS)}")
    return _rows_hub(source)


def load_records(source: DataSource | str) -> list[Record]:
    """Load and validate every record of ``source``; the first bad one raises ``DataError``."""
    if isinstance(source, str):
        source = DataSource(path=source)
    inverse = {column: name for name, column in source.columns.items()}
    records = []
    for where, raw in _rows(source):
        if source.limit is not None and len(records) >= source.limit:
            break
        if isinstance(raw, dict) and inverse:
            missing = [column for column in inverse if column not in raw]
            if missing:
                raise DataError(f"{where}: mapped column(s) {missing} not found; the record has {sorted(raw)}")
            raw = {inverse.get(k, k): v for k, v in raw.items() if k not in source.columns or k in inverse}
        records.append(parse_record(raw, where, source.kind, source.refusal))
    if not records:
        raise DataError(f"data source {source.path} holds no records")
    return records


def write_records(records: list[Record], path: str) -> None:
    """Write records as JSONL atomically (a reader never sees a half-written file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
