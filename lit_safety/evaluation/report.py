"""Render evaluation results (``SafetyEvaluation.results``) as Markdown.

Schema: ``{"asr": {attack: {split: {"rate", "low", "high", "n"}}}`` (``worst_case`` among the attacks),
``"asr_strict"`` (same shape; the judge's strict reading), ``"curves": {attack: {split: {budget: rate
cell}}}``, ``"refusal": {attack: {split: x}},
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
    for attack, splits in results.get("asr_strict", {}).items():
        lines.append(f"| {attack} (strict) | " + " | ".join(f"{v['rate']:.2f}" for v in splits.values()) + " |")
    for key in ("refusal", "gibberish"):
        for attack, splits in results.get(key, {}).items():
            lines.append(f"| {attack} ({key}) | " + " | ".join(f"{v:.2f}" for v in splits.values()) + " |")
    out = [f"ASR judged by `{results.get('judge', '?')}`; [95% Wilson interval].", "", *lines, ""]
    for attack, splits in results.get("curves", {}).items():
        out.append(f"{attack} ASR by budget: " + "; ".join(
            f"{split} " + ", ".join(f"{b}: {c['rate']:.2f}" for b, c in curve.items()) for split, curve in splits.items()))
    if results.get("curves"):
        out.append("")
    if "benign_accuracy" in results:
        out.append("benign accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in results["benign_accuracy"].items()))
    if results.get("borderline_compliance") is not None:
        out.append(f"borderline compliance: {results['borderline_compliance']:.3f}")
    if results.get("borderline_heldout_compliance") is not None:
        out.append(f"borderline compliance on held-out words: {results['borderline_heldout_compliance']:.3f}")
    if "over_refusal" in results:
        out.append("over-refusal: " + ", ".join(f"{k} {v:.3f}" for k, v in results["over_refusal"].items()))
    if results.get("benign_kl"):
        out.append("benign KL to the reference: " + ", ".join(f"{k} {v:.4f}" for k, v in results["benign_kl"].items()))
    if "budgets" in results:
        out += ["", "budgets: " + json.dumps(results["budgets"])]
    if results.get("attack_seconds"):
        out.append("seconds per attack: " + json.dumps(results["attack_seconds"]))
    return "\n".join(out) + "\n"


def plot_asr(results: dict, path: str) -> None:
    """Grouped bars: ASR per attack (colour) and split (group), with Wilson 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = list(results["asr"])
    splits = sorted({s for a in attacks for s in results["asr"][a]})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(splits) * max(1, len(attacks)) / 2), 4))
    width = 0.8 / max(1, len(attacks))
    for i, attack in enumerate(attacks):
        cells = [results["asr"][attack].get(s) for s in splits]
        xs = [j + i * width for j in range(len(splits))]
        rates = [c["rate"] if c else 0.0 for c in cells]
        errors = [[max(0.0, c["rate"] - c["low"]) if c else 0 for c in cells],
                  [max(0.0, c["high"] - c["rate"]) if c else 0 for c in cells]]
        ax.bar(xs, rates, width, yerr=errors, capsize=2, label=attack)
    ax.set_xticks([j + width * (len(attacks) - 1) / 2 for j in range(len(splits))], splits, rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"ASR ({results.get('judge', '')} judge)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(results: dict, path: str) -> None:
    """One panel per budgeted attack: ASR against its budget (log scale), a line per split, with
    Wilson 95% bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = results["curves"]
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.4), squeeze=False)
    for ax, (attack, splits) in zip(axes[0], curves.items()):
        for split, curve in splits.items():
            budgets = [int(b) for b in curve]
            cells = list(curve.values())
            ax.plot(budgets, [c["rate"] for c in cells], marker="o", label=split)
            ax.fill_between(budgets, [c["low"] for c in cells], [c["high"] for c in cells], alpha=0.15)
        ax.set_xscale("log")
        ax.set_ylim(0, 1.05)
        ax.set_title(attack)
        ax.set_xlabel("budget")
        ax.set_ylabel(f"ASR ({results.get('judge', '')})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
