"""The built-in model organism: a tiny synthetic LLM world where jailbreaks and defenses are measurable
on a CPU. To the rest of the library it is a model directory and JSONL datasets, nothing more."""

from __future__ import annotations

import os

from lit_safety.organism.builder import (
    EVAL_SPLITS,
    RECIPES,
    VARIANTS,
    Recipe,
    build,
    ensure_data,
    pin,
)


def model_dir(variant: str | None = None) -> str:
    """Resolve ``organism[:variant]`` (default ``aligned``) to its cached model directory."""
    return build(variant or "aligned")


def dataset_path(name: str) -> str:
    """Resolve ``organism:<name>`` (harmful, benign, borderline, eval_<split>, ...) to a JSONL file."""
    path = os.path.join(ensure_data(), f"{name}.jsonl")
    if not os.path.isfile(path):
        names = sorted(f[: -len(".jsonl")] for f in os.listdir(os.path.dirname(path)) if f.endswith(".jsonl"))
        raise FileNotFoundError(f"the organism has no dataset {name!r}; available: {', '.join(names)}")
    return path


__all__ = ["EVAL_SPLITS", "RECIPES", "VARIANTS", "Recipe", "build", "dataset_path", "ensure_data", "model_dir", "pin"]
