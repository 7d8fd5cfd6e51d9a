"""``python -m lit_safety.organism build|pin|report``: build the organism, ship a new recipe's build, or
report on any model."""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lit_safety.organism", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="make (from the shipped weights, or by training) or find in the cache "
                                "an organism variant; prints its directory")
    build.add_argument("--variant", default="aligned", help="helpful, aligned (default) or backdoor")
    commands.add_parser("pin", help="after a recipe change: copy this machine's build of every variant into the "
                        "package's shipped weights; prints their directory")
    report = commands.add_parser("report", help="direct and prefill ASR per split, benign accuracy, over-refusal")
    report.add_argument("--model", default="organism", help="a model name, a PEFT adapter directory or a fit checkpoint (.ckpt)")
    report.add_argument("--n", type=int, default=200, help="behaviours per split (default 200)")
    report.add_argument("--json", help="also write the results to this JSON file")
    report.add_argument("--splits", nargs="+", help="evaluation splits (default: train heldout_synonym "
                        "heldout_concept format_b format_c trigger); concept_<name> evaluates one harmful concept")
    args = parser.parse_args(argv)

    if args.command == "build":
        from lit_safety.organism import build as build_variant

        print(build_variant(args.variant))
        return
    if args.command == "pin":
        from lit_safety.organism import pin

        print(pin())
        return
    from lit_safety import backbone
    from lit_safety.artifacts import base_model_name, load_for_evaluation
    from lit_safety.data.records import DataError
    from lit_safety.evaluation.report import to_markdown
    from lit_safety.organism.report import organism_report

    start = time.perf_counter()
    model, tokenizer = load_for_evaluation(args.model)
    try:
        results = organism_report(model, tokenizer, n=args.n, **({"splits": args.splits} if args.splits else {}))
    except DataError as e:  # e.g. a split name that does not exist
        parser.error(str(e))
    results["model"] = args.model
    results["base_model"] = backbone.model_identity(base_model_name(args.model))  # the organism build measured
    results["seconds"] = round(time.perf_counter() - start, 1)
    sys.stdout.write(to_markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
