"""Attacks that optimise a suffix after the request toward a target: the shared loop
(``SuffixAttack``), a soft suffix in embedding space (``EmbeddingAttack``) and a discrete one (GCG)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lit_safety.data.formatting import ChatFormatter
from lit_safety.data.records import Record
from lit_safety.evaluation.attacks import (
    Attack,
    AttackResult,
    _attacking,
    _chunks,
    _decode,
    _snapshot_steps,
    _SnapshotBook,
    _suffix_init,
    _target_nll,
)
from lit_safety.evaluation.generation import greedy_from_embeddings
from lit_safety.evaluation.suffix import Layout, Parts, layout, split_prompt


@dataclass
class SuffixAttack(Attack):
    """Base of the attacks that optimise a suffix after the request toward a target string. One loop
    serves them all: behaviours are attacked ``batch_size`` at a time; at every step the suffix is
    scored, a behaviour whose target has just become the greedy continuation is judged at once, the
    suffix takes one optimisation step, and at ``snapshots`` evenly spaced steps every behaviour still
    attacked is judged. A subclass says how its suffix starts (``start``), is scored (``score``),
    steps (``update``) and reads as a prompt (``prompt``).

    Args:
        suffix_length: suffix positions.
        init: the string whose tokens initialise the suffix (repeated/cut to length).
        steps: optimisation steps.
        snapshots: evenly spaced judged snapshots (the last step is always one).
        early_stop: stop attacking a behaviour at its first successful snapshot.
        target_field: record field the attack optimises toward ("target", or "answer" for the whole
            harmful answer).
        max_new_tokens: tokens generated at each snapshot.
        batch_size: behaviours attacked together.
    """

    suffix_length: int = 10
    init: str = "!"
    steps: int = 100
    snapshots: int = 20
    early_stop: bool = True
    target_field: Literal["target", "answer"] = "target"
    max_new_tokens: int = 24
    batch_size: int = 50

    def prepare(self, model, formatter: ChatFormatter) -> dict:
        """What every chunk of one run shares (e.g. a random generator)."""
        return {}

    def start(self, model, formatter: ChatFormatter, parts: list[Parts], init: list[int], shared: dict) -> dict:
        raise NotImplementedError

    def score(self, model, state: dict) -> tuple[Tensor, Tensor]:
        """(target NLL [n], whether the target is the greedy continuation [n]) of the current suffixes."""
        raise NotImplementedError

    def update(self, model, state: dict, loss: Tensor, active: Tensor) -> None:
        """One optimisation step of the suffixes of the ``active`` rows."""
        raise NotImplementedError

    def prompt(self, model, state: dict, which: Tensor) -> tuple[Tensor, Tensor]:
        """(left-padded prompt embeddings, attention mask) of the rows ``which``, suffix included."""
        raise NotImplementedError

    def run(self, model, formatter: ChatFormatter, records: Sequence[Record], judge=None) -> AttackResult:
        book = _SnapshotBook(records, judge)
        checkpoints = _snapshot_steps(self.steps, self.snapshots)
        init = _suffix_init(formatter.tokenizer, self.init, self.suffix_length)
        losses: list[float] = []
        with _attacking(model, len(records), self.name) as bar:
            shared = self.prepare(model, formatter)
            for start, chunk in _chunks(records, self.batch_size):
                rows = list(range(start, start + len(chunk)))
                parts = [split_prompt(formatter, r, getattr(r, self.target_field) or "") for r in chunk]
                state = self.start(model, formatter, parts, init, shared)
                matched = torch.zeros(len(chunk), dtype=torch.bool)
                for k in range(1, self.steps + 1):
                    active = self._active(book, rows)
                    if not active.any():
                        break
                    loss, match = self.score(model, state)
                    if (match & ~matched & active).any():  # the target just became the greedy continuation
                        self._snapshot(model, formatter, state, rows, book, match & ~matched & active)
                    matched = match
                    losses.append(loss[active].mean().item())
                    active = self._active(book, rows)
                    if not active.any():
                        break
                    self.update(model, state, loss, active)
                    if k in checkpoints:
                        self._snapshot(model, formatter, state, rows, book, active)
                bar.update(len(chunk))
        return AttackResult(book.responses, losses[0] if losses else None, losses[-1] if losses else None)

    def _active(self, book: _SnapshotBook, rows: list[int]) -> Tensor:
        return ~book.broken[rows] if self.early_stop else torch.ones(len(rows), dtype=torch.bool)

    @torch.no_grad()
    def _snapshot(self, model, formatter, state: dict, rows: list[int], book: _SnapshotBook, which: Tensor) -> None:
        """Generate with the current suffixes of the rows ``which`` and judge the responses."""
        embeddings, attention = self.prompt(model, state, which)
        tokens = greedy_from_embeddings(model, embeddings, attention, self.max_new_tokens,
                                        formatter.tokenizer.eos_token_id)
        book.add([r for r, w in zip(rows, which.tolist()) if w], _decode(formatter, tokens))


@dataclass
class EmbeddingAttack(SuffixAttack):
    """Embedding-space attack (Schwinn et al. 2024): a soft suffix of continuous vectors after the
    request, initialised from a string's token embeddings and optimised by signed gradient descent
    on the target's NLL.

    Args:
        step_size: signed step in units of the mean embedding norm (a step moves a vector by about
            step_size * mean norm).
        (the rest: ``SuffixAttack``)
    """

    step_size: float = 0.02
    name = "embedding"

    def start(self, model, formatter: ChatFormatter, parts: list[Parts], init: list[int], shared: dict) -> dict:
        embed = model.get_input_embeddings()
        lay = layout(parts, [init] * len(parts), formatter.tokenizer.pad_token_id)
        base = embed(lay.ids).detach()
        suffix = base[lay.suffix_mask].view(len(parts), self.suffix_length, -1).clone().requires_grad_(True)
        scale = embed.weight.detach().norm(dim=-1).mean().item()
        return {"lay": lay, "base": base, "suffix": suffix, "step": self.step_size * scale / embed.weight.shape[-1] ** 0.5}

    def _embeddings(self, state: dict, suffix: Tensor) -> Tensor:
        return state["base"].masked_scatter(state["lay"].suffix_mask[..., None], suffix)

    def score(self, model, state: dict) -> tuple[Tensor, Tensor]:
        return _target_nll(model, self._embeddings(state, state["suffix"]), state["lay"], with_match=True)

    def update(self, model, state: dict, loss: Tensor, active: Tensor) -> None:
        suffix = state["suffix"]
        (grad,) = torch.autograd.grad(loss[active].sum(), suffix)
        with torch.no_grad():
            suffix -= state["step"] * (grad * active[:, None, None]).sign()

    def prompt(self, model, state: dict, which: Tensor) -> tuple[Tensor, Tensor]:
        lay = state["lay"]
        return self._embeddings(state, state["suffix"].detach())[which, : lay.prompt_width], lay.prompt_attention[which]


@dataclass
class GCGAttack(SuffixAttack):
    """Greedy Coordinate Gradient (Zou et al. 2023): a discrete suffix; at each step the gradient of the
    target NLL w.r.t. the suffix's one-hot tokens proposes the top-k replacement tokens per position,
    ``candidates`` single-token swaps are scored exactly, and the best is kept. Special tokens are
    never proposed, and a candidate whose text does not re-tokenise to the same ids is discarded.

    Args:
        top_k: replacement tokens considered per position.
        candidates: single-token swaps scored per behaviour per step.
        seed: seed of the candidate sampling.
        (the rest: ``SuffixAttack``)
    """

    suffix_length: int = 6
    steps: int = 40
    snapshots: int = 4
    batch_size: int = 25
    top_k: int = 16
    candidates: int = 32
    seed: int = 0
    name = "gcg"

    def prepare(self, model, formatter: ChatFormatter) -> dict:
        tokenizer = formatter.tokenizer
        allowed = torch.ones(model.get_input_embeddings().weight.shape[0], dtype=torch.bool)
        allowed[[i for i in tokenizer.all_special_ids if i < allowed.numel()]] = False
        allowed[len(tokenizer):] = False  # padding rows of the embedding matrix are not tokens
        return {"allowed": allowed, "generator": torch.Generator().manual_seed(self.seed), "tokenizer": tokenizer}

    def start(self, model, formatter: ChatFormatter, parts: list[Parts], init: list[int], shared: dict) -> dict:
        return {**shared, "parts": parts, "suffixes": torch.tensor([init] * len(parts))}

    def _layout(self, state: dict, which: Tensor | None = None) -> Layout:
        rows = range(len(state["parts"])) if which is None else which.nonzero().flatten().tolist()
        return layout([state["parts"][i] for i in rows], state["suffixes"][list(rows)].tolist(),
                      state["tokenizer"].pad_token_id)

    @torch.no_grad()
    def score(self, model, state: dict) -> tuple[Tensor, Tensor]:
        lay = self._layout(state)
        return _target_nll(model, model.get_input_embeddings()(lay.ids), lay, with_match=True)

    def update(self, model, state: dict, loss: Tensor, active: Tensor) -> None:
        rows = active.nonzero().flatten().tolist()
        state["suffixes"][rows] = self._step(model, state["tokenizer"], [state["parts"][i] for i in rows],
                                             state["suffixes"][rows], state["allowed"], state["generator"])

    def prompt(self, model, state: dict, which: Tensor) -> tuple[Tensor, Tensor]:
        lay = self._layout(state, which)
        return model.get_input_embeddings()(lay.prompt_ids), lay.prompt_attention

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
