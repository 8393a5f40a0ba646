"""Loaders that feed prepared shards (model/shards.py) to training, batch by batch, resumably."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model.shards import MANIFEST, DataError, load_shard, read_manifest


class TokenShardLoader:
    """Batches (x, y) of B sequences of T tokens from the shards of one split, y being x shifted by one.

    Every rank reads its own slice of each global micro-batch: at offset p of the current shard,
    rank r takes tokens [p + r*B*T, p + (r+1)*B*T + 1). The position (shard, offset) is the same on
    every rank, so state_dict() from rank 0 resumes all of them. After the last shard it starts over
    at the first (a new epoch). Shards too short for one global micro-batch are skipped.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        producer: str = "data_prep/fineweb.py",
    ):
        self.data_dir, self.split, self.producer = Path(data_dir), split, producer
        self.B, self.T, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        manifest = read_manifest(data_dir, producer)
        if manifest is None:
            raise DataError(f"no prepared data in {data_dir} (no {MANIFEST}): run {producer} first")
        entries = [e for e in manifest["shards"] if e["split"] == split]
        if not entries:
            raise DataError(f"no {split} shards in {data_dir}: run {producer} first (it may still be running)")
        need = self.B * self.T * self.world_size + 1
        self.entries = [e for e in entries if e["tokens"] >= need]
        if not self.entries:
            longest = max(e["tokens"] for e in entries)
            raise DataError(
                f"the {split} shards in {data_dir} hold at most {longest} tokens, but one micro-batch of "
                f"batch_size*seq_len*world_size+1 = {need} must fit in a shard: lower --batch_size or "
                f"--seq_len, or prepare bigger shards"
            )
        self.shard, self.pos, self.epoch = 0, 0, 0
        self._tokens = self._load(0)

    def _load(self, shard: int) -> np.ndarray:
        return load_shard(self.data_dir, self.entries[shard], self.producer)

    def reset(self) -> None:
        """Back to the start of the first shard (validation reads the same tokens every time)."""
        self.load_state_dict({"shard": 0, "pos": 0, "epoch": 0})

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y), each int64 (B, T) on the CPU."""
        span = self.B * self.T
        start = self.pos + self.rank * span
        buf = torch.from_numpy(self._tokens[start : start + span + 1].astype(np.int64))
        x, y = buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)
        self.pos += span * self.world_size
        if self.pos + span * self.world_size + 1 > len(self._tokens):
            nxt = (self.shard + 1) % len(self.entries)
            self.load_state_dict({"shard": nxt, "pos": 0, "epoch": self.epoch + (nxt == 0)})
        return x, y

    def num_batches(self) -> int:
        """Micro-batches in one pass over the split."""
        span = self.B * self.T * self.world_size
        return sum((e["tokens"] - 1) // span for e in self.entries)

    def state_dict(self) -> dict:
        """The position: plain ints, the same on every rank."""
        return {"shard": self.shard, "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        if state["shard"] != self.shard:
            self._tokens = self._load(state["shard"])
        self.shard, self.pos, self.epoch = state["shard"], state["pos"], state["epoch"]
