"""Attacks on the model rather than the prompt: refusal-direction ablation (white-box activation
steering) and harmful fine-tuning (tampering with the weights)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lit_safety.adversaries import EMBEDDING, ablate, attack_sites, output_tensor, replace_output
from lit_safety.backbone import decoder_layers, resolve_layers
from lit_safety.data.formatting import ChatFormatter, collate
from lit_safety.data.records import Record
from lit_safety.evaluation.attacks import Attack, AttackResult, SnapshotBook, attacking, chunks, require
from lit_safety.evaluation.generation import generate, left_pad, prompt_ids
from lit_safety.losses import toward


def _records(source: str, kind: str, n: int, attack: str, field_name: str, need_completion: bool = False) -> list[Record]:
    from lit_safety.data.loaders import load_records

    records = [r for r in load_records(source) if r.kind == kind and (r.completion or not need_completion)]
    what = f"{kind} records" + (" with a completion" if need_completion else "")
    require(bool(records), attack, field_name, f"{source!r} holds no {what}")
    return records[:n]


def _check_source(source: str, attack: str, field_name: str) -> None:
    """A source that names a local file must exist (named sets and hub ids are checked when loaded)."""
    import os

    from lit_safety.data.loaders import FILE_FORMATS

    require(bool(source), attack, field_name, "a data source is needed")
    looks_like_path = source.startswith((".", "/", "~")) or os.path.splitext(source)[1].lower() in FILE_FORMATS
    require(not looks_like_path or os.path.exists(os.path.expanduser(source)), attack, field_name,
            f"file not found: {source}")


@torch.no_grad()
def last_prompt_states(model, formatter: ChatFormatter, records: Sequence[Record], layers: list[int],
                       batch_size: int = 64, position: Callable[[Record, list[int]], int] | None = None) -> dict[int, Tensor]:
    """[records, hidden] residual states (decoder layer outputs) at each prompt's last token, per layer;
    ``position(record, its prompt ids)`` picks another token of each prompt instead."""
    from lit_safety.representations import forward_states

    device = next(model.parameters()).device
    out: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    for _, chunk in chunks(records, batch_size):
        prompts = [prompt_ids(formatter, r) for r in chunk]
        ids, mask = left_pad(prompts, formatter.tokenizer.pad_token_id)
        states, _ = forward_states(model, ids.to(device), mask.to(device), layers, logits=False)
        width = ids.shape[1]  # left padding: a prompt's token i sits at width - len + i
        at = torch.tensor([width - 1 if position is None else width - len(p) + position(r, p) for r, p in zip(chunk, prompts)])
        for layer in layers:
            out[layer].append(states[layer][torch.arange(len(prompts)), at.to(device)].float())
    return {layer: torch.cat(rows) for layer, rows in out.items()}


def mean_prompt_state(model, formatter: ChatFormatter, records: Sequence[Record], layers: list[int],
                      batch_size: int = 64) -> dict[int, Tensor]:
    """Mean residual state (decoder layer output) at each prompt's last token, per layer."""
    return {layer: states.mean(0) for layer, states in
            last_prompt_states(model, formatter, records, layers, batch_size).items()}


def refusal_directions(model, formatter: ChatFormatter, harmful: Sequence[Record], harmless: Sequence[Record],
                       layers: list[int]) -> dict[int, Tensor]:
    """Arditi et al. (arXiv 2406.11717): per layer, the unit difference of mean last-prompt-token
    states on harmful and harmless prompts."""
    a = mean_prompt_state(model, formatter, harmful, layers)
    b = mean_prompt_state(model, formatter, harmless, layers)
    return {layer: (a[layer] - b[layer]) / (a[layer] - b[layer]).norm().clamp_min(1e-12) for layer in layers}


