"""Token shards on disk and the loader that feeds them to training.

A prepared data directory holds 1-D uint16 `.npy` shards named `{split}_{NNNNNN}.npy` and a
`manifest.json` that records, for each shard, its split, token count and sha256. The data-prep
scripts write shards atomically and add a shard to the manifest only once it is complete, so a
shard that is not in the manifest, or does not match it, is never trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

MANIFEST = "manifest.json"
SHARD_FORMAT = "nanogpt-token-shards/1"


class DataError(ValueError):
    """Prepared data is missing or does not match its manifest; the message says what to run."""


def shard_name(split: str, index: int) -> str:
    """File name of shard `index` (0-based) of `split`."""
    return f"{split}_{index:06d}.npy"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_shard(out_dir: str | Path, name: str, array: np.ndarray) -> dict:
    """Write a 1-D array as out_dir/name atomically; return its manifest entry (file, tokens, sha256)."""
    path = Path(out_dir) / name
    _atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))
    return {"file": name, "tokens": int(len(array)), "sha256": sha256_file(path)}


def write_manifest(data_dir: str | Path, manifest: dict) -> None:
    """Write manifest.json atomically (a crash leaves the old one or the new one, never half)."""
    text = json.dumps(manifest, indent=1)
    _atomic_write(Path(data_dir) / MANIFEST, lambda f: f.write(text.encode()))


def read_manifest(data_dir: str | Path, producer: str) -> dict | None:
    """The manifest of a data directory, or None if there is none.

    producer is the script that makes such directories, named in the error for a damaged manifest.
    """
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is damaged ({e}): delete {data_dir} and rerun {producer}") from None
    if manifest.get("format") != SHARD_FORMAT:
        raise DataError(f"{path} is not a {SHARD_FORMAT} manifest: rerun {producer} into a new directory")
    return manifest


def load_shard(data_dir: str | Path, entry: dict, producer: str) -> np.ndarray:
    """Read one shard and check it against its manifest entry (token count and sha256)."""
    path = Path(data_dir) / entry["file"]
    rerun = f"delete it and rerun {producer} (finished shards are kept)"
    if not path.is_file():
        raise DataError(f"{path} is listed in the manifest but missing: {rerun}")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as e:  # numpy's error for a truncated or garbled file
        raise DataError(f"{path} cannot be read ({e}): {rerun}") from None
    if array.ndim != 1 or len(array) != entry["tokens"]:
        raise DataError(f"{path} holds {array.size} values, the manifest says {entry['tokens']}: {rerun}")
    if sha256_file(path) != entry["sha256"]:
        raise DataError(f"{path} does not match the sha256 in its manifest: {rerun}")
    return array


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
