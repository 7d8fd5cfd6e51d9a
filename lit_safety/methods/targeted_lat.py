"""Targeted latent adversarial training ("Latent Adversarial Training Improves Robustness to
Persistent Harmful Behaviors in LLMs", arXiv 2407.15549).

Each step: (1) an L2-bounded adversary perturbs the residual stream at chosen sites (decoder layers
and/or the embedding) at prompt positions, optimised with Adam for ``adversary.steps`` steps to
elicit the harmful behaviour, LoRA weights untouched; (2) with the perturbation fixed and active,
the model learns the desired behaviour; (3) a benign term keeps capability, adversary off. What the
adversary and the model optimise is the ``objective`` (``lit_safety.methods.lat_objectives``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import torch
from torch import Tensor

from lit_safety.adversaries import (
    LatentAdversary,
    LatentBudget,
    attack_sites,
    check_slot_counts,
    dropped,
    finite,
    site_norms,
    slot_count,
    suffix_slot,
    suffix_slots,
)
from lit_safety.backbone import BackboneError
from lit_safety.data.batch import SafetyBatch
from lit_safety.distributed import leading_rows
from lit_safety.losses import kl_divergence
from lit_safety.methods.base import SafetyModule
from lit_safety.methods.lat_objectives import LATObjective, Refusal
from lit_safety.representations import Window, completion_window


@dataclass
class LATAdversary(LatentBudget):
    """The training adversary of targeted LAT: a latent budget, and where it may act.

    Args:
        layers: attacked sites: decoder layer indices and/or "embedding".
        epsilon: L2 radius of each token's perturbation.
        epsilon_scale: "absolute" (LAT's paper: 6 at Llama-3-8B) or "reference_norm" (epsilon times
            the site's mean activation norm, measured once on the reference model).
        steps: Adam steps of the inner loop (paper: 16).
        lr: inner-loop Adam step as a fraction of epsilon.
        positions: positions perturbed: "prompt", "all" (prompt and response) or "suffix" (``suffix_length``
            slots inserted at the end of the user turn, starting as the ``suffix_init`` token: at the
            embeddings, the soft suffix of the suite's embedding attack, which continuous adversarial
            training then meets in training).
        tokens: perturb only this many positions per example, drawn at random from ``positions`` at
            every step (default: all of them). A sparse adversary models a short trigger: it can
            rewrite a token or two without rewriting the whole request.
        suffix_length: slots of ``positions: suffix``; a list of lengths takes one per step in turn.
        suffix_init: the text whose first token every slot starts as.
        prompt_layers: with ``positions: suffix``, further sites (not among ``layers``) perturbed at
            every prompt position, request words and slots, in the same inner loop: the suffix pushes
            while these perturbations weaken what the model reads of the request, as a held-out
            phrasing of it might, so the refusal must hold on a fainter harm signal than the training
            words give.
        prompt_epsilon: radius of the ``prompt_layers`` perturbations, on ``epsilon_scale``.
        decoys: what the slots of the benign decoy requests (half the benign batch, with
            ``positions: suffix``) hold: "initial" (the ``suffix_init`` token) or "adversarial" (this
            step's optimised suffix of a harmful request, under which the benign answer is the retain
            target: neither a suffix nor what the adversary found is then a cue to refuse, only the
            harm in the request; with ``kl_weight`` the KL compares the model under that suffix to
            the reference without it).
        benign_steps: Adam steps of a benign adversary (0: none). At the harmful adversary's sites
            and radii it perturbs the benign requests (the decoys' slots at ``layers`` with
            ``positions: suffix``, every prompt position at ``prompt_layers``), maximising the retain
            loss, and the retain pass runs under it. The harmful adversary alone lets the model refuse
            anything within its radius of a harmful request, benign requests nearby too (a prompt
            perturbation of half a layer norm teaches it to refuse everything); a benign one of the
            same radius asks for the answer within the radius of every benign request, so the boundary
            has to keep a margin to both sides. With ``decoys: adversarial`` it starts from the copied
            suffix.
    """

    layers: list[int | str] = field(default_factory=lambda: [0, 2])
    steps: int = 8
    positions: Literal["prompt", "all", "suffix"] = "prompt"
    tokens: int | None = None
    suffix_length: int | list[int] = 10
    suffix_init: str = "!"
    prompt_layers: list[int | str] = field(default_factory=list)
    prompt_epsilon: float = 0.3
    decoys: Literal["initial", "adversarial"] = "initial"
    benign_steps: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_slot_counts(self.suffix_length, "adversary suffix_length")
        if self.tokens is not None and self.tokens < 1:
            raise ValueError(f"adversary tokens must be >= 1 (or unset for every position), got {self.tokens}")
        if self.prompt_layers and self.positions != "suffix":
            raise ValueError(f"adversary prompt_layers needs positions: suffix (with {self.positions!r} every "
                             "site already perturbs the prompt), got prompt_layers={self.prompt_layers}")
        if self.decoys == "adversarial" and self.positions != "suffix":
            raise ValueError(f"adversary decoys: adversarial needs positions: suffix, got {self.positions!r}")
        if self.prompt_epsilon <= 0:
            raise ValueError(f"adversary prompt_epsilon must be > 0, got {self.prompt_epsilon}")
        if self.benign_steps < 0:
            raise ValueError(f"adversary benign_steps must be >= 0, got {self.benign_steps}")

    @property
    def sites(self) -> list[int | str]:
        """Every perturbed site: ``layers``, then ``prompt_layers``."""
        return [*self.layers, *self.prompt_layers]

    def radii(self, norms: dict) -> dict:
        return {**super().radii(norms), **{site: self.prompt_epsilon * self.unit(norms, site) for site in self.prompt_layers}}


def _pad_to(mask: Tensor, length: int) -> Tensor:
    return torch.nn.functional.pad(mask, (0, length - mask.shape[1]))


def sample_positions(mask: Tensor, k: int) -> Tensor:
    """Keep ``k`` positions of each row of ``mask``, drawn uniformly (all of them if a row has fewer)."""
    scores = torch.rand(mask.shape, device=mask.device).masked_fill(~mask, -1.0)
    keep = scores.topk(min(k, mask.shape[1]), dim=1).indices
    return mask & torch.zeros_like(mask).scatter(1, keep, True)


class TargetedLATModule(SafetyModule):
    """Targeted latent adversarial training for jailbreaks, backdoors and unlearning.

    Args:
        objective: the LAT variant: ``Refusal`` (jailbreaks, the default), ``DPO`` (backdoors),
            ``RMU`` or ``GradientAscent`` (unlearning), from ``lit_safety.methods.lat_objectives``.
        adversary: the training adversary's sites, budget and positions.
        benign_weight: weight of the benign (retain) term, computed with the adversary off.
        kl_weight: weight of T^2 KL(reference || model) on the benign completions, adversary off (0:
            the retain term alone). SFT on the benign answers holds what they say; the KL holds the
            reference's whole distribution over them, as the triplet defense's distillation term.
        temperature: KL temperature T.
        **kwargs: model, LoRA and optimiser settings of ``SafetyModule``.
    """

    inner_adversaries = True

    def __init__(self, objective: LATObjective | None = None, adversary: LATAdversary | None = None,
                 benign_weight: float = 1.0, kl_weight: float = 0.0, temperature: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if min(benign_weight, kl_weight) < 0 or temperature <= 0:
            raise ValueError(f"benign_weight and kl_weight must be >= 0 and temperature > 0, got {benign_weight}, "
                             f"{kl_weight}, {temperature}")
        self.objective = objective if objective is not None else Refusal()
        self.adversary = adversary if adversary is not None else LATAdversary()

    @property
    def stream_fields(self) -> dict[str, tuple[str, ...]]:
        return self.objective.stream_fields

    def setup(self, stage: str) -> None:
        if self.adversary.steps > 0:
            self.refuse_fsdp1_inner_loop()

    def validate_layers(self, num_layers: int) -> None:
        try:
            sites = [module for _, module in attack_sites(self.model, self.adversary.sites)]
        except ValueError as e:
            raise BackboneError(f"model.adversary.layers: {e}") from None
        if len(set(map(id, sites))) < len(sites):
            raise BackboneError(f"model.adversary: layers {self.adversary.layers} and prompt_layers "
                                f"{self.adversary.prompt_layers} name one site twice")
        if self.adversary.positions == "suffix":
            self._suffix_slot  # noqa: B018 - an init text outside the vocabulary fails here, before training
        self.objective.validate_layers(self)

    def calibrate(self, batch: SafetyBatch) -> dict[str, Tensor]:
        harmful = batch["harmful"]["completion"]
        with self.reference():
            norms = site_norms(self.model, self.adversary.sites, harmful["input_ids"], harmful["attention_mask"],
                               harmful["prompt_mask"], across_ranks=True)
        return {**{f"site_norm/{site}": torch.tensor(norm) for site, norm in norms.items()},
                **self.objective.calibrate(self, batch)}

    def radii(self) -> dict:
        """Per-site perturbation radius (in units of the calibrated site norms if scale-relative)."""
        if self.calibration is None:
            raise RuntimeError("TargetedLATModule is not calibrated: it calibrates at the start of fit, or call "
                               "`module.calibration = module.calibrate(batch)`")
        return self.adversary.radii({s: self.calibration[f"site_norm/{s}"] for s in self.adversary.sites})

    @cached_property
    def _suffix_slot(self) -> tuple[int, int]:
        return suffix_slot(self.tokenizer, self.adversary.suffix_init, "model.adversary.suffix_init")

    def _with_slots(self, batch: SafetyBatch) -> tuple[SafetyBatch, Tensor, Tensor | None]:
        """The batch with this step's ``suffix_length`` slots at the end of every harmful request (its
        completion and refusal sequences alike: one prompt), the slots' mask, and the benign decoys'
        slots (None without decoys). Half the benign requests get the same slots, at their initial
        token: were only harmful requests suffixed, the suffix itself would be the cue to refuse (the
        model then answers plain harmful requests)."""
        length, harmful = slot_count(self.adversary.suffix_length, self.global_step), batch["harmful"]
        slotted = {name: suffix_slots(seq, seq["input_ids"].shape[0], length, *self._suffix_slot)
                   for name, seq in harmful.items()}
        benign = batch["benign"]["completion"]
        decoys, decoy_slots = leading_rows(0.5, benign["input_ids"].shape[0]), None
        if decoys:
            benign, decoy_slots = suffix_slots(benign, decoys, length, *self._suffix_slot)[:2]
        return ({**batch, "harmful": {name: s.sequences for name, s in slotted.items()},
                 "benign": {**batch["benign"], "completion": benign}}, slotted["completion"].slots, decoy_slots)

    def _benign_mask(self, benign, decoy_slots: Tensor | None) -> dict:
        """Per site, the benign positions the retain pass's perturbation may take: as the harmful
        adversary's, on the benign requests (with a suffix: the decoys' slots)."""
        if self.adversary.positions == "suffix":
            mask = decoy_slots if decoy_slots is not None else torch.zeros_like(benign["prompt_mask"])
        else:
            mask = benign["prompt_mask" if self.adversary.positions == "prompt" else "attention_mask"]
        if self.adversary.tokens is not None:
            mask = sample_positions(mask, self.adversary.tokens)
        return {**{site: mask for site in self.adversary.layers},
                **{site: benign["prompt_mask"] for site in self.adversary.prompt_layers}}

    def _retain_adversary(self, benign, adversary: LatentAdversary, slots: Tensor | None,
                          decoy_slots: Tensor | None) -> tuple[LatentAdversary | None, dict[str, Tensor]]:
        """The frozen perturbation the retain pass runs under (None: it runs clean), and its log terms.
        ``decoys: adversarial`` puts the suffix of harmful request i % H in the slots of benign decoy
        i, at the suffix sites only, as the prompt perturbations belong to their request; with
        ``benign_steps`` the benign adversary then optimises it (and the prompt sites) against the
        retain term."""
        copied = decoy_slots is not None and self.adversary.decoys == "adversarial"
        optimised = self.training and self.adversary.benign_steps > 0
        if not (copied or optimised):
            return None, {}
        sites = self.adversary.sites if optimised else self.adversary.layers
        out, terms = LatentAdversary(self.model, sites, self._benign_mask(benign, decoy_slots), self.radii()), {}
        if copied:
            rows, length = slots.shape[0], int(slots[0].sum())
            source = torch.arange(int(decoy_slots.any(-1).sum()), device=slots.device) % rows
            with torch.no_grad():
                for site in self.adversary.layers:
                    found = adversary.units[site][:, : slots.shape[1]][slots].view(rows, length, -1)
                    out.units[site][decoy_slots] = found[source].flatten(0, 1)
        if optimised:
            examples = out.rows  # per-example gradients, as the harmful adversary's
            with out.attached(), self.adapters_frozen():
                losses = out.optimise(lambda: -examples * self.objective.benign_loss(self, benign),
                                      self.adversary.benign_steps, self.adversary.lr)
            losses = [-loss / examples for loss in finite(losses)]
            if losses:
                terms = {"adversary/benign_loss_first": torch.tensor(losses[0]),
                         "adversary/benign_loss_last": torch.tensor(losses[-1])}
        out.freeze()
        return out, terms

    def _adversary_mask(self, batch: SafetyBatch, slots: Tensor | None = None) -> Tensor | dict:
        harmful, refusal = batch["harmful"]["completion"], batch["harmful"].get("refusal")
        length = max(harmful["input_ids"].shape[1], refusal["input_ids"].shape[1] if refusal is not None else 0)
        if slots is not None:
            mask = _pad_to(slots, length)
        elif self.adversary.positions == "prompt":
            mask = _pad_to(harmful["prompt_mask"], length)
        else:
            mask = _pad_to(harmful["attention_mask"], length)
            if refusal is not None:
                mask = mask | _pad_to(refusal["attention_mask"], length)
        mask = mask if self.adversary.tokens is None else sample_positions(mask, self.adversary.tokens)
        if not self.adversary.prompt_layers:
            return mask
        prompt = _pad_to(harmful["prompt_mask"], length)  # with the slots: they are the prompt's end
        return {**{site: mask for site in self.adversary.layers},
                **{site: prompt for site in self.adversary.prompt_layers}}

    def _benign_kl(self, benign, window: Window) -> Tensor:
        with self.reference():
            reference = completion_window(self.model, benign).logits
        return kl_divergence(reference, window.logits, window.completion_mask, self.hparams.temperature)

    def compute_losses(self, batch: SafetyBatch) -> dict[str, Tensor]:
        slots = decoy_slots = None
        if self.training and self.adversary.positions == "suffix":  # validation sees the requests as they are
            batch, slots, decoy_slots = self._with_slots(batch)
        adversary_loss, model_loss = self.objective.losses(self, batch)
        adversary = LatentAdversary(self.model, self.adversary.sites, self._adversary_mask(batch, slots),
                                    self.radii())
        out: dict[str, Tensor] = {}
        with adversary.attached():
            if self.training and self.adversary.steps > 0:
                # Each example's perturbation follows its own loss: scaled by the batch's size, the
                # batch mean's gradient does not shrink with it (Adam's epsilon would then make the
                # step depend on the number of examples per process).
                examples = adversary.rows
                with self.adapters_frozen(), self.adversary_noise():  # as the attacked pass below
                    losses = adversary.optimise(lambda: examples * adversary_loss(), self.adversary.steps,
                                                self.adversary.lr)
                losses = [loss / examples for loss in losses]
                out["adversary/dropped_steps"] = torch.tensor(float(dropped(losses)))
                if finite(losses):
                    out["adversary/loss_first"] = torch.tensor(finite(losses)[0])
                    out["adversary/loss_last"] = torch.tensor(finite(losses)[-1])
            adversary.freeze()
            with self.embedding_noise():
                out["loss_attacked"] = model_loss()
        benign, hp = batch["benign"]["completion"], self.hparams
        retain_adversary, terms = self._retain_adversary(benign, adversary, slots, decoy_slots)
        out.update(terms)
        with retain_adversary.attached() if retain_adversary is not None else contextlib.nullcontext(), \
                self.benign_noise():
            window = completion_window(self.model, benign) if hp.kl_weight > 0 else None  # one forward for both
            out["loss_benign"] = self.objective.benign_loss(self, benign, window)
        out["loss"] = out["loss_attacked"] + hp.benign_weight * out["loss_benign"]
        if window is not None:
            out["loss_kl"] = self._benign_kl(benign, window)
            out["loss"] = out["loss"] + hp.kl_weight * out["loss_kl"]
        for site, norm in adversary.norms().items():
            out[f"adversary/norm_{site}"] = norm
        return out
