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


CARD_DATA = backbone.CARD_DATA


def _base_for_peft(name: str) -> str:
    """What ``adapter_config.json`` names as the base: a local Hugging Face directory as an absolute
    path (plain peft loads it offline), anything else (a hub id, a GGUF file's name) as given."""
    path, kwargs = backbone.resolve_model(name)
    return os.path.abspath(path) if os.path.isdir(path) and not kwargs else name


def export_adapter(module, path: str, training: dict | None = None, state: dict | None = None) -> str:
    """Write ``module``'s adapters as a PEFT adapter directory with the tokenizer and a model card.

    ``adapter_config.json`` names a local base by its absolute path, so
    ``AutoPeftModelForCausalLM.from_pretrained(path)`` loads it offline; ``lit_safety.json`` keeps the
    base's lit_safety name (``organism``, ``smollm2``, ...), which ``load_for_evaluation`` resolves on
    any machine. ``training``: what the card reports of the run (steps, data sources). ``state``: the
    full adapter weights by parameter name, when the model's own are shards (``sharding``).
    """
    model, name = module.model, module.hparams.base_model
    model.peft_config[model.active_adapter].base_model_name_or_path = _base_for_peft(name)
    # Training never resizes the vocabulary, so the full embeddings need not be saved; saying so
    # also stops peft from looking the base name up on the Hub (offline: a DNS wait and a warning).
    if state is None:
        model.save_pretrained(path, save_embedding_layers=False)
    else:
        _save_gathered_adapter(model, path, state)
    module.tokenizer.save_pretrained(path)
    card = {"base_model": name, "method": f"{type(module).__module__}.{type(module).__qualname__}",
            "settings": _plain(dict(module.hparams)), "training": training or {}}
    with open(os.path.join(path, CARD_DATA), "w") as f:
        json.dump(card, f, indent=1)
    write_model_card(path)
    return path


