"""Run attacks on evaluation splits, judge every response, and render results as JSON and Markdown.

Schema: ``{"asr": {attack: {split: {"rate", "low", "high", "n"}}}, "refusal": {attack: {split: x}},
"gibberish": {attack: {split: x}}, "benign_accuracy": {format: x}, "over_refusal": {"borderline": x,
"benign": x}, "budgets": {attack: {...}}, "judge": name}``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence

from lit_safety.data.formatting import ChatFormatter
from lit_safety.data.records import Record
from lit_safety.evaluation.judges import Judge
from lit_safety.evaluation.stats import rate


def judge_attack(attack, model, formatter: ChatFormatter, records: Sequence[Record], judge: Judge) -> Counter:
    responses = attack.run(model, formatter, records, judge)
    return Counter(judge(record, response) for record, response in zip(records, responses))


def attack_results(
    model, tokenizer, splits: dict[str, list[Record]], attacks: Sequence, judge: Judge,
    max_prompt_length: int = 512,
) -> dict:
    """ASR (with Wilson intervals), refusal and gibberish rates of every attack on every split."""
    formatter = ChatFormatter(tokenizer, max_prompt_length=max_prompt_length)
    results: dict = {"asr": {}, "refusal": {}, "gibberish": {}, "budgets": {}, "judge": judge.name}
    for attack in attacks:
        results["budgets"][attack.name] = attack.describe()
        for split, records in splits.items():
            counts = judge_attack(attack, model, formatter, records, judge)
            n = len(records)
            results["asr"].setdefault(attack.name, {})[split] = rate(counts["success"], n)
            results["refusal"].setdefault(attack.name, {})[split] = counts["refusal"] / n
            results["gibberish"].setdefault(attack.name, {})[split] = counts["gibberish"] / n
    return results


def to_markdown(results: dict) -> str:
    """ASR table (attack x split, with 95% intervals) plus capability and over-refusal lines."""
    lines = []
    for attack, splits in results.get("asr", {}).items():
        if not lines:
            lines += ["| attack | " + " | ".join(splits) + " |", "|---" * (len(splits) + 1) + "|"]
        cells = [f"{v['rate']:.2f} [{v['low']:.2f}, {v['high']:.2f}]" for v in splits.values()]
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    for key in ("refusal", "gibberish"):
        for attack, splits in results.get(key, {}).items():
            lines.append(f"| {attack} ({key}) | " + " | ".join(f"{v:.2f}" for v in splits.values()) + " |")
    out = [f"ASR judged by `{results.get('judge', '?')}`; [95% Wilson interval].", "", *lines, ""]
    if "benign_accuracy" in results:
        out.append("benign accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in results["benign_accuracy"].items()))
    if results.get("borderline_compliance") is not None:
        out.append(f"borderline compliance: {results['borderline_compliance']:.3f}")
    if "over_refusal" in results:
        out.append("over-refusal: " + ", ".join(f"{k} {v:.3f}" for k, v in results["over_refusal"].items()))
    if results.get("benign_kl"):
        out.append("benign KL to the reference: " + ", ".join(f"{k} {v:.4f}" for k, v in results["benign_kl"].items()))
    if "budgets" in results:
        out += ["", "budgets: " + json.dumps(results["budgets"])]
    return "\n".join(out) + "\n"
