"""Triplet defense: contrastive representation learning with adversarial hard negative mining
("Improving Large Language Model Safety with Contrastive Representation Learning", arXiv 2506.11938).

Per step, with h the reference states (adapters off) and h' the trained states at chosen layers:
- benign term:  ReLU(d_p(h'_b, h_b) - d_n(h'_b, mu_h) + m_b)   keep benign states where they were,
- harmful term: ReLU(d_p(h'_h, mu_h) - d_n(h'_h, h_h) + m_h)   pull harmful states together, away
  from where the reference had them,
- KL term: T^2 KL(p_ref / T || p' / T) on benign logits;
total = alpha L_b + beta L_h + gamma L_KL (``benign_weight``, ``harmful_weight``, ``kl_weight``), with
mu_h the masked mean of the trained model's harmful states over the (global) batch; optionally plus
``refusal_weight`` x toward(refusal) on the harmful requests, the mined ones under their hard-negative
perturbation: targeted LAT's model objective beside the triplet terms.

Optionally (``mining``), an adversary trained to restore the harmful completions supplies hard
negatives for a fraction of the harmful examples: the paper's residual module (``miner: residual``,
h -> h + W h + b after one layer, trained every ``mining_interval`` steps and reused between), or
targeted LAT's latent adversary (``miner: latent``: a per-token L2-bounded perturbation of the prompt
positions at one site, a decoder layer or the embeddings, fitted to each batch's own examples), or the
suite's embedding attack (``miner: suffix``: soft suffix vectors at the end of the user turn,
optimised toward the harmful answer), or several of the per-batch miners, one drawn at every step
(``miner: [latent, suffix]``: hard negatives from more than one threat model) or acting together
(``mining_together: true``: a latent perturbation of the prompt and a soft suffix optimised jointly, the
composed threat of an unseen request under an embedding attack).
"""

from __future__ import annotations

import contextlib
import random
from functools import cached_property
from typing import Literal

import torch
from torch import Tensor

from lit_safety.adversaries import (
    LatentAdversary,
    ResidualAttack,
    SuffixSlots,
    allowed_tokens,
    check_sites,
    check_slot_counts,
    dropped,
    finite,
    site_norms,
    slot_count,
    suffix_slot,
    suffix_slots,
)
from lit_safety.backbone import BackboneError
from lit_safety.distributed import global_masked_mean, leading_rows
from lit_safety.losses import distance, kl_divergence, masked_mean, toward, triplet_loss, wide
from lit_safety.methods.base import SafetyModule
from lit_safety.representations import completion_window, forward_states, joint_forward_states, position_mask

Distance = Literal["l2", "cosine", "mix"]
Positions = Literal["completion", "prompt", "all"]
Miner = Literal["residual", "latent", "suffix"]


