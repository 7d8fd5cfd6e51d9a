"""Named models and datasets: names such as ``organism:backdoor`` or ``smollm2:harmful_test`` that are
neither paths nor hub ids. A registry maps a name's prefix to a resolver returning a local path. The
built-in prefixes are imported on first use, so loading a hub model never imports the organism."""

from __future__ import annotations

import importlib
from collections.abc import Callable


class NamedRegistry(dict):
    """``prefix -> resolver``; ``builtins`` maps the built-in prefixes to ``"module:function"``."""

    def __init__(self, builtins: dict[str, str]):
        super().__init__()
        self.builtins = builtins

    def resolver(self, prefix: str) -> Callable | None:
        if prefix not in self and prefix in self.builtins:
            module, function = self.builtins[prefix].split(":")
            self[prefix] = getattr(importlib.import_module(module), function)
        return self.get(prefix)

    def prefixes(self) -> list[str]:
        return list(dict.fromkeys([*self.builtins, *self]))


# function(variant or None) -> a model directory or a .gguf file
MODEL_RESOLVERS = NamedRegistry({"organism": "lit_safety.organism:model_dir", "smollm2": "lit_safety.smollm2:model_path"})
# function(name) -> a data file
DATASET_RESOLVERS = NamedRegistry({"organism": "lit_safety.organism:dataset_path",
                                   "smollm2": "lit_safety.smollm2:dataset_path",
                                   "harmbench": "lit_safety.data.harmbench:dataset_path",
                                   "overrefusal": "lit_safety.data.overrefusal:dataset_path"})
