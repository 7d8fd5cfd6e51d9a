"""The variants of targeted LAT (arXiv 2407.15549) as components chosen by ``class_path``, each with
only its own knobs:

- ``Refusal`` (jailbreaks): adversary toward(harmful) + away(refusal); model toward(refusal) +
  away(harmful); benign SFT.
- ``DPO`` (backdoor removal without knowing the trigger): DPO against the adapters-off reference;
  the adversary minimises it with chosen and rejected swapped.
- ``RMU`` (unlearning): the model steers forget-data states toward a fixed random direction while
  keeping retain-data states; the adversary tries to restore the forgotten answers.
- ``GradientAscent`` (unlearning): the model ascends the NLL of forget data; benign SFT.

For the unlearning variants the ``harmful`` stream carries the forget data. ``losses(module, batch)``
returns the adversary's and the attacked model's losses as closures: the adversary's inner loop calls
the first many times with the perturbation changing, the model update calls the second once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from lit_safety.backbone import hidden_size
from lit_safety.data.batch import SafetyBatch, Sequences
from lit_safety.distributed import global_masked_mean
from lit_safety.losses import (
    away,
    dpo_loss,
    rmu_forget_loss,
    rmu_retain_loss,
    sequence_logprob,
    toward,
    wide,
)
from lit_safety.representations import (
    Window,
    completion_window,
    forward_states,
    joint_completion_windows,
    position_mask,
)

Closure = Callable[[], Tensor]


def _toward(model, seq: Sequences) -> Tensor:
    return toward(*completion_window(model, seq))


class LATObjective:
    """Base of the targeted-LAT variants. ``stream_fields`` is the data the variant needs."""

    stream_fields: dict[str, tuple[str, ...]] = {"harmful": ("completion", "refusal"), "benign": ("completion",)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"

    def validate_layers(self, module) -> None:
        """Check the variant's own layer settings against ``module.model``."""

    def calibrate(self, module, batch: SafetyBatch) -> dict[str, Tensor]:
        """Quantities measured once on the reference model (saved in checkpoints)."""
        return {}

    def losses(self, module, batch: SafetyBatch) -> tuple[Closure, Closure]:
        """(adversary loss, model loss under attack) for one batch."""
        raise NotImplementedError

    def benign_loss(self, module, benign: Sequences, window: Window | None = None) -> Tensor:
        """The retain term, computed with the adversary off (default: SFT on the benign completions).
        ``window``: the model's completion window of ``benign``, if the caller has it already."""
        return toward(*window) if window is not None else _toward(module.model, benign)


class Refusal(LATObjective):
    """Jailbreak robustness: the adversary pushes toward the harmful completion and away from the
    refusal; under that perturbation the model learns the opposite.

    Args:
        adversary_toward: adversary weight of toward(harmful completion).
        adversary_away: adversary weight of away(refusal).
        model_toward: model weight of toward(refusal).
        model_away: model weight of away(harmful completion).
    """

    def __init__(self, adversary_toward: float = 1.0, adversary_away: float = 1.0, model_toward: float = 1.0,
                 model_away: float = 1.0):
        self.adversary_toward, self.adversary_away = adversary_toward, adversary_away
        self.model_toward, self.model_away = model_toward, model_away

    def losses(self, module, batch: SafetyBatch) -> tuple[Closure, Closure]:
        harmful, refusal, model = batch["harmful"]["completion"], batch["harmful"]["refusal"], module.model

        def adversary() -> Tensor:
            on_harmful, on_refusal = joint_completion_windows(model, harmful, refusal)
            return self.adversary_toward * toward(*on_harmful) + self.adversary_away * away(*on_refusal)

        def attacked() -> Tensor:
            on_harmful, on_refusal = joint_completion_windows(model, harmful, refusal)
            return self.model_toward * toward(*on_refusal) + self.model_away * away(*on_harmful)

        return adversary, attacked


