"""Circuit breakers by representation rerouting ("Improving Alignment and Robustness with Circuit
Breakers", arXiv 2406.04313), the baseline the representation defenses are compared with.

loss = c_retain(t) * ||h'_b - h_b||_2 + c_cb(t) * ReLU(cos(h'_h, h_h)), with the schedule
c_retain = alpha * t / (2T) and c_cb = alpha * (1 - t / (2T)) over optimizer steps t of T
(the released code counts micro-batches, which skews the schedule under gradient accumulation).

Fresh adapters make h' = h exactly, where ReLU(cos(h', h)) has zero gradient: training needs
``lora_dropout`` > 0 (0.05, as released) so that the first steps see h' != h.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_safety.losses import reroute_loss, retain_loss
from lit_safety.methods.base import SafetyModule
from lit_safety.representations import forward_states


class CircuitBreakerModule(SafetyModule):
    """Representation rerouting: harmful states are pushed orthogonal to the reference, benign states
    held in place.

    Args:
        layers: decoder layers of both terms (paper: 10 and 20 of Llama-3-8B's 32).
        alpha: schedule scale alpha of c_retain and c_cb.
        **kwargs: model, LoRA and optimiser settings of ``SafetyModule``.
    """

    stream_fields = {"harmful": ("completion",), "benign": ("completion",)}

    def __init__(self, layers: list[int] = [1, 2], alpha: float = 10.0, **kwargs):  # noqa: B006
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def validate_layers(self, num_layers: int) -> None:
        self.resolve(self.hparams.layers)
        if self.hparams.lora_dropout == 0:
            raise ValueError("CircuitBreakerModule needs lora_dropout > 0 (e.g. 0.05): with fresh adapters h' = h, "
                             "where the rerouting term ReLU(cos(h', h)) has zero gradient and training never starts")

    def coefficients(self) -> tuple[float, float]:
        """(c_retain, c_cb) at the current optimizer step."""
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        progress = min(1.0, self.global_step / max(1, 2 * total))
        return self.hparams.alpha * progress, self.hparams.alpha * (1 - progress)

    def compute_losses(self, batch: dict) -> dict[str, Tensor]:
        layers = self.resolve(self.hparams.layers)
        benign, harmful = batch["benign"]["completion"], batch["harmful"]["completion"]
        with self.reference():
            ref_b, _ = forward_states(self.model, benign["input_ids"], benign["attention_mask"], layers, logits=False)
            ref_h, _ = forward_states(self.model, harmful["input_ids"], harmful["attention_mask"], layers, logits=False)
        new_b, _ = forward_states(self.model, benign["input_ids"], benign["attention_mask"], layers, logits=False)
        new_h, _ = forward_states(self.model, harmful["input_ids"], harmful["attention_mask"], layers, logits=False)
        retain = torch.stack([retain_loss(new_b[l], ref_b[l], benign["attention_mask"]) for l in layers]).mean()
        reroute = torch.stack([reroute_loss(new_h[l], ref_h[l], harmful["attention_mask"]) for l in layers]).mean()
        c_retain, c_cb = self.coefficients()
        return {
            "loss": c_retain * retain + c_cb * reroute,
            "loss_retain": retain,
            "loss_reroute": reroute,
            "coefficient_retain": torch.tensor(c_retain),
            "coefficient_reroute": torch.tensor(c_cb),
        }