def _save_gathered_adapter(model, path: str, state: dict) -> None:
    """peft's adapter files from gathered weights. peft's own save finds adapter weights by module
    path, which a sharding wrapper changes; the file format is the weights keyed by parameter name
    without the adapter's name, and the adapter's config."""
    from safetensors.torch import save_file

    adapter = model.active_adapter
    os.makedirs(path, exist_ok=True)
    save_file({name.replace(f".{adapter}.", "."): tensor.contiguous() for name, tensor in state.items()},
              os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    model.peft_config[adapter].save_pretrained(path)


def _plain(value):
    """A JSON-able view of hyperparameters (components and dataclasses as their repr)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def write_model_card(path: str, evaluation: dict | None = None) -> None:
    """The adapter directory's README.md in the Hugging Face model-card format, from its
    ``lit_safety.json``; ``evaluation`` (a ``SafetyEvaluation`` result) is added to the card data."""
    with open(os.path.join(path, CARD_DATA)) as f:
        card = json.load(f)
    if evaluation is not None:
        card["evaluation"] = {k: evaluation[k] for k in ("asr", "benign_accuracy", "over_refusal", "budgets", "judge")
                              if k in evaluation}
        with open(os.path.join(path, CARD_DATA), "w") as f:
            json.dump(card, f, indent=1)
    method = card["method"].rsplit(".", 1)[-1]
    lines = ["---", f"base_model: {card['base_model']}", "library_name: peft", "tags:", "- lit_safety",
             f"- {method}", "---", "", f"# {method} adapter for {card['base_model']}", "",
             f"LoRA adapters trained with lit_safety's `{card['method']}`. Load them with",
             "`lit_safety.load_for_evaluation(\"<this directory>\")`; for a base in a local directory, plain",
             "`peft.AutoPeftModelForCausalLM.from_pretrained(\"<this directory>\")` works too.", "",
             "## Training", ""]
    lines += [f"- {key}: {value}" for key, value in card["training"].items()]
    lines += ["", "## Settings", "", "```json", json.dumps(card["settings"], indent=1), "```", ""]
    if "evaluation" in card:
        ev = card["evaluation"]
        lines += ["## Evaluation", "", f"Judge: {ev.get('judge')}. Attack success rate per attack and split "
                  "(the budgets below):", "", "| attack | " + " | ".join(next(iter(ev["asr"].values()), {})) + " |",
                  "|---" * (1 + len(next(iter(ev["asr"].values()), {}))) + "|"]
        lines += [f"| {attack} | " + " | ".join(f"{c['rate']:.2f}" for c in splits.values()) + " |"
                  for attack, splits in ev["asr"].items()]
        lines += ["", f"Benign accuracy: {json.dumps(ev.get('benign_accuracy'))}; over-refusal: "
                  f"{json.dumps(ev.get('over_refusal'))}.", "", "Budgets:", "", "```json",
                  json.dumps(ev.get("budgets"), indent=1), "```", ""]
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write("\n".join(lines))


def export_merged(module, path: str) -> str:
    """Write a plain Hugging Face model with ``module``'s adapters merged into a copy of the weights."""
    if module.hparams.quantization is not None:
        raise ArtifactError("cannot merge adapters into a quantized base; export the adapter instead")
    merged = copy.deepcopy(module.model).merge_and_unload()
    merged.save_pretrained(path)
    module.tokenizer.save_pretrained(path)
    return path


SHARDED_METADATA = "meta.pt"  # beside the shards of a sharded (FSDP2) checkpoint directory


def _read_sharded(path: str) -> dict:
    """A sharded checkpoint directory as one checkpoint: the metadata file and the gathered weights."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    checkpoint = torch.load(os.path.join(path, SHARDED_METADATA), map_location="cpu", weights_only=False)
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, os.path.join(tmp, "full.pt"))
        checkpoint.update(torch.load(os.path.join(tmp, "full.pt"), map_location="cpu", weights_only=False))
    return checkpoint


def read_checkpoint(path: str, map_location: str = "cpu") -> dict:
    """The contents of a ``fit`` checkpoint (a file, or a sharded checkpoint's directory);
    ``ArtifactError`` naming the path if it is not one."""
    sharded = os.path.isfile(os.path.join(path, SHARDED_METADATA))
    if not os.path.isfile(path) and not sharded:
        raise ArtifactError(f"checkpoint not found: {path}")
    try:
        checkpoint = _read_sharded(path) if sharded else torch.load(path, map_location=map_location, weights_only=False)
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

    old = renamed_options({"model": {"init_args": hparams}}, checkpoint_path, checkpoint["lit_safety_class"])
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


def base_model_name(spec: str) -> str:
    """The model ``spec`` (as ``load_for_evaluation`` takes it) is built on: a checkpoint's or an
    adapter's base model, else ``spec`` itself."""
    if spec.endswith(".ckpt"):
        return read_checkpoint(spec)["hyper_parameters"]["base_model"]
    return backbone.adapter_base(spec) or spec


def load_for_evaluation(spec: str):
    """Return ``(model, tokenizer)`` for ``spec``, in eval mode.

    ``spec``: a model name (``organism[:variant]``, a Hugging Face directory, a ``.gguf`` file, a hub
    id), a PEFT adapter directory (its base model is loaded and the adapter applied), or a ``.ckpt``
    file from ``fit`` (the method's model and adapters are rebuilt from it).
    """
    if spec.endswith(".ckpt"):
        module = load_module(spec)
        return module.model.eval(), module.tokenizer
    if os.path.isfile(os.path.join(spec, "adapter_config.json")):
        from peft import PeftModel

        model = PeftModel.from_pretrained(backbone.load_causal_lm(base_model_name(spec)), spec)
        return model.eval(), backbone.load_tokenizer(spec)
    return backbone.load_causal_lm(spec).eval(), backbone.load_tokenizer(spec)
