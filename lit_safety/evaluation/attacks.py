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

from lit_safety.adversaries import LatentAdversary, LatentBudget, check_sites, site_norms
from lit_safety.data.formatting import ChatFormatter
from lit_safety.data.records import Record
from lit_safety.evaluation.generation import generate, greedy_from_embeddings, positions
from lit_safety.evaluation.suffix import Layout, layout, split_prompt
from lit_safety.losses import token_logprobs


def target_scores(logits: Tensor, ids: Tensor, target_mask: Tensor, with_match: bool = False):
    """Mean NLL of each row's target tokens (``target_mask`` marks them in ``ids``), shape [B]; with
    ``with_match`` also whether every target token is the greedy (argmax) prediction, shape [B]."""
    target = target_mask[:, 1:]
    nll = -(token_logprobs(logits, ids) * target).sum(-1) / target.sum(-1).clamp_min(1)
    if not with_match:
        return nll
    hits = (logits[:, :-1].argmax(-1) == ids[:, 1:]) | ~target
    return nll, hits.all(-1)


def target_nll(model, embeddings: Tensor, lay: Layout, with_match: bool = False):
    """``target_scores`` of the model on a suffix-attack layout given its input embeddings."""
    mask = lay.attention_mask.long()
    logits = model(inputs_embeds=embeddings, attention_mask=mask, position_ids=positions(mask)).logits
    return target_scores(logits, lay.ids, lay.target_mask, with_match)


TargetField = Literal["answer", "target"]
TARGET_FIELDS = ("answer", "target")


def objective(record: Record, target_field: str) -> str:
    """The string a gradient attack optimises toward. "answer": what the judge counts as harm done,
    the record's ground-truth ``answer``, else its harmful ``completion``, else its ``target``;
    "target": the attack target string alone (e.g. "Sure, here is")."""
    if target_field == "answer":
        return record.answer or record.completion or record.target or ""
    return record.target or ""


def decode(formatter: ChatFormatter, tokens: Tensor) -> list[str]:
    return [formatter.tokenizer.decode(row, skip_special_tokens=True).strip() for row in tokens]


