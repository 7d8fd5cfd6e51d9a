"""``AdversarialEvalCallback``: robustness curves in TensorBoard while a defense trains."""

from __future__ import annotations

import lightning as L
import torch

from lit_safety.data.loaders import DataSource, load_records
from lit_safety.evaluation.attacks import Attack, PrefillAttack
from lit_safety.evaluation.suite import SafetyEvaluation


class AdversarialEvalCallback(L.Callback):
    """Every ``every_n_steps`` optimizer steps, attack a small fixed set of behaviours with a reduced
    budget and log ``val/asr/<attack>/<split>``, so robustness can be watched as it moves.

    Args:
        splits: split name -> source of harmful behaviours (default: the organism's train and
            held-out-synonym splits).
        attacks: attacks with their (reduced) budgets (default: prefill).
        n: behaviours per split, the same ones every time.
        every_n_steps: optimizer steps between evaluations (and one before training starts).
        judge: "exact", "refusal_prefix" (a proxy) or "harmbench".
    """

    def __init__(self, splits: dict[str, str | DataSource] | None = None, attacks: list[Attack] | None = None,
                 n: int = 20, every_n_steps: int = 50, judge: str = "exact"):
        self.splits = splits if splits is not None else {"train": "organism:eval_train",
                                                         "heldout_synonym": "organism:eval_heldout_synonym"}
        self.attacks = attacks if attacks is not None else [PrefillAttack()]
        self.n, self.every_n_steps, self.judge_name = n, every_n_steps, judge
        self.records: dict | None = None
        self.history: list[dict[str, float]] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Loaded before training, so a bad source fails before the first step.
        self.records = {name: load_records(source)[: self.n] for name, source in self.splits.items()}
        self.suite = SafetyEvaluation(self.attacks, self.judge_name, projector_layer=None)

    def _evaluate(self, trainer, pl_module) -> None:
        self.suite.prepare(dict.fromkeys(self.records, True), pl_module.model)
        with torch.inference_mode(False), torch.enable_grad():
            for split, records in self.records.items():
                self.suite.evaluate(pl_module.model, pl_module.tokenizer, split, records)
        results = self.suite.results()
        scalars = {f"val/asr/{a}/{s}": v["rate"] for a, splits in results["asr"].items() for s, v in splits.items()}
        self.history.append({"step": trainer.global_step, **scalars})
        if trainer.logger is not None:
            trainer.logger.log_metrics(scalars, step=trainer.global_step)

    def on_train_start(self, trainer, pl_module) -> None:
        self._evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0 \
                and (not self.history or self.history[-1]["step"] != trainer.global_step):
            self._evaluate(trainer, pl_module)


__all__ = ["AdversarialEvalCallback"]
