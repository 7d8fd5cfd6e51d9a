"""``SafetyModule``: the training template every method fills in (one level of inheritance).

A method is one small file: it declares the data it needs (``stream_fields``) and implements
``compute_losses(batch) -> {"loss": total, term: value, ...}``. What a method does at a moment of the
run is a named hook, called by the base at that moment:

- ``validate_layers(num_layers)``: check layer settings against the model (after it is built);
- ``init_adapters()``: initialise the fresh LoRA weights (peft's default: B = 0);
- ``calibrate(batch) -> {name: tensor}``: measure scale-relative quantities once, on the first
  training batch, before any step (validation included); the result is ``self.calibration`` and is
  saved in checkpoints, so a resumed run uses the same values. Statistics of the global batch
  (``distributed.global_masked_mean``): every rank measures its own first batch;
- ``training_state()`` / ``load_training_state(state)``: what a method keeps between steps that is
  not a weight (a miner, its own random generator), so that a resumed run equals an uninterrupted
  one. The base adds torch's and Python's global random states.

The base builds the LoRA model in ``configure_model`` (FSDP-ready, idempotent), gives the frozen
reference through the same weights, logs every term under ``train/`` and ``val/``, keeps only adapter
weights in checkpoints and exports a PEFT adapter directory at the end of ``fit``. Evaluation
(``python -m lit_safety test``) is the ``lit_safety.evaluation.SafetyEvaluation`` callback's job.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Sequence
from functools import cached_property

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor

from lit_safety import artifacts, backbone, sharding
from lit_safety.adversaries import edit_output
from lit_safety.backbone import DType, Quantization
from lit_safety.data.batch import SafetyBatch, check_batch

CALIBRATION_KEY = "lit_safety_calibration"
STATE_KEY = "lit_safety_training_state"


def noisy_embeddings(module: torch.nn.Module, embeddings: Tensor, scale: float, rows: Tensor | None = None,
                     shrink: float = 0.0) -> Tensor:
    """``embeddings`` [B, T, D] with each token scaled by a factor drawn uniformly from
    [1 - ``shrink``, 1], then moved by ``scale`` times its own (unscaled) norm in a uniformly random
    direction, when ``module`` is in training mode (else unchanged); ``rows`` [B] (bool), if given,
    picks the rows that change."""
    if not module.training:
        return embeddings
    chosen = (torch.ones(embeddings.shape[0], device=embeddings.device, dtype=embeddings.dtype) if rows is None
              else rows.to(embeddings.device, embeddings.dtype))[:, None, None]
    direction = torch.randn_like(embeddings)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    moved = embeddings + scale * embeddings.detach().norm(dim=-1, keepdim=True) * direction * chosen
    if not shrink:  # no draw: noise alone keeps the random stream it always had
        return moved
    factor = 1 - shrink * chosen * torch.rand(*embeddings.shape[:-1], 1, device=embeddings.device, dtype=embeddings.dtype)
    return moved - (1 - factor) * embeddings


class SafetyModule(L.LightningModule):
    """Base of every lit_safety method: a causal LM with LoRA adapters and its frozen reference.

    Args:
        base_model: the model to defend: ``organism[:variant]``, ``smollm2``, a local Hugging Face
            directory, a ``.gguf`` file or a hub id.
        lora_rank: LoRA rank r.
        lora_alpha: LoRA alpha (updates are scaled by alpha / r).
        lora_dropout: dropout on the adapter input.
        lora_target_modules: module names to adapt, or "all-linear".
        lora_layers: decoder layers to adapt (negative allowed); None adapts every layer that can
            change the loss (all, unless the method reads no logits: see ``deepest_layer``).
        dtype: dtype of the base weights ("bfloat16" halves memory at 8B scale).
        quantization: "4bit" (NF4, QLoRA) or "8bit" base weights through bitsandbytes.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        embedding_noise: in the training passes over harmful requests, every token embedding moves
            by this fraction of its own L2 norm in a uniformly random direction, drawn anew each pass
            (0: off). A refusal learned on noisy tokens must hold for a neighbourhood of each training
            word, and so can reach nearby words it never saw (held-out synonyms); benign (retain)
            passes stay clean, since noise there teaches the model to answer blurred tasks and costs
            capability. Like dropout it acts only in training mode: the reference, the inner adversaries
            and miners, validation and evaluation see the tokens as they are (but see
            ``noisy_adversaries``).
        embedding_shrink: in the same passes, every token embedding is first scaled by a factor drawn
            uniformly from [1 - embedding_shrink, 1] (0: off). Rare words have shorter embeddings than
            common ones (the organism's held-out synonyms about half their training synonyms' norm):
            a refusal learned on shortened tokens must hold where a harmful word is only weakly known.
        benign_noise: in the training passes over benign (retain) requests, every token embedding moves
            by this fraction of its own norm as ``embedding_noise`` moves harmful ones (0: off); their
            targets stay those of the clean request (the data's answers, or the reference, which sees
            tokens as they are). Noise on harmful passes alone can teach the model that unfamiliar-looking
            tokens are a cue to refuse (on the organism: the system turn's words, which no training data
            holds); noise on both sides leaves harm as the cue, at some cost in clean accuracy.
        noisy_adversaries: the method's inner adversaries (the triplet's miners, LAT's adversary)
            optimise under ``embedding_noise`` too, each of their steps a fresh draw: the perturbation
            they return then breaks the refusal across the neighbourhood of each request the model
            learns on under noise, instead of at the clean request beside it.
        optimizer: optimizer of the LoRA parameters.
        scheduler: learning-rate scheduler, stepped once per optimizer step.
    """

    # stream name -> record fields the method needs in it; checked on the data before training and
    # on every batch (see lit_safety.data.batch).
    stream_fields: dict[str, tuple[str, ...]] = {}
    # whether the method optimises an adversary inside its training step (see noisy_adversaries)
    inner_adversaries: bool = False

    def __init__(
        self,
        base_model: str = "organism",
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_target_modules: str | list[str] = "all-linear",
        lora_layers: list[int] | None = None,
        dtype: DType = "float32",
        quantization: Quantization | None = None,
        gradient_checkpointing: bool = False,
        embedding_noise: float = 0.0,
        embedding_shrink: float = 0.0,
        benign_noise: float = 0.0,
        noisy_adversaries: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        if lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {lora_rank}")
        if embedding_noise < 0:
            raise ValueError(f"embedding_noise must be >= 0, got {embedding_noise}")
        if benign_noise < 0:
            raise ValueError(f"benign_noise must be >= 0, got {benign_noise}")
        if not 0 <= embedding_shrink < 1:
            raise ValueError(f"embedding_shrink must be in [0, 1), got {embedding_shrink}")
        if noisy_adversaries and not self.inner_adversaries:
            raise ValueError(f"noisy_adversaries: {type(self).__name__} has no inner adversary to optimise under noise")
        if noisy_adversaries and not (embedding_noise or embedding_shrink):
            raise ValueError("noisy_adversaries: the adversaries optimise under embedding_noise and embedding_shrink, "
                             "which are 0")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.model = None  # the PeftModel, built in configure_model
        self.calibration: dict[str, Tensor] | None = None  # set by calibrate(), saved in checkpoints
        self.strict_loading = False  # checkpoints hold adapter weights only

    # ----- model -----------------------------------------------------------------------------------
    @cached_property
    def tokenizer(self):
        return backbone.load_tokenizer(self.hparams.base_model)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        base = backbone.load_causal_lm(hp.base_model, hp.dtype, hp.quantization)
        layers = hp.lora_layers
        deepest = self.deepest_layer(len(backbone.decoder_layers(base)))
        if layers is None and deepest is not None:
            # Adapters above it could not change the loss: they would never train, and DDP would
            # stop on parameters without a gradient.
            layers = list(range(deepest + 1))
        self.model = backbone.add_lora(base, hp.lora_rank, hp.lora_alpha, hp.lora_dropout, hp.lora_target_modules, layers)
        if hp.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.enable_input_require_grads()
        self.validate_layers(len(backbone.decoder_layers(self.model)))
        self.init_adapters()
        self.model.train()  # from_pretrained returns eval mode; LoRA dropout must be live in training
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 is applied here, by the module
            if self.device_mesh["tensor_parallel"].size() > 1:
                raise ValueError("ModelParallelStrategy: lit_safety shards data-parallel only (FSDP2); set "
                                 "data_parallel_size to the number of devices and tensor_parallel_size=1")
            sharding.fully_shard_model(self.model, self.device_mesh["data_parallel"])

    def deepest_layer(self, num_layers: int) -> int | None:
        """Hook: the deepest decoder layer whose output the loss reads, when it never reads the logits
        (default None: it does). With ``lora_layers`` unset, only layers up to it are adapted."""
        return None

    def validate_layers(self, num_layers: int) -> None:
        """Hook: check the method's layer settings against the model (raise ``BackboneError``)."""

    def init_adapters(self) -> None:
        """Hook: initialise the fresh adapter weights (default: peft's, LoRA B = 0)."""

    def calibrate(self, batch: SafetyBatch) -> dict[str, Tensor]:
        """Hook: quantities measured once on the first training batch (default: none)."""
        return {}

    def training_state(self) -> dict:
        """Hook: the method's state between steps that is not a weight (saved in checkpoints)."""
        return {}

    def load_training_state(self, state: dict) -> None:
        """Hook: restore what ``training_state`` returned."""

    def resolve(self, layers: Sequence[int], option: str | None = None) -> list[int]:
        """Decoder-layer indices of this model, negatives resolved (see ``backbone.resolve_layers``);
        an error names ``option``, the setting the layers came from."""
        try:
            return backbone.resolve_layers(layers, len(backbone.decoder_layers(self.model)))
        except backbone.BackboneError as e:
            raise backbone.BackboneError(f"{option}: {e}" if option else str(e)) from None

    def reference(self):
        """Context in which ``self.model`` is the frozen reference (adapters off, no grad, no dropout)."""
        return backbone.reference(self.model)

    def refuse_fsdp1_inner_loop(self) -> None:
        """Raise if training under ``FSDPStrategy``: FSDP's backward hooks assume one backward per
        forward of a wrapped module, and an inner adversary loop's backward passes leave them in a state
        where the model's next update comes out wrong. FSDP2 keeps no such state."""
        if self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            raise ValueError(f"{type(self).__name__} under FSDPStrategy: its inner adversary loop does not train "
                             "correctly under FSDP; shard with FSDP2 (lightning.pytorch.strategies."
                             "ModelParallelStrategy) or use DDP")

    @contextlib.contextmanager
    def adapters_frozen(self):
        """Context for an inner adversary loop, which differentiates its perturbation only: with the
        adapters frozen, the forward keeps nothing for their gradients. (Not under sharding, where
        requires_grad belongs to the shards and their gathered copies alike.)"""
        adapters = [] if self._sharded() else [p for p in self.trainable_parameters() if p.requires_grad]
        for p in adapters:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in adapters:
                p.requires_grad_(True)

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole fit (for schedules over training progress)."""
        return max(1, int(self.trainer.estimated_stepping_batches))

    # ----- steps -----------------------------------------------------------------------------------
    def compute_losses(self, batch: SafetyBatch) -> dict[str, Tensor]:
        """The method's loss terms for one batch; ``"loss"`` is the total that is optimised."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute_losses")

    def on_fit_start(self) -> None:
        # A resumed run has it from its checkpoint (FSDP2 reads checkpoints after this hook: what is
        # measured here is then replaced by the saved calibration).
        if self.calibration is None:
            measured = {k: v.detach().to(self.device) for k, v in self._in_forward("calibrate", self._first_training_batch()).items()}
            self.calibration = measured

    @torch.no_grad()
    def _in_forward(self, method: str, *args):
        """``getattr(self, method)(*args)``, a measurement without gradient. Under FSDP it runs inside
        the wrapped forward, as Lightning runs ``training_step``: only there are the root unit's
        weights (embeddings, head) whole. (FSDP2 shards the PeftModel itself, which gathers them.)"""
        strategy = self.trainer.strategy
        if not isinstance(strategy, FSDPStrategy) or strategy.model is None:
            return getattr(self, method)(*args)
        return strategy._forward_redirection(strategy.model, self, method, *args)

    def _first_training_batch(self) -> SafetyBatch:
        # A fresh loader from the data module: the training loop's own data order is left alone.
        datamodule = self.trainer.datamodule
        loader = datamodule.train_dataloader() if datamodule is not None else self.train_dataloader()
        batch = next(iter(loader))
        if isinstance(loader, CombinedLoader):
            batch = batch[0]  # (batch, batch_idx, dataloader_idx)
        return self.transfer_batch_to_device(batch, self.device, 0)

    def _log_terms(self, stage: str, terms: dict[str, Tensor], batch: SafetyBatch) -> None:
        size = next(iter(batch.values()))["completion"]["input_ids"].shape[0]
        for name, value in terms.items():
            self.log(f"{stage}/{name}", value.detach().float(), batch_size=size, prog_bar=name == "loss",
                     sync_dist=stage != "train")

    def embedding_noise(self, rows: Tensor | None = None):
        """Context for a method's passes over harmful requests: in training mode they see
        ``embedding_shrink`` and ``embedding_noise`` on their token embeddings (``rows``: only those rows of a joint pass).
        The hook lives only within the block: a copy of the model made for evaluation (the tampering
        attack fine-tunes one in training mode) must not carry it."""
        return self._noise(self.hparams.embedding_noise, self.hparams.embedding_shrink, rows)

    def benign_noise(self, rows: Tensor | None = None):
        """Context for a method's passes over benign requests: in training mode they see
        ``benign_noise`` on their token embeddings (``rows``: only those rows of a joint pass)."""
        return self._noise(self.hparams.benign_noise, 0.0, rows)

    def _noise(self, scale: float, shrink: float, rows: Tensor | None):
        if not (scale or shrink):
            return contextlib.nullcontext()
        embeddings = self.model.get_input_embeddings()
        return edit_output(embeddings, lambda h: noisy_embeddings(embeddings, h, scale, rows, shrink))

    def adversary_noise(self):
        """Context for the inner adversaries' optimisation: ``embedding_noise`` if
        ``noisy_adversaries``, else clean tokens."""
        return self.embedding_noise() if self.hparams.noisy_adversaries else contextlib.nullcontext()

    def training_step(self, batch: SafetyBatch, batch_idx: int) -> Tensor:
        check_batch(batch, self.stream_fields, type(self).__name__)
        terms = self.compute_losses(batch)
        self._log_terms("train", terms, batch)
        return terms["loss"]

    def validation_step(self, batch: SafetyBatch, batch_idx: int) -> None:
        check_batch(batch, self.stream_fields, type(self).__name__)
        self._log_terms("val", self.compute_losses(batch), batch)

    def test_step(self, batch, batch_idx: int) -> None:
        """Nothing: ``test`` is run by the ``lit_safety.evaluation.SafetyEvaluation`` callback."""

    def on_test_start(self) -> None:
        if not any(getattr(callback, "evaluates_safety", False) for callback in self.trainer.callbacks):
            raise RuntimeError("`test` needs a lit_safety.evaluation.SafetyEvaluation among the trainer's callbacks "
                               "(the CLI adds the config's `evaluation`)")

    def on_before_optimizer_step(self, optimizer) -> None:
        norm = self.gradient_norm()
        if norm is not None:
            self.log("train/grad_norm", norm, batch_size=1)

    def gradient_norm(self) -> Tensor | None:
        """The L2 norm of the trainable gradients, over every rank's shards (None before any backward)."""
        grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
        if not grads:
            return None
        # Under sharding each rank holds a shard of every gradient (FSDP2: a DTensor's local part).
        squares = torch.stack([getattr(g, "_local_tensor", g).detach().to(torch.promote_types(g.dtype, torch.float32))
                               .pow(2).sum() for g in grads]).sum()
        if self._sharded():
            torch.distributed.all_reduce(squares)
        return squares.sqrt()

    def _sharded(self) -> bool:
        return self._trainer is not None and (isinstance(self.trainer.strategy, FSDPStrategy)
                                              or self.device_mesh is not None)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Sharded gradients are clipped by the whole model's norm, as torch.nn.utils.clip_grad_norm_ does in
        # one process (Lightning's FSDP plugin refuses norm clipping; FSDP's own computes it in float32).
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and self._sharded():
            norm = self.gradient_norm()
            if norm is not None and (scale := gradient_clip_val / (float(norm) + 1e-6)) < 1.0:
                for p in self.trainable_parameters():
                    if p.grad is not None:
                        p.grad.mul_(scale)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        optimizer = self.optimizer(self.trainable_parameters())
        if self.scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler(optimizer), "interval": "step"}}

    # ----- checkpoints -----------------------------------------------------------------------------
    def _adapters_only(self, state: dict, prefix: str = "") -> dict:
        """``state`` without the frozen weights (keys may carry ``prefix`` and wrapper names)."""
        trainable = {sharding.clean_name(name) for name, p in self.named_parameters() if p.requires_grad}
        return type(state)((k, v) for k, v in state.items() if sharding.clean_name(k[len(prefix) :]) in trainable)

    def state_dict(self, *args, **kwargs):
        """Only the trainable (adapter) weights: checkpoints stay megabytes at 8B scale."""
        return self._adapters_only(super().state_dict(*args, **kwargs), kwargs.get("prefix", ""))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A wrapper that calls state_dict() on this module as a child (FSDP) keeps every weight.
        checkpoint["state_dict"] = self._adapters_only(checkpoint["state_dict"])
        # Lets `artifacts.load_module` rebuild the right class from a checkpoint alone.
        checkpoint["lit_safety_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        if self.calibration is not None:
            checkpoint[CALIBRATION_KEY] = {k: v.cpu() for k, v in self.calibration.items()}
        # The random streams a step draws from (dropout, adversary positions, mining draws).
        checkpoint[STATE_KEY] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                                 "method": self.training_state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if CALIBRATION_KEY in checkpoint:  # on the CPU: a method moves what it uses to its tensors' device
            self.calibration = dict(checkpoint[CALIBRATION_KEY])
        if STATE_KEY in checkpoint:
            state = checkpoint[STATE_KEY]
            torch.set_rng_state(state["torch"])
            random.setstate(state["python"])
            self.load_training_state(state["method"])

    def on_fit_end(self) -> None:
        # A PEFT adapter directory beside the logs, so every run can be evaluated or shared directly.
        # Without a logger there is no run directory (log_dir would be the working directory).
        log_dir = self.trainer.log_dir if self.trainer.logger is not None else None
        if not log_dir:
            return
        # Under sharding every rank gathers the adapters (a collective), rank 0 writes them.
        state = sharding.full_trainable_state(self.model, self.trainer.strategy.model) if self._sharded() else None
        if self.trainer.is_global_zero:
            datamodule = self.trainer.datamodule
            streams = getattr(datamodule, "streams", None)
            training = {"steps": self.trainer.global_step,
                        "data": {name: [str(getattr(s, "path", s)) for s in stream.sources] for name, stream in streams.items()}
                        if streams else type(datamodule).__name__}
            artifacts.export_adapter(self, os.path.join(log_dir, "adapter"), training, state)
