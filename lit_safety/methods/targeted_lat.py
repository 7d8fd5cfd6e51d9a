"""Targeted latent adversarial training ("Latent Adversarial Training Improves Robustness to
Persistent Harmful Behaviors in LLMs", arXiv 2407.15549).

Each step: (1) an L2-bounded adversary perturbs the residual stream at chosen sites (decoder layers
and/or the embedding) at prompt positions, optimised with Adam for ``adversary_steps`` steps to
elicit the harmful behaviour, LoRA weights untouched; (2) with the perturbation fixed and active,
the model learns the desired behaviour; (3) a benign term keeps capability, adversary off.

Objectives:
- ``refusal`` (jailbreaks): adversary toward(harmful) + away(refusal); model toward(refusal) +
  away(harmful); benign SFT or KL to the reference.
- ``dpo`` (backdoor removal without knowing the trigger): DPO with the adapters-off reference; the
  adversary minimises it with chosen and rejected swapped, the model minimises it as is, plus
  ``model_toward`` x toward(refusal) (DPO alone lowers the chosen likelihood too and garbles it).
- ``rmu`` (unlearning): the model steers forget-data states at ``rmu_layer`` toward a fixed random
  direction while keeping retain-data states; the adversary tries to restore the forgotten answers.
- ``gradient_ascent`` (unlearning): the model ascends the NLL of forget data, SFT on retain data.
The ``harmful`` stream carries the forget data for the unlearning objectives.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lit_safety.adversaries import LatentAdversary, attack_sites, site_norms
from lit_safety.losses import (
    away,
    dpo_loss,
    kl_divergence,
    rmu_forget_loss,
    rmu_retain_loss,
    sequence_logprob,
    toward,
)
from lit_safety.methods.base import SafetyModule
from lit_safety.representations import forward_states, position_mask

Objective = Literal["refusal", "dpo", "rmu", "gradient_ascent"]


def _pad_to(mask: Tensor, length: int) -> Tensor:
    return torch.nn.functional.pad(mask, (0, length - mask.shape[1]))


def _sample_positions(mask: Tensor, k: int) -> Tensor:
    """Keep ``k`` positions of each row of ``mask``, drawn uniformly (all of them if a row has fewer)."""
    scores = torch.rand(mask.shape, device=mask.device).masked_fill(~mask, -1.0)
    keep = scores.topk(min(k, mask.shape[1]), dim=1).indices
    return mask & torch.zeros_like(mask).scatter(1, keep, True)


class TargetedLATModule(SafetyModule):
    """Targeted latent adversarial training for jailbreaks, backdoors and unlearning.

    Args:
        objective: "refusal" (jailbreaks), "dpo" (backdoors), "rmu" or "gradient_ascent" (unlearning).
        adversary_layers: attacked sites: decoder layer indices and/or "embedding".
        epsilon: L2 radius of each token's perturbation.
        epsilon_scale: "absolute" (epsilon as given; paper: 6 at Llama-3-8B) or "layer_norm"
            (epsilon times the site's mean activation norm, measured once on the reference model).
        adversary_steps: Adam steps of the inner loop (paper: 16).
        adversary_lr: inner-loop Adam step as a fraction of epsilon (a step moves each perturbed
            token by about adversary_lr * epsilon, whatever the model width).
        adversary_positions: positions perturbed: "prompt" or "all" (prompt and completion).
        adversary_tokens: perturb only this many positions per example, drawn at random from
            ``adversary_positions`` at every step (default: all of them). A sparse adversary models a
            short trigger: it can rewrite a token or two without rewriting the whole request.
        adversary_toward: adversary weight of toward(harmful completion).
        adversary_away: adversary weight of away(refusal).
        model_toward: model weight of toward(refusal) (objectives refusal and dpo).
        model_away: model weight of away(harmful completion).
        benign_weight: weight of the benign (retain) term, computed with the adversary off.
        benign_loss: "sft" (cross-entropy on benign completions) or "kl" (to the reference).
        dpo_beta: DPO temperature beta (paper: 0.3).
        rmu_layer: decoder layer whose states RMU steers.
        rmu_steering: RMU steering coefficient c, in units of the layer's mean activation norm.
        rmu_positions: forget-data positions RMU steers: "all" (the paper: every token), "completion"
            or "prompt". Positions before the forgotten content are identical in retain data, so
            steering them fights the retain term.
        seed: seed of the RMU direction.
        **kwargs: model, LoRA and optimiser settings of ``SafetyModule``.
    """

    stream_fields = {"harmful": ("completion",), "benign": ("completion",)}

    def __init__(
        self,
        objective: Objective = "refusal",
        adversary_layers: list[int | str] = [0, 2],  # noqa: B006 - jsonargparse needs a literal default
        epsilon: float = 1.0,
        epsilon_scale: Literal["absolute", "layer_norm"] = "layer_norm",
        adversary_steps: int = 8,
        adversary_lr: float = 0.25,
        adversary_positions: Literal["prompt", "all"] = "prompt",
        adversary_tokens: int | None = None,
        adversary_toward: float = 1.0,
        adversary_away: float = 1.0,
        model_toward: float = 1.0,
        model_away: float = 1.0,
        benign_weight: float = 1.0,
        benign_loss: Literal["sft", "kl"] = "sft",
        dpo_beta: float = 0.3,
        rmu_layer: int = 2,
        rmu_steering: float = 2.0,
        rmu_positions: Literal["all", "completion", "prompt"] = "all",
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if epsilon <= 0 or adversary_steps < 0:
            raise ValueError("epsilon must be > 0 and adversary_steps >= 0")
        if adversary_tokens is not None and adversary_tokens < 1:
            raise ValueError(f"adversary_tokens must be >= 1 (or unset for every position), got {adversary_tokens}")
        if objective in ("refusal", "dpo"):
            self.stream_fields = {"harmful": ("completion", "refusal"), "benign": ("completion",)}
        self.site_norms: dict | None = None  # measured once, on the reference model
        self.control: Tensor | None = None  # RMU's c * u

    def validate_layers(self, num_layers: int) -> None:
        attack_sites(self.model, self.hparams.adversary_layers)  # raises on unknown sites
        if self.hparams.objective == "rmu":
            self.resolve([self.hparams.rmu_layer])

    # ----- scale-relative quantities, measured once ---------------------------------------------------
    def _measure(self, sequences: dict, mask: Tensor) -> None:
        hp = self.hparams
        rmu = [hp.rmu_layer] if hp.objective == "rmu" else []
        with self.reference():
            norms = site_norms(self.model, [*hp.adversary_layers, *rmu], sequences["input_ids"],
                               sequences["attention_mask"], mask)
        self.site_norms = {s: norms[s] for s in hp.adversary_layers}
        if hp.objective == "rmu":
            u = torch.rand(self.model.get_input_embeddings().weight.shape[-1],
                           generator=torch.Generator().manual_seed(hp.seed))
            self.control = (hp.rmu_steering * norms[hp.rmu_layer] * u / u.norm()).to(mask.device)

    def _epsilon(self) -> dict:
        hp = self.hparams
        scale = self.site_norms if hp.epsilon_scale == "layer_norm" else dict.fromkeys(hp.adversary_layers, 1.0)
        return {site: hp.epsilon * scale[site] for site in hp.adversary_layers}

    # ----- pieces ----------------------------------------------------------------------------------
    def _logits(self, sequences: dict) -> Tensor:
        return self.model(input_ids=sequences["input_ids"], attention_mask=sequences["attention_mask"]).logits

    def _logp(self, sequences: dict) -> Tensor:
        return sequence_logprob(self._logits(sequences), sequences["input_ids"], sequences["completion_mask"])

    def _rmu_states(self, sequences: dict) -> Tensor:
        states, _ = forward_states(self.model, sequences["input_ids"], sequences["attention_mask"],
                                  [self.hparams.rmu_layer], logits=False)
        return next(iter(states.values()))

    def _objectives(self, harmful: dict, refusal: dict | None, reference: dict):
        """(adversary loss, model loss under attack) as closures over the batch."""
        hp = self.hparams
        ids, mask = harmful["input_ids"], harmful["completion_mask"]
        if hp.objective == "refusal":
            def adversary():
                return (hp.adversary_toward * toward(self._logits(harmful), ids, mask)
                        + hp.adversary_away * away(self._logits(refusal), refusal["input_ids"], refusal["completion_mask"]))

            def model():
                return (hp.model_toward * toward(self._logits(refusal), refusal["input_ids"], refusal["completion_mask"])
                        + hp.model_away * away(self._logits(harmful), ids, mask))
        elif hp.objective == "dpo":
            def adversary():  # prefer the harmful completion
                return dpo_loss(self._logp(harmful), self._logp(refusal), reference["harmful"], reference["refusal"], hp.dpo_beta)

            def model():  # DPO alone lowers both likelihoods; toward(refusal) keeps the chosen answer intact
                logits = self._logits(refusal)  # one forward serves both terms
                chosen = sequence_logprob(logits, refusal["input_ids"], refusal["completion_mask"])
                return (dpo_loss(chosen, self._logp(harmful), reference["refusal"], reference["harmful"], hp.dpo_beta)
                        + hp.model_toward * toward(logits, refusal["input_ids"], refusal["completion_mask"]))
        else:
            def adversary():  # restore the forgotten answers
                return toward(self._logits(harmful), ids, mask)

            if hp.objective == "rmu":
                def model():
                    return rmu_forget_loss(self._rmu_states(harmful), self.control, position_mask(harmful, hp.rmu_positions))
            else:
                def model():
                    return -toward(self._logits(harmful), ids, mask)
        return adversary, model

    def _benign(self, benign: dict) -> Tensor:
        hp = self.hparams
        if hp.objective == "rmu":
            with self.reference():
                reference = self._rmu_states(benign)
            return rmu_retain_loss(self._rmu_states(benign), reference, benign["attention_mask"])
        if hp.benign_loss == "kl":
            with self.reference():
                reference = self._logits(benign)
            return kl_divergence(reference, self._logits(benign), benign["attention_mask"])
        return toward(self._logits(benign), benign["input_ids"], benign["completion_mask"])

    # ----- step ------------------------------------------------------------------------------------
    def compute_losses(self, batch: dict) -> dict[str, Tensor]:
        hp = self.hparams
        harmful, benign = batch["harmful"]["completion"], batch["benign"]["completion"]
        refusal = batch["harmful"].get("refusal")
        length = max(harmful["input_ids"].shape[1], refusal["input_ids"].shape[1] if refusal is not None else 0)
        if hp.adversary_positions == "prompt":
            mask = _pad_to(harmful["prompt_mask"], length)
        else:
            mask = _pad_to(harmful["attention_mask"], length)
            if refusal is not None:
                mask = mask | _pad_to(refusal["attention_mask"], length)
        if hp.adversary_tokens is not None:
            mask = _sample_positions(mask, hp.adversary_tokens)
        if self.site_norms is None:
            self._measure(harmful, harmful["prompt_mask"])

        reference = {}
        if hp.objective == "dpo":
            with self.reference():
                reference = {"harmful": self._logp(harmful), "refusal": self._logp(refusal)}
        adversary_loss, model_loss = self._objectives(harmful, refusal, reference)

        adversary = LatentAdversary(self.model, hp.adversary_layers, mask, self._epsilon())
        out: dict[str, Tensor] = {}
        with adversary.attached():
            if self.training and hp.adversary_steps > 0:
                losses = adversary.optimise(adversary_loss, hp.adversary_steps, hp.adversary_lr)
                out["adversary/loss_first"] = torch.tensor(losses[0])
                out["adversary/loss_last"] = torch.tensor(losses[-1])
            adversary.freeze()
            out["loss_attacked"] = model_loss()
        out["loss_benign"] = self._benign(benign)
        out["loss"] = out["loss_attacked"] + hp.benign_weight * out["loss_benign"]
        for site, norm in adversary.norms().items():
            out[f"adversary/norm_{site}"] = norm
        return out
