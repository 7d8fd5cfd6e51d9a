"""The one record schema every loader produces and every method consumes.

A record is a request (``prompt``, or a chat ``messages`` list), its ``kind`` (harmful, benign or
borderline), the ``completion`` (the harmful answer for harmful records, the helpful one otherwise),
an optional ``refusal``, and for evaluation an attack ``target`` and the ground-truth ``answer``.
Fields outside the schema are kept in ``meta``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

KINDS = ("harmful", "benign", "borderline")
FIELDS = ("prompt", "messages", "completion", "refusal", "kind", "target", "answer")


class DataError(ValueError):
    """A data source or record that cannot be used; the message names file, record and field."""


@dataclass
class Record:
    kind: str
    messages: list[dict[str, str]]
    completion: str | None = None
    refusal: str | None = None
    target: str | None = None
    answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The last user turn, for display and judges."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")

    def with_prompt(self, content: str) -> Record:
        """This record with ``content`` as its last user turn (the earlier turns kept)."""
        messages = [dict(m) for m in self.messages]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last_user]["content"] = content
        return dataclasses.replace(self, messages=messages)

    def to_json(self) -> dict[str, Any]:
        row = {"kind": self.kind, "messages": self.messages}
        for name in ("completion", "refusal", "target", "answer"):
            if getattr(self, name) is not None:
                row[name] = getattr(self, name)
        return {**row, **self.meta}


def _text(value: Any, where: str, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def parse_record(raw: Any, where: str, default_kind: str | None = None, default_refusal: str | None = None) -> Record:
    """Validate one raw row (already column-mapped) into a ``Record``.

    Args:
        raw: a mapping with schema field names.
        where: "file:line" or "dataset[index]", used in every error message.
        default_kind: kind for rows without one.
        default_refusal: refusal for rows without one.
    """
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a record must be an object, got {type(raw).__name__}")
    kind = raw.get("kind", default_kind)
    if kind is None:
        raise DataError(f"{where}: record has no 'kind' (set it in the data or with the source's 'kind')")
    if kind not in KINDS:
        raise DataError(f"{where}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    completion = _text(raw.get("completion"), where, "completion")
    messages = raw.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise DataError(f"{where}: field 'messages' must be a list of {{role, content}} strings")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if messages and messages[-1]["role"] == "assistant" and completion is None:
            # A chat transcript: its last assistant turn is the completion.
            completion = messages.pop()["content"]
    elif raw.get("prompt") is not None:
        messages = [{"role": "user", "content": _text(raw["prompt"], where, "prompt")}]
    if not messages or not any(m["role"] == "user" for m in messages):
        raise DataError(f"{where}: record needs a 'prompt' or a 'messages' list with a user turn")
    return Record(
        kind=kind,
        messages=messages,
        completion=completion,
        refusal=_text(raw.get("refusal", default_refusal), where, "refusal"),
        target=_text(raw.get("target"), where, "target"),
        answer=_text(raw.get("answer"), where, "answer"),
        meta={k: v for k, v in raw.items() if k not in FIELDS},
    )
