"""Gradient attacks on the prompt: the shared loop (``GradientAttack``), suffixes after the request
(``SuffixAttack``: a soft one in embedding space, ``EmbeddingAttack``, and a discrete one, ``GCGAttack``)
and a bounded perturbation of the request's own token embeddings (``EmbeddingPerturbationAttack``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lit_safety.adversaries import allowed_tokens
from lit_safety.data.formatting import ChatFormatter
from lit_safety.data.records import Record
from lit_safety.evaluation.attacks import (
    CURVE_BUDGETS,
    Attack,
    AttackResult,
    SnapshotBook,
    TargetField,
    attacking,
    check_schedule,
    chunks,
    decode,
    objective,
    require,
    snapshot_steps,
    target_nll,
    target_scores,
    token_ids,
)
from lit_safety.evaluation.generation import greedy_from_embeddings, positions
from lit_safety.evaluation.suffix import Layout, Parts, Rest, layout, rest_layout, split_prompt, split_request


@dataclass
class GradientAttack(Attack):
    """Base of the attacks that optimise the prompt toward a target string. One loop serves them
    all: behaviours are attacked ``batch_size`` at a time; at every step the prompt is scored, a
    behaviour whose target has just become the greedy continuation is judged at once, the prompt
    takes one optimisation step, and at ``snapshots`` evenly spaced steps (and at every curve budget)
    each behaviour still attacked is judged. Behaviours left unbroken are attacked again from a
    random start, ``restarts`` times in all; a behaviour's budget is the steps spent on it over its
    restarts, the x axis of the attack's robustness curve. A subclass says how its prompt starts
    (``start``), is scored (``score``), steps (``update``) and reads as a prompt (``prompt``).

    Args:
        steps: optimisation steps per restart.
        restarts: starts per behaviour (the first from the attack's own init, the rest random).
        snapshots: evenly spaced judged snapshots per restart (the last step is always one).
        early_stop: stop attacking a behaviour at its first successful snapshot.
        target_field: what the attack optimises toward: "answer" (what the judge counts as harm
            done: the record's answer, else its harmful completion, else its target) or "target"
            (the target string alone, e.g. "Sure, here is").
        max_new_tokens: tokens generated at each snapshot.
        batch_size: behaviours attacked together.
        seed: seed of the random starts and of any sampling.
    """

    steps: int = 100
    restarts: int = 1
    snapshots: int = 20
    early_stop: bool = True
    target_field: TargetField = "answer"
    max_new_tokens: int = 24
    batch_size: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_schedule(name, self.steps, self.snapshots, self.target_field, self.batch_size)
        require(self.restarts >= 1, name, "restarts", f"must be >= 1, got {self.restarts}")
        require(self.max_new_tokens >= 1, name, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")

    def prepare(self, model, formatter: ChatFormatter) -> dict:
        """What every chunk of one run shares (e.g. a random generator)."""
        return {"generator": torch.Generator().manual_seed(self.seed)}

    def start(self, model, formatter: ChatFormatter, records: Sequence[Record], targets: list[str], restart: int,
              shared: dict) -> dict:
        raise NotImplementedError

    def score(self, model, state: dict) -> tuple[Tensor, Tensor]:
        """(target NLL [n], whether the target is the greedy continuation [n]) of the current prompts."""
        raise NotImplementedError

    def update(self, model, state: dict, loss: Tensor, active: Tensor) -> None:
        """One optimisation step of the prompts of the ``active`` rows."""
        raise NotImplementedError

    def prompt(self, model, state: dict, which: Tensor) -> tuple[Tensor, Tensor]:
        """(left-padded prompt embeddings, attention mask) of the rows ``which``."""
        raise NotImplementedError

    def select(self, state: dict, keep: Tensor) -> dict:
        """The state of the rows ``keep`` only (broken behaviours leave the batch: no compute is spent
        on them)."""
        raise NotImplementedError

    def texts(self, state: dict, which: Tensor) -> list[str] | None:
        """The text the attack wrote into the prompts of the rows ``which``; None for attacks whose
        prompt is not text (embedding vectors, perturbations)."""
        return None

    def run(self, model, formatter: ChatFormatter, records: Sequence[Record], judge=None) -> AttackResult:
        book = SnapshotBook(records, judge)
        checkpoints = snapshot_steps(self.steps, self.snapshots)
        losses: list[float] = []
        with attacking(model, len(records), self.name) as bar:
            shared = self.prepare(model, formatter)
            for restart in range(self.restarts):
                todo = [i for i in range(len(records)) if not (self.early_stop and book.broken[i])]
                for _, rows in chunks(todo, self.batch_size):
                    chunk = [records[i] for i in rows]
                    targets = [objective(r, self.target_field) for r in chunk]
                    state = self.start(model, formatter, chunk, targets, restart, shared)
                    self._attack(model, formatter, state, rows, book, checkpoints, restart * self.steps, losses)
                    if restart == 0:
                        bar.update(len(chunk))
        written = any(p is not None for p in book.prompts)
        return AttackResult(book.responses, losses[0] if losses else None, losses[-1] if losses else None,
                            book.broken_at, book.prompts if written else None)

    def curve_budgets(self) -> list[int]:
        total = self.steps * self.restarts
        return [b for b in CURVE_BUDGETS if b < total] + [total]

    def _attack(self, model, formatter, state, rows, book, checkpoints, spent: int, losses: list[float]) -> None:
        matched = torch.zeros(len(rows), dtype=torch.bool)
        for k in range(1, self.steps + 1):
            active = self._active(book, rows)
            if not active.any():
                return
            if not active.all():  # drop the broken rows from the batch
                state, matched = self.select(state, active), matched[active]
                rows = [r for r, a in zip(rows, active.tolist()) if a]
                active = active[active]
            loss, match = self.score(model, state)
            just_matched = match & ~matched & active  # the target just became the greedy continuation
            if just_matched.any():
                self._snapshot(model, formatter, state, rows, book, just_matched, spent + k - 1)
            matched = match
            losses.append(loss[active].mean().item())
            active = self._active(book, rows)
            if not active.any():
                return
            self.update(model, state, loss, active)
            if k in checkpoints:
                self._snapshot(model, formatter, state, rows, book, active, spent + k)

    def _active(self, book: SnapshotBook, rows: list[int]) -> Tensor:
        return ~book.broken[rows] if self.early_stop else torch.ones(len(rows), dtype=torch.bool)

    @torch.no_grad()
    def _snapshot(self, model, formatter, state: dict, rows: list[int], book: SnapshotBook, which: Tensor,
                  budget: int) -> None:
        """Generate with the current prompts of the rows ``which`` and judge the responses."""
        embeddings, attention = self.prompt(model, state, which)
        tokens = greedy_from_embeddings(model, embeddings, attention, self.max_new_tokens,
                                        formatter.tokenizer.eos_token_id)
        book.add([r for r, w in zip(rows, which.tolist()) if w], decode(formatter, tokens), max(budget, 1),
                 self.texts(state, which))


@dataclass
class SuffixAttack(GradientAttack):
    """A gradient attack on a suffix after the request (at the end of the user turn).

    Args:
        suffix_length: suffix positions.
        init: the string whose tokens start the first restart's suffix (repeated/cut to length);
            later restarts start from random tokens.
        (the rest: ``GradientAttack``)
    """

    suffix_length: int = 10
    init: str = "please"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.suffix_length >= 1, type(self).__name__, "suffix_length", f"must be >= 1, got {self.suffix_length}")

    def start(self, model, formatter, records, targets, restart, shared) -> dict:
        parts = [split_prompt(formatter, r, t) for r, t in zip(records, targets)]
        tokenizer = formatter.tokenizer
        if restart == 0:
            init = token_ids(tokenizer, self.init, self.suffix_length)
        else:
            allowed = allowed_tokens(tokenizer, model.get_input_embeddings().weight.shape[0]).nonzero().flatten()
            init = allowed[torch.randint(len(allowed), (self.suffix_length,), generator=shared["generator"])].tolist()
        return self.begin(model, formatter, parts, init, shared)

    def begin(self, model, formatter: ChatFormatter, parts: list[Parts], init: list[int], shared: dict) -> dict:
        """The state of a chunk whose suffixes all start as the tokens ``init``."""
        raise NotImplementedError


@dataclass
class EmbeddingAttack(SuffixAttack):
    """Embedding-space attack (Schwinn et al. 2024): a soft suffix of continuous vectors after the
    request, started from a string's token embeddings and optimised by signed gradient descent on
    the objective's NLL. The default budget is the published evaluations' (20 vectors, 500 steps,
    many judged snapshots; Schwinn and Geisler 2024, arXiv 2407.15902).

    Args:
        step_size: signed step in units of the mean embedding norm (a step moves a vector by about
            step_size * mean norm).
        (the rest: ``SuffixAttack``)
    """

    suffix_length: int = 20
    steps: int = 500
    snapshots: int = 20
    step_size: float = 0.02
    name: str = "embedding"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.step_size > 0, type(self).__name__, "step_size", f"must be > 0, got {self.step_size}")

    def begin(self, model, formatter, parts, init, shared) -> dict:
        embed = model.get_input_embeddings()
        pad = formatter.tokenizer.pad_token_id
        lay, rest = layout(parts, [init] * len(parts), pad), rest_layout(parts, [init] * len(parts), pad)
        base = embed(lay.ids).detach()
        suffix = base[lay.suffix_mask].view(len(parts), self.suffix_length, -1).clone().requires_grad_(True)
        scale = embed.weight.detach().norm(dim=-1).mean().item()
        # Scoring runs on [suffix][template end][target] after the request's cached keys and values:
        # every step's forward and backward skip the request, which does not change.
        return {"lay": lay, "base": base, "suffix": suffix, "rest": rest, "rest_base": embed(rest.ids).detach(),
                "prefix": PrefixCache(model, parts, pad), "step": self.step_size * scale / embed.weight.shape[-1] ** 0.5}

    def _embeddings(self, state: dict, suffix: Tensor) -> Tensor:
        return state["base"].masked_scatter(state["lay"].suffix_mask[..., None], suffix)

    def score(self, model, state: dict) -> tuple[Tensor, Tensor]:
        rest = state["rest"]
        embeddings = state["rest_base"].masked_scatter(rest.suffix_mask[..., None], state["suffix"])
        return state["prefix"].target_nll(model, torch.arange(len(rest.ids)), rest, embeddings, with_match=True)

    def update(self, model, state: dict, loss: Tensor, active: Tensor) -> None:
        suffix = state["suffix"]
        (grad,) = torch.autograd.grad(loss[active].sum(), suffix)
        with torch.no_grad():
            suffix -= state["step"] * (grad * active[:, None, None]).sign()

    def prompt(self, model, state: dict, which: Tensor) -> tuple[Tensor, Tensor]:
        lay = state["lay"]
        return self._embeddings(state, state["suffix"].detach())[which, : lay.prompt_width], lay.prompt_attention[which]

    def select(self, state: dict, keep: Tensor) -> dict:
        return {**state, "lay": state["lay"].select(keep), "base": state["base"][keep],
                "suffix": state["suffix"].detach()[keep].requires_grad_(True), "rest": state["rest"].select(keep),
                "rest_base": state["rest_base"][keep], "prefix": state["prefix"].select(keep)}


@dataclass
class EmbeddingPerturbationAttack(GradientAttack):
    """Projected gradient descent on the request's own token embeddings: every request token's
    embedding may move within an L2 ball (normalised-gradient steps) or an Linf box (signed steps)
    of radius ``epsilon`` mean embedding norms; nothing is appended. Restarts after the first start
    from a random point of the ball.

    Args:
        norm: "l2" (per token) or "linf" (per coordinate: epsilon * mean norm / sqrt(width)).
        epsilon: the bound, in units of the mean embedding norm.
        step_size: step as a fraction of epsilon.
        (the rest: ``GradientAttack``)
    """

    norm: Literal["l2", "linf"] = "l2"
    epsilon: float = 0.5
    step_size: float = 0.05
    steps: int = 300
    name: str = "perturbation"

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        require(self.norm in ("l2", "linf"), name, "norm", f"{self.norm!r} is not one of l2, linf")
        require(self.epsilon > 0, name, "epsilon", f"must be > 0, got {self.epsilon}")
        require(self.step_size > 0, name, "step_size", f"must be > 0, got {self.step_size}")

    def start(self, model, formatter, records, targets, restart, shared) -> dict:
        embed = model.get_input_embeddings()
        split = [split_request(formatter, r, t) for r, t in zip(records, targets)]
        lay = layout([p for p, _ in split], [request for _, request in split], formatter.tokenizer.pad_token_id)
        base = embed(lay.ids).detach()
        width = base.shape[-1]
        radius = self.epsilon * embed.weight.detach().norm(dim=-1).mean().item()
        if self.norm == "linf":
            radius /= width**0.5
        delta = torch.zeros_like(base[lay.suffix_mask])
        if restart > 0:  # a random point of the ball (box)
            generator = shared["generator"]
            if self.norm == "l2":
                direction = torch.randn(delta.shape, generator=generator)
                delta = direction / direction.norm(dim=-1, keepdim=True) * radius * torch.rand(len(delta), 1, generator=generator)
            else:
                delta = (torch.rand(delta.shape, generator=generator) * 2 - 1) * radius
            delta = delta.to(base)
        return {"lay": lay, "base": base, "delta": delta.requires_grad_(True), "radius": radius,
                "row": lay.suffix_mask.nonzero()[:, 0]}

    def _project(self, delta: Tensor, radius: float) -> Tensor:
        if self.norm == "linf":
            return delta.clamp(-radius, radius)
        return delta * (radius / delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)

    def _embeddings(self, state: dict, delta: Tensor) -> Tensor:
        mask = state["lay"].suffix_mask
        return state["base"].masked_scatter(mask[..., None], state["base"][mask] + delta)

    def score(self, model, state: dict) -> tuple[Tensor, Tensor]:
        return target_nll(model, self._embeddings(state, state["delta"]), state["lay"], with_match=True)

    def update(self, model, state: dict, loss: Tensor, active: Tensor) -> None:
        delta, radius = state["delta"], state["radius"]
        (grad,) = torch.autograd.grad(loss[active].sum(), delta)
        grad = grad * active[state["row"]][:, None]
        if self.norm == "linf":
            step = grad.sign()
        else:
            step = grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        with torch.no_grad():
            delta.copy_(self._project(delta - self.step_size * radius * step, radius))

    def prompt(self, model, state: dict, which: Tensor) -> tuple[Tensor, Tensor]:
        lay = state["lay"]
        return self._embeddings(state, state["delta"].detach())[which, : lay.prompt_width], lay.prompt_attention[which]

    def select(self, state: dict, keep: Tensor) -> dict:
        lay = state["lay"].select(keep)
        return {**state, "lay": lay, "base": state["base"][keep], "row": lay.suffix_mask.nonzero()[:, 0],
                "delta": state["delta"].detach()[keep[state["row"]]].requires_grad_(True)}


class PrefixCache:
    """The keys and values of every behaviour's prompt before its suffix, computed once and shared by
    all candidates of every step (nanoGCG's prefix cache): a candidate's forward covers only
    [suffix][template end][target]."""

    def __init__(self, model, parts: Sequence[Parts], pad_token_id: int):
        from lit_safety.evaluation.generation import left_pad

        ids, mask = left_pad([p.before for p in parts], pad_token_id)
        device = next(model.parameters()).device
        self.mask, self.length = mask.bool().to(device), mask.sum(-1).to(device)
        with torch.no_grad():
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions(mask.to(device)),
                        use_cache=True)
        self.layers = [(layer.keys, layer.values) for layer in out.cache.layers]

    def select(self, keep: Tensor) -> PrefixCache:
        chosen = object.__new__(PrefixCache)
        chosen.mask, chosen.length = self.mask[keep], self.length[keep]
        chosen.layers = [(k[keep], v[keep]) for k, v in self.layers]
        return chosen

    def target_nll(self, model, rows: Tensor, rest: Rest, embeddings: Tensor, with_match: bool = False):
        """``target_nll`` of the rows ``rows`` of the cache followed by ``rest`` (its embeddings given)."""
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(k[rows], v[rows]) for k, v in self.layers])
        attention = torch.cat([self.mask[rows], rest.attention_mask], dim=1).long()
        position_ids = self.length[rows, None] + rest.attention_mask.long().cumsum(-1) - 1
        logits = model(inputs_embeds=embeddings, attention_mask=attention, position_ids=position_ids, cache=cache,
                       use_cache=True).logits
        return target_scores(logits, rest.ids, rest.target_mask, with_match)


@dataclass
class GCGAttack(SuffixAttack):
    """Greedy Coordinate Gradient (Zou et al. 2023): a discrete suffix; at each step the gradient of the
    objective's NLL w.r.t. the suffix's one-hot tokens proposes the top-k replacement tokens per
    position, ``candidates`` single-token swaps are scored exactly, and the best is kept. Special
    tokens are never proposed, and a candidate whose text does not re-tokenise to the same ids is
    discarded. ``top_k`` larger than the vocabulary an attacker may write means all of it.

    Args:
        top_k: replacement tokens considered per position.
        candidates: single-token swaps scored per behaviour per step.
        (the rest: ``SuffixAttack``)
    """

    suffix_length: int = 20
    steps: int = 250
    snapshots: int = 10
    batch_size: int = 25
    top_k: int = 128
    candidates: int = 256
    name: str = "gcg"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.top_k >= 1, type(self).__name__, "top_k", f"must be >= 1, got {self.top_k}")
        require(self.candidates >= 1, type(self).__name__, "candidates", f"must be >= 1, got {self.candidates}")

    def prepare(self, model, formatter: ChatFormatter) -> dict:
        tokenizer = formatter.tokenizer
        return {**super().prepare(model, formatter), "tokenizer": tokenizer,
                "allowed": allowed_tokens(tokenizer, model.get_input_embeddings().weight.shape[0])}

    def begin(self, model, formatter, parts, init, shared) -> dict:
        return {**shared, "parts": parts, "suffixes": torch.tensor([init] * len(parts)),
                "prefix": PrefixCache(model, parts, formatter.tokenizer.pad_token_id)}

    def _layout(self, state: dict, which: Tensor | None = None) -> Layout:
        rows = range(len(state["parts"])) if which is None else which.nonzero().flatten().tolist()
        return layout([state["parts"][i] for i in rows], state["suffixes"][list(rows)].tolist(),
                      state["tokenizer"].pad_token_id)

    @torch.no_grad()
    def score(self, model, state: dict) -> tuple[Tensor, Tensor]:
        rest = rest_layout(state["parts"], state["suffixes"].tolist(), state["tokenizer"].pad_token_id)
        rows = torch.arange(len(state["parts"]))
        return state["prefix"].target_nll(model, rows, rest, model.get_input_embeddings()(rest.ids), with_match=True)

    def update(self, model, state: dict, loss: Tensor, active: Tensor) -> None:
        rows = active.nonzero().flatten()
        state["suffixes"][rows] = self._step(model, state["tokenizer"], [state["parts"][i] for i in rows.tolist()],
                                             state["suffixes"][rows], state["allowed"], state["generator"],
                                             state["prefix"], rows)

    def prompt(self, model, state: dict, which: Tensor) -> tuple[Tensor, Tensor]:
        lay = self._layout(state, which)
        return model.get_input_embeddings()(lay.prompt_ids), lay.prompt_attention

    def select(self, state: dict, keep: Tensor) -> dict:
        return {**state, "parts": [p for p, k in zip(state["parts"], keep.tolist()) if k],
                "suffixes": state["suffixes"][keep], "prefix": state["prefix"].select(keep)}

    def texts(self, state: dict, which: Tensor) -> list[str]:
        return [state["tokenizer"].decode(s) for s in state["suffixes"][which].tolist()]

    def _step(self, model, tokenizer, parts: list[Parts], suffixes: Tensor, allowed: Tensor, generator,
              prefix: PrefixCache, prefix_rows: Tensor) -> Tensor:
        """New suffixes for the behaviours ``parts``, whose prompts are rows ``prefix_rows`` of ``prefix``."""
        embed = model.get_input_embeddings()
        rows, length = suffixes.shape
        rest = rest_layout(parts, suffixes.tolist(), tokenizer.pad_token_id)
        one_hot = torch.nn.functional.one_hot(suffixes, embed.weight.shape[0]).to(embed.weight.dtype).requires_grad_(True)
        embeddings = embed(rest.ids).detach().masked_scatter(rest.suffix_mask[..., None], one_hot @ embed.weight)
        (grad,) = torch.autograd.grad(prefix.target_nll(model, prefix_rows, rest, embeddings).sum(), one_hot)
        grad[..., ~allowed] = float("inf")
        top_k = min(self.top_k, int(allowed.sum()))
        top = (-grad).topk(top_k, dim=-1).indices  # [rows, n, k]
        where = torch.randint(0, length, (rows, self.candidates), generator=generator)
        pick = torch.randint(0, top_k, (rows, self.candidates), generator=generator)
        candidates = suffixes[:, None].repeat(1, self.candidates, 1)  # [rows, C, n]
        row_index = torch.arange(rows)[:, None]
        candidates[row_index, torch.arange(self.candidates)[None], where] = top[row_index, where, pick]
        # A candidate must survive a decode/encode round trip: that is what a real prompt would contain.
        flat = candidates.view(-1, length).tolist()
        consistent = torch.tensor([tokenizer(" " + tokenizer.decode(c), add_special_tokens=False)["input_ids"] == c
                                   for c in flat]).view(rows, self.candidates)
        owner = prefix_rows.repeat_interleave(self.candidates)  # the behaviour of each candidate
        with torch.no_grad():
            losses = []
            for start, chunk in chunks(flat, 1024):
                index = list(range(start, start + len(chunk)))
                cand = rest_layout([parts[i // self.candidates] for i in index], chunk, tokenizer.pad_token_id)
                losses.append(prefix.target_nll(model, owner[index], cand, embed(cand.ids)))
        losses = torch.cat(losses).view(rows, self.candidates)
        losses[~consistent] = float("inf")
        best = losses.argmin(-1)
        keep = consistent.any(-1)
        return torch.where(keep[:, None], candidates[torch.arange(rows), best], suffixes)
