"""Attacks: each maps behaviours (records with a ``target``) to the model's responses under attack.

Every attack is a small class whose init arguments are its whole budget, so a reported figure can
always name the budget behind it (``describe()``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from lit_safety.data.formatting import ChatFormatter
from lit_safety.data.records import Record
from lit_safety.evaluation.generation import generate


@dataclass
class DirectRequest:
    """The request as it is, no attack: the baseline every other attack is compared with.

    Args:
        max_new_tokens: length of the greedy response.
    """

    max_new_tokens: int = 24
    name = "direct"

    def describe(self) -> dict:
        return asdict(self)

    def run(self, model, formatter: ChatFormatter, records: Sequence[Record]) -> list[str]:
        return generate(model, formatter, records, max_new_tokens=self.max_new_tokens)


@dataclass
class PrefillAttack:
    """Prefilling: the response is forced to start with the behaviour's target (e.g. "Sure, here is"),
    and the model continues from there. Shallowly aligned models usually continue with the harm.

    Args:
        max_new_tokens: tokens generated after the prefill.
    """

    max_new_tokens: int = 24
    name = "prefill"

    def describe(self) -> dict:
        return asdict(self)

    def run(self, model, formatter: ChatFormatter, records: Sequence[Record]) -> list[str]:
        return generate(model, formatter, records, prefill=[r.target for r in records],
                        max_new_tokens=self.max_new_tokens)
