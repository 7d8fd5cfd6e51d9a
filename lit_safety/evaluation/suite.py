"""``SafetyEvaluation``: the suite behind ``python -m lit_safety test``, a Lightning callback.

Harmful behaviours are attacked by every configured attack; benign and borderline records measure
capability (exact accuracy, KL to the reference on their completions) and over-refusal. Every count
is a torchmetrics state, so the figures are exact under DDP. Any module with ``model`` (the PeftModel),
``tokenizer`` and ``reference()`` can be evaluated, with a data module that has test splits
(``SafetyDataModule``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torchmetrics import MeanMetric

from lit_safety import artifacts, backbone
from lit_safety.data.formatting import ChatFormatter, collate
from lit_safety.data.records import Record
from lit_safety.evaluation.attacks import Attack, DirectRequest, PrefillAttack
from lit_safety.evaluation.fidelity import FidelityMeasures
from lit_safety.evaluation.judges import make_judge
from lit_safety.evaluation.metrics import BudgetCurve, VerdictRates
from lit_safety.evaluation.report import plot_asr, plot_curves, to_markdown
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
    return kl_divergence(reference_logits, logits, batch["completion_mask"].to(device), temperature=1.0)


def worst_verdict(verdicts: Sequence[str]) -> str:
    """One behaviour's verdict over several attacks: broken by any, else gibberish from any, else refused."""
    return next((v for v in ("success", "gibberish") if v in verdicts), "refusal")


