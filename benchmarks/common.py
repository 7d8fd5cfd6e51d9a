"""What the benchmark scripts share: the repository root and running one `python -m lit_safety` command."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The keys of a result's "asr" that are worst cases over its attacks (SafetyEvaluation), not attacks.
WORST_CASES = ("worst_case", "worst_case_inference")


def run(args: list[str], log: str, threads: int | None = None) -> float:
    """Run ``python -m lit_safety <args>`` from the repository root with its output in ``log``;
    returns the wall seconds, or stops the benchmark when the command fails. ``threads`` sets the
    command's torch threads (OMP_NUM_THREADS), so that commands run side by side share the cores."""
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "lit_safety", *args], check=False, cwd=ROOT, stdout=f,
                              stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise SystemExit(f"`lit_safety {' '.join(args[:3])}` failed; see {log}")
    return time.perf_counter() - start


def atomic_write(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a killed benchmark leaves the
    old file or the new one, never a truncated one that ``--reuse`` would trust. Creates the
    directory (a benchmark's ``--out``) if it is missing."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def interval_cell(rate: dict) -> str:
    """A rate with its 95% Wilson interval: ``0.50 [0.30, 0.70]``."""
    return f"{rate['rate']:.2f} [{rate['low']:.2f}, {rate['high']:.2f}]"


def spread(values: list[float]) -> dict:
    """Mean, min and max of one figure over seeds, with the values (the mean kept within them: summed
    floats can land a hair outside, and error bars from mean to min must not be negative)."""
    low, high = min(values), max(values)
    return {"mean": min(max(statistics.fmean(values), low), high), "min": low, "max": high, "values": values}


def spread_cell(summary: dict | None) -> str:
    """A mean over seeds with its (min-max) spread when the seeds differ; — where nothing ran."""
    if summary is None:
        return "—"
    detail = f" ({summary['min']:.2f}-{summary['max']:.2f})" if summary["min"] != summary["max"] else ""
    return f"{summary['mean']:.2f}{detail}"


def judge_agreement(judge: str, results: str = os.path.join(ROOT, "benchmarks", "results", "judges.json")) -> str:
    """One sentence naming ``judge`` and its agreement with people as benchmarks/judges.py measured it."""
    name = judge.split(" ", 1)[0]
    measured = {}
    if os.path.isfile(results):
        with open(results) as f:
            measured = json.load(f).get(name, {})
    if not measured:
        return f"Judge: {judge} (agreement with people not measured)."
    scores = "; ".join(f"{r['accuracy']:.2f} accuracy, {r['precision']:.2f} precision, {r['recall']:.2f} recall "
                       f"on {labels} (n={r['n']})" for labels, r in measured.items())
    return f"Judge: {judge}; against PyRIT's human labels ({os.path.basename(results)}): {scores}."


def organism_builds(runs: list[dict]) -> list[str]:
    """The organism builds (weights checksum, 12 digits) ``runs`` were measured on; results from before
    the build was recorded name none."""
    return sorted({r["base_model"]["sha256"][:12] for r in runs if r.get("base_model")})


def models_parser(doc: str, name: str | None = None) -> argparse.ArgumentParser:
    """The options of a benchmark that measures named models on organism behaviours: ``--model
    name=path`` (repeatable), ``--n``, ``--out`` and, for a benchmark whose results file is ``name``
    unless told, ``--name``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="name=checkpoint, adapter or model name")
    parser.add_argument("--n", type=int, default=100, help="behaviours per split (default 100)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    if name is not None:
        parser.add_argument("--name", default=name, help=f"results file name, without extension (default {name})")
    return parser


def attack_parser(doc: str, name: str | None = None) -> argparse.ArgumentParser:
    """``models_parser``'s options and those of a benchmark that attacks the models on one organism
    split: ``--split`` and the suite config its attack comes from."""
    parser = models_parser(doc, name)
    parser.add_argument("--split", default="heldout_synonym")
    parser.add_argument("--suite", default=os.path.join(ROOT, "configs", "suite.yaml"))
    return parser


def named_models(specs: list[str]) -> list[tuple[str, str]]:
    """(name, what to load) of each ``--model name=path`` (a bare name loads itself, e.g. organism)."""
    return [(name, path or name) for name, _, path in (spec.partition("=") for spec in specs)]
