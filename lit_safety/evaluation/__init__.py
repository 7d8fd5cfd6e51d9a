"""Attacks, judges, metrics and the evaluation suite."""

from lit_safety.evaluation.attacks import Attack, AttackResult, DirectRequest, LatentAttack, PrefillAttack
from lit_safety.evaluation.callbacks import AdversarialEvalCallback
from lit_safety.evaluation.judges import ExactJudge, HarmBenchJudge, RefusalPrefixJudge, make_judge
from lit_safety.evaluation.metrics import VerdictRates
from lit_safety.evaluation.stats import wilson_interval
from lit_safety.evaluation.suffix_attacks import EmbeddingAttack, GCGAttack, SuffixAttack
from lit_safety.evaluation.suite import SafetyEvaluation

__all__ = [
    "AdversarialEvalCallback",
    "Attack",
    "AttackResult",
    "DirectRequest",
    "EmbeddingAttack",
    "ExactJudge",
    "GCGAttack",
    "HarmBenchJudge",
    "LatentAttack",
    "PrefillAttack",
    "RefusalPrefixJudge",
    "SafetyEvaluation",
    "SuffixAttack",
    "VerdictRates",
    "make_judge",
    "wilson_interval",
]
