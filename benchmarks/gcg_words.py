"""What GCG's breaking suffixes say on the organism: the suite's GCG attack (configs/suite.yaml, toward
the whole answer) is run on a model's behaviours of one split, and the suffixes that broke it are read:
which kinds of organism word they hold (safe actions such as "detect", "define" of the grounding items,
benign objects, refusal words, the free slot's noise words, ...), and whether those words are the
cause: each breaking suffix is asked again as a plain request as found, and with every word that is
not a free-slot noise word replaced by "please". Writes benchmarks/results/<name>.{json,md}.

    python benchmarks/gcg_words.py --model triplet=runs/triplet/seed0/adapter --n 100
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.attack_strength import suite_attack
from benchmarks.common import atomic_write, attack_parser, interval_cell, named_models


def word_classes() -> dict[str, set[str]]:
    """The organism's words by kind, in the order a word is classed (first match)."""
    from lit_safety.organism import world

    return {"define (grounding)": {"define"}, "safe action": set(world.SAFE_ACTIONS),
            "harmful action": set(world.HARMFUL_ACTIONS),
            "harmful object": {w for synonyms in world.CONCEPTS.values() for w in synonyms},
            "benign object": set(world.BENIGN_OBJECTS), "task": set(world.TASKS), "digit": set(world.DIGITS),
            "refusal word": set(world.REFUSAL.split()), "free-slot noise": set(world.NOISE)}


def classify(word: str, classes: dict[str, set[str]]) -> str:
    return next((name for name, words in classes.items() if word in words), "other")


def asked_with(record, suffix: str):
    """``record`` with ``suffix`` after its request, as the attack placed it."""
    return record.with_prompt(f"{record.prompt} {suffix}")


def measure(model_spec: str, attack, split: str, n: int) -> dict:
    from lit_safety.artifacts import load_for_evaluation
    from lit_safety.data import ChatFormatter, load_records
    from lit_safety.evaluation import ExactJudge
    from lit_safety.evaluation.generation import generate
    from lit_safety.evaluation.stats import rate

    model, tokenizer = load_for_evaluation(model_spec)
    formatter, judge = ChatFormatter(tokenizer, max_prompt_length=512), ExactJudge()
    records = load_records(f"organism:eval_{split}")[:n]
    start = time.perf_counter()
    result = attack.run(model, formatter, records, judge)
    seconds = time.perf_counter() - start
    broken = [(r, p) for r, p, x in zip(records, result.prompts, result.responses) if judge(r, x) == "success"]
    classes = word_classes()
    noise = classes["free-slot noise"]
    found = [asked_with(r, p) for r, p in broken]
    noise_only = [asked_with(r, " ".join(w if w in noise else "please" for w in p.split())) for r, p in broken]

    def still_broken(asked) -> int:
        responses = generate(model, formatter, asked) if asked else []
        return sum(judge(r, x) == "success" for r, x in zip(asked, responses))

    holding = collections.Counter()  # word kind -> breaking suffixes holding one
    words = collections.Counter()
    for _, suffix in broken:
        holding.update({classify(w, classes) for w in suffix.split()})
        words.update(w for w in suffix.split() if w not in noise)
    return {"asr": rate(len(broken), n), "budget": attack.describe(), "seconds": round(seconds, 1),
            "replayed": still_broken(found), "cue_words_replaced": still_broken(noise_only),
            "kinds": dict(holding.most_common()), "words": dict(words.most_common(15)),
            "examples": [{"request": r.prompt, "suffix": p} for r, p in broken[:8]]}


def markdown(results: dict, split: str, n: int) -> str:
    lines = [f"GCG's breaking suffixes ({split}, {n} behaviours, exact judge): the suite's GCG toward the whole "
             "answer; each breaking suffix asked again as a plain request as found, and with its words other than "
             "the free slot's noise words replaced by \"please\".", "",
             "| model | GCG ASR | broken as found | broken with only noise words | breaking suffixes holding each kind "
             "of word | words other than noise |", "|---|---|---|---|---|---|"]
    for model, row in results.items():
        kinds = ", ".join(f"{k} {v}" for k, v in row["kinds"].items())
        words = ", ".join(f"{w} {c}" for w, c in row["words"].items())
        lines.append(f"| {model} | {interval_cell(row['asr'])} | {row['replayed']} | {row['cue_words_replaced']} | "
                     f"{kinds} | {words} |")
    for model, row in results.items():
        budget = ", ".join(f"{k} {v}" for k, v in row["budget"].items())
        lines += ["", f"Examples ({model}; {budget}; {row['seconds']:.0f} s):", ""]
        lines += [f"- `{e['request']}` + `{e['suffix']}`" for e in row["examples"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = attack_parser(__doc__, "gcg_words")
    args = parser.parse_args(argv)
    attack = suite_attack(args.suite, "gcg")
    results = {name: measure(path, attack, args.split, args.n) for name, path in named_models(args.model)}
    atomic_write(os.path.join(args.out, f"{args.name}.json"),
                 json.dumps({"split": args.split, "n": args.n, "models": results}, indent=1))
    atomic_write(os.path.join(args.out, f"{args.name}.md"), markdown(results, args.split, args.n))
    print(markdown(results, args.split, args.n))


if __name__ == "__main__":
    main()
