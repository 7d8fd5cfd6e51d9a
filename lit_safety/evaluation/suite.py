"""``SafetyEvaluation``: the suite behind ``python -m lit_safety test``.

Harmful behaviours are attacked by every configured attack; benign and borderline records measure
capability (exact accuracy, KL to the reference on their completions) and over-refusal. Every count
is a torchmetrics state, so the figures are exact under DDP.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import nn
from torchmetrics import MeanMetric

from lit_safety.data.formatting import ChatFormatter, collate
from lit_safety.data.records import Record
from lit_safety.evaluation.attacks import Attack, DirectRequest, PrefillAttack
from lit_safety.evaluation.judges import make_judge
from lit_safety.evaluation.metrics import VerdictRates
from lit_safety.evaluation.report import to_markdown
from lit_safety.losses import kl_divergence


@torch.no_grad()
def benign_kl(model, formatter: ChatFormatter, records: Sequence[Record], reference) -> torch.Tensor:
    """KL(reference || model) of next-token distributions over the records' completion tokens;
    ``reference`` is a context manager factory under which ``model`` acts as the reference."""
    batch = collate([formatter.encode_record(r, r.completion) for r in records], formatter.tokenizer.pad_token_id)
    device = next(model.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits
    with reference():
        reference_logits = model(input_ids=ids, attention_mask=mask).logits
    completion = batch["completion_mask"].to(device)
    # Position t predicts token t+1: compare where the next token is a completion token.
    positions = torch.nn.functional.pad(completion[:, 1:], (0, 1))
    return kl_divergence(reference_logits, logits, positions, temperature=1.0)


class SafetyEvaluation(nn.Module):
    """Attacks, judge and outputs of the evaluation suite.

    Args:
        attacks: attacks run on every harmful split (each reports under its name: direct, prefill,
            embedding, gcg, latent).
        judge: "exact" (records' answers and refusals: the organism), "refusal_prefix" (a proxy,
            named as such in every result) or "harmbench" (the HarmBench classifier).
        harmbench_model: classifier id or directory for the "harmbench" judge.
        attack_splits: attack name -> the only splits it runs on (e.g. keep an expensive attack to
            a few splits); attacks not named run on every harmful split.
        projector_layer: decoder layer whose mean-pooled prompt states go to TensorBoard's
            embedding projector (None disables it).
        max_prompt_length: prompt tokens kept.
    """

    def __init__(
        self,
        attacks: list[Attack] | None = None,
        judge: str = "exact",
        harmbench_model: str = "cais/HarmBench-Llama-2-13b-cls",
        attack_splits: dict[str, list[str]] | None = None,
        projector_layer: int | None = -1,
        max_prompt_length: int = 512,
    ):
        super().__init__()
        self.attacks = list(attacks) if attacks is not None else [DirectRequest(), PrefillAttack()]
        self.judge_name, self.harmbench_model = judge, harmbench_model
        self.attack_splits = attack_splits or {}
        self.projector_layer = projector_layer
        self.max_prompt_length = max_prompt_length
        self.metrics = nn.ModuleDict()  # "attack|split" -> VerdictRates, "kl|split" -> MeanMetric
        self.harmful_splits: set[str] = set()
        self._judge = None
        self.projected: dict[str, list] = defaultdict(list)
        self.seconds: dict[str, float] = defaultdict(float)  # attack -> time spent on this rank

    @property
    def judge(self):
        if self._judge is None:
            self._judge = make_judge(self.judge_name, self.harmbench_model)
        return self._judge

    def prepare(self, splits: dict[str, bool], model) -> None:
        """Check layer settings against ``model`` and create every metric up front (split -> whether
        it holds harmful behaviours), so that all ranks hold the same metrics whatever share of the
        data each one sees."""
        from lit_safety.adversaries import attack_sites
        from lit_safety.backbone import decoder_layers, resolve_layers

        for attack in self.attacks:
            if hasattr(attack, "layers"):
                attack_sites(model, attack.layers)
        if self.projector_layer is not None:
            resolve_layers([self.projector_layer], len(decoder_layers(model)))
        self.harmful_splits = {split for split, harmful in splits.items() if harmful}
        device = next(model.parameters()).device
        with torch.inference_mode(False):  # states updated outside the test loop's inference mode
            self.metrics = nn.ModuleDict()
            for split, harmful in splits.items():
                for name in [a.name for a in self._attacks_for(split)] if harmful else ["direct"]:
                    self.metrics[f"{name}|{split}"] = VerdictRates().to(device)
                if not harmful:
                    self.metrics[f"kl|{split}"] = MeanMetric().to(device)
        self.projected = defaultdict(list)
        self.seconds = defaultdict(float)

    def evaluate(self, model, tokenizer, split: str, records: Sequence[Record], reference=None) -> None:
        """Update the metrics with one batch of one split's records."""
        formatter = ChatFormatter(tokenizer, max_prompt_length=self.max_prompt_length)
        harmful = [r for r in records if r.kind == "harmful"]
        other = [r for r in records if r.kind != "harmful"]
        for attack in self._attacks_for(split) if harmful else []:
            start = time.perf_counter()
            responses = attack.run(model, formatter, harmful, self.judge)
            self.seconds[attack.name] += time.perf_counter() - start
            self.metrics[f"{attack.name}|{split}"].update(
                self.judge(r, response) for r, response in zip(harmful, responses))
        if other:
            responses = DirectRequest().run(model, formatter, other)
            self.metrics[f"direct|{split}"].update(
                self.judge(r, response) for r, response in zip(other, responses))
            if reference is not None:
                self.metrics[f"kl|{split}"].update(benign_kl(model, formatter, other, reference), len(other))
        if self.projector_layer is not None:
            self._project(model, formatter, records)

    def _attacks_for(self, split: str) -> list[Attack]:
        return [a for a in self.attacks if split in self.attack_splits.get(a.name, [split])]

    @torch.no_grad()
    def _project(self, model, formatter: ChatFormatter, records: Sequence[Record]) -> None:
        from lit_safety.representations import forward_states, masked_mean

        batch = collate([formatter.encode_record(r, None) for r in records], formatter.tokenizer.pad_token_id)
        device = next(model.parameters()).device
        mask = batch["attention_mask"].to(device)
        states, _ = forward_states(model, batch["input_ids"].to(device), mask, [self.projector_layer], logits=False)
        pooled = masked_mean(next(iter(states.values())), mask, dim=1)
        self.projected["states"].append(pooled.float().cpu())
        self.projected["labels"] += [r.kind for r in records]

    def results(self) -> dict:
        """Compute every metric (synchronised across ranks) into the report schema and reset."""
        out: dict = {"asr": {}, "refusal": {}, "gibberish": {}, "benign_accuracy": {}, "over_refusal": {},
                     "benign_kl": {}, "budgets": {a.name: a.describe() for a in self.attacks}, "judge": self.judge_name,
                     "attack_seconds": {name: round(t, 1) for name, t in self.seconds.items()}}
        for key, metric in self.metrics.items():
            name, split = key.split("|")
            value = metric.compute()
            if name == "kl":
                out["benign_kl"][split] = float(value)
            elif split in self.harmful_splits:
                out["asr"].setdefault(name, {})[split] = {k: value[k] for k in ("rate", "low", "high", "n")}
                out["refusal"].setdefault(name, {})[split] = value["refusal"]
                out["gibberish"].setdefault(name, {})[split] = value["gibberish"]
            else:
                out["benign_accuracy"][split] = value["rate"]
                out["over_refusal"][split] = value["refusal"]
            metric.reset()
        if self.judge_name == "refusal_prefix":
            out["judge"] = "refusal_prefix (PROXY: counts every non-refusal as success)"
        return out

    def write(self, results: dict, directory: str) -> None:
        """``eval_results.json``, ``eval_results.md`` and ``eval_results.png`` in ``directory``."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "eval_results.json"), "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.join(directory, "eval_results.md"), "w") as f:
            f.write(to_markdown(results))
        plot_asr(results, os.path.join(directory, "eval_results.png"))


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
