"""How strong is the suite's embedding attack? It is run beside reference embedding attacks on the same
behaviours of the same models, every one toward the whole answer, and the ASR of each (with its
Wilson interval and its curve over steps) is written to benchmarks/results/attack_strength.{json,md}.

    python benchmarks/attack_strength.py --model triplet_adv=path/to/last.ckpt --n 100
    python benchmarks/attack_strength.py --model base=organism --model lat=runs/lat/seed0/checkpoints/last.ckpt

The references: 10 vectors and 300 signed steps from "please" and from "!" (one start each, judged
every 25 steps), 20 vectors x 1000 steps from "please", 10 vectors x 3000 steps from "please" (three
times the suite's steps in one start), the suite's 500-step starts four times over (from "please", then
random tokens), and 10 vectors x 2000 steps at a quarter of the suite's step size (a defense trained
against the suite's step can sit between its steps). The suite's attack is the one in
configs/suite.yaml (or --suite). Results are written after each model.

    python benchmarks/attack_strength.py --model tsr=path/to/last.ckpt --without-suite \
        --references "10 x 2000 at step 0.005 from please" --name attack_strength_fine
"""

from __future__ import annotations

import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import atomic_write, attack_parser, interval_cell, named_models

REFERENCES = {
    "10 x 300 from please": {"suffix_length": 10, "steps": 300, "snapshots": 12, "init": "please"},
    "10 x 300 from !": {"suffix_length": 10, "steps": 300, "snapshots": 12, "init": "!"},
    "20 x 1000 from please": {"suffix_length": 20, "steps": 1000, "snapshots": 40, "init": "please"},
    "10 x 3000 from please": {"suffix_length": 10, "steps": 3000, "snapshots": 30, "init": "please"},
    "10 x 500 x 4 starts": {"suffix_length": 10, "steps": 500, "restarts": 4, "snapshots": 20, "init": "please"},
    "10 x 2000 at step 0.005 from please": {"suffix_length": 10, "steps": 2000, "snapshots": 40, "init": "please",
                                            "step_size": 0.005},
}


def suite_attack(path: str, name: str = "embedding"):
    """The attack named ``name`` of a suite config, built as the CLI builds it."""
    import yaml
    from jsonargparse import ArgumentParser

    from lit_safety.evaluation import SafetyEvaluation

    parser = ArgumentParser()
    parser.add_argument("--suite", type=SafetyEvaluation)
    with open(path) as f:
        suite = parser.instantiate(parser.parse_object({"suite": yaml.safe_load(f)})).suite
    return next(a for a in suite.attacks if a.name == name)


def measure(model_spec: str, attacks: dict, split: str, n: int) -> dict:
    from lit_safety.artifacts import load_for_evaluation
    from lit_safety.data import ChatFormatter, load_records
    from lit_safety.evaluation import ExactJudge
    from lit_safety.evaluation.stats import rate

    model, tokenizer = load_for_evaluation(model_spec)
    if hasattr(model, "merge_and_unload"):  # as the suite attacks it (merge_adapters), at the merged model's speed
        model = model.merge_and_unload().eval()
    formatter, judge = ChatFormatter(tokenizer, max_prompt_length=512), ExactJudge()
    records = load_records(f"organism:eval_{split}")[:n]
    out = {}
    for name, attack in attacks.items():
        start = time.perf_counter()
        result = attack.run(model, formatter, records, judge)
        budgets = attack.curve_budgets()
        out[name] = {
            "asr": rate(sum(judge(r, x) == "success" for r, x in zip(records, result.responses)), len(records)),
            "asr_strict": rate(sum(judge.strict(r, x) == "success" for r, x in zip(records, result.responses)),
                               len(records)),
            "curve": {b: rate(k, len(records)) for b, k in zip(budgets, result.broken_within(budgets))},
            "budget": attack.describe(), "seconds": round(time.perf_counter() - start, 1)}
        print(f"{model_spec} {name}: {interval_cell(out[name]['asr'])} ({out[name]['seconds']} s)", flush=True)
    return out


def markdown(results: dict, split: str, n: int) -> str:
    names = list(next(iter(results.values())))
    lines = [f"Embedding attacks toward the whole answer, {split}, {n} behaviours, exact judge (harm done; "
             "strict reading in brackets after the interval).", "",
             "| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for model, row in results.items():
        lines.append(f"| {model} | " + " | ".join(f"{interval_cell(row[a]['asr'])} ({row[a]['asr_strict']['rate']:.2f})"
                                                 for a in names) + " |")
    lines += ["", "Seconds: " + "; ".join(f"{m} " + ", ".join(f"{row[a]['seconds']:.0f}" for a in names)
                                          for m, row in results.items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from lit_safety.evaluation import EmbeddingAttack

    parser = attack_parser(__doc__, "attack_strength")
    parser.add_argument("--references", nargs="+", default=list(REFERENCES), choices=list(REFERENCES))
    parser.add_argument("--without-suite", action="store_true",
                        help="run the references only (the suite's figures are in each run's test results)")
    args = parser.parse_args(argv)
    attacks = {**({} if args.without_suite else {"suite": suite_attack(args.suite)}),
               **{name: EmbeddingAttack(**REFERENCES[name]) for name in args.references}}
    results = {}
    for name, path in named_models(args.model):  # written after each model: a long run keeps what it measured
        results[name] = measure(path, attacks, args.split, args.n)
        atomic_write(os.path.join(args.out, f"{args.name}.json"),
                     json.dumps({"split": args.split, "n": args.n, "models": results}, indent=1))
        atomic_write(os.path.join(args.out, f"{args.name}.md"), markdown(results, args.split, args.n))


if __name__ == "__main__":
    main()