class TripletDefenseModule(SafetyModule):
    """Triplet-loss representation defense with optional adversarial hard negative mining.

    Args:
        layers_benign: decoder layers of the benign term (negative indices count from the end).
        layers_harmful: decoder layers of the harmful term.
        distance_benign_positive: d_p of the benign term, d(h'_b, h_b): l2, cosine or mix.
        distance_benign_negative: d_n of the benign term, d(h'_b, mu_h).
        distance_harmful_positive: d_p of the harmful term, d(h'_h, mu_h).
        distance_harmful_negative: d_n of the harmful term, d(h'_h, h_h).
        margin_benign: margin m_b of the benign term.
        margin_harmful: margin m_h of the harmful term.
        mix_weight: weight w of the cosine part of the mix distance.
        margin_scale: "absolute" uses margins and mix weight as given (paper: 500/1500 at Llama-3-8B
            scale); "reference_norm" multiplies them by the mean norm of the reference states at
            each layer, so one setting holds across models of different activation scale.
        benign_weight: weight alpha of the benign term.
        harmful_weight: weight beta of the harmful term.
        kl_weight: weight gamma of the KL term on benign logits.
        refusal_weight: weight of toward(refusal) on every harmful request, the mined ones under the
            miner's perturbation (targeted LAT's model objective; 0, the paper's loss, needs no refusals).
        temperature: KL temperature T.
        positions: tokens the triplet terms average over: "completion", "prompt" or "all".
        mining: enable adversarial hard negative mining.
        miner: "residual" (the paper's module), "latent" (LAT's per-token L2 adversary on the prompt) or
            "suffix" (``mining_suffix_length`` soft vectors at the end of the user turn, starting as the
            ``mining_suffix_init`` token, each within ``mining_epsilon`` of its start: the suite's
            embedding attack); or a list of the latent and suffix miners, one drawn at every step
            (or acting together: ``mining_together``).
        mining_interval: optimizer steps between fresh residual modules (paper: 30); the latent and
            suffix miners perturb each batch's own examples, so they mine every step and need 1.
        mining_steps: Adam steps that train each adversary.
        mining_lr: the residual module's Adam learning rate; the latent and suffix miners' step as a
            fraction of their radius (as LAT's ``lr``).
        mining_fraction: fraction of the harmful examples of each global batch whose states come from
            the attacked model (paper: 0.3): the same examples on any number of processes.
        mining_layers: sites from which the adversary's position is drawn: decoder layers (and, for the
            latent miner, "embedding"); each must be before the deepest triplet layer, or the
            adversary could not change any state used.
        mining_epsilon: the latent and suffix miners' per-token L2 radius, in units of the site's mean
            reference activation norm (calibrated on the first batch); with a list of miners, one
            radius for all or a list of one per miner.
        mining_suffix_length: soft suffix vectors of the suffix miner; a list of lengths takes one per
            step in turn.
        mining_suffix_init: the text whose first token every suffix vector starts as.
        mining_random_start: share of steps (drawn per step) whose suffix vectors start from random
            tokens instead, as the embedding attack's later restarts do: a defense mined from one
            start holds attacks from that start better than from others.
        mining_warm_start: share of the steps that start from ``mining_suffix_init`` (drawn per step)
            whose suffix vectors start where the latest steps' optimisation left them, in the same ball
            around the init token: the miner's few inner steps then add up across training steps, as
            the suite's attack spends hundreds on one behaviour.
        mining_bank_size: optimised suffixes kept for warm starts (the latest, per suffix length).
        mining_together: the listed latent and suffix miners perturb every mined example together,
            optimised jointly (the latent one at decoder-layer sites: the suffix owns the embeddings),
            instead of one drawn per step.
        mining_seed: seed of the draws of miner and mining site.
        **kwargs: model, LoRA and optimiser settings of ``SafetyModule``.
    """

    inner_adversaries = True  # the miners

    def __init__(
        self,
        layers_benign: list[int] = [2, 3],  # noqa: B006 - jsonargparse needs a literal default
        layers_harmful: list[int] = [2, 3],  # noqa: B006
        distance_benign_positive: Distance = "mix",
        distance_benign_negative: Distance = "mix",
        distance_harmful_positive: Distance = "mix",
        distance_harmful_negative: Distance = "mix",
        margin_benign: float = 0.5,
        margin_harmful: float = 1.0,
        mix_weight: float = 1.0,
        margin_scale: Literal["absolute", "reference_norm"] = "reference_norm",
        benign_weight: float = 1.0,
        harmful_weight: float = 1.0,
        kl_weight: float = 1.0,
        refusal_weight: float = 0.0,
        temperature: float = 2.0,
        positions: Positions = "completion",
        mining: bool = False,
        miner: Miner | list[Miner] = "residual",
        mining_interval: int = 30,
        mining_steps: int = 30,
        mining_lr: float = 1e-3,
        mining_fraction: float = 0.3,
        mining_layers: list[int | str] = [0, 1],  # noqa: B006
        mining_epsilon: float | list[float] = 0.5,
        mining_suffix_length: int | list[int] = 10,
        mining_suffix_init: str = "!",
        mining_random_start: float = 0.0,
        mining_warm_start: float = 0.0,
        mining_bank_size: int = 64,
        mining_together: bool = False,
        mining_seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if not 0.0 <= mining_fraction <= 1.0:
            raise ValueError(f"mining_fraction must be in [0, 1], got {mining_fraction}")
        if not 0.0 <= mining_random_start <= 1.0:
            raise ValueError(f"mining_random_start must be in [0, 1], got {mining_random_start}")
        if not 0.0 <= mining_warm_start <= 1.0:
            raise ValueError(f"mining_warm_start must be in [0, 1], got {mining_warm_start}")
        if mining_bank_size < 1:
            raise ValueError(f"mining_bank_size must be >= 1, got {mining_bank_size}")
        if margin_benign < 0 or margin_harmful <= 0:
            raise ValueError(f"margins must be margin_benign >= 0 and margin_harmful > 0, got {margin_benign}, {margin_harmful}")
        if min(benign_weight, harmful_weight, kl_weight, refusal_weight) < 0:
            raise ValueError("benign_weight, harmful_weight, kl_weight and refusal_weight must be >= 0")
        if mining_interval < 1 or mining_steps < 0:
            raise ValueError("mining_interval must be >= 1 and mining_steps >= 0")
        self.miners: list[str] = [miner] if isinstance(miner, str) else list(miner)
        if not self.miners or len(set(self.miners)) < len(self.miners):
            raise ValueError(f"miner: a miner or a list of distinct miners, got {miner}")
        if len(self.miners) > 1 and "residual" in self.miners:
            raise ValueError(f"miner: the residual miner serves mining_interval steps and cannot take turns with the "
                             f"per-batch miners, got {miner}")
        epsilons = mining_epsilon if isinstance(mining_epsilon, list) else [mining_epsilon] * len(self.miners)
        if len(epsilons) != len(self.miners):
            raise ValueError(f"mining_epsilon: one radius or one per miner ({self.miners}), got {mining_epsilon}")
        if min(epsilons) <= 0:
            raise ValueError(f"mining_epsilon must be > 0, got {mining_epsilon}")
        self.epsilons = dict(zip(self.miners, epsilons))
        self.per_batch = self.miners != ["residual"]  # latent and suffix miners perturb each batch's examples
        if mining and self.per_batch and mining_interval != 1:
            raise ValueError(f"mining_interval: the {'/'.join(self.miners)} miner perturbs each batch's own examples "
                             f"and mines every step; set mining_interval: 1 (got {mining_interval})")
        if mining_warm_start and "suffix" not in self.miners:
            raise ValueError(f"mining_warm_start: warm starts are the suffix miner's, got miner {miner}")
        if mining_together and sorted(self.miners) != ["latent", "suffix"]:
            raise ValueError(f"mining_together: the latent and suffix miners act together, got miner {miner}")
        if mining_together and "embedding" in mining_layers:
            raise ValueError("mining_layers: with mining_together the latent miner acts after decoder layers (the "
                             f"suffix miner owns the embeddings), got {mining_layers}")
        check_slot_counts(mining_suffix_length, "mining_suffix_length")
        if self.hparams.noisy_adversaries and not (mining and mining_steps):
            raise ValueError("noisy_adversaries: the triplet's adversaries are its miners; set mining: true and "
                             "mining_steps > 0")
        self.rng = random.Random(mining_seed)
        self.miner: ResidualAttack | None = None  # not a parameter: checkpointed by training_state
        self.latent: LatentAdversary | None = None  # this step's latent perturbation (belongs to its batch)
        self.slotted: SuffixSlots | None = None  # this step's harmful batch with the suffix miner's slots
        self.slot_start: int | Tensor | None = None  # what this step's slots start as (token id or ids)
        # slot count -> [n, slots, hidden] latest optimised suffixes (units of the radius), newest first
        self.suffix_bank: dict[int, Tensor] = {}
        self._mined_at_step = -1
        self._restored_miner: dict | None = None

    @property
    def stream_fields(self) -> dict[str, tuple[str, ...]]:
        harmful = ("completion", "refusal") if self.hparams.refusal_weight > 0 else ("completion",)
        return {"harmful": harmful, "benign": ("completion",)}

    def setup(self, stage: str) -> None:
        if self.hparams.mining and self.hparams.mining_steps > 0:
            self.refuse_fsdp1_inner_loop()

    def validate_layers(self, num_layers: int) -> None:
        hp = self.hparams
        self.resolve(hp.layers_benign, "model.layers_benign")
        deepest = max(self.resolve(hp.layers_harmful, "model.layers_harmful") + self.resolve(hp.layers_benign))
        if hp.mining:
            if not self.per_batch and not all(isinstance(layer, int) for layer in hp.mining_layers):
                raise BackboneError(f"model.mining_layers: the residual miner acts after decoder layers, got "
                                    f"{hp.mining_layers}")
            try:
                sites = check_sites(self._all_sites(), num_layers)
            except ValueError as e:
                raise BackboneError(f"model.mining_layers: {e}") from None
            if "suffix" in self.miners:
                self._suffix_slot  # noqa: B018 - an init text outside the vocabulary fails here, before training
            mining = [-1 if site == "embedding" else site for site in sites]
            if max(mining) >= deepest:
                raise BackboneError(
                    f"mining_layers {hp.mining_layers} must lie before the deepest triplet layer ({deepest}): "
                    "an attack module after it changes no state the triplet terms see"
                )

    def _sites(self, miner: str) -> list[int | str]:
        return ["embedding"] if miner == "suffix" else list(self.hparams.mining_layers)

    def _all_sites(self) -> list[int | str]:
        return list(dict.fromkeys(site for miner in self.miners for site in self._sites(miner)))

    def calibrate(self, batch) -> dict[str, Tensor]:
        hp = self.hparams
        if not (hp.mining and self.per_batch):
            return {}
        harmful = batch["harmful"]["completion"]
        with self.reference():
            norms = site_norms(self.model, self._all_sites(), harmful["input_ids"], harmful["attention_mask"],
                               harmful["prompt_mask"], across_ranks=True)
        return {f"site_norm/{site}": torch.tensor(norm) for site, norm in norms.items()}

    def training_state(self) -> dict:
        miner = None if self.miner is None else {"layer": self.miner.layer, "weight": self.miner.weight.detach().cpu(),
                                                   "bias": self.miner.bias.detach().cpu()}
        return {"rng": self.rng.getstate(), "mined_at_step": self._mined_at_step, "miner": miner,
                "suffix_bank": {count: bank.cpu() for count, bank in self.suffix_bank.items()}}

    def load_training_state(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self._mined_at_step = state["mined_at_step"]
        self._restored_miner = state["miner"]  # rebuilt once the model is on its device
        self.suffix_bank = dict(state.get("suffix_bank", {}))  # moved to the device where it is used

    def _rebuild_restored_miner(self) -> None:
        # At the first step, not on load: a checkpoint may be read before the model reaches its device
        # (DDP) or after fit has started (FSDP2 restores after setup).
        saved, self._restored_miner = self._restored_miner, None
        self.miner = ResidualAttack.for_model(self.model, saved["layer"])
        with torch.no_grad():
            self.miner.weight.copy_(saved["weight"])
            self.miner.bias.copy_(saved["bias"])

    # ----- hard negative mining --------------------------------------------------------------------
    def _mine(self, harmful: dict) -> None:
        """Insert a fresh identity-initialised attack module at a random layer and train it to make the
        (unchanged) LoRA model produce the harmful completions."""
        hp = self.hparams
        layer = self.rng.choice(hp.mining_layers)
        miner = ResidualAttack.for_model(self.model, layer)

        def harmful_nll() -> Tensor:
            with self.adversary_noise(), miner.attached(self.model):
                return toward(*completion_window(self.model, harmful))

        losses = miner.train(harmful_nll, hp.mining_steps, hp.mining_lr)
        self.miner = miner
        logged = {"train/mining_layer": float(layer), "train/mining_dropped_steps": float(dropped(losses))}
        if finite(losses):
            logged.update({"train/mining_loss_first": finite(losses)[0], "train/mining_loss_last": finite(losses)[-1]})
        self.log_dict(logged, batch_size=harmful["input_ids"].shape[0])

    @cached_property
    def _suffix_slot(self) -> tuple[int, int]:
        return suffix_slot(self.tokenizer, self.hparams.mining_suffix_init, "mining_suffix_init")

    def _draw_slot_start(self) -> int | Tensor:
        """This step's slot start: ``mining_suffix_init``'s token, or with probability
        ``mining_random_start`` as many random writable tokens as slots (from the module's own
        generator: every rank draws the same)."""
        if not (self.hparams.mining_random_start and self.rng.random() < self.hparams.mining_random_start):
            return self._suffix_slot[1]
        allowed = self._writable_tokens
        return allowed[[self.rng.randrange(len(allowed)) for _ in range(self._slot_count)]]

    def _warm_start(self, adversary: LatentAdversary, slots: Tensor) -> bool:
        """Start each attacked row's slots from one of the latest optimised suffixes of this length
        (the newest first); False if there is none yet."""
        bank = self.suffix_bank.get(self._slot_count)
        if bank is None:
            return False
        units = adversary.units["embedding"]
        with torch.no_grad():
            units[slots] = bank[torch.arange(units.shape[0]) % len(bank)].to(units).flatten(0, 1)
        return True

    def _bank(self, adversary: LatentAdversary, slots: Tensor) -> None:
        """Keep the rows' optimised suffixes (newest first) for later warm starts."""
        count, units = self._slot_count, adversary.units["embedding"].detach()
        mined = units[slots].view(units.shape[0], count, units.shape[-1])
        kept = self.suffix_bank.get(count)
        mined = mined if kept is None else torch.cat([mined, kept.to(mined)])
        self.suffix_bank[count] = mined[: self.hparams.mining_bank_size].clone()

    @cached_property
    def _writable_tokens(self) -> Tensor:
        """The ids a random start may draw (built once, not at every step that draws)."""
        return allowed_tokens(self.tokenizer, self.model.get_input_embeddings().weight.shape[0]).nonzero().flatten()

    @property
    def _slot_count(self) -> int:
        """The suffix miner's slots at this step."""
        return slot_count(self.hparams.mining_suffix_length, self.global_step)

    def _mine_latent(self, harmful: dict) -> None:
        """Fit a latent perturbation and/or soft suffix of the first mined examples' prompts that makes
        the (unchanged) LoRA model produce their harmful completions."""
        hp = self.hparams
        self.latent = self.slotted = None
        # Drawn by every rank, mining or not: one stream of miners and sites.
        if hp.mining_together:
            miners = self.miners
        else:
            miners = [self.rng.choice(self.miners) if len(self.miners) > 1 else self.miners[0]]
        sites = {miner: self.rng.choice(self._sites(miner)) for miner in miners}
        rows = leading_rows(hp.mining_fraction, harmful["input_ids"].shape[0])
        # A rank that mines none of its rows still runs the inner loop, on one row with zero weight:
        # under FSDP every forward is a collective, so every rank must run as many.
        attacked = max(rows, 1)
        banked = warm = False
        if "suffix" in miners:
            self.slot_start = self._draw_slot_start()
            # the bank's suffixes are displacements from the init token: no warm start from random tokens
            banked = hp.mining_warm_start > 0 and not isinstance(self.slot_start, Tensor)
            warm = banked and self.rng.random() < hp.mining_warm_start
            self.slotted = suffix_slots(harmful, attacked, self._slot_count, self._suffix_slot[0], self.slot_start)
        sequences = harmful if self.slotted is None else self.slotted.sequences
        mined = {key: value[:attacked] for key, value in sequences.items()}
        prompt = mined["prompt_mask"] if self.slotted is None else mined["prompt_mask"] & ~self.slotted.slots[:attacked]
        masks = {site: self.slotted.slots[:attacked] if miner == "suffix" else prompt for miner, site in sites.items()}
        radii = {site: self.epsilons[miner] * float(self.calibration[f"site_norm/{site}"])
                 for miner, site in sites.items()}
        adversary = LatentAdversary(self.model, list(sites.values()), masks, radii)
        warm = bool(warm and rows) and self._warm_start(adversary, masks["embedding"])
        # The noise enters before the perturbation, as in the training pass (see _harmful_states).
        with self.adversary_noise(), adversary.attached(), self.adapters_frozen():
            # Scaled by the examples, as LAT's: each example's perturbation follows its own loss.
            losses = adversary.optimise(lambda: rows * toward(*completion_window(self.model, mined)), hp.mining_steps,
                                        hp.mining_lr)
        if not rows:
            self.slotted = None
            return
        adversary.freeze()
        if banked:
            self._bank(adversary, masks["embedding"])
        adversary.padded(harmful["input_ids"].shape[0])
        self.latent = adversary
        norms = adversary.norms()
        logged = {"train/mining_dropped_steps": float(dropped(losses))}
        if "suffix" in miners and hp.mining_random_start:
            logged["train/mining_random_start"] = float(isinstance(self.slot_start, Tensor))
        if "suffix" in miners and hp.mining_warm_start:
            logged["train/mining_warm_start"] = float(warm)
        if not hp.mining_together:
            logged["train/miner"] = float(self.miners.index(miners[0]))
        for miner, site in sites.items():
            tag = f"_{miner}" if hp.mining_together else ""  # together: each miner's own strength
            logged.update({f"train/mining_radius{tag}": radii[site], f"train/mining_norm{tag}": float(norms[site])})
            if miner == "latent" or not hp.mining_together:
                logged["train/mining_layer"] = -1.0 if site == "embedding" else float(site)
        if finite(losses):
            logged.update({"train/mining_loss_first": finite(losses)[0] / rows,
                           "train/mining_loss_last": finite(losses)[-1] / rows})
        self.log_dict(logged, batch_size=harmful["input_ids"].shape[0])

    def _perturbed(self, rows: int):
        """The context in which this step's harmful forwards (``rows`` examples) see the hard-negative
        perturbation: attacked and clean rows in one forward."""
        if self.latent is not None:
            return self.latent.attached()
        mined = leading_rows(self.hparams.mining_fraction, rows) if self.miner is not None else 0
        return self.miner.attached(self.model, rows=mined) if mined else contextlib.nullcontext()

    def _harmful_states(self, harmful: dict, layers: list[int]) -> dict[int, Tensor]:
        slotted = self.slotted
        sequences = harmful if slotted is None else slotted.sequences
        with self._perturbed(sequences["input_ids"].shape[0]):
            states = forward_states(self.model, sequences["input_ids"], sequences["attention_mask"], layers,
                                    logits=False)[0]
        # Read back at the original positions, the reference's.
        return states if slotted is None else {layer: slotted.original(h) for layer, h in states.items()}

    def _refusal_loss(self, refusal: dict) -> Tensor:
        """toward(refusal) on the harmful requests, the mined ones under this step's perturbation (their
        refusals get the same suffix slots as their completions: one prompt)."""
        if self.slotted is not None:
            rows = int(self.slotted.slots.any(-1).sum())
            refusal = suffix_slots(refusal, rows, self._slot_count, self._suffix_slot[0], self.slot_start).sequences
        with self._perturbed(refusal["input_ids"].shape[0]):
            return toward(*completion_window(self.model, refusal))

    # ----- loss ------------------------------------------------------------------------------------
    def _scale(self, reference: Tensor, mask: Tensor) -> Tensor | float:
        if self.hparams.margin_scale == "absolute":
            return 1.0
        return global_masked_mean(wide(reference.detach()).norm(dim=-1), mask)

    def _term(self, anchor: Tensor, positive: Tensor, negative: Tensor, reference: Tensor, mask: Tensor,
              margin: float, positive_distance: str, negative_distance: str) -> tuple[Tensor, Tensor, Tensor]:
        """One layer's triplet term, and its mean positive and negative distances (for logging)."""
        scale = self._scale(reference, mask)
        w = self.hparams.mix_weight * scale
        loss = triplet_loss(anchor, positive, negative, mask, margin * scale, positive_distance, negative_distance, w)
        with torch.no_grad():
            d_p = masked_mean(distance(anchor, positive, positive_distance, w), mask)
            d_n = masked_mean(distance(anchor, negative, negative_distance, w), mask)
        return loss, d_p, d_n

    def compute_losses(self, batch: dict) -> dict[str, Tensor]:
        hp = self.hparams
        benign, harmful = batch["benign"]["completion"], batch["harmful"]["completion"]
        layers_b, layers_h = self.resolve(hp.layers_benign), self.resolve(hp.layers_harmful)
        mask_b, mask_h = position_mask(benign, hp.positions), position_mask(harmful, hp.positions)
        use_kl = hp.kl_weight > 0
        if self._restored_miner is not None:
            self._rebuild_restored_miner()

        if not self.training:
            self.latent = self.slotted = None
        elif hp.mining and self.per_batch:  # every batch, accumulated micro-batches included
            self._mine_latent(harmful)
        elif hp.mining and self.global_step % hp.mining_interval == 0 and self._mined_at_step != self.global_step:
            self._mined_at_step = self.global_step
            self._mine(harmful)

        with self.reference():
            if use_kl:  # only the benign rows need logits (the head would cost more than one forward saves)
                ref_b, ref_logits = forward_states(self.model, benign["input_ids"], benign["attention_mask"], layers_b)
                ref_h, _ = forward_states(self.model, harmful["input_ids"], harmful["attention_mask"], layers_h, logits=False)
            else:
                (ref_b, ref_logits), (ref_h, _) = joint_forward_states(self.model, [benign, harmful],
                                                                       sorted(set(layers_b) | set(layers_h)))
        with self.benign_noise():
            new_b, logits = forward_states(self.model, benign["input_ids"], benign["attention_mask"], layers_b, use_kl)
        with self.embedding_noise():
            new_h = self._harmful_states(harmful, sorted(set(layers_b) | set(layers_h)))
        mu_h = {layer: global_masked_mean(states, mask_h) for layer, states in new_h.items()}

        terms: dict[str, list[Tensor]] = {k: [] for k in
                                          ("b_pos", "b_neg", "h_pos", "h_neg", "loss_benign", "loss_harmful")}
        for layer in layers_b:  # benign: positive = reference state, negative = harmful mean
            for key, value in zip(("loss_benign", "b_pos", "b_neg"), self._term(
                    new_b[layer], ref_b[layer], mu_h[layer], ref_b[layer], mask_b, hp.margin_benign,
                    hp.distance_benign_positive, hp.distance_benign_negative)):
                terms[key].append(value)
        for layer in layers_h:  # harmful: positive = harmful mean, negative = reference state
            for key, value in zip(("loss_harmful", "h_pos", "h_neg"), self._term(
                    new_h[layer], mu_h[layer], ref_h[layer], ref_h[layer], mask_h, hp.margin_harmful,
                    hp.distance_harmful_positive, hp.distance_harmful_negative)):
                terms[key].append(value)

        out = {name: torch.stack(values).mean() for name, values in terms.items()}
        out["loss_kl"] = (kl_divergence(ref_logits, logits, benign["attention_mask"], hp.temperature)
                          if use_kl else torch.zeros((), device=out["loss_benign"].device))
        out["loss"] = (hp.benign_weight * out["loss_benign"] + hp.harmful_weight * out["loss_harmful"]
                       + hp.kl_weight * out["loss_kl"])
        refusal = {}
        if hp.refusal_weight > 0:
            with self.embedding_noise():
                refusal["loss_refusal"] = self._refusal_loss(batch["harmful"]["refusal"])
            out["loss"] = out["loss"] + hp.refusal_weight * refusal["loss_refusal"]
        return {
            "loss": out["loss"], "loss_benign": out["loss_benign"], "loss_harmful": out["loss_harmful"],
            "loss_kl": out["loss_kl"], **refusal,
            "distance/benign_to_reference": out["b_pos"], "distance/benign_to_harmful_mean": out["b_neg"],
            "distance/harmful_to_harmful_mean": out["h_pos"], "distance/harmful_to_reference": out["h_neg"],
            "mining_fraction": torch.tensor(float(hp.mining_fraction if self.miner or self.latent else 0.0)),
        }
