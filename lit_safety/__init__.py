"""lit_safety: PyTorch Lightning modules that make LLMs robust to jailbreaks by training on their
internal representations."""

from lit_safety.data import DataSource, SafetyDataModule, Stream
from lit_safety.methods import (
    RefusalSFTModule,
    SafetyModule,
    TargetedLATModule,
    TripletDefenseModule,
    load_module,
)

__all__ = [
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
