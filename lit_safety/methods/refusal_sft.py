"""Refusal SFT: the simplest baseline. Cross-entropy toward the refusal on harmful prompts, plus SFT on
benign retain data so that the model keeps answering everything else."""

from __future__ import annotations

from torch import Tensor

from lit_safety.losses import toward
from lit_safety.methods.base import SafetyModule


class RefusalSFTModule(SafetyModule):
    """Refusal fine-tuning with a benign retain term: loss = refusal_weight * CE(refusal | harmful
    prompt) + benign_weight * CE(completion | benign prompt).

    Args:
        refusal_weight: weight of the refusal cross-entropy on harmful prompts.
        benign_weight: weight of the SFT cross-entropy on benign (and borderline) data.
        **kwargs: model, LoRA and optimiser settings of ``SafetyModule``.
    """

    stream_fields = {"harmful": ("refusal",), "benign": ("completion",)}

    def __init__(self, refusal_weight: float = 1.0, benign_weight: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.refusal_weight = refusal_weight
        self.benign_weight = benign_weight

    def _sft(self, sequences: dict) -> Tensor:
        logits = self.model(input_ids=sequences["input_ids"], attention_mask=sequences["attention_mask"]).logits
        return toward(logits, sequences["input_ids"], sequences["completion_mask"])

    def compute_losses(self, batch: dict) -> dict[str, Tensor]:
        with self.embedding_noise():
            refusal = self._sft(batch["harmful"]["refusal"])
        with self.benign_noise():
            benign = self._sft(batch["benign"]["completion"])
        return {
            "loss": self.refusal_weight * refusal + self.benign_weight * benign,
            "loss_refusal": refusal,
            "loss_benign": benign,
        }
