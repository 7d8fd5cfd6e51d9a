"""Residual-stream states at chosen decoder layers, captured with forward hooks.

Hooks (rather than ``output_hidden_states``) give the raw output of every decoder layer, including
the last one, which Hugging Face reports only after the final norm. See ``backbone.resolve_layers``
for the layer convention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from lit_safety.backbone import decoder_layers, resolve_layers


class _StopForward(Exception):
    """Raised by a hook to skip the layers after the last one a caller needs."""


def _layer_output(output) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def capture_residuals(model, layers: Sequence[int], stop_after_last: bool = False) -> Iterator[dict[int, Tensor]]:
    """Record the output of the given decoder layers during the forward passes inside the block.

    Args:
        model: a causal LM (PEFT-wrapped or not).
        layers: decoder layer indices (negative allowed).
        stop_after_last: abort the forward after the deepest requested layer (the caller must run it
            through ``forward_states``, which catches the abort); saves the rest of the network.
    """
    stack = decoder_layers(model)
    wanted = resolve_layers(layers, len(stack))
    states: dict[int, Tensor] = {}
    last = max(wanted) if wanted else -1

    def make_hook(index: int):
        def hook(_module, _args, output):
            states[index] = _layer_output(output)
            if stop_after_last and index == last:
                raise _StopForward

        return hook

    handles = [stack[i].register_forward_hook(make_hook(i)) for i in sorted(set(wanted))]
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


def forward_states(
    model, input_ids: Tensor, attention_mask: Tensor, layers: Sequence[int], logits: bool = True
) -> tuple[dict[int, Tensor], Tensor | None]:
    """One forward pass returning ``({layer: states [B, T, D]}, logits [B, T, V] or None)``.

    With ``logits=False`` the pass stops after the deepest requested layer, so a reference pass that
    needs only states costs no LM head and no later layers.
    """
    with capture_residuals(model, layers, stop_after_last=not logits) as states:
        if logits:
            out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return dict(states), out.logits
        with contextlib.suppress(_StopForward):
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return dict(states), None


def position_mask(sequences: dict, positions: str) -> Tensor:
    """The positions of a collated batch to use: "completion", "prompt" or "all" (every real token)."""
    return {"completion": sequences["completion_mask"], "prompt": sequences["prompt_mask"],
            "all": sequences["attention_mask"]}[positions]


def joint(sequences: list[dict], fields: Sequence[str] = ("input_ids", "attention_mask")
          ) -> tuple[dict[str, Tensor], list[tuple[int, int]]]:
    """Several right-padded sequence batches as one: ``({field: joined}, [(rows, length)])``.

    Right padding keeps every real token at its position, and padding is masked, so each part's states
    are those of its own forward; one forward of the joint batch replaces one per part.
    """
    length = max(seq["input_ids"].shape[1] for seq in sequences)
    joined = {name: torch.cat([torch.nn.functional.pad(seq[name], (0, length - seq[name].shape[1]))
                               for seq in sequences]) for name in fields}
    return joined, [(seq["input_ids"].shape[0], seq["input_ids"].shape[1]) for seq in sequences]


def split(x: Tensor, parts: list[tuple[int, int]]) -> list[Tensor]:
    """``x`` [sum of rows, T, ...] back into the parts ``joint`` made, each at its own length."""
    out, start = [], 0
    for rows, length in parts:
        out.append(x[start : start + rows, :length])
        start += rows
    return out


def joint_forward_states(model, sequences: list[dict], layers: Sequence[int],
                         logits: bool = False) -> list[tuple[dict[int, Tensor], Tensor | None]]:
    """``forward_states`` of several sequence batches in one forward pass, one result per batch."""
    joined, parts = joint(sequences)
    states, all_logits = forward_states(model, joined["input_ids"], joined["attention_mask"], layers, logits)
    per_layer = {layer: split(h, parts) for layer, h in states.items()}
    per_part_logits = split(all_logits, parts) if all_logits is not None else [None] * len(parts)
    return [({layer: h[i] for layer, h in per_layer.items()}, per_part_logits[i]) for i in range(len(parts))]


class Window(NamedTuple):
    """A batch's logits from the position before its earliest completion token to the end, with its
    ids and completion mask over the same positions: all that a completion loss reads (LAT's inner
    loop and the miner score completions many times a step; the head over every prompt position
    would dominate)."""

    logits: Tensor
    input_ids: Tensor
    completion_mask: Tensor


def completion_window(model, seq: dict) -> Window:
    """``seq``'s completion window (see ``Window``)."""
    ids, completion = seq["input_ids"], seq["completion_mask"]
    marked = completion.any(dim=0).nonzero()
    start = max(0, int(marked[0]) - 1) if len(marked) else ids.shape[1] - 1
    logits = model(input_ids=ids, attention_mask=seq["attention_mask"], logits_to_keep=ids.shape[1] - start).logits
    return Window(logits, ids[:, start:], completion[:, start:])


def joint_completion_windows(model, first: dict, second: dict) -> tuple[Window, Window]:
    """The windows of two sequence batches of the same examples (the harmful completion and the
    refusal of each request) from one forward pass."""
    joined, parts = joint([first, second], ("input_ids", "attention_mask", "completion_mask"))
    window, rows = completion_window(model, joined), parts[0][0]
    return Window(*(x[:rows] for x in window)), Window(*(x[rows:] for x in window))
