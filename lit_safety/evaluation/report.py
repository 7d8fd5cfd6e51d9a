"""Render evaluation results (``SafetyEvaluation.results``) as Markdown.

Schema: ``{"asr": {attack: {split: {"rate", "low", "high", "n"}}}, "refusal": {attack: {split: x}},
"gibberish": {attack: {split: x}}, "benign_accuracy": {format: x}, "over_refusal": {"borderline": x,
"benign": x}, "budgets": {attack: {...}}, "judge": name}``.
"""

from __future__ import annotations

import json


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
    if results.get("attack_seconds"):
        out.append("seconds per attack: " + json.dumps(results["attack_seconds"]))
    return "\n".join(out) + "\n"
