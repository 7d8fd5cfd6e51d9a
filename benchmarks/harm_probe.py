"""Does a model tell held-out harmful requests from benign ones in its residual stream? Per decoder
layer, the difference of mean last-prompt-token states on the defenses' own training prompts
(organism:harmful against organism:benign, as the refusal direction is found) splits the states at
its midpoint, and each evaluation split's share of prompts on the harmful side is reported (harmful
splits: higher is better told apart; benign and borderline: lower is). A refusal trained on the
training synonyms can only reach the requests its representations put on that side, so the held-out
splits' shares bound what a defense generalises to without an attack. Writes
benchmarks/results/harm_probe.{json,md}.

    python benchmarks/harm_probe.py                                    # the aligned base organism
    python benchmarks/harm_probe.py --model base=organism --model triplet=path/to/last.ckpt
    python benchmarks/harm_probe.py --position object                  # at the request's object word

``--position object`` reads the states at the request's object word instead (the organism's requests
are "<action> <object> : <task>"), where a word's meaning enters before it is carried to the end of
the prompt; it writes harm_probe_object.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import ROOT, atomic_write
from lit_safety.backbone import BackboneError
from lit_safety.cache import weights_checksum
from lit_safety.organism import model_dir

SPLITS = {"train": "organism:eval_train", "heldout_synonym": "organism:eval_heldout_synonym",
          "heldout_concept": "organism:eval_heldout_concept", "benign": "organism:eval_benign_a",
          "borderline": "organism:eval_borderline"}


def object_position(tokenizer):
    """``position`` for ``last_prompt_states``: the last occurrence of the request's object word (its
    second word: "<action> <object> : <task>")."""
    def position(record, ids: list[int]) -> int:
        word = tokenizer.convert_tokens_to_ids(record.messages[-1]["content"].split()[1])
        return max(i for i, token in enumerate(ids) if token == word)

    return position


def probe(model_spec: str, n: int, position: str = "last") -> dict:
    """Per layer: each split's share of prompts on the harmful side of the training direction, read
    at the last prompt token or (``position="object"``) at the request's object word."""
    from lit_safety.artifacts import load_for_evaluation
    from lit_safety.backbone import decoder_layers
    from lit_safety.data import ChatFormatter, load_records
    from lit_safety.evaluation.model_attacks import last_prompt_states

    model, tokenizer = load_for_evaluation(model_spec)
    formatter = ChatFormatter(tokenizer, max_prompt_length=512)
    layers = list(range(len(decoder_layers(model))))
    at = object_position(tokenizer) if position == "object" else None

    def states(records):
        return last_prompt_states(model, formatter, records, layers, position=at)

    train = {kind: states(load_records(f"organism:{kind}")[:n]) for kind in ("harmful", "benign")}
    evaluated = {split: states(load_records(source)[:n]) for split, source in SPLITS.items()}
    out = {}
    for layer in layers:
        harmful, benign = train["harmful"][layer].mean(0), train["benign"][layer].mean(0)
        direction, middle = harmful - benign, (harmful + benign) / 2
        out[str(layer)] = {split: round(((seen[layer] - middle) @ direction > 0).float().mean().item(), 3)
                           for split, seen in evaluated.items()}
    return out


def markdown(results: dict, n: int, position: str = "last") -> str:
    where = "last-prompt-token" if position == "last" else "object-word"
    lines = [f"Harm probe (benchmarks/harm_probe.py): share of each split's prompts ({n} per split) on the harmful "
             f"side of the difference of mean {where} states on organism:harmful and organism:benign, "
             "per decoder layer. Harmful splits: higher = told apart; benign / borderline: lower = told apart.", "",
             "| model | layer | " + " | ".join(SPLITS) + " |", "|---" * (len(SPLITS) + 2) + "|"]
    for name, layers in results.items():
        for layer, shares in layers.items():
            lines.append(f"| {name} | {layer} | " + " | ".join(f"{shares[s]:.2f}" for s in SPLITS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[],
                        help="name=model (organism, a checkpoint, an adapter or model directory); default base=organism")
    parser.add_argument("--n", type=int, default=128, help="prompts per set (default 128)")
    parser.add_argument("--position", choices=("last", "object"), default="last",
                        help="where states are read: the last prompt token (default) or the request's object word")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    models = dict(spec.split("=", 1) for spec in args.model or ["base=organism"])
    try:
        results = {name: probe(spec, args.n, args.position) for name, spec in models.items()}
    except BackboneError as e:
        parser.error(f"--model: {e}")
    build = weights_checksum(model_dir())  # the organism whose prompts (and, by default, base) are probed
    stem = "harm_probe" if args.position == "last" else "harm_probe_object"
    atomic_write(os.path.join(args.out, f"{stem}.json"),
                 json.dumps({"n": args.n, "position": args.position, "organism_build": build, "models": results}, indent=1))
    text = markdown(results, args.n, args.position) + f"\nOrganism build {build[:12]} (checksum of its weights).\n"
    atomic_write(os.path.join(args.out, f"{stem}.md"), text)
    print(text)


if __name__ == "__main__":
    main()
