"""Attacks: each maps behaviours (records with a ``target``) to the model's responses under attack.

Every attack is a small class whose init arguments are its whole budget, so a reported figure can
always name the budget behind it (``describe()``). ``run(model, formatter, records, judge)`` returns
an ``AttackResult``: one response per behaviour (attacks that take several snapshots return a
successful one if any snapshot succeeded under ``judge``: a behaviour is broken if any snapshot breaks
it) and, for gradient attacks, the mean target loss at their first and last step.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lit_safety.adversaries import LatentAdversary, LatentBudget, site_norms
from lit_safety.data.formatting import ChatFormatter
from lit_safety.data.records import Record
from lit_safety.evaluation.generation import generate, greedy_from_embeddings, positions
from lit_safety.evaluation.suffix import Layout, layout, split_prompt
from lit_safety.losses import token_logprobs


def _target_nll(model, embeddings: Tensor, lay: Layout, with_match: bool = False):
    """Mean NLL of each row's target tokens, shape [B]; with ``with_match`` also whether every target
    token is the greedy (argmax) prediction, shape [B]."""
    mask = lay.attention_mask.long()
    logits = model(inputs_embeds=embeddings, attention_mask=mask, position_ids=positions(mask)).logits
    target = lay.target_mask[:, 1:]
    nll = -(token_logprobs(logits, lay.ids) * target).sum(-1) / target.sum(-1).clamp_min(1)
    if not with_match:
        return nll
    hits = (logits[:, :-1].argmax(-1) == lay.ids[:, 1:]) | ~target
    return nll, hits.all(-1)


def _decode(formatter: ChatFormatter, tokens: Tensor) -> list[str]:
    return [formatter.tokenizer.decode(row, skip_special_tokens=True).strip() for row in tokens]


def _chunks(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def _progress(total: int, name: str):
    return tqdm(total=total, desc=f"attack: {name}", leave=False, disable=os.environ.get("LIT_SAFETY_QUIET") == "1")


@contextlib.contextmanager
def _attacking(model, total: int, name: str):
    """Eval mode (no dropout) and a progress bar for the attack; the model's mode is restored."""
    was_training = model.training
    model.eval()
    bar = _progress(total, name)
    try:
        yield bar
    finally:
        bar.close()
        model.train(was_training)


def _suffix_init(tokenizer, init: str, length: int) -> list[int]:
    """Token ids of ``init``, repeated or cut to ``length`` (an unknown token if it has none)."""
    ids = tokenizer(" " + init, add_special_tokens=False)["input_ids"] or [tokenizer.unk_token_id]
    return (ids * length)[:length]


def _snapshot_steps(steps: int, snapshots: int) -> set[int]:
    """The (1-based) steps after which a snapshot is judged, evenly spaced, always including the last."""
    snapshots = max(1, min(snapshots, steps))
    return {round(steps * (k + 1) / snapshots) for k in range(snapshots)}


@dataclass
class AttackResult:
    """What an attack returns: one response per behaviour and, for gradient attacks, the mean target
    loss of the behaviours still attacked at the first and at the last step."""

    responses: list[str]
    loss_first: float | None = None
    loss_last: float | None = None


class Attack:
    """Base of every attack: ``name`` keys its results, ``describe()`` is its budget."""

    name = "attack"

    def describe(self) -> dict:
        return asdict(self)

    def run(self, model, formatter: ChatFormatter, records: Sequence[Record], judge=None) -> AttackResult:
        raise NotImplementedError


class _SnapshotBook:
    """Keeps, per behaviour, the first successful snapshot response (else the latest one)."""

    def __init__(self, records: Sequence[Record], judge):
        self.records, self.judge = records, judge
        self.responses: list[str | None] = [None] * len(records)
        self.broken = torch.zeros(len(records), dtype=torch.bool)

    def add(self, rows: Sequence[int], responses: Sequence[str]) -> None:
        for row, response in zip(rows, responses):
            if self.broken[row]:
                continue
            self.responses[row] = response
            if self.judge is not None and self.judge(self.records[row], response) == "success":
                self.broken[row] = True


@dataclass
class DirectRequest(Attack):
    """The request as it is, no attack: the baseline every other attack is compared with, and how the
    suite asks benign and borderline requests.

    Args:
        max_new_tokens: length of the greedy response.
    """

    max_new_tokens: int = 24
    name = "direct"

    def run(self, model, formatter: ChatFormatter, records: Sequence[Record], judge=None) -> AttackResult:
        return AttackResult(generate(model, formatter, records, max_new_tokens=self.max_new_tokens))


@dataclass
class PrefillAttack(Attack):
    """Prefilling: the response is forced to start with the behaviour's target (e.g. "Sure, here is"),
    and the model continues from there. Shallowly aligned models usually continue with the harm.

    Args:
        max_new_tokens: tokens generated after the prefill.
    """

    max_new_tokens: int = 24
    name = "prefill"

    def run(self, model, formatter: ChatFormatter, records: Sequence[Record], judge=None) -> AttackResult:
        return AttackResult(generate(model, formatter, records, prefill=[r.target for r in records],
                                     max_new_tokens=self.max_new_tokens))


@dataclass
class LatentAttack(Attack, LatentBudget):
    """Latent-space attack: targeted LAT's adversary used at evaluation time. A per-token L2-bounded
    perturbation at the prompt positions of chosen sites is optimised on the target's NLL, then the
    model answers with the perturbation in place. Its budget is ``LatentBudget``'s (the norms of
    ``reference_norm`` are the attacked model's own).

    Args:
        target_field: record field the attack optimises toward ("target" or "answer").
        max_new_tokens: tokens generated after the attack.
        batch_size: behaviours attacked together.
        (the budget: ``lit_safety.adversaries.LatentBudget``)
    """

    target_field: Literal["target", "answer"] = "target"
    max_new_tokens: int = 24
    batch_size: int = 50
    name = "latent"

    def run(self, model, formatter: ChatFormatter, records: Sequence[Record], judge=None) -> AttackResult:
        embed = model.get_input_embeddings()
        responses: list[str] = []
        first = last = None
        with _attacking(model, len(records), self.name) as bar:
            for _, chunk in _chunks(records, self.batch_size):
                parts = [split_prompt(formatter, r, getattr(r, self.target_field) or "") for r in chunk]
                lay = layout(parts, [[]] * len(chunk), formatter.tokenizer.pad_token_id)
                prompt_mask = lay.attention_mask & ~lay.target_mask
                norms = site_norms(model, self.layers, lay.prompt_ids, lay.prompt_attention, lay.prompt_attention)
                adversary = LatentAdversary(model, self.layers, prompt_mask, self.radii(norms))
                embeddings = embed(lay.ids).detach()
                with adversary.attached():
                    losses = adversary.optimise(lambda: _target_nll(model, embeddings, lay).mean(), self.steps, self.lr)
                    first = losses[0] if first is None and losses else first
                    last = _target_nll(model, embeddings, lay).mean().item()
                adversary.freeze()
                with torch.no_grad():
                    tokens = greedy_from_embeddings(model, embeddings[:, : lay.prompt_width], lay.prompt_attention,
                                                    self.max_new_tokens, formatter.tokenizer.eos_token_id,
                                                    prompt_context=adversary.attached())
                responses += _decode(formatter, tokens)
                bar.update(len(chunk))
        return AttackResult(responses, first, last)
