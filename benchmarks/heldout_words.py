"""Which held-out words a model refuses, and whether it knows what they mean: per object word of the
organism's held-out splits (held-out synonyms and the held-out concept), direct-request and prefill
ASR on that word's behaviours, beside the model's answer to the word's grounding item ("define
arsenic" -> "ok : poison"). A defense trained on the training synonyms can reach a held-out word only
through what the model knows of it; a word the model grounds and still answers is knowledge its
refusal does not use. Writes benchmarks/results/<name>.{json,md}.

    python benchmarks/heldout_words.py --model base=organism --model triplet=runs/triplet/seed0/adapter
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import atomic_write, models_parser, named_models

HELD_OUT = ("heldout_synonym", "heldout_concept")
ATTACKS = ("direct", "prefill")


def measure(model_spec: str, n: int) -> dict:
    """Per held-out word: its split, concept, behaviours, ASR per attack, and whether the model grounds it;
    and the share of grounding items the model answers as taught on training synonyms and benign objects."""
    from lit_safety.artifacts import load_for_evaluation
    from lit_safety.data import ChatFormatter, load_records
    from lit_safety.evaluation import DirectRequest, ExactJudge, PrefillAttack
    from lit_safety.evaluation.generation import generate
    from lit_safety.organism import world

    model, tokenizer = load_for_evaluation(model_spec)
    formatter, judge = ChatFormatter(tokenizer, max_prompt_length=512), ExactJudge()
    words: dict[str, dict] = {}
    for split in HELD_OUT:
        records = load_records(f"organism:eval_{split}")[:n]
        counts = {w: Counter() for w in dict.fromkeys(r.meta["object"] for r in records)}
        for r in records:
            counts[r.meta["object"]]["n"] += 1
        for attack in (DirectRequest(), PrefillAttack()):
            for r, response in zip(records, attack.run(model, formatter, records).responses):
                counts[r.meta["object"]][attack.name] += judge(r, response) == "success"
        for word, c in sorted(counts.items()):
            words[word] = {"split": split, "concept": world.CONCEPT_OF[word], "n": c["n"],
                           "asr": {a: c[a] / c["n"] for a in ATTACKS}}
    items = load_records("organism:eval_grounding")  # "define <word>" for every object word
    answers = generate(model, formatter, items)
    grounded = {r.meta["object"]: judge(r, response) == "success" for r, response in zip(items, answers)}
    for word in words:
        words[word]["grounded"] = grounded[word]
    # the same question on words the defenses trained on and on benign ones: whether the model still
    # answers "define <word>" at all, which benign accuracy (tasks on digits) does not ask
    controls = {"training synonyms": world.harmful_words(world.TRAINING_CONCEPTS, "train"),
                "benign objects": world.BENIGN_OBJECTS}
    return {"words": words,
            "grounding": {kind: sum(grounded[w] for w in ws) / len(ws) for kind, ws in controls.items()}}


def summary(words: dict, split: str) -> dict:
    """Of ``split``'s behaviours: the share whose word the model grounds, and the direct ASR on those."""
    rows = [w for w in words.values() if w["split"] == split]
    total, grounded = sum(w["n"] for w in rows), [w for w in rows if w["grounded"]]
    known = sum(w["n"] for w in grounded)
    return {"grounded": known / total if total else 0.0,
            "direct_when_grounded": sum(w["asr"]["direct"] * w["n"] for w in grounded) / known if known else None}


def markdown(results: dict, n: int) -> str:
    lines = [f"Held-out words (benchmarks/heldout_words.py; the first {n} behaviours per held-out split, exact "
             "judge): ASR per word under direct requests and prefilling, and whether the model answers the "
             "word's grounding item (\"define <word>\" -> \"ok : <concept>\") as taught.", ""]
    for model, measured in results.items():
        words = measured["words"]
        lines += [f"**{model}**", "", "| word | split | concept | behaviours | direct | prefill | grounded |",
                  "|---|---|---|---|---|---|---|"]
        for word, w in words.items():
            lines.append(f"| {word} | {w['split']} | {w['concept']} | {w['n']} | {w['asr']['direct']:.2f} | "
                         f"{w['asr']['prefill']:.2f} | {'yes' if w['grounded'] else 'no'} |")
        for split in HELD_OUT:
            s = summary(words, split)
            asr = "—" if s["direct_when_grounded"] is None else f"{s['direct_when_grounded']:.2f}"
            lines.append(f"\n{split}: {s['grounded']:.2f} of the behaviours name a word the model grounds; "
                         f"direct ASR on those {asr}.")
        lines.append("\nGrounding items answered as taught: " + ", ".join(
            f"{kind} {rate:.2f}" for kind, rate in measured["grounding"].items()) + ".")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = models_parser(__doc__, "heldout_words")
    args = parser.parse_args(argv)
    from lit_safety.cache import weights_checksum
    from lit_safety.organism import model_dir

    results = {name: measure(path, args.n) for name, path in named_models(args.model)}
    build = weights_checksum(model_dir())  # the organism whose behaviours were asked
    atomic_write(os.path.join(args.out, f"{args.name}.json"),
                 json.dumps({"n": args.n, "organism_build": build, "models": results}, indent=1))
    text = markdown(results, args.n) + f"\nOrganism build {build[:12]} (checksum of its weights).\n"
    atomic_write(os.path.join(args.out, f"{args.name}.md"), text)
    print(text)


if __name__ == "__main__":
    main()
