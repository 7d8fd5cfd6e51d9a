"""Attacks, judges, metrics and the evaluation suite."""

from lit_safety.evaluation.attacks import (
    Attack,
    AttackResult,
    DirectRequest,
    LatentAttack,
    PrefillAttack,
    SampledResponses,
)
from lit_safety.evaluation.callbacks import AdversarialEvalCallback
from lit_safety.evaluation.judges import ExactJudge, HarmBenchJudge, RefusalPrefixJudge, make_judge
from lit_safety.evaluation.metrics import BudgetCurve, VerdictRates
from lit_safety.evaluation.model_attacks import HarmfulFineTuning, RefusalDirectionAblation
from lit_safety.evaluation.stats import wilson_interval
from lit_safety.evaluation.suffix_attacks import (
    EmbeddingAttack,
    EmbeddingPerturbationAttack,
    GCGAttack,
    GradientAttack,
    SuffixAttack,
)
from lit_safety.evaluation.suite import SafetyEvaluation

__all__ = [
    "AdversarialEvalCallback",
    "Attack",
    "AttackResult",
    "BudgetCurve",
    "DirectRequest",
    "EmbeddingAttack",
    "EmbeddingPerturbationAttack",
    "ExactJudge",
    "GCGAttack",
    "GradientAttack",
    "HarmfulFineTuning",
    "HarmBenchJudge",
    "LatentAttack",
    "PrefillAttack",
    "RefusalDirectionAblation",
    "RefusalPrefixJudge",
    "SampledResponses",
    "SafetyEvaluation",
    "SuffixAttack",
    "VerdictRates",
    "make_judge",
    "wilson_interval",
]
