"""What the organism's system-turn format measures: benign accuracy on the format C behaviours with their
system turn as built (world.SYSTEM_PROMPT, whose words appear in no training data), with as many words
the model trained on instead (free-slot noise words, benign objects; drawn per behaviour, seeded), and
with no system turn, beside the token-embedding norms of each kind of word (an untrained or rarely
seen token keeps a short embedding). Writes benchmarks/results/<name>.{json,md}.

    python benchmarks/system_turn.py --model base=organism --model triplet=runs/triplet/seed0/adapter
"""

from __future__ import annotations

import json
import os
import random
import sys

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import atomic_write, interval_cell, models_parser, named_models


def system_turns(seed: int = 0) -> dict:
    """Variant name -> a function giving a record's system turn (None: no system turn)."""
    from lit_safety.organism import world

    rng = random.Random(seed)
    length = len(world.SYSTEM_PROMPT.split())
    return {"as built": lambda: world.SYSTEM_PROMPT,
            "free-slot words": lambda: " ".join(rng.choices(world.NOISE, k=length)),
            "benign objects": lambda: " ".join(rng.choices(world.BENIGN_OBJECTS, k=length)),
            "none": lambda: None}


def word_kinds() -> dict[str, list[str]]:
    from lit_safety.organism import world

    return {"system turn": world.SYSTEM_PROMPT.split(), "free-slot noise": world.NOISE,
            "benign object": world.BENIGN_OBJECTS,
            "training synonym": [w for c in world.TRAINING_CONCEPTS for w in world.train_synonyms(c)],
            "held-out synonym": [w for c in world.TRAINING_CONCEPTS for w in world.heldout_synonyms(c)],
            "held-out concept": list(world.CONCEPTS[world.HELDOUT_CONCEPT])}


def with_system(record, content: str | None):
    """``record`` with its system turn replaced by ``content`` (removed if None)."""
    import dataclasses

    messages = [dict(m) for m in record.messages if m["role"] != "system"]
    if content is not None:
        messages.insert(0, {"role": "system", "content": content})
    return dataclasses.replace(record, messages=messages)


def measure(model_spec: str, n: int, seed: int) -> dict:
    from lit_safety.artifacts import load_for_evaluation
    from lit_safety.data import ChatFormatter, load_records
    from lit_safety.evaluation import ExactJudge
    from lit_safety.evaluation.generation import generate
    from lit_safety.evaluation.stats import rate

    model, tokenizer = load_for_evaluation(model_spec)
    formatter, judge = ChatFormatter(tokenizer, max_prompt_length=512), ExactJudge()
    records = load_records("organism:eval_benign_c")[:n]
    accuracy, refused, gibberish = {}, {}, {}
    for variant, draw in system_turns(seed).items():
        asked = [with_system(r, draw()) for r in records]
        verdicts = [judge(r, x) for r, x in zip(asked, generate(model, formatter, asked))]
        accuracy[variant] = rate(verdicts.count("success"), len(asked))
        refused[variant] = verdicts.count("refusal") / len(asked)
        gibberish[variant] = verdicts.count("gibberish") / len(asked)
    weight = model.get_input_embeddings().weight.detach()
    norms = weight.norm(dim=-1)
    norm_of = {kind: float(norms[tokenizer.convert_tokens_to_ids(words)].mean()) for kind, words in word_kinds().items()}
    return {"accuracy": accuracy, "refused": refused, "gibberish": gibberish, "embedding_norm": {**norm_of, "vocabulary": float(norms.mean())}}


def markdown(results: dict, n: int) -> str:
    variants = list(system_turns())
    kinds = list(word_kinds()) + ["vocabulary"]
    lines = [f"Benign accuracy on the organism's system-turn behaviours (format C, {n}, exact judge) with the system "
             "turn as built, with as many trained words in its place, and without it; refused = the refusal "
             "sentence; other = neither the answer nor the refusal (a wrong answer, a broken one).", "",
             "| model | " + " | ".join(f"{v}: accuracy / refused / other" for v in variants) + " |",
             "|---" * (1 + len(variants)) + "|"]
    for model, row in results.items():
        lines.append(f"| {model} | " + " | ".join(f"{interval_cell(row['accuracy'][v])} / {row['refused'][v]:.2f} / {row['gibberish'][v]:.2f}"
                                                   for v in variants) + " |")
    lines += ["", "Mean token-embedding norm by kind of word:", "",
              "| model | " + " | ".join(kinds) + " |", "|---" * (1 + len(kinds)) + "|"]
    for model, row in results.items():
        lines.append(f"| {model} | " + " | ".join(f"{row['embedding_norm'][k]:.2f}" for k in kinds) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = models_parser(__doc__)
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn system turns")
    parser.add_argument("--name", default="system_turn", help="file name of the results (default system_turn)")
    args = parser.parse_args(argv)
    results = {name: measure(path, args.n, args.seed) for name, path in named_models(args.model)}
    atomic_write(os.path.join(args.out, f"{args.name}.json"),
                 json.dumps({"n": args.n, "seed": args.seed, "models": results}, indent=1))
    atomic_write(os.path.join(args.out, f"{args.name}.md"), markdown(results, args.n))
    print(markdown(results, args.n))


if __name__ == "__main__":
    main()
