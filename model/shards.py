"""Token shards on disk: the format every data-prep script writes and every loader checks.

A prepared data directory holds 1-D `.npy` shards named `{split}_{NNNNNN}.npy` and a
`manifest.json` that records, for each shard, its split, length and sha256. Data-prep scripts write
shards atomically and add a shard to the manifest only once it is complete, so a shard that is not
in the manifest, or does not match it, is never trained on. No torch here: data prep stays light.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from model.atomic import atomic_write

MANIFEST = "manifest.json"
SHARD_FORMAT = "nanogpt-token-shards/1"
ENTRY_KEYS = {"file", "split", "tokens", "sha256"}  # what every shard's manifest entry holds

# The loss mask beside instruction shards (uint8, one per token): 0 = not trained on (prompts, replies
# kept as history), 1 = a trained reply token, 2 = the trained token that ends an example (the closing
# <|endoftext|> of its last trained reply). An example may train several replies, so the end is marked.
MASK_TRAINED, MASK_END = 1, 2
MASK_VALUES = {"history": 0, "trained": MASK_TRAINED, "end": MASK_END}  # recorded in instruction manifests


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


def write_shard(out_dir: str | Path, name: str, array: np.ndarray) -> dict:
    """Write a 1-D array as out_dir/name atomically; return its manifest entry (file, tokens, sha256)."""
    path = Path(out_dir) / name
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))
    return {"file": name, "tokens": int(len(array)), "sha256": sha256_file(path)}


def write_manifest(data_dir: str | Path, manifest: dict) -> None:
    """Write manifest.json atomically (a crash leaves the old one or the new one, never half)."""
    text = json.dumps(manifest, indent=1)
    atomic_write(Path(data_dir) / MANIFEST, lambda f: f.write(text.encode()))


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
    if not isinstance(manifest, dict) or manifest.get("format") != SHARD_FORMAT:
        raise DataError(f"{path} is not a {SHARD_FORMAT} manifest: rerun {producer} into a new directory")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(e, dict) and ENTRY_KEYS <= e.keys() for e in shards):
        raise DataError(f"{path} is damaged (its shard list is not what {producer} writes): delete {data_dir} and rerun {producer}")
    return manifest


def shard_intact(data_dir: str | Path, entry: dict) -> bool:
    """Whether a token shard's file is there, 1-D uint16 of the manifest's length: only its .npy header is
    read, so this is cheap for any number of shards (load_shard also checks the sha256, reading it all)."""
    try:
        array = np.load(Path(data_dir) / entry["file"], mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):  # missing, truncated or not an .npy file
        return False
    return array.shape == (entry["tokens"],) and array.dtype == np.uint16


def load_shard(data_dir: str | Path, entry: dict, producer: str) -> np.ndarray:
    """Read one shard and check it against its manifest entry (token count and sha256)."""
    path = Path(data_dir) / entry["file"]
    rerun = f"delete it and rerun {producer} (finished shards are kept)"
    if not path.is_file():
        raise DataError(f"{path} is listed in the manifest but missing: {rerun}")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as e:  # numpy's errors for a truncated, empty or garbled file
        raise DataError(f"{path} cannot be read ({e}): {rerun}") from None
    if array.ndim != 1 or len(array) != entry["tokens"]:
        raise DataError(f"{path} holds {array.size} values, the manifest says {entry['tokens']}: {rerun}")
    if sha256_file(path) != entry["sha256"]:
        raise DataError(f"{path} does not match the sha256 in its manifest: {rerun}")
    return array
