"""``SafetyModule``: the one base of every method (one level of inheritance).

A method is one small file: it declares the data it needs (``stream_fields``) and implements
``compute_losses(batch) -> {"loss": total, term: value, ...}``. The base builds the LoRA model in
``configure_model`` (FSDP-ready, idempotent), gives the frozen reference through the same weights,
logs every term under ``train/`` and ``val/``, and keeps only adapter weights in checkpoints.
"""

from __future__ import annotations

import copy
import importlib
import os
from collections.abc import Sequence
from functools import cached_property

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lit_safety import backbone
from lit_safety.backbone import DType, Quantization
from lit_safety.evaluation.suite import SafetyEvaluation


class SafetyModule(L.LightningModule):
    """Base of every lit_safety method: a causal LM with LoRA adapters and its frozen reference.

    Args:
        model: model name: ``organism[:variant]``, a local Hugging Face directory, a ``.gguf`` file or
            a hub id.
        lora_rank: LoRA rank r.
        lora_alpha: LoRA alpha (updates are scaled by alpha / r).
        lora_dropout: dropout on the adapter input.
        lora_target_modules: module names to adapt, or "all-linear".
        lora_layers: decoder layers to adapt (negative allowed); None adapts all.
        dtype: dtype of the base weights ("bfloat16" halves memory at 8B scale).
        quantization: "4bit" (NF4, QLoRA) or "8bit" base weights through bitsandbytes.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        optimizer: optimizer of the LoRA parameters.
        scheduler: learning-rate scheduler, stepped once per optimizer step.
        evaluation: the attack suite that ``test`` runs (default: direct request and prefill,
            exact judge).
    """

    # stream name -> record fields the method needs in it; the data module checks them at setup.
    stream_fields: dict[str, tuple[str, ...]] = {}

    def __init__(
        self,
        model: str = "organism",
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_target_modules: str | list[str] = "all-linear",
        lora_layers: list[int] | None = None,
        dtype: DType = "float32",
        quantization: Quantization | None = None,
        gradient_checkpointing: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        evaluation: SafetyEvaluation | None = None,
    ):
        super().__init__()
        if lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {lora_rank}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "evaluation"])
        self.evaluation = evaluation
        self.model_name = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.model = None  # built in configure_model
        self.strict_loading = False  # checkpoints hold adapter weights only

    # ----- model -----------------------------------------------------------------------------------
    @cached_property
    def tokenizer(self):
        return backbone.load_tokenizer(self.model_name)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        base = backbone.load_causal_lm(self.model_name, hp.dtype, hp.quantization)
        self.model = backbone.add_lora(
            base, hp.lora_rank, hp.lora_alpha, hp.lora_dropout, hp.lora_target_modules, hp.lora_layers
        )
        if hp.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.enable_input_require_grads()
        self.validate_layers(len(backbone.decoder_layers(self.model)))
        self.model.train()  # from_pretrained returns eval mode; LoRA dropout must be live in training

    def validate_layers(self, num_layers: int) -> None:
        """Check the method's layer settings against the model (raise ``BackboneError``)."""

    def resolve(self, layers: Sequence[int]) -> list[int]:
        """Decoder-layer indices of this model, negatives resolved (see ``backbone.resolve_layers``)."""
        return backbone.resolve_layers(layers, len(backbone.decoder_layers(self.model)))

    def reference(self):
        """Context in which ``self.model`` is the frozen reference (adapters off, no grad, no dropout)."""
        return backbone.reference(self.model)

    # ----- steps -----------------------------------------------------------------------------------
    def compute_losses(self, batch: dict) -> dict[str, Tensor]:
        """The method's loss terms for one batch; ``"loss"`` is the total that is optimised."""
        raise NotImplementedError

    def _log_terms(self, stage: str, terms: dict[str, Tensor], batch: dict) -> None:
        size = next(iter(batch.values()))["completion"]["input_ids"].shape[0]
        for name, value in terms.items():
            self.log(f"{stage}/{name}", value.detach().float(), batch_size=size, prog_bar=name == "loss",
                     sync_dist=stage != "train")

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        terms = self.compute_losses(batch)
        self._log_terms("train", terms, batch)
        return terms["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._log_terms("val", self.compute_losses(batch), batch)

    # ----- evaluation (`python -m lit_safety test`) -------------------------------------------------
    def on_test_start(self) -> None:
        if self.evaluation is None:
            self.evaluation = SafetyEvaluation().to(self.device)
        self.evaluation.prepare(self.trainer.datamodule.test_split_kinds(), self.model)

    def test_step(self, batch: list, batch_idx: int) -> None:
        by_split: dict[str, list] = {}
        for split, record in batch:
            by_split.setdefault(split, []).append(record)
        # Gradient attacks need autograd even under the test loop's inference mode.
        with torch.inference_mode(False), torch.enable_grad():
            for split, records in by_split.items():
                self.evaluation.evaluate(self.model, self.tokenizer, split, records, reference=self.reference)

    def on_test_epoch_end(self) -> None:
        results = self.evaluation.results()
        scalars = {f"test/asr/{a}/{s}": v["rate"] for a, splits in results["asr"].items() for s, v in splits.items()}
        scalars.update({f"test/benign_accuracy/{s}": v for s, v in results["benign_accuracy"].items()})
        scalars.update({f"test/over_refusal/{s}": v for s, v in results["over_refusal"].items()})
        scalars.update({f"test/benign_kl/{s}": v for s, v in results["benign_kl"].items()})
        for key, value in scalars.items():
            self.log(key, value)
        self.test_results = results
        if self.trainer.is_global_zero and self.trainer.log_dir and self.trainer.logger is not None:
            self.evaluation.write(results, self.trainer.log_dir)
            projected = self.evaluation.projected
            if projected.get("states") and hasattr(self.trainer.logger.experiment, "add_embedding"):
                self.trainer.logger.experiment.add_embedding(torch.cat(projected["states"]),
                                                             metadata=projected["labels"], tag="representations")

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        optimizer = self.optimizer(self.trainable_parameters())
        if self.scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler(optimizer), "interval": "step"}}

    # ----- checkpoints and export ------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        """Only the trainable (adapter) weights: checkpoints stay megabytes at 8B scale."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        return type(full)((k, v) for k, v in full.items() if k[len(prefix) :] in trainable)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lets `load_module` rebuild the right class from a checkpoint alone.
        checkpoint["lit_safety_class"] = f"{type(self).__module__}.{type(self).__qualname__}"

    def export_adapter(self, path: str) -> str:
        """Write a PEFT adapter directory (loadable with ``PeftModel.from_pretrained``) and the tokenizer.

        The adapter names its base by this module's ``model`` (e.g. ``organism`` or ``smollm2``), which
        ``load_for_evaluation`` resolves on any machine; a resolved path would lose a GGUF file name.
        """
        self.model.peft_config[self.model.active_adapter].base_model_name_or_path = self.hparams.model
        # Training never resizes the vocabulary, so the full embeddings need not be saved; saying so
        # also stops peft from looking the base name up on the Hub (offline: a DNS wait and a warning).
        self.model.save_pretrained(path, save_embedding_layers=False)
        self.tokenizer.save_pretrained(path)
        return path

    def export_merged(self, path: str) -> str:
        """Write a plain Hugging Face model with the adapters merged into a copy of the weights."""
        if self.hparams.quantization is not None:
            raise ValueError("cannot merge adapters into a quantized base; export the adapter instead")
        merged = copy.deepcopy(self.model).merge_and_unload()
        merged.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return path

    def on_fit_end(self) -> None:
        # A PEFT adapter directory beside the logs, so every run can be evaluated or shared directly.
        # Without a logger there is no run directory (log_dir would be the working directory).
        log_dir = self.trainer.log_dir if self.trainer.logger is not None else None
        sharded = "FSDP" in type(self.trainer.strategy).__name__
        if log_dir and not sharded and self.trainer.is_global_zero:
            self.export_adapter(os.path.join(log_dir, "adapter"))


def load_module(checkpoint_path: str, map_location: str = "cpu") -> SafetyModule:
    """Rebuild a trained ``SafetyModule`` (model built, adapters loaded) from a ``fit`` checkpoint."""
    checkpoint = torch.load(checkpoint_path, map_location=map_location, weights_only=False)
    module_name, _, class_name = checkpoint.get("lit_safety_class", "").rpartition(".")
    if not module_name:
        raise ValueError(f"{checkpoint_path} is not a lit_safety checkpoint (no 'lit_safety_class' entry)")
    cls = getattr(importlib.import_module(module_name), class_name)
    module = cls(**checkpoint["hyper_parameters"])
    module.configure_model()
    missing = set(checkpoint["state_dict"]) - set(module.state_dict())
    if missing:
        raise ValueError(f"{checkpoint_path}: adapter keys do not match the model: {sorted(missing)[:3]} ...")
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    return module
