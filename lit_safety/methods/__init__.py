"""The methods: one ``SafetyModule`` subclass each."""

from lit_safety.methods.base import SafetyModule
from lit_safety.methods.circuit_breaker import CircuitBreakerModule
from lit_safety.methods.no_defense import NoDefense
from lit_safety.methods.refat import RefusalFeatureATModule
from lit_safety.methods.refusal_sft import RefusalSFTModule
from lit_safety.methods.targeted_lat import LATAdversary, TargetedLATModule
from lit_safety.methods.triplet import TripletDefenseModule

__all__ = ["CircuitBreakerModule", "LATAdversary", "NoDefense", "RefusalFeatureATModule", "RefusalSFTModule", "SafetyModule",
           "TargetedLATModule", "TripletDefenseModule"]