class DPO(LATObjective):
    """Backdoor removal: DPO (Rafailov et al. 2023) preferring the refusal over the harmful completion,
    against the adapters-off reference; the adversary minimises the same loss with the preference
    reversed. DPO alone lowers the chosen likelihood too and garbles it, so the model also learns
    ``model_toward`` x toward(refusal).

    Args:
        beta: DPO temperature (LAT's paper: 0.3).
        model_toward: model weight of toward(refusal).
    """

    def __init__(self, beta: float = 0.3, model_toward: float = 1.0):
        if beta <= 0:
            raise ValueError(f"DPO beta must be > 0, got {beta}")
        self.beta, self.model_toward = beta, model_toward

    def losses(self, module, batch: SafetyBatch) -> tuple[Closure, Closure]:
        harmful, refusal, model = batch["harmful"]["completion"], batch["harmful"]["refusal"], module.model

        def logps(on_harmful: Window, on_refusal: Window) -> tuple[Tensor, Tensor]:
            return sequence_logprob(*on_harmful), sequence_logprob(*on_refusal)

        with module.reference():
            reference_harmful, reference_refusal = logps(*joint_completion_windows(model, harmful, refusal))

        def adversary() -> Tensor:  # prefer the harmful completion
            return dpo_loss(*logps(*joint_completion_windows(model, harmful, refusal)), reference_harmful,
                            reference_refusal, self.beta)

        def attacked() -> Tensor:
            on_harmful, on_refusal = joint_completion_windows(model, harmful, refusal)
            rejected, chosen = logps(on_harmful, on_refusal)
            return (dpo_loss(chosen, rejected, reference_refusal, reference_harmful, self.beta)
                    + self.model_toward * toward(*on_refusal))

        return adversary, attacked


class RMU(LATObjective):
    """Unlearning by representation misdirection (Li et al. 2024, WMDP): forget-data states at ``layer``
    are steered toward a fixed random direction c u; retain-data states stay where the reference has
    them (the benign term, ||h' - h||^2). The adversary tries to restore the forgotten answers.

    Args:
        layer: decoder layer whose states RMU steers.
        steering: steering coefficient c, in units of the layer's mean activation norm.
        positions: forget-data positions steered: "all" (the paper: every token), "completion" or
            "prompt". Positions before the forgotten content are identical in retain data, so steering
            them fights the retain term.
        direction_seed: seed of the random direction u.
    """

    stream_fields = {"harmful": ("completion",), "benign": ("completion",)}

    def __init__(self, layer: int = 2, steering: float = 2.0,
                 positions: Literal["all", "completion", "prompt"] = "all", direction_seed: int = 0):
        if steering <= 0:
            raise ValueError(f"RMU steering must be > 0, got {steering}")
        self.layer, self.steering, self.positions, self.direction_seed = layer, steering, positions, direction_seed

    def validate_layers(self, module) -> None:
        module.resolve([self.layer], "model.objective.layer")

    def _states(self, model, seq: Sequences) -> Tensor:
        states, _ = forward_states(model, seq["input_ids"], seq["attention_mask"], [self.layer], logits=False)
        return next(iter(states.values()))

    def calibrate(self, module, batch: SafetyBatch) -> dict[str, Tensor]:
        forget = batch["harmful"]["completion"]
        with module.reference():
            norm = global_masked_mean(wide(self._states(module.model, forget)).norm(dim=-1), forget["prompt_mask"])
        hidden = hidden_size(module.model)
        u = torch.rand(hidden, generator=torch.Generator().manual_seed(self.direction_seed))
        return {"rmu_control": self.steering * norm.cpu() * u / u.norm()}

    def losses(self, module, batch: SafetyBatch) -> tuple[Closure, Closure]:
        forget, model = batch["harmful"]["completion"], module.model
        control = module.calibration["rmu_control"].to(forget["input_ids"].device)

        def adversary() -> Tensor:  # restore the forgotten answers
            return _toward(model, forget)

        def attacked() -> Tensor:
            return rmu_forget_loss(self._states(model, forget), control, position_mask(forget, self.positions))

        return adversary, attacked

    def benign_loss(self, module, benign: Sequences, window: Window | None = None) -> Tensor:
        with module.reference():
            reference = self._states(module.model, benign)
        return rmu_retain_loss(self._states(module.model, benign), reference, benign["attention_mask"])


class GradientAscent(LATObjective):
    """Unlearning by gradient ascent on the forget data's NLL; the adversary tries to restore it."""

    stream_fields = {"harmful": ("completion",), "benign": ("completion",)}

    def losses(self, module, batch: SafetyBatch) -> tuple[Closure, Closure]:
        forget, model = batch["harmful"]["completion"], module.model
        return (lambda: _toward(model, forget)), (lambda: -_toward(model, forget))
