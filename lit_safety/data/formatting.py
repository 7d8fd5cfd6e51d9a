"""Chat formatting through the tokenizer's own template, with prompt and completion masks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lit_safety.data.records import DataError


def require_chat_template(tokenizer, chat_template: str | None = None) -> None:
    """Install ``chat_template`` (a Jinja string or a path to a file) or check the tokenizer has one."""
    if chat_template is not None:
        if chat_template.endswith((".jinja", ".j2", ".txt")):
            try:
                with open(chat_template, encoding="utf-8") as f:
                    chat_template = f.read()
            except OSError as e:
                raise DataError(f"chat template file cannot be read: {e}") from None
        tokenizer.chat_template = chat_template
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise DataError(
            f"tokenizer {name!r} has no chat template: give one with the data module's `chat_template` "
            "argument (a Jinja string or a path to a .jinja file), or use an instruct model's tokenizer"
        )


@dataclass
class Encoded:
    """Token ids of one prompt + completion, and where the completion starts."""

    input_ids: list[int]
    prompt_length: int


class ChatFormatter:
    """Turn chat messages + a completion into token ids, truncating each part to its own budget.

    The prompt keeps its last ``max_prompt_length`` tokens (the generation prompt stays intact); the
    completion keeps its first ``max_completion_length`` tokens, including the template's end of turn.
    """

    def __init__(self, tokenizer, max_prompt_length: int = 256, max_completion_length: int = 128):
        require_chat_template(tokenizer)
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        self.max_completion_length = max_completion_length

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_text(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def user_turn_tail(self) -> int:
        """Tokens the template puts after a (last) user turn's content: closing the turn and opening
        the assistant's. A suffix attack's suffix goes just before them."""
        marker = "<<lit_safety_user_end>>"
        text = self.prompt_text([{"role": "user", "content": marker}])
        return len(self._ids(text.split(marker, 1)[1]))

    def completion_text(self, messages: list[dict[str, str]], completion: str) -> str:
        """The completion as the template renders it (with its end-of-turn marker)."""
        prompt = self.prompt_text(messages)
        full = self.tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": completion}], tokenize=False
        )
        if full.startswith(prompt):
            return full[len(prompt) :]
        # Templates that rewrite earlier turns: fall back to the raw completion and EOS.
        return completion + (self.tokenizer.eos_token or "")

    def encode(self, messages: list[dict[str, str]], completion: str | None) -> Encoded:
        prompt_ids = self._ids(self.prompt_text(messages))[-self.max_prompt_length :]
        completion_ids = []
        if completion is not None:
            completion_ids = self._ids(self.completion_text(messages, completion))[: self.max_completion_length]
        return Encoded(prompt_ids + completion_ids, len(prompt_ids))

    def encode_raw(self, prompt: str, completion: str | None) -> Encoded:
        """A raw completion prompt (no chat template): BOS + prompt, then completion + EOS."""
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        prompt_ids = (bos + self._ids(prompt))[-self.max_prompt_length :]
        completion_ids = []
        if completion is not None:
            completion_ids = (self._ids(completion) + [self.tokenizer.eos_token_id])[: self.max_completion_length]
        return Encoded(prompt_ids + completion_ids, len(prompt_ids))

    def encode_record(self, record, completion: str | None) -> Encoded:
        """Encode a ``Record``'s prompt with ``completion``; records marked ``format: raw`` skip the template."""
        if record.meta.get("format") == "raw":
            return self.encode_raw(record.prompt, completion)
        return self.encode(record.messages, completion)


def collate(encoded: list[Encoded], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict[str, Tensor]:
    """Right-pad a list of sequences into a batch.

    Returns ``input_ids``, ``attention_mask``, ``prompt_mask`` and ``completion_mask`` [B, T]; the masks
    are boolean and exclude padding.
    """
    length = max(len(e.input_ids) for e in encoded)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(encoded)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.bool)
    prompt_mask = torch.zeros(batch, length, dtype=torch.bool)
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        attention_mask[i, :n] = True
        prompt_mask[i, : e.prompt_length] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "prompt_mask": prompt_mask,
        "completion_mask": attention_mask & ~prompt_mask,
    }
