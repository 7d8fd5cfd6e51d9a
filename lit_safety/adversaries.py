"""Adversaries that act on the residual stream from inside ``training_step``.

Their tensors are plain leaf tensors held outside the module tree: never module parameters, never
seen by the outer optimizer or written to checkpoints, and no DDP unused-parameter errors. Their
gradients come from ``torch.autograd.grad`` so nothing leaks into the LoRA ``.grad`` buffers. They
enter the forward pass through hooks that are removed in a ``finally``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from lit_safety.backbone import decoder_layers, hidden_size, resolve_layers
from lit_safety.data.formatting import ChatFormatter
from lit_safety.distributed import global_masked_mean, mean_across_ranks_
from lit_safety.losses import masked_mean, wide, wide_dtype


def floating_parameter(model) -> Tensor:
    """The model's first floating-point weight: where and in what precision an adversary's
    parameters live (quantized models hold integer weights too)."""
    return next(p for p in model.parameters() if p.is_floating_point())


def replace_output(output, new: Tensor):
    return (new, *output[1:]) if isinstance(output, tuple) else new


def output_tensor(output) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def ablate(h: Tensor, direction: Tensor) -> Tensor:
    """h with its component along the unit ``direction`` removed, at every position (refusal-direction
    ablation: the evaluation's attack and ReFAT's training perturbation)."""
    direction = direction.to(h.dtype)
    return h - (h @ direction)[..., None] * direction


def adam_descent(
    parameters: list[Tensor], loss_fn: Callable[[], Tensor], steps: int, lr: float,
    after_step: Callable[[], None] | None = None, stop: Callable[[int], bool] | None = None,
    shared: bool = False,
) -> list[float]:
    """Adam on ``parameters`` for ``steps`` steps minimising ``loss_fn()``; returns every step's loss.

    Gradients come from ``torch.autograd.grad`` w.r.t. ``parameters`` only, so nothing accumulates
    in any model parameter's ``.grad``. A step whose loss or gradient is not finite is dropped (its
    loss is reported as NaN, see ``dropped``): one bad inner step must not poison the perturbation,
    and through it the model update. ``stop(k)``, called after every step k that was taken, ends the
    descent early when it returns True. ``shared``: the parameters act on every rank's batch (a
    miner, not a per-example perturbation): gradients are averaged across ranks, so every rank takes
    the same step (see ``lit_safety.distributed``).
    """
    optimizer = torch.optim.Adam(parameters, lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        grads = torch.autograd.grad(loss, parameters)
        loss = loss.detach()
        if shared:  # every rank then sees the same loss and gradient, and takes or drops the same step
            loss, *grads = mean_across_ranks_([loss.clone(), *(g.contiguous() for g in grads)])
        if not (torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)):
            losses.append(float("nan"))
            continue
        for p, g in zip(parameters, grads):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        losses.append(loss.item())
        if stop is not None and stop(len(losses)):
            break
    return losses


def dropped(losses: list[float]) -> int:
    """Inner steps ``adam_descent`` dropped for a non-finite loss or gradient."""
    return sum(loss != loss for loss in losses)


def finite(losses: list[float]) -> list[float]:
    return [loss for loss in losses if loss == loss]


@contextlib.contextmanager
def edit_output(module: torch.nn.Module, edit: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Within the block, ``module``'s output h is replaced by ``edit(h)``."""
    handle = module.register_forward_hook(
        lambda _module, _args, output: replace_output(output, edit(output_tensor(output)))
    )
    try:
        yield
    finally:
        handle.remove()


def edit_layer_output(model, layer: int, edit: Callable[[Tensor], Tensor]):
    """Within the block, decoder layer ``layer``'s output h is replaced by ``edit(h)``."""
    stack = decoder_layers(model)
    (index,) = resolve_layers([layer], len(stack))
    return edit_output(stack[index], edit)


