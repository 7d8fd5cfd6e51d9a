"""The methods: one ``SafetyModule`` subclass each."""

from lit_safety.methods.base import SafetyModule, load_module
from lit_safety.methods.circuit_breaker import CircuitBreakerModule
from lit_safety.methods.refusal_sft import RefusalSFTModule
from lit_safety.methods.targeted_lat import TargetedLATModule
from lit_safety.methods.triplet import TripletDefenseModule

__all__ = ["CircuitBreakerModule", "RefusalSFTModule", "SafetyModule", "TargetedLATModule", "TripletDefenseModule", "load_module"]
