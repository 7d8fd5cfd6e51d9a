"""Attacks: each maps behaviours (records with a ``target``) to the model's responses under attack.

Every attack is a small class whose init arguments are its whole budget, so a reported figure can
always name the budget behind it (``describe()``). ``run(model, formatter, records, judge)`` returns
one response per behaviour; attacks that take several snapshots return a successful one if any
snapshot succeeded under ``judge`` (a behaviour is broken if any snapshot breaks it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lit_safety.adversaries import LatentAdversary, site_norms
from lit_safety.losses import token_logprobs

from lit_safety.data.formatting import ChatFormatter
from lit_safety.data.records import Record
from lit_safety.evaluation.generation import generate, greedy_from_embeddings, positions
from lit_safety.evaluation.suffix import Layout, Parts, layout, split_prompt


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
    import os

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


class Attack:
    """Base of every attack: ``name`` keys its results, ``describe()`` is its budget. Gradient
    attacks also keep the mean target loss of their first and last step (``loss_first``,
    ``loss_last``) of the last batch they attacked."""

    name = "attack"
    loss_first: float | None = None
    loss_last: float | None = None

    def describe(self) -> dict:
        return asdict(self)

    def run(self, model, formatter: ChatFormatter, records: Sequence[Record], judge=None) -> list[str]:
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
    """The request as it is, no attack: the baseline every other attack is compared with.

    Args:
        max_new_tokens: length of the greedy response.
    """

    max_new_tokens: int = 24
    name = "direct"

    def run(self, model, formatter: ChatFormatter, records: Sequence[Record], judge=None) -> list[str]:
        return generate(model, formatter, records, max_new_tokens=self.max_new_tokens)


@dataclass
class PrefillAttack(Attack):
    """Prefilling: the response is forced to start with the behaviour's target (e.g. "Sure, here is"),
    and the model continues from there. Shallowly aligned models usually continue with the harm.

    Args:
        max_new_tokens: tokens generated after the prefill.
    """

    max_new_tokens: int = 24
    name = "prefill"

    def run(self, model, formatter: ChatFormatter, records: Sequence[Record], judge=None) -> list[str]:
        return generate(model, formatter, records, prefill=[r.target for r in records],
                        max_new_tokens=self.max_new_tokens)


def _snapshot_steps(steps: int, snapshots: int) -> set[int]:
    """The (1-based) steps after which a snapshot is judged, evenly spaced, always including the last."""
    snapshots = max(1, min(snapshots, steps))
    return {round(steps * (k + 1) / snapshots) for k in range(snapshots)}


@dataclass
class EmbeddingAttack(Attack):
    """Embedding-space attack: a soft suffix of continuous vectors after the request, initialised from
    a string and optimised on the target's NLL (Schwinn et al. 2024). Snapshots of the suffix are
    judged during the attack; a behaviour is broken if any snapshot succeeds and, with
    ``early_stop``, its suffix stops there.

    Args:
        suffix_length: number of suffix vectors.
        init: the string whose token embeddings initialise the suffix (repeated/cut to length).
        steps: optimisation steps.
        step_size: step in units of the mean embedding norm (a signed step moves a vector by about
            step_size * mean norm).
        optimizer: "sign" (signed gradient descent) or "adam".
        snapshots: evenly spaced judged snapshots (the last step is always one).
        early_stop: stop optimising a behaviour at its first successful snapshot.
        l2_bound: optional bound on each suffix vector's distance from its initial value, in units
            of the mean embedding norm.
        target_field: record field the attack optimises toward ("target", or "answer" for an
            oracle attack that knows the full harmful answer).
        max_new_tokens: tokens generated at each snapshot.
        batch_size: behaviours attacked together.
    """

    suffix_length: int = 10
    init: str = "!"
    steps: int = 100
    step_size: float = 0.02
    optimizer: Literal["sign", "adam"] = "sign"
    snapshots: int = 20
    early_stop: bool = True
    l2_bound: float | None = None
    target_field: Literal["target", "answer"] = "target"
    max_new_tokens: int = 24
    batch_size: int = 50
    name = "embedding"

    def run(self, model, formatter: ChatFormatter, records: Sequence[Record], judge=None) -> list[str]:
        embed = model.get_input_embeddings()
        scale = embed.weight.detach().norm(dim=-1).mean().item()
        step = self.step_size * scale / embed.weight.shape[-1] ** 0.5
        book = _SnapshotBook(records, judge)
        checkpoints = _snapshot_steps(self.steps, self.snapshots)
        init = _suffix_init(formatter.tokenizer, self.init, self.suffix_length)
        with _attacking(model, len(records), self.name) as bar:
            for start, chunk in _chunks(records, self.batch_size):
                rows = list(range(start, start + len(chunk)))
                parts = [split_prompt(formatter, r, getattr(r, self.target_field) or "") for r in chunk]
                lay = layout(parts, [init] * len(chunk), formatter.tokenizer.pad_token_id)
                base = embed(lay.ids).detach()
                initial = base[lay.suffix_mask].view(len(chunk), self.suffix_length, -1)
                suffix = initial.clone().requires_grad_(True)
                adam = torch.optim.Adam([suffix], lr=step) if self.optimizer == "adam" else None
                matched = torch.zeros(len(chunk), dtype=torch.bool)
                for k in range(1, self.steps + 1):
                    active = ~book.broken[rows] if self.early_stop else torch.ones(len(chunk), dtype=torch.bool)
                    if not active.any():
                        break
                    embeddings = base.masked_scatter(lay.suffix_mask[..., None], suffix)
                    loss, match = _target_nll(model, embeddings, lay, with_match=True)
                    self.loss_last = loss.mean().item()
                    if k == 1:
                        self.loss_first = self.loss_last
                    if (match & ~matched).any():  # the target just became the greedy continuation
                        self._snapshot(model, formatter, base, lay, suffix.detach(), rows, book, match & ~matched)
                    matched = match
                    (grad,) = torch.autograd.grad(loss[active].sum(), suffix)
                    with torch.no_grad():
                        grad = grad * active[:, None, None]
                        if adam is None:
                            suffix -= step * grad.sign()
                        else:
                            suffix.grad = grad
                            adam.step()
                        if self.l2_bound is not None:
                            drift = suffix - initial
                            norms = drift.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                            suffix.copy_(initial + drift * torch.clamp(self.l2_bound * scale / norms, max=1.0))
                    if k in checkpoints:
                        self._snapshot(model, formatter, base, lay, suffix, rows, book)
                bar.update(len(chunk))
        return book.responses

    @torch.no_grad()
    def _snapshot(self, model, formatter, base, lay, suffix, rows, book, which: Tensor | None = None) -> None:
        """Generate with the current suffix and judge; ``which`` limits it to some rows."""
        which = torch.ones(len(rows), dtype=torch.bool) if which is None else which
        prompt = base.masked_scatter(lay.suffix_mask[..., None], suffix)[which, : lay.prompt_width]
        tokens = greedy_from_embeddings(model, prompt, lay.prompt_attention[which], self.max_new_tokens,
                                        formatter.tokenizer.eos_token_id)
        book.add([r for r, w in zip(rows, which.tolist()) if w], _decode(formatter, tokens))


@dataclass
class GCGAttack(Attack):
    """Greedy Coordinate Gradient (Zou et al. 2023): a discrete suffix; at each step the gradient of the
    target NLL w.r.t. the suffix's one-hot tokens proposes the top-k replacement tokens per position,
    ``candidates`` single-token swaps are scored exactly, and the best is kept. Special tokens are
    never proposed, and a candidate whose text does not re-tokenise to the same ids is discarded.
    Behaviours are attacked in batches (each with its own suffix).

    Args:
        suffix_length: suffix tokens.
        init: string whose tokens initialise the suffix (repeated/cut to length).
        steps: optimisation steps.
        top_k: replacement tokens considered per position.
        candidates: single-token swaps scored per behaviour per step.
        snapshots: evenly spaced judged snapshots (the last step is always one), besides one whenever
            a behaviour's target first becomes the greedy continuation; a behaviour stops at its
            first successful snapshot.
        target_field: record field the attack optimises toward ("target" or "answer").
        max_new_tokens: tokens generated at each snapshot.
        batch_size: behaviours attacked together.
        seed: seed of the candidate sampling.
    """

    suffix_length: int = 6
    init: str = "!"
    steps: int = 40
    top_k: int = 16
    candidates: int = 32
    snapshots: int = 4
    target_field: Literal["target", "answer"] = "target"
    max_new_tokens: int = 24
    batch_size: int = 25
    seed: int = 0
    name = "gcg"

    def run(self, model, formatter: ChatFormatter, records: Sequence[Record], judge=None) -> list[str]:
        tokenizer = formatter.tokenizer
        embed = model.get_input_embeddings()
        allowed = torch.ones(embed.weight.shape[0], dtype=torch.bool)
        allowed[[i for i in tokenizer.all_special_ids if i < allowed.numel()]] = False
        allowed[len(tokenizer):] = False  # padding rows of the embedding matrix are not tokens
        generator = torch.Generator().manual_seed(self.seed)
        book = _SnapshotBook(records, judge)
        checkpoints = _snapshot_steps(self.steps, self.snapshots)
        init = _suffix_init(tokenizer, self.init, self.suffix_length)
        with _attacking(model, len(records), self.name) as bar:
            for start, chunk in _chunks(records, self.batch_size):
                rows = list(range(start, start + len(chunk)))
                parts = [split_prompt(formatter, r, getattr(r, self.target_field) or "") for r in chunk]
                suffixes = torch.tensor([init] * len(chunk))
                matched = torch.zeros(len(chunk), dtype=torch.bool)
                for k in range(1, self.steps + 1):
                    active = (~book.broken[rows]).nonzero().flatten().tolist()
                    if not active:
                        break
                    suffixes[active] = self._step(model, tokenizer, [parts[i] for i in active], suffixes[active],
                                                  allowed, generator)
                    lay = layout([parts[i] for i in active], suffixes[active].tolist(), tokenizer.pad_token_id)
                    with torch.no_grad():
                        _, match = _target_nll(model, embed(lay.ids), lay, with_match=True)
                    # Judge when the target first becomes the greedy continuation, and at the checkpoints.
                    snap = (match & ~matched[active]) | torch.full_like(match, k in checkpoints)
                    matched[active] = match
                    if snap.any():
                        tokens = greedy_from_embeddings(model, embed(lay.prompt_ids[snap]), lay.prompt_attention[snap],
                                                        self.max_new_tokens, tokenizer.eos_token_id)
                        book.add([rows[i] for i, s in zip(active, snap.tolist()) if s], _decode(formatter, tokens))
                bar.update(len(chunk))
        return book.responses

    def _step(self, model, tokenizer, parts: list[Parts], suffixes: Tensor, allowed: Tensor, generator) -> Tensor:
        embed = model.get_input_embeddings()
        rows, length = suffixes.shape
        lay = layout(parts, suffixes.tolist(), tokenizer.pad_token_id)
        one_hot = torch.nn.functional.one_hot(suffixes, embed.weight.shape[0]).to(embed.weight.dtype).requires_grad_(True)
        embeddings = embed(lay.ids).detach().masked_scatter(lay.suffix_mask[..., None], one_hot @ embed.weight)
        (grad,) = torch.autograd.grad(_target_nll(model, embeddings, lay).sum(), one_hot)
        grad[..., ~allowed] = float("inf")
        top = (-grad).topk(self.top_k, dim=-1).indices  # [rows, n, k]
        where = torch.randint(0, length, (rows, self.candidates), generator=generator)
        pick = torch.randint(0, self.top_k, (rows, self.candidates), generator=generator)
        candidates = suffixes[:, None].repeat(1, self.candidates, 1)  # [rows, C, n]
        row_index = torch.arange(rows)[:, None]
        candidates[row_index, torch.arange(self.candidates)[None], where] = top[row_index, where, pick]
        # A candidate must survive a decode/encode round trip: that is what a real prompt would contain.
        flat = candidates.view(-1, length).tolist()
        consistent = torch.tensor([tokenizer(" " + tokenizer.decode(c), add_special_tokens=False)["input_ids"] == c
                                   for c in flat]).view(rows, self.candidates)
        with torch.no_grad():
            lay = layout([p for p in parts for _ in range(self.candidates)], flat, tokenizer.pad_token_id)
            losses = _target_nll(model, embed(lay.ids), lay).view(rows, self.candidates)
        losses[~consistent] = float("inf")
        best = losses.argmin(-1)
        keep = consistent.any(-1)
        return torch.where(keep[:, None], candidates[torch.arange(rows), best], suffixes)


@dataclass
class LatentAttack(Attack):
    """Latent-space attack: targeted LAT's adversary used at evaluation time. A per-token L2-bounded
    perturbation at the prompt positions of chosen layers is optimised on the target's NLL, then the
    model answers with the perturbation in place.

    Args:
        layers: attacked sites: decoder layer indices and/or "embedding".
        epsilon: per-token L2 radius.
        epsilon_scale: "absolute" or "layer_norm" (epsilon times the site's mean activation norm).
        steps: Adam steps.
        lr: Adam step as a fraction of epsilon.
        target_field: record field the attack optimises toward ("target" or "answer").
        max_new_tokens: tokens generated after the attack.
        batch_size: behaviours attacked together.
    """

    layers: list[int | str] = field(default_factory=lambda: [0])
    epsilon: float = 1.0
    epsilon_scale: Literal["absolute", "layer_norm"] = "layer_norm"
    steps: int = 32
    lr: float = 0.25
    target_field: Literal["target", "answer"] = "target"
    max_new_tokens: int = 24
    batch_size: int = 50
    name = "latent"

    def run(self, model, formatter: ChatFormatter, records: Sequence[Record], judge=None) -> list[str]:
        embed = model.get_input_embeddings()
        responses: list[str] = []
        with _attacking(model, len(records), self.name) as bar:
            for _, chunk in _chunks(records, self.batch_size):
                parts = [split_prompt(formatter, r, getattr(r, self.target_field) or "") for r in chunk]
                lay = layout(parts, [[]] * len(chunk), formatter.tokenizer.pad_token_id)
                prompt_mask = lay.attention_mask & ~lay.target_mask
                norms = (site_norms(model, self.layers, lay.prompt_ids, lay.prompt_attention, lay.prompt_attention)
                         if self.epsilon_scale == "layer_norm" else dict.fromkeys(self.layers, 1.0))
                adversary = LatentAdversary(model, self.layers, prompt_mask,
                                            {s: self.epsilon * norms[s] for s in self.layers})
                embeddings = embed(lay.ids).detach()
                with adversary.attached():
                    losses = adversary.optimise(lambda: _target_nll(model, embeddings, lay).mean(), self.steps, self.lr)
                    self.loss_first, self.loss_last = losses[0], _target_nll(model, embeddings, lay).mean().item()
                adversary.freeze()
                with torch.no_grad():
                    tokens = greedy_from_embeddings(model, embeddings[:, : lay.prompt_width], lay.prompt_attention,
                                                    self.max_new_tokens, formatter.tokenizer.eos_token_id,
                                                    prompt_context=adversary.attached())
                responses += _decode(formatter, tokens)
                bar.update(len(chunk))
        return responses
