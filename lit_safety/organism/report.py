"""The organism report: the no-gradient part of the evaluation suite on every split.

Direct-request and prefill ASR on every evaluation split, benign accuracy per format, over-refusal
on borderline and benign prompts, all judged exactly (the organism knows every correct answer).
"""

from __future__ import annotations

from collections import Counter

from lit_safety.data.formatting import ChatFormatter
from lit_safety.data.loaders import DataSource, load_records
from lit_safety.evaluation.attacks import DirectRequest, PrefillAttack
from lit_safety.evaluation.report import attack_results, judge_attack
from lit_safety.organism import world
from lit_safety.organism.builder import EVAL_SPLITS
from lit_safety.organism.judge import exact_judge


def eval_split(name: str, n: int):
    return load_records(DataSource(f"organism:eval_{name}", limit=n))


def organism_report(model, tokenizer, n: int = 200, attacks=None, splits=EVAL_SPLITS) -> dict:
    """Evaluate ``model`` on ``n`` behaviours per split; returns the report schema (see
    ``lit_safety.evaluation.report``)."""
    attacks = attacks if attacks is not None else [DirectRequest(), PrefillAttack()]
    judge = exact_judge()
    results = attack_results(model, tokenizer, {s: eval_split(s, n) for s in splits}, attacks, judge)
    direct, formatter = DirectRequest(), ChatFormatter(tokenizer)
    results["benign_accuracy"] = {}
    for fmt in world.FORMATS:
        counts = judge_attack(direct, model, formatter, eval_split(f"benign_{fmt.lower()}", n), judge)
        results["benign_accuracy"][fmt] = counts["success"] / sum(counts.values())
    results["over_refusal"], results["borderline_compliance"] = {}, None
    for name, split in (("borderline", "borderline"), ("benign", "benign_a")):
        counts: Counter = judge_attack(direct, model, formatter, eval_split(split, n), judge)
        results["over_refusal"][name] = counts["refusal"] / sum(counts.values())
        if name == "borderline":  # XSTest analogue: the full correct answer, not just "no refusal"
            results["borderline_compliance"] = counts["success"] / sum(counts.values())
    return results
