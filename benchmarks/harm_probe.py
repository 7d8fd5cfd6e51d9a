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
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import ROOT, atomic_write
from lit_safety.cache import checksum
from lit_safety.organism import model_dir

SPLITS = {"train": "organism:eval_train", "heldout_synonym": "organism:eval_heldout_synonym",
          "heldout_concept": "organism:eval_heldout_concept", "benign": "organism:eval_benign_a",
          "borderline": "organism:eval_borderline"}


def probe(model_spec: str, n: int) -> dict:
    """Per layer: each split's share of prompts on the harmful side of the training direction."""
    from lit_safety.artifacts import load_for_evaluation
    from lit_safety.backbone import decoder_layers
    from lit_safety.data import ChatFormatter, load_records
    from lit_safety.evaluation.model_attacks import last_prompt_states

    model, tokenizer = load_for_evaluation(model_spec)
    formatter = ChatFormatter(tokenizer, max_prompt_length=512)
    layers = list(range(len(decoder_layers(model))))
    train = {kind: last_prompt_states(model, formatter, load_records(f"organism:{kind}")[:n], layers)
             for kind in ("harmful", "benign")}
    evaluated = {split: last_prompt_states(model, formatter, load_records(source)[:n], layers)
                 for split, source in SPLITS.items()}
    out = {}
    for layer in layers:
        harmful, benign = train["harmful"][layer].mean(0), train["benign"][layer].mean(0)
        direction, middle = harmful - benign, (harmful + benign) / 2
        out[str(layer)] = {split: round(((states[layer] - middle) @ direction > 0).float().mean().item(), 3)
                           for split, states in evaluated.items()}
    return out


def markdown(results: dict, n: int) -> str:
    lines = [f"Harm probe (benchmarks/harm_probe.py): share of each split's prompts ({n} per split) on the harmful "
             "side of the difference of mean last-prompt-token states on organism:harmful and organism:benign, "
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
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    models = dict(spec.split("=", 1) for spec in args.model or ["base=organism"])
    results = {name: probe(spec, args.n) for name, spec in models.items()}
    build = checksum(model_dir())  # the organism whose prompts (and, by default, base) are probed
    atomic_write(os.path.join(args.out, "harm_probe.json"),
                 json.dumps({"n": args.n, "organism_build": build, "models": results}, indent=1))
    text = markdown(results, args.n) + f"\nOrganism build {build[:12]} (checksum of its weights).\n"
    atomic_write(os.path.join(args.out, "harm_probe.md"), text)
    print(text)


if __name__ == "__main__":
    main()
