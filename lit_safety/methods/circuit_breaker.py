"""Circuit breakers by representation rerouting ("Improving Alignment and Robustness with Circuit
Breakers", arXiv 2406.04313), the baseline the representation defenses are compared with.

loss = c_retain(t) * ||h'_b - h_b||_2 + c_cb(t) * ReLU(cos(h'_h, h_h)), with the schedule
c_retain = a * t / (2T) and c_cb = a * (1 - t / (2T)) over optimizer steps t of T (the paper's alpha)
(the released code counts micro-batches, which skews the schedule under gradient accumulation).

Fresh adapters (LoRA B = 0) make h' = h exactly, where ReLU(cos(h', h)) has zero gradient, and
LoRA dropout cannot help (it acts before B). The released code escapes through bf16 kernel noise,
which Adam amplifies; here B starts from a small seeded Gaussian (``init_noise``, the
``init_adapters`` hook) instead, so the first step has a gradient and runs are reproducible.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_safety import backbone
from lit_safety.losses import reroute_loss, retain_loss
from lit_safety.methods.base import SafetyModule
from lit_safety.representations import joint_forward_states


class CircuitBreakerModule(SafetyModule):
    """Representation rerouting: harmful states are pushed orthogonal to the reference, benign states
    held in place.

    Args:
        layers: decoder layers of both terms (paper: 10 and 20 of Llama-3-8B's 32).
        coefficient_scale: the schedule's scale a (the paper's alpha) of c_retain and c_cb.
        init_noise: standard deviation of LoRA B at the start (0 would leave the rerouting term
            without a gradient).
        init_seed: seed of that initialisation.
        **kwargs: model, LoRA and optimiser settings of ``SafetyModule``.
    """

    stream_fields = {"harmful": ("completion",), "benign": ("completion",)}

    def __init__(self, layers: list[int] = [1, 2], coefficient_scale: float = 10.0,  # noqa: B006
                 init_noise: float = 1e-3, init_seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if init_noise <= 0:
            raise ValueError("init_noise must be > 0: with LoRA B = 0 the rerouting term has no gradient")
        if coefficient_scale <= 0:
            raise ValueError(f"coefficient_scale must be > 0, got {coefficient_scale}")

    def deepest_layer(self, num_layers: int) -> int:
        try:  # both terms read states only (the released code also drops the layers above)
            return max(backbone.resolve_layers(self.hparams.layers, num_layers))
        except backbone.BackboneError as e:
            raise backbone.BackboneError(f"model.layers: {e}") from None

    def validate_layers(self, num_layers: int) -> None:
        self.resolve(self.hparams.layers, "model.layers")

    def init_adapters(self) -> None:
        generator = torch.Generator().manual_seed(self.hparams.init_seed)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * self.hparams.init_noise)

    def coefficients(self) -> tuple[float, float]:
        """(c_retain, c_cb) at the current optimizer step."""
        progress = min(1.0, self.global_step / (2 * self.total_steps)) if self._trainer is not None else 0.0
        scale = self.hparams.coefficient_scale
        return scale * progress, scale * (1 - progress)

    def compute_losses(self, batch: dict) -> dict[str, Tensor]:
        layers = self.resolve(self.hparams.layers)
        benign, harmful = batch["benign"]["completion"], batch["harmful"]["completion"]
        # Both streams in one forward per view, stopped after the deepest layer (no logits).
        with self.reference():
            (ref_b, _), (ref_h, _) = joint_forward_states(self.model, [benign, harmful], layers)
        noised = torch.arange(len(benign["input_ids"]) + len(harmful["input_ids"])) >= len(benign["input_ids"])
        with self.embedding_noise(rows=noised), self.benign_noise(rows=~noised):  # the rows of each stream
            (new_b, _), (new_h, _) = joint_forward_states(self.model, [benign, harmful], layers)
        retain = torch.stack([retain_loss(new_b[i], ref_b[i], benign["attention_mask"]) for i in layers]).mean()
        reroute = torch.stack([reroute_loss(new_h[i], ref_h[i], harmful["attention_mask"]) for i in layers]).mean()
        c_retain, c_cb = self.coefficients()
        return {
            "loss": c_retain * retain + c_cb * reroute,
            "loss_retain": retain,
            "loss_reroute": reroute,
            "coefficient_retain": torch.tensor(c_retain),
            "coefficient_reroute": torch.tensor(c_cb),
        }
