"""The batch a method receives: the one contract between data and methods.

A training batch maps each stream name (``harmful``, ``benign``, ...) to a ``StreamBatch``; each holds
the records' prompt with their ``completion`` and, where the records have one, with their
``refusal``. Any ``LightningDataModule`` whose loader yields this structure can feed any method;
``collate_stream`` builds it from records.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypedDict

from torch import Tensor

from lit_safety.data.formatting import ChatFormatter, collate
from lit_safety.data.records import DataError, Record

try:
    from typing import NotRequired
except ImportError:  # Python 3.10
    from typing_extensions import NotRequired


class Sequences(TypedDict):
    """Right-padded prompt + response token ids of a batch and their masks, each [B, T]. The masks are
    boolean and never mark padding (see ``lit_safety.losses`` for how losses read them)."""

    input_ids: Tensor
    attention_mask: Tensor
    prompt_mask: Tensor
    completion_mask: Tensor


class StreamBatch(TypedDict):
    """One stream's examples: prompt + completion, and prompt + refusal when every record has one."""

    completion: Sequences
    refusal: NotRequired[Sequences]


SafetyBatch = dict[str, StreamBatch]  # stream name -> its examples


def collate_stream(records: Sequence[Record], formatter: ChatFormatter, pad_to_multiple_of: int | None = None) -> StreamBatch:
    """Encode records (chat-formatted by ``formatter``) into a ``StreamBatch``."""
    pad_id = formatter.tokenizer.pad_token_id
    batch: StreamBatch = {"completion": collate([formatter.encode_record(r, r.completion) for r in records], pad_id,
                                                pad_to_multiple_of)}
    if all(r.refusal is not None for r in records):
        batch["refusal"] = collate([formatter.encode_record(r, r.refusal) for r in records], pad_id, pad_to_multiple_of)
    return batch


def check_batch(batch: Mapping, needs: Mapping[str, Sequence[str]], method: str) -> None:
    """Raise ``DataError`` naming the stream or field a method needs (``needs``: stream -> fields) that
    ``batch`` lacks."""
    for stream, fields in needs.items():
        if stream not in batch:
            raise DataError(f"{method} needs a '{stream}' stream in its batches; got streams {sorted(batch)}")
        for name in fields:
            if name not in batch[stream]:
                raise DataError(f"{method} needs '{name}' sequences in stream '{stream}'; got {sorted(batch[stream])}")
