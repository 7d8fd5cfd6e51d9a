"""Attacks, judges, metrics and the evaluation suite."""

from lit_safety.evaluation.attacks import (
    Attack,
    DirectRequest,
    EmbeddingAttack,
    GCGAttack,
    LatentAttack,
    PrefillAttack,
)
from lit_safety.evaluation.callbacks import AdversarialEvalCallback
from lit_safety.evaluation.judges import ExactJudge, HarmBenchJudge, RefusalPrefixJudge, make_judge
from lit_safety.evaluation.metrics import VerdictRates
from lit_safety.evaluation.stats import wilson_interval
from lit_safety.evaluation.suite import SafetyEvaluation

__all__ = [
    "AdversarialEvalCallback",
    "Attack",
    "DirectRequest",
    "EmbeddingAttack",
    "ExactJudge",
    "GCGAttack",
    "HarmBenchJudge",
    "LatentAttack",
    "PrefillAttack",
    "RefusalPrefixJudge",
    "SafetyEvaluation",
    "VerdictRates",
    "make_judge",
    "wilson_interval",
]
