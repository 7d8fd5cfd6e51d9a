"""Refusal feature adversarial training, ReFAT ("Robust LLM safeguarding via refusal feature adversarial
training", arXiv 2409.20089).

Jailbreaks work largely by suppressing the refusal feature: the direction r_l = mean h_l(harmful) -
mean h_l(harmless) of the residual states at the prompt's last token. ReFAT simulates that attack
without an inner loop: every ``refresh_interval`` steps r_l is measured on the current model (on the
batch's harmful and benign prompts, over the global batch), and on each harmful example, with
probability p, r_l is projected out of decoder layer l's output at every position while the model
learns to refuse. Benign examples train on their answers, unablated (plus an optional KL term to the
reference). Its cost is one trained forward per stream, as refusal SFT.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from lit_safety import backbone
from lit_safety.adversaries import ablate, output_tensor, replace_output
from lit_safety.distributed import global_masked_mean, rank, world_size
from lit_safety.losses import kl_divergence, toward, wide
from lit_safety.methods.base import SafetyModule
from lit_safety.representations import joint_forward_states


def last_prompt_mask(sequences: dict) -> Tensor:
    """[B, T] marking each row's last prompt token (where the refusal feature is read)."""
    prompt = sequences["prompt_mask"].bool()
    positions = torch.arange(prompt.shape[1], device=prompt.device).expand_as(prompt)
    last = torch.where(prompt, positions, -1).max(dim=1).values
    return positions == last[:, None]


def ablate_rows(h: Tensor, direction: Tensor, rows: Tensor) -> Tensor:
    """h [B, T, D] with its component along the unit ``direction`` removed at every position of the
    ``rows`` [B] marked; other rows unchanged."""
    return torch.where(rows[:, None, None], ablate(h, direction), h)


