"""How far does the suite's embedding attack move its suffix vectors when it breaks a model? For each
behaviour it breaks, the displacement of the vectors from their start (mean and largest over the
vectors, in mean token-embedding norms) at the snapshot where the behaviour first broke, beside the
step. A suffix miner whose radius (``mining_epsilon``, same unit) lies beyond these displacements is
not held back by its ball: its optimisation, not its budget, is what falls short of the attack.

    python benchmarks/suffix_displacement.py --model tsr=path/to/last.ckpt --n 40

The attack is the suite's (configs/suite.yaml, or --suite) from its first start only ("please"); results
go to benchmarks/results/suffix_displacement.{json,md} (or --name), written after each model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.attack_strength import suite_attack
from benchmarks.common import atomic_write, attack_parser, named_models
from lit_safety.evaluation import EmbeddingAttack


@dataclasses.dataclass
class DisplacementProbe(EmbeddingAttack):
    """The embedding attack, recording for each behaviour it breaks how far its vectors had moved."""

    def begin(self, model, formatter, parts, init, shared) -> dict:
        state = super().begin(model, formatter, parts, init, shared)
        scale = model.get_input_embeddings().weight.detach().norm(dim=-1).mean().item()
        start = state["base"][state["lay"].suffix_mask].view(len(parts), self.suffix_length, -1)
        return {**state, "start": start, "scale": scale}

    def select(self, state: dict, keep) -> dict:
        return {**super().select(state, keep), "start": state["start"][keep], "scale": state["scale"]}

    def _snapshot(self, model, formatter, state, rows, book, which, budget) -> None:
        before = book.broken.clone()
        super()._snapshot(model, formatter, state, rows, book, which, budget)
        moved = (state["suffix"].detach() - state["start"]).norm(dim=-1) / state["scale"]
        for i, row in enumerate(rows):
            if book.broken[row] and not before[row]:
                self.broke[row] = {"step": budget, "mean": moved[i].mean().item(), "max": moved[i].max().item()}


def measure(model_spec: str, attack: EmbeddingAttack, split: str, n: int, judge=None) -> dict:
    """The displacements on ``n`` behaviours of ``split``, judged by ``judge`` (default: exact)."""
    import torch

    from lit_safety.artifacts import load_for_evaluation
    from lit_safety.data import ChatFormatter, load_records
    from lit_safety.evaluation import ExactJudge

    model, tokenizer = load_for_evaluation(model_spec)
    if hasattr(model, "merge_and_unload"):  # as the suite attacks it (merge_adapters)
        model = model.merge_and_unload().eval()
    probe = DisplacementProbe(**{f.name: getattr(attack, f.name) for f in dataclasses.fields(attack)})
    probe.restarts, probe.broke = 1, {}
    records = load_records(f"organism:eval_{split}")[:n]
    with torch.inference_mode(False), torch.enable_grad():
        probe.run(model, ChatFormatter(tokenizer, max_prompt_length=512), records, judge or ExactJudge())
    broke = [probe.broke[row] for row in sorted(probe.broke)]
    means = [b["mean"] for b in broke]
    summary = {"median": statistics.median(means), "largest": max(b["max"] for b in broke)} if broke else {}
    return {"broken": len(broke), "n": len(records), "behaviours": broke, **summary}


def markdown(results: dict, split: str, n: int, budget: dict) -> str:
    lines = [f"Suffix displacement at the break (mean token-embedding norms), the suite's embedding attack from its "
             f"first start ({budget['suffix_length']} vectors, {budget['steps']} steps, step {budget['step_size']}), "
             f"{split}, {n} behaviours.", "",
             "| model | broken | median of mean displacement | largest vector displacement | median step |",
             "|---|---|---|---|---|"]
    for model, r in results.items():
        steps = [b["step"] for b in r["behaviours"]]
        cells = (f"{r['median']:.2f} | {r['largest']:.2f} | {statistics.median(steps):.0f}" if steps else "- | - | -")
        lines.append(f"| {model} | {r['broken']} / {r['n']} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = attack_parser(__doc__, "suffix_displacement")
    args = parser.parse_args(argv)
    attack = suite_attack(args.suite)
    budget = {"suffix_length": attack.suffix_length, "steps": attack.steps, "step_size": attack.step_size}
    results = {}
    for name, path in named_models(args.model):
        results[name] = measure(path, attack, args.split, args.n)
        atomic_write(os.path.join(args.out, f"{args.name}.json"),
                     json.dumps({"split": args.split, "n": args.n, "budget": budget, "models": results}, indent=1))
        atomic_write(os.path.join(args.out, f"{args.name}.md"), markdown(results, args.split, args.n, budget))


if __name__ == "__main__":
    main()
