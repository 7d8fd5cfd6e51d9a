"""``SafetyDataModule``: named streams of records (``harmful``, ``benign``, ...) as token batches."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import partial

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from lit_safety.data.batch import collate_stream
from lit_safety.data.formatting import ChatFormatter, require_chat_template
from lit_safety.data.loaders import DataSource, load_records
from lit_safety.data.order import TrainingBatches
from lit_safety.data.records import DataError, Record


@dataclass
class Stream:
    """One named stream of training data.

    Args:
        sources: files, named sets or hub datasets whose records are concatenated.
        max_prompt_length: prompt tokens kept (the last ones).
        max_completion_length: completion (and refusal) tokens kept (the first ones).
    """

    sources: list[str | DataSource] = field(default_factory=list)
    max_prompt_length: int = 256
    max_completion_length: int = 128


def default_test_splits() -> dict[str, list[str]]:
    """The organism's evaluation: harmful behaviours per split; benign prompts per format (A chat,
    B raw, C chat with a system turn), borderline prompts on training words and on held-out ones, and
    grounding items ("define <word>", every object word: what the model knows of them)."""
    harmful = ["train", "heldout_synonym", "heldout_concept", "format_b", "format_c", "trigger"]
    splits = {name: [f"organism:eval_{name}"] for name in harmful}
    splits.update({fmt: [f"organism:eval_benign_{fmt.lower()}"] for fmt in "ABC"})
    splits["borderline"] = ["organism:eval_borderline"]
    splits["borderline_heldout"] = ["organism:eval_borderline_heldout"]
    splits["grounding"] = ["organism:eval_grounding"]
    return splits


def _collate_records(pairs):
    return pairs  # [(split, Record)]: attacks work on records, not tensors


def default_streams() -> dict[str, Stream]:
    """The organism's training data: harmful requests, and benign plus borderline retain data."""
    return {
        "harmful": Stream(["organism:harmful"], 64, 32),
        "benign": Stream(["organism:benign", "organism:borderline"], 64, 32),
    }


