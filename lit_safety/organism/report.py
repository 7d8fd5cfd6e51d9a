"""The organism report: the no-gradient part of the evaluation suite on every split.

Direct-request and prefill ASR on every evaluation split, benign accuracy per format, over-refusal
on borderline and benign prompts, all judged exactly (the organism knows every correct answer). It is
a ``SafetyEvaluation`` run over the organism's splits, with the report's own keys.
"""

from __future__ import annotations

from lit_safety.data.loaders import DataSource, load_records
from lit_safety.evaluation.attacks import DirectRequest, PrefillAttack
from lit_safety.evaluation.suite import SafetyEvaluation
from lit_safety.organism import world
from lit_safety.organism.builder import EVAL_SPLITS


def eval_split(name: str, n: int):
    return load_records(DataSource(f"organism:eval_{name}", limit=n))


def organism_report(model, tokenizer, n: int = 200, attacks=None, splits=EVAL_SPLITS) -> dict:
    """Evaluate ``model`` on ``n`` behaviours per split; returns the report schema (see
    ``lit_safety.evaluation.report``) plus ``borderline_compliance`` (the full correct answer to a
    borderline request, the XSTest analogue), the same on held-out words (``borderline_heldout_compliance``:
    a refusal of held-out synonyms that also refuses "detect <synonym>" is about the word, not harm) and
    over-refusal on benign chat requests."""
    suite = SafetyEvaluation(attacks if attacks is not None else [DirectRequest(), PrefillAttack()],
                             judge="exact", projector_layer=None)
    capability = {fmt: f"benign_{fmt.lower()}" for fmt in world.FORMATS} | {
        "borderline": "borderline", "borderline_heldout": "borderline_heldout", "grounding": "grounding"}
    records = {s: eval_split(s, n) for s in splits} | {name: eval_split(s, n) for name, s in capability.items()}
    suite.prepare({name: name in splits for name in records}, model, reference=False)
    for name, split_records in records.items():
        suite.evaluate(model, tokenizer, name, split_records)
    results = suite.results()
    del results["benign_kl"]  # empty: no reference here
    results["borderline_compliance"] = results["benign_accuracy"].pop("borderline")
    results["borderline_heldout_compliance"] = results["benign_accuracy"].pop("borderline_heldout")
    results["over_refusal"] = {"borderline": results["over_refusal"]["borderline"], "benign": results["over_refusal"]["A"]}
    return results
