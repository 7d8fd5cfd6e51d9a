"""The methods: one ``SafetyModule`` subclass each."""

from lit_safety.methods.base import SafetyModule, load_module
from lit_safety.methods.refusal_sft import RefusalSFTModule

__all__ = ["RefusalSFTModule", "SafetyModule", "load_module"]