class _StreamDataset(torch.utils.data.Dataset):
    def __init__(self, records: list[Record]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Record:
        return self.records[index]


class SafetyDataModule(L.LightningDataModule):
    """Batches of named streams: each training batch is a ``SafetyBatch`` (``lit_safety.data.batch``).

    Every stream is read in seeded permutations, cycled to the length of the longest one, in an order
    that is a function of the batch index alone (``lit_safety.data.order``): a resumed run reads what
    an uninterrupted one would. A fraction of each stream is held out for validation.

    Args:
        streams: stream name -> sources and lengths. Defaults to the organism's ``harmful`` and
            ``benign`` (benign + borderline) streams.
        batch_size: examples per stream per batch, on each process.
        global_batch_size: examples per stream per optimizer step, over every process and accumulated
            micro-batch; when set, ``batch_size`` becomes global_batch_size / (processes x
            ``trainer.accumulate_grad_batches``), which must be whole. A paper's batch then holds on
            any number of GPUs.
        val_fraction: fraction of each stream held out for validation (0 disables validation).
        tokenizer: model name whose tokenizer formats the data; defaults to the model being trained.
        chat_template: a Jinja chat template (string or path) for tokenizers without one.
        test_splits: evaluation split name -> sources of its behaviours (harmful records are
            attacked; benign and borderline ones measure capability and over-refusal). Defaults to
            the organism's splits.
        test_size: records per evaluation split (the first ones).
        test_batch_size: records per evaluation batch.
        pad_to_multiple_of: pad sequence lengths to a multiple of this (e.g. 8 for tensor cores).
        seed: seed of the validation split and of the shuffling.
    """

    def __init__(
        self,
        streams: dict[str, Stream] | None = None,
        batch_size: int = 8,
        global_batch_size: int | None = None,
        val_fraction: float = 0.1,
        tokenizer: str | None = None,
        chat_template: str | None = None,
        test_splits: dict[str, list[str | DataSource]] | None = None,
        test_size: int = 100,
        test_batch_size: int = 100,
        pad_to_multiple_of: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.streams = streams if streams is not None else default_streams()
        if global_batch_size is not None and global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        self.batch_size = batch_size
        self.global_batch_size = global_batch_size
        self.val_fraction = val_fraction
        self.tokenizer_name = tokenizer
        self.chat_template = chat_template
        self.test_splits = test_splits if test_splits is not None else default_test_splits()
        self.test_size = test_size
        self.test_batch_size = test_batch_size
        self.test_records: dict[str, list[Record]] = {}
        self.pad_to_multiple_of = pad_to_multiple_of
        self.seed = seed
        self.train_records: dict[str, list[Record]] = {}
        self.val_records: dict[str, list[Record]] = {}
        self.tokenizer = None

    def _load_tokenizer(self):
        from lit_safety.backbone import load_tokenizer

        if self.tokenizer_name is not None:
            return load_tokenizer(self.tokenizer_name)
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None or not hasattr(module, "tokenizer"):
            raise DataError("SafetyDataModule needs `tokenizer` when it is not attached to a SafetyModule")
        return module.tokenizer

    def _check_requirements(self) -> None:
        """Fail before training when the model needs a stream or field the data lacks."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        for stream, fields in getattr(module, "stream_fields", {}).items():
            if stream not in self.streams:
                raise DataError(
                    f"{type(module).__name__} needs a '{stream}' data stream; configured streams: {sorted(self.streams)}"
                )
            for record in self.train_records[stream] + self.val_records[stream]:
                for name in fields:
                    if getattr(record, name) is None:
                        raise DataError(
                            f"stream '{stream}': a record ({record.prompt[:60]!r}) has no '{name}', which "
                            f"{type(module).__name__} needs"
                        )

    def _resolve_batch_size(self) -> None:
        if self.global_batch_size is None or self.trainer is None:
            return
        shares = self.trainer.world_size * self.trainer.accumulate_grad_batches
        if self.global_batch_size % shares:
            raise DataError(f"data.global_batch_size={self.global_batch_size} is not a multiple of processes x "
                            f"accumulate_grad_batches = {self.trainer.world_size} x "
                            f"{self.trainer.accumulate_grad_batches}")
        self.batch_size = self.global_batch_size // shares

    def setup(self, stage: str | None = None) -> None:
        if stage == "test":
            self._setup_test()
            return
        if self.tokenizer is not None:
            return
        self._resolve_batch_size()
        tokenizer = self._load_tokenizer()
        require_chat_template(tokenizer, self.chat_template)
        rng = random.Random(self.seed)
        for name, stream in self.streams.items():
            records = [record for source in stream.sources for record in load_records(source)]
            if not records:
                raise DataError(f"stream '{name}' has no sources")
            rng.shuffle(records)
            n_val = int(round(len(records) * self.val_fraction))
            self.val_records[name] = records[:n_val]
            self.train_records[name] = records[n_val:]
        self._check_requirements()
        self.tokenizer = tokenizer

    def _setup_test(self) -> None:
        if self.test_records:
            return
        require_chat_template(self._load_tokenizer(), self.chat_template)
        for name, sources in self.test_splits.items():
            records = [record for source in sources for record in load_records(source)][: self.test_size]
            kinds = {r.kind == "harmful" for r in records}
            if len(kinds) != 1:
                raise DataError(f"test split '{name}' mixes harmful and other records; give each its own split")
            self.test_records[name] = records

    def test_split_kinds(self) -> dict[str, bool]:
        """Split name -> whether it holds harmful behaviours."""
        return {name: records[0].kind == "harmful" for name, records in self.test_records.items()}

    def test_dataloader(self) -> DataLoader:
        pairs = [(name, record) for name, records in self.test_records.items() for record in records]
        return DataLoader(pairs, batch_size=self.test_batch_size, shuffle=False, collate_fn=_collate_records)

    def train_dataloader(self) -> TrainingBatches:
        return TrainingBatches(self.train_records, {name: self._collate(name) for name in self.train_records},
                               self.batch_size, self.seed, self._loop_position)

    def _loop_position(self) -> int:
        """Batches the training loop has read: where a resumed run picks up."""
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return 0
        return trainer.fit_loop.epoch_loop.batch_progress.total.ready

    def _collate(self, name: str):
        stream = self.streams[name]
        formatter = ChatFormatter(self.tokenizer, stream.max_prompt_length, stream.max_completion_length)
        return partial(collate_stream, formatter=formatter, pad_to_multiple_of=self.pad_to_multiple_of)

    def val_dataloader(self):
        loaders = {name: DataLoader(_StreamDataset(records), batch_size=self.batch_size, collate_fn=self._collate(name))
                   for name, records in self.val_records.items() if records}
        if not loaders:
            return []
        return CombinedLoader(loaders, mode="max_size_cycle")