def chunks(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def _progress(total: int, name: str):
    return tqdm(total=total, desc=f"attack: {name}", leave=False, disable=os.environ.get("LIT_SAFETY_QUIET") == "1")


@contextlib.contextmanager
def attacking(model, total: int, name: str):
    """Eval mode (no dropout) and a progress bar for the attack; the model's mode is restored."""
    was_training = model.training
    model.eval()
    bar = _progress(total, name)
    try:
        yield bar
    finally:
        bar.close()
        model.train(was_training)


def token_ids(tokenizer, text: str, length: int) -> list[int]:
    """Token ids of ``text``, repeated or cut to ``length`` (an unknown token if it has none)."""
    ids = tokenizer(" " + text, add_special_tokens=False)["input_ids"] or [tokenizer.unk_token_id]
    return (ids * length)[:length]


# The budgets (steps, or training steps) at which every curve is read, where an attack reaches them.
CURVE_BUDGETS = (10, 30, 100, 300, 1000, 3000)


def snapshot_steps(steps: int, snapshots: int) -> set[int]:
    """The (1-based) steps after which a snapshot is judged: ``snapshots`` evenly spaced (always
    including the last) plus every curve budget within ``steps``, so curves are exact at those."""
    snapshots = max(1, min(snapshots, steps))
    return {round(steps * (k + 1) / snapshots) for k in range(snapshots)} | {b for b in CURVE_BUDGETS if b <= steps}


def require(condition: bool, attack: str, field: str, message: str) -> None:
    """A budget check: one line naming the attack and the field."""
    if not condition:
        raise ValueError(f"{attack}.{field}: {message}")


def check_schedule(attack: str, steps: int, snapshots: int, target_field: str, batch_size: int) -> None:
    """The checks every stepped attack with judged snapshots shares."""
    require(steps >= 1, attack, "steps", f"must be >= 1, got {steps}")
    require(1 <= snapshots <= steps, attack, "snapshots", f"{snapshots} is not in 1..steps ({steps})")
    require(target_field in TARGET_FIELDS, attack, "target_field",
            f"{target_field!r} is not one of {', '.join(TARGET_FIELDS)}")
    require(batch_size >= 1, attack, "batch_size", f"must be >= 1, got {batch_size}")


@dataclass
class AttackResult:
    """What an attack returns: one response per behaviour; for gradient attacks the mean target loss
    of the behaviours still attacked at the first and at the last step; for attacks with a budget
    axis (``Attack.curve_budgets``), the budget at which each behaviour was first judged broken
    (None: never); for attacks that write text into the prompt (GCG), per behaviour the text of the
    kept response's prompt: the suffix, which follows the request after a space and can be replayed
    or transferred."""

    responses: list[str]
    loss_first: float | None = None
    loss_last: float | None = None
    broken_at: list[int | None] | None = None
    prompts: list[str | None] | None = None

    def broken_within(self, budgets: Sequence[int]) -> list[int]:
        """Per budget, the behaviours broken within it."""
        at = self.broken_at or []
        return [sum(b is not None and b <= budget for b in at) for budget in budgets]


class Attack:
    """Base of every attack: ``name`` keys its results (every attack takes one, defaulting to its own:
    a suite running one attack twice, e.g. at two suffix lengths, names them apart), ``describe()`` is
    its budget;
    ``needs_adapters``: it trains the model's LoRA weights (the others may get a merged copy);
    ``tampers``: it changes the weights, a threat model (an attacker holding the weights) beyond the
    inference-time attacks a jailbreak defense claims robustness to."""

    name = "attack"
    needs_adapters = False
    tampers = False

    def describe(self) -> dict:
        return asdict(self)

    def check(self, num_layers: int) -> None:
        """Check settings that depend on the model (its decoder layers) before any attack runs."""

    def curve_budgets(self) -> list[int]:
        """The budgets its robustness curve is read at (none for attacks without a budget axis)."""
        return []

    def run(self, model, formatter: ChatFormatter, records: Sequence[Record], judge=None) -> AttackResult:
        raise NotImplementedError


class SnapshotBook:
    """Keeps, per behaviour, the first successful snapshot response (else the latest one), the
    budget at which it was found and, for attacks that write text, the prompt text it answered."""

    def __init__(self, records: Sequence[Record], judge):
        self.records, self.judge = records, judge
        self.responses: list[str | None] = [None] * len(records)
        self.prompts: list[str | None] = [None] * len(records)
        self.broken = torch.zeros(len(records), dtype=torch.bool)
        self.broken_at: list[int | None] = [None] * len(records)

    def add(self, rows: Sequence[int], responses: Sequence[str], budget: int | None = None,
            prompts: Sequence[str] | None = None) -> None:
        for i, (row, response) in enumerate(zip(rows, responses)):
            if self.broken[row]:
                continue
            self.responses[row] = response
            if prompts is not None:
                self.prompts[row] = prompts[i]
            if self.judge is not None and self.judge(self.records[row], response) == "success":
                self.broken[row] = True
                self.broken_at[row] = budget


@dataclass
class DirectRequest(Attack):
    """The request as it is, no attack: the baseline every other attack is compared with, and how the
    suite asks benign and borderline requests.

    Args:
        max_new_tokens: length of the greedy response.
    """

    max_new_tokens: int = 24
    name: str = "direct"

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
    name: str = "prefill"

    def run(self, model, formatter: ChatFormatter, records: Sequence[Record], judge=None) -> AttackResult:
        return AttackResult(generate(model, formatter, records, prefill=[r.target for r in records],
                                     max_new_tokens=self.max_new_tokens))


@dataclass
class SampledResponses(Attack):
    """Sampling: ``k`` responses to the plain request at ``temperature``; a behaviour is broken if
    any sample is judged a success (a shallow refusal is often only the most likely answer).

    Args:
        k: samples per behaviour.
        temperature: sampling temperature.
        max_new_tokens: length of each sample.
        seed: seed of the sampling (the global random state is left as it was).
    """

    k: int = 16
    temperature: float = 1.0
    max_new_tokens: int = 24
    seed: int = 0
    name: str = "sampled"

    def __post_init__(self) -> None:
        require(self.k >= 1, "SampledResponses", "k", f"must be >= 1, got {self.k}")
        require(self.temperature > 0, "SampledResponses", "temperature", f"must be > 0, got {self.temperature}")

    def run(self, model, formatter: ChatFormatter, records: Sequence[Record], judge=None) -> AttackResult:
        book = SnapshotBook(records, judge)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for sample in range(1, self.k + 1):
                rows = [i for i in range(len(records)) if not book.broken[i]]
                if not rows:
                    break
                responses = generate(model, formatter, [records[i] for i in rows], max_new_tokens=self.max_new_tokens,
                                     temperature=self.temperature)
                book.add(rows, responses, sample)
        return AttackResult(book.responses, broken_at=book.broken_at)

    def curve_budgets(self) -> list[int]:
        return [b for b in (1, 4, 16, 64, 256) if b < self.k] + [self.k]


@dataclass
class LatentAttack(Attack, LatentBudget):
    """Latent-space attack: targeted LAT's adversary used at evaluation time. A per-token L2-bounded
    perturbation at the prompt positions of chosen sites is optimised by Adam on the objective's NLL;
    at ``snapshots`` evenly spaced steps (and every curve budget) the model answers with the
    perturbation in place and unbroken behaviours are judged. Its budget is ``LatentBudget``'s (the
    norms of ``reference_norm`` are the attacked model's own).

    Args:
        target_field: what the attack optimises toward: "answer" (what the judge counts: the
            record's answer, else its harmful completion, else its target) or "target".
        snapshots: judged snapshots (the last step is always one).
        max_new_tokens: tokens generated at each snapshot.
        batch_size: behaviours attacked together.
        (the budget: ``lit_safety.adversaries.LatentBudget``)
    """

    target_field: TargetField = "answer"
    snapshots: int = 1
    max_new_tokens: int = 24
    batch_size: int = 50
    name: str = "latent"

    def __post_init__(self) -> None:
        LatentBudget.__post_init__(self)
        check_schedule(type(self).__name__, self.steps, self.snapshots, self.target_field, self.batch_size)

    def run(self, model, formatter: ChatFormatter, records: Sequence[Record], judge=None) -> AttackResult:
        book = SnapshotBook(records, judge)
        checkpoints = snapshot_steps(self.steps, self.snapshots)
        embed = model.get_input_embeddings()
        first = last = None
        with attacking(model, len(records), self.name) as bar:
            for start, chunk in chunks(records, self.batch_size):
                rows = list(range(start, start + len(chunk)))
                parts = [split_prompt(formatter, r, objective(r, self.target_field)) for r in chunk]
                lay = layout(parts, [[]] * len(chunk), formatter.tokenizer.pad_token_id)
                prompt_mask = lay.attention_mask & ~lay.target_mask
                norms = site_norms(model, self.layers, lay.prompt_ids, lay.prompt_attention, lay.prompt_attention)
                adversary = LatentAdversary(model, self.layers, prompt_mask, self.radii(norms))
                embeddings = embed(lay.ids).detach()
                means: list[float] = []

                def loss_fn():
                    active = ~book.broken[rows]
                    with adversary.attached():
                        loss = target_nll(model, embeddings, lay)[active]
                    means.append(loss.mean().item())
                    return loss.sum()

                def stop(k: int) -> bool:
                    if k in checkpoints:
                        self._snapshot(model, formatter, adversary, embeddings, lay, rows, ~book.broken[rows], book, k)
                    return bool(book.broken[rows].all())

                adversary.optimise(loss_fn, self.steps, self.lr, stop=stop)
                first = means[0] if first is None else first
                last = means[-1]
                bar.update(len(chunk))
        return AttackResult(book.responses, first, last, book.broken_at)

    def check(self, num_layers: int) -> None:
        try:
            check_sites(self.layers, num_layers)
        except ValueError as e:
            raise ValueError(f"{type(self).__name__}.layers: {e}") from None

    def curve_budgets(self) -> list[int]:
        return [b for b in CURVE_BUDGETS if b < self.steps] + [self.steps]

    @torch.no_grad()
    def _snapshot(self, model, formatter, adversary, embeddings, lay, rows, which, book, step) -> None:
        tokens = greedy_from_embeddings(model, embeddings[:, : lay.prompt_width], lay.prompt_attention,
                                        self.max_new_tokens, formatter.tokenizer.eos_token_id,
                                        prompt_context=adversary.attached())
        book.add([r for r, w in zip(rows, which.tolist()) if w], [t for t, w in zip(decode(formatter, tokens), which)
                                                                   if w], step)
