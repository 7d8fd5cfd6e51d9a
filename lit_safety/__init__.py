"""lit_safety: PyTorch Lightning modules that make LLMs robust to jailbreaks by training on their
internal representations."""

from lit_safety.data import DataSource, SafetyDataModule, Stream
from lit_safety.methods import (
    CircuitBreakerModule,
    RefusalSFTModule,
    SafetyModule,
    TargetedLATModule,
    TripletDefenseModule,
    load_module,
)

__all__ = [
    "CircuitBreakerModule",
    "DataSource",
    "RefusalSFTModule",
    "SafetyDataModule",
    "SafetyModule",
    "Stream",
    "TargetedLATModule",
    "TripletDefenseModule",
    "load_module",
]
__version__ = "0.1.0"