class ResidualAttack:
    """The hard-negative miner of the triplet defense (2506.11938, Sec. 3.3): a linear residual module
    h -> h + W h + b inserted after one decoder layer. W and b start at zero, so the module starts as
    the identity; it is trained to make the (frozen) model produce harmful completions, and the
    harmful states it induces serve as hard negatives.

    Args:
        hidden_size: width of the residual stream (read from the model, never hard-coded).
        layer: decoder layer after which the module acts.
        device, dtype: placement of W and b (``for_model``: the model's device, float32 or wider).
    """

    def __init__(self, hidden_size: int, layer: int, device=None, dtype=torch.float32):
        self.layer = layer
        self.weight = torch.zeros(hidden_size, hidden_size, device=device, dtype=dtype, requires_grad=True)
        self.bias = torch.zeros(hidden_size, device=device, dtype=dtype, requires_grad=True)

    @classmethod
    def for_model(cls, model, layer: int) -> ResidualAttack:
        reference = floating_parameter(model)
        return cls(hidden_size(model), layer, reference.device, wide_dtype(reference.dtype))

    def parameters(self) -> list[Tensor]:
        return [self.weight, self.bias]

    def __call__(self, h: Tensor) -> Tensor:
        return h + (h.to(self.weight.dtype) @ self.weight.T + self.bias).to(h.dtype)

    def attached(self, model, rows: int | None = None):
        """Context in which the module sits in ``model``'s forward path, acting on the first ``rows``
        examples of each batch (all by default): attacked and clean examples share one forward."""
        if rows is None:
            return edit_layer_output(model, self.layer, self)
        return edit_layer_output(model, self.layer, lambda h: torch.cat([self(h[:rows]), h[rows:]]))

    def train(self, loss_fn: Callable[[], Tensor], steps: int, lr: float) -> list[float]:
        """Adam on (W, b) minimising ``loss_fn()`` (which runs with the module attached); returns the
        loss at every step. Gradients reach only W and b; one module serves every rank's batch."""
        return adam_descent(self.parameters(), loss_fn, steps, lr, shared=True)


EMBEDDING = "embedding"


def check_sites(layers: list[int | str], num_layers: int) -> list[int | str]:
    """Attacked sites as indices into the decoder layers (or ``"embedding"``); raises on an unknown
    site or a layer out of range."""
    resolved: list[int | str] = []
    for layer in layers:
        if layer == EMBEDDING:
            resolved.append(EMBEDDING)
        elif isinstance(layer, str):
            raise ValueError(f"unknown attack site {layer!r}: use decoder layer indices or {EMBEDDING!r}")
        else:
            resolved += resolve_layers([layer], num_layers)
    return resolved


def attack_sites(model, layers: list[int | str]) -> list[tuple[int | str, torch.nn.Module]]:
    """``(site as given, module)`` for each attacked site: decoder layer indices (negative allowed)
    and/or ``"embedding"``."""
    stack = decoder_layers(model)
    return [(layer, model.get_input_embeddings() if index == EMBEDDING else stack[index])
            for layer, index in zip(layers, check_sites(layers, len(stack)))]


EpsilonScale = Literal["absolute", "reference_norm"]


@dataclass
class LatentBudget:
    """The budget of an L2-bounded latent adversary; targeted LAT's inner loop and the latent attack
    of the evaluation suite share it.

    Args:
        layers: attacked sites: decoder layer indices (negative allowed) and/or "embedding".
        epsilon: L2 radius of each token's perturbation.
        epsilon_scale: "absolute" (epsilon as given; LAT's paper: 6 at Llama-3-8B) or
            "reference_norm" (epsilon times the site's mean activation norm under the reference model,
            so one setting holds across models of different activation scale).
        steps: Adam steps.
        lr: Adam step as a fraction of epsilon (a step moves each perturbed token by about
            lr * epsilon, whatever the model width).
    """

    layers: list[int | str] = field(default_factory=lambda: [0])
    epsilon: float = 1.0
    epsilon_scale: EpsilonScale = "reference_norm"
    steps: int = 32
    lr: float = 0.25

    def __post_init__(self) -> None:
        if self.epsilon <= 0 or self.steps < 0 or self.lr <= 0:
            raise ValueError(f"a latent adversary needs epsilon > 0, steps >= 0 and lr > 0; got epsilon={self.epsilon}, "
                             f"steps={self.steps}, lr={self.lr}")

    def unit(self, norms: dict, site) -> float:
        """What one epsilon is at ``site``, given each site's mean activation norm."""
        return float(norms[site]) if self.epsilon_scale == "reference_norm" else 1.0

    def radii(self, norms: dict) -> dict:
        """Per-site radius, given each site's mean activation norm (used by ``reference_norm``)."""
        return {site: self.epsilon * self.unit(norms, site) for site in self.layers}


@torch.no_grad()
def site_norms(model, sites: list[int | str], input_ids: Tensor, attention_mask: Tensor, mask: Tensor,
               across_ranks: bool = False) -> dict:
    """Mean per-token activation norm of each site over the masked positions: the unit of
    scale-relative epsilons. ``across_ranks``: over every data-parallel rank's batch (a method's
    calibration, the same on every rank); a collective, so every rank must call it."""
    from lit_safety.representations import capture_residuals

    layers = [s for s in sites if s != EMBEDDING]
    resolved = dict(zip(layers, resolve_layers(layers, len(decoder_layers(model)))))
    captured = {}  # the embedding output, seen inside the forward (where sharded weights are whole)
    handle = model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: captured.update(h=out))
    try:
        with capture_residuals(model, layers) as states:
            model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        handle.remove()
    embeddings = captured["h"]

    mean = global_masked_mean if across_ranks else masked_mean

    def norm(h: Tensor) -> float:
        return mean(wide(h).norm(dim=-1), mask).item()

    return {s: norm(embeddings if s == EMBEDDING else states[resolved[s]]) for s in sites}


