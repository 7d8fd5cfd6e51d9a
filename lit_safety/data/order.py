"""The order of training batches, as a pure function of (epoch, batch index), so a resumed run reads
exactly the batches an uninterrupted one would.

Each stream is read in passes; pass p is a permutation seeded by (seed, stream, p), sharded across
ranks as ``DistributedSampler`` shards (padded to a multiple of the world size, every world-th index).
An epoch is as long as the longest stream; shorter streams run on into their next pass. Iteration
starts at the global batch after the last one the run has read (Lightning's total batch progress, which
a checkpoint restores), so a resumed run reads what an uninterrupted one would: from a checkpoint
saved mid-epoch, and from one saved when fit stopped at ``max_steps`` mid-epoch (which Lightning
records as a finished epoch).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch

from lit_safety.data.records import DataError, Record


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class TrainingBatches:
    """Training batches ``{stream: collate(records)}`` of one epoch, resumable mid-epoch.

    Args:
        streams: stream name -> its training records.
        collate: stream name -> the function that turns a list of records into its batch.
        batch_size: records per stream per batch.
        seed: seed of the permutations.
        position: returns how many batches the run has read when iteration starts; 0 without it.
    """

    def __init__(self, streams: dict[str, list[Record]], collate: dict[str, Callable], batch_size: int, seed: int,
                 position: Callable[[], int] | None = None):
        self.streams, self.collate, self.batch_size, self.seed = streams, collate, batch_size, seed
        self.position = position or (lambda: 0)
        self._permutation = lru_cache(maxsize=8)(self._permute)

    def _per_rank(self, name: str) -> int:
        return -(-len(self.streams[name]) // _rank_and_world()[1])

    def stream_length(self, name: str) -> int:
        """Batches per pass of stream ``name`` on this rank."""
        return -(-self._per_rank(name) // self.batch_size)

    def __len__(self) -> int:
        return max(self.stream_length(name) for name in self.streams)

    def _permute(self, name: str, pass_index: int) -> list[int]:
        seed = (self.seed * 1_000_003 + sum(map(ord, name)) * 7_919 + pass_index) % 2**63
        return torch.randperm(len(self.streams[name]), generator=torch.Generator().manual_seed(seed)).tolist()

    def indices(self, name: str, batch: int) -> list[int]:
        """Record indices of stream ``name`` in global batch ``batch`` (counted over all epochs)."""
        rank, world = _rank_and_world()
        pass_index, position = divmod(batch, self.stream_length(name))
        order = self._permutation(name, pass_index)
        order = (order * world)[: self._per_rank(name) * world]  # pad like DistributedSampler
        mine = order[rank::world]
        return mine[position * self.batch_size : (position + 1) * self.batch_size]

    def __iter__(self):
        length = len(self)
        epoch, start = divmod(self.position(), length)
        for b in range(start, length):
            batch = epoch * length + b
            yield {name: self.collate[name]([records[i] for i in self.indices(name, batch)])
                   for name, records in self.streams.items()}

    # Stateful for Lightning: the position comes from the loop itself; the state guards against
    # resuming with other data.
    def state_dict(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size,
                "sizes": {name: len(records) for name, records in self.streams.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state != self.state_dict():
            raise DataError(f"the checkpoint was trained on other data ({state}); this run has {self.state_dict()}: "
                            "resume with the data settings it was written with")