class SafetyEvaluation(L.Callback):
    """Attacks, judge and outputs of the evaluation suite; as a callback it runs the ``test`` loop.

    Per harmful split it reports every attack's ASR, the strict reading of the judge beside it where
    the judge has one (``asr_strict``), ``worst_case``: a behaviour counts as broken if any attack
    run on the split broke it (``worst_case_inference``: any attack that leaves the weights as they
    are, beside it where tampering runs), and each budgeted attack's robustness curve (``curves``: ASR within
    each budget of its ``curve_budgets()``).

    Args:
        attacks: attacks run on every harmful split (each reports under its ``name``: direct, prefill,
            embedding, gcg, latent; two attacks need two names). Benign and borderline requests are asked with the suite's
            ``DirectRequest`` (a default one if it has none).
        judge: "exact" (records' answers and refusals: the organism), "refusal_prefix" (a proxy,
            named as such in every result) or "harmbench" (the HarmBench classifier).
        harmbench_model: classifier id or directory for the "harmbench" judge.
        attack_splits: attack name -> the only splits it runs on (e.g. keep an expensive attack to
            a few splits); attacks not named run on every harmful split.
        projector_layer: decoder layer whose mean-pooled prompt states go to TensorBoard's
            embedding projector (None disables it).
        max_prompt_length: prompt tokens kept.
        fidelity: also measure what models without ground-truth answers need: broken and
            reproduced harmful responses, token agreement on benign completions
            (``lit_safety.evaluation.fidelity.FidelityMeasures``).
        fidelity_tokens: completion tokens the token agreement covers.
        keep_responses: keep up to this many responses per attack and split in the results (this
            rank's), e.g. to compare two models' answers; for attacks that write text into the prompt
            (GCG), their suffixes beside them (``prompts``), to read or replay what broke a model.
        merge_adapters: attack a copy of the model with its LoRA weights merged into the base (the
            same function, no adapter branch in every layer: about 1.5x faster on the organism on a
            CPU; costs one more copy of the weights). Attacks that train the adapters
            (``needs_adapters``) always get the model itself.
    """

    def __init__(
        self,
        attacks: list[Attack] | None = None,
        judge: str = "exact",
        harmbench_model: str = "cais/HarmBench-Llama-2-13b-cls",
        attack_splits: dict[str, list[str]] | None = None,
        projector_layer: int | None = -1,
        max_prompt_length: int = 512,
        fidelity: bool = False,
        fidelity_tokens: int = 32,
        keep_responses: int = 0,
        merge_adapters: bool = False,
    ):
        self.attacks = list(attacks) if attacks is not None else [DirectRequest(), PrefillAttack()]
        names = [a.name for a in self.attacks]
        for name in names:
            if not name:
                raise ValueError("evaluation.attacks: an attack's `name` is empty")
            if names.count(name) > 1:
                raise ValueError(f"evaluation.attacks: two attacks are named {name!r}; give one its own `name`")
        unknown = sorted(set(attack_splits or {}) - set(names))
        if unknown:  # a misspelt name would otherwise leave its attack on every split
            raise ValueError(f"evaluation.attack_splits: {', '.join(map(repr, unknown))} is not an attack of the "
                             f"suite (its attacks: {', '.join(names)}); a new attack list needs its own attack_splits")
        self.benign_request = next((a for a in self.attacks if isinstance(a, DirectRequest)), DirectRequest())
        self.judge_name, self.harmbench_model = judge, harmbench_model
        self.attack_splits = attack_splits or {}
        self.projector_layer = projector_layer
        self.max_prompt_length = max_prompt_length
        self.fidelity = FidelityMeasures(fidelity_tokens) if fidelity else None
        self.keep_responses = keep_responses
        self.merge_adapters = merge_adapters
        self._merged = None  # the merged copy, made once per prepare() (the model does not change in between)
        self.responses: dict[str, dict[str, list[str]]] = {}
        self.prompts: dict[str, dict[str, list[str | None]]] = {}
        # "attack|split", "strict/attack|split", "worst_case[_inference]|split" -> VerdictRates; "curve/attack|split" ->
        # BudgetCurve; "kl|split" -> MeanMetric
        self.metrics = nn.ModuleDict()
        self.harmful_splits: set[str] = set()
        self._judge = None
        self.projected: dict[str, list] = defaultdict(list)
        self.seconds: dict[str, float] = defaultdict(float)  # attack -> time spent on this rank
        self._sigterm_before = None  # the SIGTERM handler the test found, restored at its end

    @property
    def judge(self):
        if self._judge is None:
            self._judge = make_judge(self.judge_name, self.harmbench_model)
        return self._judge

    @property
    def strict_judge(self):
        """The judge's strict reading (e.g. the exact judge's "nothing but the answer"), if it has one."""
        return getattr(self.judge, "strict", None)

    def prepare(self, splits: dict[str, bool], model, reference: bool = True) -> None:
        """Check layer settings against ``model`` and create every metric up front (split -> whether
        it holds harmful behaviours), so that all ranks hold the same metrics whatever share of the
        data each one sees; ``reference``: whether ``evaluate`` will get a reference (benign KL)."""
        from lit_safety.backbone import decoder_layers

        self.check_layers(len(decoder_layers(model)))
        self.harmful_splits = {split for split, harmful in splits.items() if harmful}
        device = next(model.parameters()).device
        with torch.inference_mode(False):  # states updated outside the test loop's inference mode
            self.metrics = nn.ModuleDict()
            for split, harmful in splits.items():
                attacks = self._attacks_for(split) if harmful else []
                for name in [a.name for a in attacks] if harmful else ["direct"]:
                    self.metrics[f"{name}|{split}"] = VerdictRates().to(device)
                    if harmful and self.strict_judge is not None:
                        self.metrics[f"strict/{name}|{split}"] = VerdictRates().to(device)
                for attack in attacks:
                    if attack.curve_budgets():
                        self.metrics[f"curve/{attack.name}|{split}"] = BudgetCurve(attack.curve_budgets()).to(device)
                for worst, among in self._worst_cases(attacks).items():
                    self.metrics[f"{worst}|{split}"] = VerdictRates().to(device)
                    if self.strict_judge is not None:
                        self.metrics[f"strict/{worst}|{split}"] = VerdictRates().to(device)
                if not harmful and reference:
                    self.metrics[f"kl|{split}"] = MeanMetric().to(device)
            if self.fidelity is not None:
                keys = [(a.name, s) for s, harmful in splits.items() if harmful for a in self._attacks_for(s)]
                self.fidelity.prepare(keys, [s for s, harmful in splits.items() if not harmful], device)
        self.projected = defaultdict(list)
        self.seconds = defaultdict(float)
        self.responses, self.prompts = {}, {}
        self._merged = None

    def check_layers(self, num_layers: int) -> None:
        """Every layer setting of the suite against a model with ``num_layers`` decoder layers (the
        CLI calls it from the model's config, before the model is loaded)."""
        from lit_safety.backbone import resolve_layers

        for attack in self.attacks:
            attack.check(num_layers)
        if self.projector_layer is not None:
            try:
                resolve_layers([self.projector_layer], num_layers)
            except ValueError as e:
                raise ValueError(f"evaluation.projector_layer: {e}") from None

    def evaluate(self, model, tokenizer, split: str, records: Sequence[Record], reference=None) -> None:
        """Update the metrics with one batch of one split's records."""
        formatter = ChatFormatter(tokenizer, max_prompt_length=self.max_prompt_length)
        harmful = [r for r in records if r.kind == "harmful"]
        other = [r for r in records if r.kind != "harmful"]
        judged: dict[str, tuple[list[str], list[str]]] = {}  # attack -> (verdicts, strict verdicts)
        attacks = self._attacks_for(split) if harmful else []
        for attack in attacks:
            start = time.perf_counter()
            result = attack.run(self._attacked(model, attack), formatter, harmful, self.judge)
            responses = result.responses
            self.seconds[attack.name] += time.perf_counter() - start
            verdicts = [self.judge(r, response) for r, response in zip(harmful, responses)]
            self.metrics[f"{attack.name}|{split}"].update(verdicts)
            strict = []
            if self.strict_judge is not None:
                strict = [self.strict_judge(r, response) for r, response in zip(harmful, responses)]
                self.metrics[f"strict/{attack.name}|{split}"].update(strict)
            judged[attack.name] = verdicts, strict
            if f"curve/{attack.name}|{split}" in self.metrics:
                curve = self.metrics[f"curve/{attack.name}|{split}"]
                curve.update(result.broken_within(curve.budgets), len(harmful))
            self._keep(attack.name, split, responses, result.prompts)
            if self.fidelity is not None and reference is not None:
                self.fidelity.update_harmful(model, formatter, attack.name, split, harmful, responses, verdicts,
                                             reference)
        for worst, among in self._worst_cases(attacks).items():
            for key, reading in ((f"{worst}|{split}", 0), (f"strict/{worst}|{split}", 1)):
                if key in self.metrics:
                    rows = zip(*(judged[name][reading] for name in among))
                    self.metrics[key].update(worst_verdict(row) for row in rows)
        if other:
            responses = self.benign_request.run(model, formatter, other).responses
            self.metrics[f"direct|{split}"].update(
                self.judge(r, response) for r, response in zip(other, responses))
            self._keep("direct", split, responses)
            answered = [r for r in other if r.completion]
            if reference is not None and answered:
                self.metrics[f"kl|{split}"].update(benign_kl(model, formatter, answered, reference), len(answered))
            if self.fidelity is not None and reference is not None:
                self.fidelity.update_benign(model, formatter, split, other, responses, reference)
        if self.projector_layer is not None:
            self._project(model, formatter, records)

    def _attacked(self, model, attack: Attack):
        """The model ``attack`` runs on: with ``merge_adapters``, a merged copy made once per prepare()."""
        if not self.merge_adapters or attack.needs_adapters or not hasattr(model, "merge_and_unload"):
            return model
        if self._merged is None:
            self._merged = copy.deepcopy(model).merge_and_unload().eval()
        return self._merged

    def _keep(self, attack: str, split: str, responses: Sequence[str], prompts: Sequence[str | None] | None = None) -> None:
        kept = self.responses.setdefault(attack, {}).setdefault(split, [])
        room = self.keep_responses - len(kept)
        kept += list(responses)[:room]
        if prompts is not None:
            self.prompts.setdefault(attack, {}).setdefault(split, []).extend(list(prompts)[:room])

    def _attacks_for(self, split: str) -> list[Attack]:
        return [a for a in self.attacks if split in self.attack_splits.get(a.name, [split])]

    @staticmethod
    def _worst_cases(attacks: Sequence[Attack]) -> dict[str, list[str]]:
        """Worst-case key -> the attacks it is taken over: ``worst_case`` over all of them and, where
        some tamper with the weights, ``worst_case_inference`` over the inference-time ones (the
        threat model of a jailbreak defense); a worst case needs two attacks or more."""
        out = {"worst_case": [a.name for a in attacks]}
        if any(a.tampers for a in attacks):
            out["worst_case_inference"] = [a.name for a in attacks if not a.tampers]
        return {key: among for key, among in out.items() if len(among) > 1}

    @torch.no_grad()
    def _project(self, model, formatter: ChatFormatter, records: Sequence[Record]) -> None:
        from lit_safety.losses import masked_mean
        from lit_safety.representations import forward_states

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
                     "attack_seconds": {name: round(t, 3) for name, t in self.seconds.items()}}
        if self.strict_judge is not None:
            out["asr_strict"] = {}
        for key, metric in self.metrics.items():
            name, split = key.split("|")
            value = metric.compute()
            if name.startswith("strict/"):
                out["asr_strict"].setdefault(name.split("/", 1)[1], {})[split] = {k: value[k] for k in
                                                                                  ("rate", "low", "high", "n")}
            elif name.startswith("curve/"):
                out.setdefault("curves", {}).setdefault(name.split("/", 1)[1], {})[split] = value
            elif name == "kl":
                if not math.isnan(float(value)):  # NaN: no record of the split had a reference answer
                    out["benign_kl"][split] = float(value)
            elif split in self.harmful_splits:
                out["asr"].setdefault(name, {})[split] = {k: value[k] for k in ("rate", "low", "high", "n")}
                out["refusal"].setdefault(name, {})[split] = value["refusal"]
                out["gibberish"].setdefault(name, {})[split] = value["gibberish"]
            else:
                out["benign_accuracy"][split] = value["rate"]
                out["over_refusal"][split] = value["refusal"]
            metric.reset()
        if self.fidelity is not None:
            out.update(self.fidelity.results())
        if self.keep_responses:
            out["responses"] = self.responses
            if self.prompts:
                out["prompts"] = self.prompts
        self._merged = None  # one copy of the weights less once the results are in
        if self.judge_name == "refusal_prefix":
            out["judge"] = "refusal_prefix (PROXY: counts every non-refusal as success)"
        return out

    # ----- the `test` loop ------------------------------------------------------------------------
    evaluates_safety = True  # what SafetyModule.on_test_start looks for among the callbacks

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Each split is one test batch whose attacks run for minutes, and Lightning only looks at SIGTERM
        # between batches: a scheduler's SIGTERM would wait out the split. A test has nothing to save on
        # the way out, so it stops at the signal (after Lightning's own handler, which stops other ranks).
        if stage != "test" or threading.current_thread() is not threading.main_thread():
            return
        before = signal.getsignal(signal.SIGTERM)

        def stop(signum, frame):
            if callable(before):
                before(signum, frame)
            raise SIGTERMException(128 + signum)  # the shell's exit status for a process ended by the signal

        self._sigterm_before = before
        signal.signal(signal.SIGTERM, stop)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._sigterm_before is not None:
            signal.signal(signal.SIGTERM, self._sigterm_before)
            self._sigterm_before = None

    def on_test_start(self, trainer, pl_module) -> None:
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "test_split_kinds"):
            raise RuntimeError("SafetyEvaluation needs a data module with test splits (lit_safety.SafetyDataModule)")
        self.prepare(datamodule.test_split_kinds(), pl_module.model)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        by_split: dict[str, list] = {}
        for split, record in batch:
            by_split.setdefault(split, []).append(record)
        # Gradient attacks need autograd even under the test loop's inference mode.
        with torch.inference_mode(False), torch.enable_grad():
            for split, records in by_split.items():
                self.evaluate(pl_module.model, pl_module.tokenizer, split, records, reference=pl_module.reference)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        results = {**self.results(), "base_model": backbone.model_identity(pl_module.hparams["base_model"])}
        scalars = {f"test/asr/{a}/{s}": v["rate"] for a, splits in results["asr"].items() for s, v in splits.items()}
        for key in ("benign_accuracy", "over_refusal", "benign_kl"):
            scalars.update({f"test/{key}/{s}": v for s, v in results[key].items()})
        for key, value in scalars.items():
            pl_module.log(key, value)
        if trainer.is_global_zero and trainer.ckpt_path:
            # A run directory's adapter gets the results in its model card.
            adapter = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(trainer.ckpt_path))), "adapter")
            if os.path.isfile(os.path.join(adapter, artifacts.CARD_DATA)):
                artifacts.write_model_card(adapter, results)
        if trainer.is_global_zero and trainer.log_dir and trainer.logger is not None:
            self.write(results, trainer.log_dir)
            if self.projected.get("states") and hasattr(trainer.logger.experiment, "add_embedding"):
                trainer.logger.experiment.add_embedding(torch.cat(self.projected["states"]),
                                                        metadata=self.projected["labels"], tag="representations")

    def write(self, results: dict, directory: str) -> None:
        """``eval_results.json``, ``eval_results.md``, ``eval_results.png`` and, with curves,
        ``eval_curves.png`` in ``directory``."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "eval_results.json"), "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.join(directory, "eval_results.md"), "w") as f:
            f.write(to_markdown(results))
        plot_asr(results, os.path.join(directory, "eval_results.png"))
        if results.get("curves"):
            plot_curves(results, os.path.join(directory, "eval_curves.png"))