def project_per_token(delta: Tensor, epsilon: Tensor | float, mask: Tensor) -> Tensor:
    """Scale each token's perturbation into the L2 ball of radius ``epsilon`` and zero masked-out
    positions. ``delta`` [B, T, D]; ``mask`` [B, T]; ``epsilon`` a scalar."""
    norms = delta.norm(dim=-1, keepdim=True)
    factor = torch.clamp(epsilon / norms.clamp_min(1e-12), max=1.0)
    return delta * factor * mask[..., None].to(delta.dtype)


class SuffixSlots(NamedTuple):
    """A batch with ``length`` slot tokens inserted into the prompts of its first rows (see
    ``suffix_slots``): the new sequences, the slot positions, and the positions of the original
    sequences (``kept``: ``length`` fewer per row) to read its states back at."""

    sequences: dict
    slots: Tensor
    kept: Tensor

    def original(self, states: Tensor) -> Tensor:
        """[B, T + length, ...] states at the original batch's [B, T] positions."""
        rows, width = self.kept.shape[0], self.kept.shape[1] - int(self.kept[0].logical_not().sum())
        return states[self.kept].view(rows, width, *states.shape[2:])


def slot_count(length: int | list[int], step: int) -> int:
    """Suffix slots at training step ``step``: ``length``, or the listed lengths in turn (the attacker
    picks the suffix's length, and a defense trained at one length can give way at a longer one)."""
    return length if isinstance(length, int) else length[step % len(length)]


def check_slot_counts(length: int | list[int], setting: str) -> None:
    counts = [length] if isinstance(length, int) else list(length)
    if not counts or min(counts) < 1:
        raise ValueError(f"{setting} must be >= 1, or a list of such lengths, got {length}")


def suffix_slot(tokenizer, init: str, setting: str) -> tuple[int, int]:
    """(template tokens after the user's content, the first token of ``init``): where suffix slots go
    and what they start as, as in the suite's embedding attack. ``setting`` names ``init`` in the error
    raised when it is not in the vocabulary."""
    ids = tokenizer(init, add_special_tokens=False)["input_ids"]
    if not ids or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"{setting}: {init!r} is not in the tokenizer's vocabulary")
    return ChatFormatter(tokenizer).user_turn_tail(), ids[0]


def allowed_tokens(tokenizer, vocabulary: int) -> Tensor:
    """[vocabulary] mask of the ids an attacker may write: no special tokens, no padding rows."""
    allowed = torch.ones(vocabulary, dtype=torch.bool)
    allowed[[i for i in tokenizer.all_special_ids if i < vocabulary]] = False
    allowed[len(tokenizer):] = False
    return allowed


def suffix_slots(sequences: dict, rows: int, length: int, tail: int, token_id: int | Tensor) -> SuffixSlots:
    """``sequences`` (right-padded, with prompt and completion masks) with ``length`` slot tokens
    (copies of ``token_id``, or the ``length`` ids of a tensor in order) inserted in each of the first
    ``rows`` prompts ``tail`` tokens before the prompt ends (the end of the user turn, before the
    template closes it: where a suffix attack puts its suffix); the other rows get ``length`` padding
    positions at the end, so every row keeps one width."""
    ids = sequences["input_ids"]
    batch, width = ids.shape
    new_width = width + length
    column = torch.arange(new_width, device=ids.device).expand(batch, new_width)
    mined = (torch.arange(batch, device=ids.device) < rows)[:, None]
    at = (sequences["prompt_mask"].sum(-1, keepdim=True) - tail).clamp_min(0)
    at = torch.where(mined, at, torch.full_like(at, width))
    inserted = (column >= at) & (column < at + length)
    # Position j of a new row reads old position j before the inserted ones and j - length after them.
    source = torch.where(column < at, column, column - length).clamp(0, width - 1)
    slot_ids = torch.as_tensor(token_id, device=ids.device).expand(length)[(column - at).clamp(0, length - 1)]
    fill = {"input_ids": slot_ids, "attention_mask": mined, "prompt_mask": mined}  # else False (padding)
    out = {key: torch.where(inserted, torch.as_tensor(fill.get(key, False), device=ids.device).to(value.dtype),
                            value.gather(1, source))
           for key, value in sequences.items()}
    return SuffixSlots(out, inserted & mined, ~inserted)


