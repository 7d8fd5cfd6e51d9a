"""Property-based tests of the record loaders: whatever bytes or shapes a file holds, loading gives
records or a ``DataError`` naming the file, never another exception."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lit_safety.data import DataError, Record, load_records

FIELDS = ["prompt", "messages", "completion", "refusal", "kind", "target", "answer", "other"]
values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                      lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children,
                                                                                        max_size=3), max_leaves=6)
rows = st.dictionaries(st.sampled_from(FIELDS), values, max_size=6)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def load(suffix: str, data: bytes):
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, f"records{suffix}")
        with open(path, "wb") as f:
            f.write(data)
        try:
            records = load_records(path)
        except DataError as e:
            assert "records" in str(e), str(e)  # names the file
            return None
        assert all(isinstance(r, Record) for r in records)
        return records


@SETTINGS
@given(st.binary(max_size=200), st.sampled_from([".jsonl", ".json", ".csv"]))
def test_arbitrary_bytes_give_records_or_a_data_error(data, suffix):
    load(suffix, data)


@SETTINGS
@given(st.lists(rows | values, max_size=5))
def test_arbitrary_jsonl_rows(items):
    load(".jsonl", "\n".join(json.dumps(item) for item in items).encode())


@SETTINGS
@given(st.lists(rows, max_size=5) | values)
def test_arbitrary_json_documents(document):
    load(".json", json.dumps(document).encode())


@SETTINGS
@given(st.lists(st.lists(st.text(max_size=10), min_size=1, max_size=4), max_size=5),
       st.lists(st.sampled_from(FIELDS), min_size=1, max_size=4, unique=True))
def test_arbitrary_csv_tables(table, header):
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(table)
    load(".csv", out.getvalue().encode())


def test_a_well_formed_row_loads():
    records = load(".jsonl", json.dumps({"prompt": "hi", "completion": "ok", "kind": "benign"}).encode())
    assert records and records[0].prompt == "hi"
