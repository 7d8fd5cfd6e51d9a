"""Token layout shared by suffix attacks: [template start + request][suffix][template end][target].

The suffix sits at the end of the user turn (before the template closes it); raw-format records get
it at the end of their prompt. Every row is left-padded up to the target, whose tokens follow,
right-padded, so the prompt part of every row ends at the same column (ready for generation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lit_safety.data.formatting import ChatFormatter
from lit_safety.data.records import Record

SENTINEL = "<<lit_safety_suffix>>"


@dataclass
class Parts:
    before: list[int]
    after: list[int]
    target: list[int]


def _ids(formatter: ChatFormatter, text: str) -> list[int]:
    return formatter.tokenizer(text, add_special_tokens=False)["input_ids"]


def _target_ids(formatter: ChatFormatter, target: str) -> list[int]:
    return _ids(formatter, " " + target) if target else []


def _bos(formatter: ChatFormatter) -> list[int]:
    """What precedes a raw-format prompt, which has no template."""
    bos = formatter.tokenizer.bos_token_id
    return [bos] if bos is not None else []


def _around(formatter: ChatFormatter, record: Record, content: str) -> tuple[str, str]:
    """The chat prompt's text before and after the slot marker, the last user turn's content being
    ``content`` (which holds the marker once)."""
    text_before, text_after = formatter.prompt_text(record.with_prompt(content).messages).split(SENTINEL)
    return text_before, text_after


def split_prompt(formatter: ChatFormatter, record: Record, target: str) -> Parts:
    """Token ids around the suffix slot of ``record``'s prompt, and of the target string."""
    if record.meta.get("format") == "raw":
        before, after = _bos(formatter) + _ids(formatter, record.prompt), []
    else:
        text_before, text_after = _around(formatter, record, record.prompt + " " + SENTINEL)
        before, after = _ids(formatter, text_before.rstrip(" ")), _ids(formatter, text_after)
    return Parts(before, after, _target_ids(formatter, target))


def split_request(formatter: ChatFormatter, record: Record, target: str) -> tuple[Parts, list[int]]:
    """The prompt of ``record`` as (template around the request, the request's own token ids): the
    request takes the suffix slot, for attacks that perturb the request itself."""
    if record.meta.get("format") == "raw":
        before, after = _bos(formatter), []
    else:
        text_before, text_after = _around(formatter, record, SENTINEL)
        before, after = _ids(formatter, text_before), _ids(formatter, text_after)
    return Parts(before, after, _target_ids(formatter, target)), _ids(formatter, record.prompt)


@dataclass
class Layout:
    """A batch laid out for a suffix attack. ``ids`` [B, P + Tt]: left-padded prompts with suffix
    (width P), then right-padded targets. Masks are [B, P + Tt] booleans."""

    ids: Tensor
    attention_mask: Tensor
    suffix_mask: Tensor
    target_mask: Tensor
    prompt_width: int

    def select(self, keep: Tensor) -> Layout:
        """The rows ``keep`` (a boolean mask) of this layout."""
        return Layout(self.ids[keep], self.attention_mask[keep], self.suffix_mask[keep], self.target_mask[keep],
                      self.prompt_width)

    @property
    def prompt_ids(self) -> Tensor:
        return self.ids[:, : self.prompt_width]

    @property
    def prompt_attention(self) -> Tensor:
        return self.attention_mask[:, : self.prompt_width]


def layout(parts: Sequence[Parts], suffixes: Sequence[Sequence[int]], pad_token_id: int) -> Layout:
    prompts = [p.before + list(s) + p.after for p, s in zip(parts, suffixes)]
    width, target_width = max(map(len, prompts)), max(len(p.target) for p in parts)
    rows = len(parts)
    ids = torch.full((rows, width + target_width), pad_token_id, dtype=torch.long)
    attention = torch.zeros(rows, width + target_width, dtype=torch.bool)
    suffix_mask, target_mask = torch.zeros_like(attention), torch.zeros_like(attention)
    for i, (p, s, prompt) in enumerate(zip(parts, suffixes, prompts)):
        start = width - len(prompt)
        ids[i, start:width] = torch.tensor(prompt)
        attention[i, start:width] = True
        suffix_mask[i, start + len(p.before) : start + len(p.before) + len(s)] = True
        if p.target:
            ids[i, width : width + len(p.target)] = torch.tensor(p.target)
            attention[i, width : width + len(p.target)] = True
            target_mask[i, width : width + len(p.target)] = True
    return Layout(ids, attention, suffix_mask, target_mask, width)


@dataclass
class Rest:
    """What follows a cached prefix: [suffix][template end][target] per row, right-padded ([N, R])."""

    ids: Tensor
    attention_mask: Tensor
    suffix_mask: Tensor
    target_mask: Tensor

    def select(self, keep: Tensor) -> Rest:
        """The rows ``keep`` (a boolean mask) of this layout."""
        return Rest(self.ids[keep], self.attention_mask[keep], self.suffix_mask[keep], self.target_mask[keep])


def rest_layout(parts: Sequence[Parts], suffixes: Sequence[Sequence[int]], pad_token_id: int) -> Rest:
    rows = [list(s) + p.after + p.target for p, s in zip(parts, suffixes)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros(len(rows), width, dtype=torch.bool)
    suffix_mask, target_mask = torch.zeros_like(attention), torch.zeros_like(attention)
    for i, (p, s, row) in enumerate(zip(parts, suffixes, rows)):
        ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = True
        suffix_mask[i, : len(s)] = True
        target_mask[i, len(row) - len(p.target) : len(row)] = True
    return Rest(ids, attention, suffix_mask, target_mask)