class LatentAdversary:
    """Targeted LAT's adversary (arXiv 2407.15549): a perturbation delta per example, per position and
    per attacked site, added to the site's output at the masked positions (by default the prompt),
    with every token's ||delta_t||_2 <= epsilon of its site.

    The perturbation is stored in units of epsilon (delta = epsilon * u, ||u_t|| <= 1), so one
    learning rate serves sites and models of any activation scale.

    Args:
        model: the model under attack (its hidden size is read from it).
        sites: decoder layer indices and/or "embedding".
        mask: [B, T] positions that may be perturbed (a dict site -> mask, or one mask for all; every
            mask of one shape).
        epsilon: per-site radius (a dict site -> radius, or one radius for all).
    """

    def __init__(self, model, sites: list[int | str], mask: Tensor | dict, epsilon: dict | float):
        self.sites = attack_sites(model, sites)
        self.masks = {name: mask[name] if isinstance(mask, dict) else mask for name, _ in self.sites}
        first = next(iter(self.masks.values()))
        shape = (*first.shape, hidden_size(model))
        self.epsilon = {name: float(epsilon[name] if isinstance(epsilon, dict) else epsilon) for name, _ in self.sites}
        dtype = wide_dtype(floating_parameter(model).dtype)
        self.units = {name: torch.zeros(shape, dtype=dtype, device=first.device, requires_grad=True)
                      for name, _ in self.sites}

    @property
    def rows(self) -> int:
        """Examples perturbed."""
        return next(iter(self.units.values())).shape[0]

    def parameters(self) -> list[Tensor]:
        return list(self.units.values())

    def delta(self, name) -> Tensor:
        return self.epsilon[name] * self.units[name]

    def project(self) -> None:
        with torch.no_grad():
            for name, u in self.units.items():
                u.copy_(project_per_token(u, 1.0, self.masks[name]))

    def freeze(self) -> None:
        """Fix the perturbation (the model update must not compute gradients for it)."""
        for u in self.units.values():
            u.requires_grad_(False)

    def padded(self, rows: int) -> None:
        """Extend the (frozen) perturbation with zero rows up to ``rows`` examples: the attacked
        examples come first in a batch whose other examples pass unperturbed in the same forward."""
        extra = rows - self.rows
        self.masks = {name: torch.cat([m, m.new_zeros(extra, m.shape[1])]) for name, m in self.masks.items()}
        self.units = {name: torch.cat([u, u.new_zeros(extra, *u.shape[1:])]) for name, u in self.units.items()}

    def norms(self) -> dict:
        """Mean per-token ||delta_t||_2 of each site over the perturbed positions."""
        with torch.no_grad():
            return {name: (self.delta(name).norm(dim=-1) * self.masks[name]).sum() / self.masks[name].sum().clamp_min(1)
                    for name in self.units}

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """Within the block every forward pass is perturbed (sequences may be shorter or longer than the
        mask: positions past it are not perturbed, e.g. a longer response to the same prompt). A
        batch of k times the examples (several sequences of each example in one forward, as
        ``representations.joint`` makes) gets each example's perturbation in each of its k parts."""

        def make_hook(name):
            def hook(_module, _args, output):
                h = output_tensor(output)
                delta = self.delta(name)[:, : h.shape[1]]
                if delta.shape[1] < h.shape[1]:
                    delta = torch.nn.functional.pad(delta, (0, 0, 0, h.shape[1] - delta.shape[1]))
                if h.shape[0] != delta.shape[0]:
                    delta = delta.repeat(h.shape[0] // delta.shape[0], 1, 1)
                return replace_output(output, h + delta.to(h.dtype))

            return hook

        handles = [module.register_forward_hook(make_hook(name)) for name, module in self.sites]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def optimise(self, loss_fn: Callable[[], Tensor], steps: int, lr: float,
                 stop: Callable[[int], bool] | None = None) -> list[float]:
        """Adam on the perturbations minimising ``loss_fn()`` (run inside ``attached``), projecting
        after every step; gradients come from ``torch.autograd.grad`` and reach nothing else.

        ``lr`` is a fraction of epsilon: Adam moves every coordinate by about lr / sqrt(D), so a step
        moves a token by about lr * epsilon whatever the width D of the model.
        """
        width = next(iter(self.units.values())).shape[-1]
        return adam_descent(self.parameters(), loss_fn, steps, lr / width**0.5, after_step=self.project, stop=stop)
