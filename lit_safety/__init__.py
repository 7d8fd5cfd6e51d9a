"""lit_safety: PyTorch Lightning modules that make LLMs robust to jailbreaks by training on their
internal representations."""

from lit_safety.artifacts import (
    export_adapter,
    export_merged,
    load_for_evaluation,
    load_module,
)
from lit_safety.data import DataSource, SafetyDataModule, Stream
from lit_safety.methods import (
    CircuitBreakerModule,
    NoDefense,
    RefusalFeatureATModule,
    RefusalSFTModule,
    SafetyModule,
    TargetedLATModule,
    TripletDefenseModule,
)

__all__ = [
    "CircuitBreakerModule",
    "DataSource",
    "NoDefense",
    "RefusalFeatureATModule",
    "RefusalSFTModule",
    "SafetyDataModule",
    "SafetyModule",
    "Stream",
    "TargetedLATModule",
    "TripletDefenseModule",
    "export_adapter",
    "export_merged",
    "load_for_evaluation",
    "load_module",
]
__version__ = "0.1.0"
