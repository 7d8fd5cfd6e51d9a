"""Load a causal LM, wrap it with LoRA, and view the frozen reference through the same weights.

The trainable model M' and the frozen reference M are one ``PeftModel``: M' has its adapters on, M is
the same module with adapters disabled, under ``no_grad`` and with dropout off. No second copy of the
weights is ever made (at 8B scale memory is the binding constraint).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from lit_safety.named import MODEL_RESOLVERS

Quantization = Literal["4bit", "8bit"]
DType = Literal["auto", "float32", "bfloat16", "float16", "float64"]  # float64: numerical checks


class BackboneError(ValueError):
    """A model, tokenizer or layer specification that cannot be used."""


def register_model_resolver(prefix: str, resolver: Callable[[str | None], str]) -> None:
    """Make ``prefix`` and ``prefix:variant`` valid model names resolved by ``resolver``."""
    MODEL_RESOLVERS[prefix] = resolver


CARD_DATA = "lit_safety.json"  # what lit_safety needs to rebuild an adapter's model, beside peft's files


def adapter_base(name: str) -> str | None:
    """The base model of ``name`` when it is a PEFT adapter directory (a run's ``adapter/``), else None.

    lit_safety's own card names the base as it was given (``organism`` resolves on any machine); an
    adapter written by other tools names it in ``adapter_config.json``.
    """
    config = os.path.join(name, "adapter_config.json")
    if not os.path.isfile(config):
        return None
    card = os.path.join(name, CARD_DATA)
    with open(card if os.path.isfile(card) else config) as f:
        data = json.load(f)
    return data.get("base_model") or data["base_model_name_or_path"]


def resolve_model(name: str) -> tuple[str, dict]:
    """Turn a model name into ``(path_or_hub_id, extra from_pretrained kwargs)``.

    Accepted names: a registered name such as ``organism``, ``organism:backdoor`` or ``smollm2``; a
    local Hugging Face directory; a ``.gguf`` file (loaded through transformers' GGUF support); a hub id.
    A PEFT adapter directory resolves to itself: ``load_causal_lm`` merges it into its base.
    """
    prefix, _, variant = name.partition(":")
    resolver = MODEL_RESOLVERS.resolver(prefix)
    if resolver is not None and not os.path.exists(name):
        name = resolver(variant or None)
        if not name.endswith(".gguf"):
            return name, {}
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise BackboneError(f"GGUF file not found: {name}")
        return os.path.dirname(os.path.abspath(name)), {"gguf_file": os.path.basename(name)}
    if name.startswith((".", "/", "~")) and not os.path.exists(name):
        raise BackboneError(f"model directory not found: {name}")
    return name, {}


def model_identity(name: str) -> dict:
    """``name`` and, for a model this library built (the organism), the checksum of its weights: one
    recipe built on two machines can be two organisms, so a figure names the one it was measured on."""
    from lit_safety.cache import checksum, weights_checksum

    base = adapter_base(name)
    if base is not None:  # a model trained in stages is measured on the build under its first stage
        identity = model_identity(base)
        return {"name": name, "sha256": identity["sha256"], "base": identity}
    path, _ = resolve_model(name)
    built = os.path.isdir(path) and checksum(path) is not None
    return {"name": name, "sha256": weights_checksum(path) if built else None}


def num_decoder_layers(name: str) -> int | None:
    """The decoder layers of model ``name`` read from its config alone (no weights loaded); None when
    the config does not say (the layer count is then checked once the model is loaded)."""
    from transformers import AutoConfig

    try:
        while (base := adapter_base(name)) is not None:  # an adapter has its base's layers
            name = base
        path, kwargs = resolve_model(name)
        return int(AutoConfig.from_pretrained(path, **kwargs).num_hidden_layers)
    except Exception:  # noqa: BLE001 - any config that cannot be read defers the check to the loaded model
        return None


@functools.lru_cache(maxsize=None)
def bf16_speedup(device_type: str) -> float:
    """fp32 time over bf16 time of a 1024 x 1024 matmul on this device type (> 1: bf16 is faster).

    Measured, not read from CPU flags: a CPU may list AVX-512 BF16 and still run bf16 matmuls of
    model-sized blocks several times slower than fp32 (emulated, or not dispatched to those kernels).
    """
    if device_type == "cuda":
        return 2.0 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 0.0
    a = torch.randn(1024, 1024)

    def seconds(x: Tensor) -> float:
        x @ x  # warm-up
        start = time.perf_counter()
        for _ in range(3):
            x @ x
        return time.perf_counter() - start

    return seconds(a) / seconds(a.bfloat16())


def load_tokenizer(name: str):
    """Load the tokenizer of model ``name`` (see ``resolve_model``), with a pad token; an adapter
    directory saved without one uses its base's."""
    from transformers import AutoTokenizer

    base = adapter_base(name)
    if base is not None and not os.path.isfile(os.path.join(name, "tokenizer_config.json")):
        return load_tokenizer(base)
    path, kwargs = resolve_model(name)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if tokenizer.pad_token is None:
        # Padding positions are always masked out, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name: str, dtype: DType = "float32", quantization: Quantization | None = None):
    """Load a causal LM, optionally with a 4-bit (NF4) or 8-bit bitsandbytes base (QLoRA).

    A PEFT adapter directory (a previous run's ``adapter/``) loads as its base with the adapter merged
    in, so one method can train on top of another's result; chains of such stages follow to the first.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = adapter_base(name)
    if base is not None:
        if quantization is not None:
            raise BackboneError(f"{name}: an adapter directory as the model cannot be quantized (its weights "
                                "are merged into the base first); export the merged model and quantize that")
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(load_causal_lm(base, dtype), name).merge_and_unload()
        except BackboneError as e:
            raise BackboneError(f"{name}: the base of this adapter: {e}") from None
        model.requires_grad_(False)
        return model
    path, kwargs = resolve_model(name)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    if quantization == "4bit":
        compute = torch.float32 if dtype in ("auto", "float32") else torch_dtype
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    elif quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif quantization is not None:
        raise BackboneError(f"quantization must be '4bit', '8bit' or None, got {quantization!r}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
    model.requires_grad_(False)
    return model


def add_lora(
    model,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
    layers: Sequence[int] | None = None,
):
    """Wrap ``model`` with fresh LoRA adapters; only they are trainable afterwards.

    Args:
        rank: LoRA rank r.
        alpha: LoRA scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapter input.
        target_modules: module names to adapt, or "all-linear".
        layers: decoder layer indices to adapt (negative allowed); None adapts every layer.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    layers_to_transform = None
    if layers is not None:
        stack = decoder_layers(model)
        layers_to_transform = resolve_layers(layers, len(stack))
        if target_modules == "all-linear":  # peft needs explicit names to restrict layers
            target_modules = sorted({name.split(".")[-1] for name, module in stack[0].named_modules()
                                     if isinstance(module, nn.Linear) or "Linear" in type(module).__name__})
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        layers_to_transform=layers_to_transform,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream (read without touching weights, which may be shards)."""
    return model.get_input_embeddings().embedding_dim


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder stack of a causal LM (``model.layers`` in Llama, Mistral, Qwen2, Gemma, ...).

    Looks through PEFT wrappers; raises ``BackboneError`` for models without such a stack.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    expected = getattr(getattr(base, "config", None), "num_hidden_layers", None)
    for name, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks"):
            if expected is None or len(module) == expected:
                return module
    raise BackboneError(
        f"{type(base).__name__} has no decoder layer list (looked for a ModuleList named 'layers', 'h' "
        f"or 'blocks' with config.num_hidden_layers={expected} entries)"
    )


def resolve_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """Map decoder-layer indices to non-negative ones.

    Layer convention of the whole library: index i names the output of decoder layer i, i.e. the
    residual stream that Hugging Face reports as ``hidden_states[i + 1]`` (``hidden_states[0]`` is the
    embedding output). Negative indices count from the end (-1 is the last decoder layer).
    """
    resolved = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise BackboneError(f"layer indices must be integers, got {layer!r}")
        if not -num_layers <= layer < num_layers:
            raise BackboneError(
                f"layer {layer} is out of range: the model has {num_layers} decoder layers "
                f"(valid indices {-num_layers}..{num_layers - 1})"
            )
        resolved.append(layer % num_layers)
    return resolved


@contextlib.contextmanager
def reference(model) -> Iterator[None]:
    """Run ``model`` as the frozen reference: adapters off, no gradient, dropout off.

    Restores the training mode of every submodule on exit.
    """
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), model.disable_adapter():
            yield
    finally:
        for m, training in was_training.items():
            m.training = training
