"""Every offline judge of the library scored against human refusal labels: accuracy, precision,
recall and the confusion matrix, in benchmarks/results/judges.{json,md}.

    pip install --no-deps pyrit      # MIT; only its labelled CSVs are read, its code is never imported
    python benchmarks/judges.py

The labels are PyRIT's: its refusal-scorer sets (``refusal.csv``, ``refusal_extra.csv``; human_score
1 = the response did not comply: a refusal, or an answer to something else), on whose errors the
offline judge's phrases were chosen (in-sample), and its objective-scorer sets (``objective/*.csv``;
human_score 1 = the response achieved the harmful objective), never used to choose anything. A judge
"says not complied" when its verdict is anything but success; on the objective sets "not complied"
is compared with "objective not achieved", which a refusal judge can only approximate (a harmless
answer on topic is not a refusal but achieves nothing).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import ROOT, atomic_write


def _read(path: str, positive: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    return [{**row, "not_complied": row["human_score"].strip() == positive} for row in rows]


def labelled_rows(directory: str | None = None) -> dict[str, list[dict]]:
    """Set name -> rows with ``not_complied`` (the human label) from PyRIT's ``scorer_evals``
    directory (comment lines starting with # skipped)."""
    if directory is None:
        from lit_safety.data.packaged import package_dir
        from lit_safety.data.records import DataError

        try:
            directory = os.path.join(package_dir("pyrit", "pip install --no-deps pyrit", "PyRIT's human labels"),
                                     "datasets", "scorer_evals")
        except DataError as e:
            raise SystemExit(str(e)) from None
    refusal = [row for file in ("refusal.csv", "refusal_extra.csv")
               for row in _read(os.path.join(directory, "refusal_scorer", file), positive="1")]
    objective_dir = os.path.join(directory, "objective")
    objective = [row for file in sorted(os.listdir(objective_dir)) if file.endswith(".csv")
                 for row in _read(os.path.join(objective_dir, file), positive="0")]
    return {"refusal labels (in-sample)": refusal, "objective labels (unseen)": objective}


def agreement(judge, rows: list[dict]) -> dict:
    from lit_safety.data.records import Record

    counts = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}  # positive = refused (did not comply)
    for row in rows:
        record = Record(kind="harmful", messages=[{"role": "user", "content": row["objective"]}])
        said = judge(record, row["assistant_response"]) != "success"
        human = row["not_complied"]
        counts[("t" if said == human else "f") + ("p" if said else "n")] += 1
    n = sum(counts.values())
    predicted, actual = counts["tp"] + counts["fp"], counts["tp"] + counts["fn"]
    return {"accuracy": (counts["tp"] + counts["tn"]) / n, "precision": counts["tp"] / predicted if predicted else 0.0,
            "recall": counts["tp"] / actual if actual else 0.0, "n": n, "confusion": counts}


def markdown(results: dict) -> str:
    lines = ["Judges against PyRIT's human refusal labels (positive = did not comply).", "",
             "| judge | set | accuracy | precision | recall | TP / FP / TN / FN | n |", "|---" * 7 + "|"]
    for judge, sets in results.items():
        for name, r in sets.items():
            c = r["confusion"]
            lines.append(f"| {judge} | {name} | {r['accuracy']:.2f} | {r['precision']:.2f} | {r['recall']:.2f} | "
                         f"{c['tp']} / {c['fp']} / {c['tn']} / {c['fn']} | {r['n']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from lit_safety.evaluation.judges import RefusalJudge, RefusalPrefixJudge

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", help="a scorer_evals directory: refusal_scorer/ and objective/ (default: PyRIT's)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    sets = labelled_rows(args.labels)
    judges = {"refusal_prefix": RefusalPrefixJudge(), "refusal_offline": RefusalJudge()}
    results = {name: {s: agreement(judge, rows) for s, rows in sets.items()} for name, judge in judges.items()}
    atomic_write(os.path.join(args.out, "judges.json"), json.dumps(results, indent=1))
    atomic_write(os.path.join(args.out, "judges.md"), markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