@contextlib.contextmanager
def ablated(model, direction: Tensor) -> Iterator[None]:
    """Within the block the direction is projected out of the embedding output and of every decoder
    layer's output, so no layer can write it into the residual stream."""

    sites = attack_sites(model, [EMBEDDING, *range(len(decoder_layers(model)))])
    hook = lambda _m, _a, output: replace_output(output, ablate(output_tensor(output), direction))  # noqa: E731
    handles = [module.register_forward_hook(hook) for _, module in sites]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class RefusalDirectionAblation(Attack):
    """Refusal-direction ablation (Arditi et al. 2024): the difference of mean residual states on
    harmful and harmless prompts, computed on the attacked model itself, is projected out of every
    layer's output at every position while the model answers. Every candidate layer's direction is
    tried; a behaviour is broken if any of them breaks it. With ``prefill`` the response is also
    forced to start with the behaviour's target.

    Args:
        harmful: data source of harmful prompts for the direction.
        harmless: data source of harmless prompts for the direction (its benign records).
        n: prompts of each kind.
        layers: candidate layers of the direction (None: every decoder layer).
        prefill: also prefill the target.
        max_new_tokens: length of the response.
    """

    harmful: str = "organism:harmful"
    harmless: str = "organism:benign"
    n: int = 128
    layers: list[int] | None = None
    prefill: bool = False
    max_new_tokens: int = 24

    def __post_init__(self) -> None:
        _check_source(self.harmful, "RefusalDirectionAblation", "harmful")
        _check_source(self.harmless, "RefusalDirectionAblation", "harmless")
        require(self.n >= 1, "RefusalDirectionAblation", "n", f"must be >= 1, got {self.n}")
        require(self.layers is None or len(self.layers) > 0, "RefusalDirectionAblation", "layers", "empty list")

    @property
    def name(self) -> str:
        return "ablation_prefill" if self.prefill else "ablation"

    def check(self, num_layers: int) -> None:
        if self.layers is not None:
            try:
                resolve_layers(self.layers, num_layers)
            except ValueError as e:
                raise ValueError(f"RefusalDirectionAblation.layers: {e}") from None

    def run(self, model, formatter: ChatFormatter, records: Sequence[Record], judge=None) -> AttackResult:
        book = SnapshotBook(records, judge)
        layers = list(range(len(decoder_layers(model)))) if self.layers is None else \
            resolve_layers(self.layers, len(decoder_layers(model)))
        with attacking(model, len(records), self.name) as bar:
            directions = refusal_directions(
                model, formatter, _records(self.harmful, "harmful", self.n, "RefusalDirectionAblation", "harmful"),
                _records(self.harmless, "benign", self.n, "RefusalDirectionAblation", "harmless"), layers)
            for k, layer in enumerate(layers, start=1):
                rows = [i for i in range(len(records)) if not book.broken[i]]
                if not rows:
                    break
                with ablated(model, directions[layer]):
                    chunk = [records[i] for i in rows]
                    responses = generate(model, formatter, chunk, max_new_tokens=self.max_new_tokens,
                                         prefill=[r.target for r in chunk] if self.prefill else None)
                book.add(rows, responses, k)
            bar.update(len(records))
        return AttackResult(book.responses)


@dataclass
class HarmfulFineTuning(Attack):
    """Harmful fine-tuning (tampering): the defended model's LoRA weights are trained on harmful
    request/answer pairs (SFT on the answers), and the model answers the plain request after each of
    ``checkpoints`` training steps; a behaviour is broken if it is broken at any checkpoint. The
    model's weights are restored afterwards.

    Args:
        pairs: data source of harmful training pairs (harmful records with a completion): the
            defense's own training concepts, never the evaluated behaviours.
        checkpoints: training steps after which the model is judged (the last is the budget).
        lr: AdamW learning rate.
        batch_size: pairs per step.
        seed: seed of the pairs' order.
        max_new_tokens: length of the response.
    """

    pairs: str = "organism:harmful"
    checkpoints: list[int] = field(default_factory=lambda: [10, 50, 200])
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    max_new_tokens: int = 24
    name: str = "tampering"
    needs_adapters = True
    tampers = True

    def __post_init__(self) -> None:
        _check_source(self.pairs, "HarmfulFineTuning", "pairs")
        require(bool(self.checkpoints) and all(c >= 1 for c in self.checkpoints), "HarmfulFineTuning", "checkpoints",
                f"need one or more steps >= 1, got {self.checkpoints}")
        require(self.lr > 0, "HarmfulFineTuning", "lr", f"must be > 0, got {self.lr}")
        require(self.batch_size >= 1, "HarmfulFineTuning", "batch_size", f"must be >= 1, got {self.batch_size}")

    def run(self, model, formatter: ChatFormatter, records: Sequence[Record], judge=None) -> AttackResult:
        pairs = _records(self.pairs, "harmful", 10**9, "HarmfulFineTuning", "pairs", need_completion=True)
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        require(bool(lora), "HarmfulFineTuning", "model", "the model has no LoRA weights to fine-tune")
        saved = [(p.detach().clone(), p.requires_grad) for p in lora]
        book = SnapshotBook(records, judge)
        checkpoints = sorted(set(self.checkpoints))
        generator = torch.Generator().manual_seed(self.seed)
        device = next(model.parameters()).device
        try:
            for p in lora:
                p.requires_grad_(True)
            optimizer = torch.optim.AdamW(lora, lr=self.lr)
            order: list[int] = []
            with attacking(model, checkpoints[-1], self.name) as bar:
                for step in range(1, checkpoints[-1] + 1):
                    if len(order) < self.batch_size:
                        order += torch.randperm(len(pairs), generator=generator).tolist()
                    batch, order = [pairs[i] for i in order[: self.batch_size]], order[self.batch_size :]
                    encoded = collate([formatter.encode_record(r, r.completion) for r in batch],
                                      formatter.tokenizer.pad_token_id)
                    ids, mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
                    logits = model(input_ids=ids, attention_mask=mask).logits
                    loss = toward(logits, ids, encoded["completion_mask"].to(device))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    bar.update(1)
                    if step in checkpoints:
                        rows = [i for i in range(len(records)) if not book.broken[i]]
                        if rows:
                            book.add(rows, generate(model, formatter, [records[i] for i in rows],
                                                    max_new_tokens=self.max_new_tokens), step)
        finally:
            with torch.no_grad():
                for p, (value, requires_grad) in zip(lora, saved):
                    p.copy_(value)
                    p.grad = None
                    p.requires_grad_(requires_grad)
        return AttackResult(book.responses, broken_at=book.broken_at)

    def curve_budgets(self) -> list[int]:
        return sorted(set(self.checkpoints))