@contextlib.contextmanager
def refusal_features_ablated(model, directions: dict[int, Tensor], rows: Tensor) -> Iterator[None]:
    """Within the block, each decoder layer l in ``directions`` has r_l projected out of its output
    on the marked rows."""
    stack = backbone.decoder_layers(model)

    def make_hook(direction: Tensor):
        return lambda _m, _a, output: replace_output(output, ablate_rows(output_tensor(output), direction, rows))

    handles = [stack[layer].register_forward_hook(make_hook(d)) for layer, d in directions.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class RefusalFeatureATModule(SafetyModule):
    """ReFAT: learn to refuse harmful requests with their refusal feature ablated.

    Args:
        layers: decoder layers whose refusal feature is ablated (negative allowed); None: the last
            three quarters of the layers (as an open reproduction does; the paper ablates across
            layers too).
        ablation_probability: probability p that a harmful example is trained with its refusal
            feature ablated (0.5).
        refresh_interval: optimizer steps between measurements of the refusal features on the current
            model.
        refusal_weight: weight of the refusal term (CE toward the refusal, under ablation).
        benign_weight: weight of the benign term (CE toward the benign answers).
        kl_weight: weight of T^2 KL(reference || model) on benign logits (0: SFT only).
        temperature: KL temperature T.
        seed: seed of the ablation draws.
        **kwargs: model, LoRA and optimiser settings of ``SafetyModule``.
    """

    stream_fields = {"harmful": ("refusal",), "benign": ("completion",)}

    def __init__(self, layers: list[int] | None = None, ablation_probability: float = 0.5, refresh_interval: int = 4,
                 refusal_weight: float = 1.0, benign_weight: float = 1.0, kl_weight: float = 0.0,
                 temperature: float = 1.0, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if not 0.0 <= ablation_probability <= 1.0:
            raise ValueError(f"ablation_probability must be in [0, 1], got {ablation_probability}")
        if refresh_interval < 1:
            raise ValueError(f"refresh_interval must be >= 1, got {refresh_interval}")
        if min(refusal_weight, benign_weight, kl_weight) < 0 or temperature <= 0:
            raise ValueError("refusal_weight, benign_weight and kl_weight must be >= 0 and temperature > 0")
        self.generator = torch.Generator().manual_seed(seed)
        self.directions: dict[int, Tensor] | None = None  # not weights: kept by training_state
        self._refreshed_at = -1

    def _layers(self) -> list[int]:
        if self.hparams.layers is not None:
            return self.resolve(self.hparams.layers, "model.layers")
        num_layers = len(backbone.decoder_layers(self.model))
        return list(range(num_layers // 4, num_layers))

    def validate_layers(self, num_layers: int) -> None:
        self._layers()

    def training_state(self) -> dict:
        directions = None if self.directions is None else {k: v.cpu() for k, v in self.directions.items()}
        return {"generator": self.generator.get_state(), "directions": directions, "refreshed_at": self._refreshed_at}

    def load_training_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.directions, self._refreshed_at = state["directions"], state["refreshed_at"]

    @torch.no_grad()
    def refusal_features(self, harmful: dict, benign: dict, layers: list[int]) -> dict[int, Tensor]:
        """Unit r_l per layer: mean state at the last prompt token of harmful minus benign prompts,
        on the current model (adapters on, no dropout), over every rank's batch."""
        was_training = self.model.training
        self.model.eval()
        try:
            (on_harmful, _), (on_benign, _) = joint_forward_states(self.model, [harmful, benign], layers)
        finally:
            self.model.train(was_training)
        last_h, last_b = last_prompt_mask(harmful), last_prompt_mask(benign)
        directions = {}
        for layer in layers:
            r = (global_masked_mean(wide(on_harmful[layer]), last_h)
                 - global_masked_mean(wide(on_benign[layer]), last_b))
            directions[layer] = r / r.norm().clamp_min(1e-12)
        return directions

    def compute_losses(self, batch: dict) -> dict[str, Tensor]:
        hp = self.hparams
        refusal, benign = batch["harmful"]["refusal"], batch["benign"]["completion"]
        if self.training and self._refreshed_at != self.global_step and \
                (self.directions is None or self.global_step % hp.refresh_interval == 0):
            self.directions = self.refusal_features(refusal, benign, self._layers())
            self._refreshed_at = self.global_step
        rows = torch.zeros(refusal["input_ids"].shape[0], dtype=torch.bool)
        if self.directions is not None and not self.training:  # validation: every harmful example ablated
            rows = torch.ones_like(rows)
        elif self.directions is not None:  # one draw per example of the global batch, as data is sharded
            draws = torch.rand(len(rows) * world_size(), generator=self.generator)[rank()::world_size()]
            rows = draws < hp.ablation_probability
        rows = rows.to(refusal["input_ids"].device)
        directions = {k: v.to(refusal["input_ids"].device) for k, v in (self.directions or {}).items()}
        with refusal_features_ablated(self.model, directions, rows), self.embedding_noise():
            logits = self.model(input_ids=refusal["input_ids"], attention_mask=refusal["attention_mask"]).logits
        loss_refusal = toward(logits, refusal["input_ids"], refusal["completion_mask"])
        with self.benign_noise():
            benign_logits = self.model(input_ids=benign["input_ids"], attention_mask=benign["attention_mask"]).logits
        loss_benign = toward(benign_logits, benign["input_ids"], benign["completion_mask"])
        loss_kl = torch.zeros((), device=loss_benign.device)
        if hp.kl_weight > 0:
            with self.reference():
                reference = self.model(input_ids=benign["input_ids"], attention_mask=benign["attention_mask"]).logits
            loss_kl = kl_divergence(reference, benign_logits, benign["attention_mask"], hp.temperature)
        return {
            "loss": hp.refusal_weight * loss_refusal + hp.benign_weight * loss_benign + hp.kl_weight * loss_kl,
            "loss_refusal": loss_refusal, "loss_benign": loss_benign, "loss_kl": loss_kl,
            "ablated_fraction": rows.float().mean(),
        }
