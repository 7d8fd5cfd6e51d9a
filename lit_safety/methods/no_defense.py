"""``NoDefense``: the base model as it is (fresh adapters change nothing), for evaluating it with the
same ``test`` command and suite as every trained method (``configs/evaluate.yaml``)."""

from __future__ import annotations

from lit_safety.methods.base import SafetyModule


class NoDefense(SafetyModule):
    """The undefended base model: nothing to train, everything to evaluate.

    Args:
        **kwargs: model settings of ``SafetyModule``.
    """

    def compute_losses(self, batch):
        raise RuntimeError("NoDefense trains nothing: use it with `test` (configs/evaluate.yaml), or pick a method to fit")
