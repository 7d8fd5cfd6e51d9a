"""Load any model the evaluation can be pointed at: a model name, a PEFT adapter directory, or a
checkpoint written by ``fit``."""

from __future__ import annotations

import json
import os

from lit_safety import backbone


def load_for_evaluation(spec: str):
    """Return ``(model, tokenizer)`` for ``spec``, in eval mode.

    ``spec``: a model name (``organism[:variant]``, a Hugging Face directory, a ``.gguf`` file, a hub
    id), a PEFT adapter directory (its base model is loaded and the adapter applied), or a ``.ckpt``
    file from ``fit`` (the method's model and adapters are rebuilt from it).
    """
    if spec.endswith(".ckpt"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"checkpoint not found: {spec}")
        from lit_safety.methods.base import load_module

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
