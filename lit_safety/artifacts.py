"""What a trained method leaves behind, and every way back to a model: PEFT adapter directories,
merged Hugging Face models and ``fit`` checkpoints.

``load_for_evaluation(spec)`` accepts all of them (and plain model names), so every command that
takes a model takes any of them.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import pickle
import zipfile

import torch

from lit_safety import backbone


class ArtifactError(ValueError):
    """A file or directory that is not the artefact it was given as."""


def export_adapter(module, path: str) -> str:
    """Write ``module``'s adapters as a PEFT adapter directory (``PeftModel.from_pretrained``) with
    the tokenizer.

    The adapter names its base by the module's ``base_model`` (e.g. ``organism`` or ``smollm2``),
    which ``load_for_evaluation`` resolves on any machine; a resolved path would lose a GGUF file name.
    """
    model = module.model
    model.peft_config[model.active_adapter].base_model_name_or_path = module.hparams.base_model
    # Training never resizes the vocabulary, so the full embeddings need not be saved; saying so
    # also stops peft from looking the base name up on the Hub (offline: a DNS wait and a warning).
    model.save_pretrained(path, save_embedding_layers=False)
    module.tokenizer.save_pretrained(path)
    return path


def export_merged(module, path: str) -> str:
    """Write a plain Hugging Face model with ``module``'s adapters merged into a copy of the weights."""
    if module.hparams.quantization is not None:
        raise ArtifactError("cannot merge adapters into a quantized base; export the adapter instead")
    merged = copy.deepcopy(module.model).merge_and_unload()
    merged.save_pretrained(path)
    module.tokenizer.save_pretrained(path)
    return path


def read_checkpoint(path: str, map_location: str = "cpu") -> dict:
    """The contents of a ``fit`` checkpoint; ``ArtifactError`` naming the file if it is not one."""
    if not os.path.isfile(path):
        raise ArtifactError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, KeyError, RuntimeError, ValueError) as e:
        raise ArtifactError(f"{path} is not a checkpoint torch can read ({type(e).__name__}: {e})") from None
    if not isinstance(checkpoint, dict) or "lit_safety_class" not in checkpoint:
        raise ArtifactError(f"{path} is not a lit_safety checkpoint (no 'lit_safety_class' entry)")
    return checkpoint


def load_module(checkpoint_path: str, map_location: str = "cpu"):
    """Rebuild a trained ``SafetyModule`` (model built, adapters and calibration loaded) from a ``fit``
    checkpoint, whether it was written by the CLI or by a ``Trainer`` in Python."""
    checkpoint = read_checkpoint(checkpoint_path, map_location)
    module_name, _, class_name = checkpoint["lit_safety_class"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    hparams = dict(checkpoint["hyper_parameters"])
    from lit_safety.migrations import renamed_options

    old = renamed_options({"model": {"init_args": hparams}}, checkpoint_path)
    if old:
        raise ArtifactError(f"{old[0]} (a checkpoint of an earlier lit_safety: retrain, or pass its adapter "
                            "weights to a module built with the new options)")
    if hparams.pop("_instantiator", None) is not None:
        # Written by the CLI: the hyperparameters are the config (class paths and init args).
        from lightning.pytorch.cli import instantiate_module

        module = instantiate_module(cls, hparams)
    else:
        module = cls(**hparams)
    module.configure_model()
    missing = set(checkpoint["state_dict"]) - set(module.state_dict())
    if missing:
        raise ArtifactError(f"{checkpoint_path}: adapter keys do not match the model: {sorted(missing)[:3]} ...")
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    return module


def load_for_evaluation(spec: str):
    """Return ``(model, tokenizer)`` for ``spec``, in eval mode.

    ``spec``: a model name (``organism[:variant]``, a Hugging Face directory, a ``.gguf`` file, a hub
    id), a PEFT adapter directory (its base model is loaded and the adapter applied), or a ``.ckpt``
    file from ``fit`` (the method's model and adapters are rebuilt from it).
    """
    if spec.endswith(".ckpt"):
        module = load_module(spec)
        return module.model.eval(), module.tokenizer
    adapter_config = os.path.join(spec, "adapter_config.json")
    if os.path.isfile(adapter_config):
        from peft import PeftModel

        with open(adapter_config) as f:
            base_name = json.load(f)["base_model_name_or_path"]
        model = PeftModel.from_pretrained(backbone.load_causal_lm(base_name), spec)
        return model.eval(), backbone.load_tokenizer(spec)
    return backbone.load_causal_lm(spec).eval(), backbone.load_tokenizer(spec)
