"""Loaders that feed prepared shards (model/shards.py) to training, batch by batch, resumably:
contiguous token windows for pretraining, whole masked examples for instruction tuning, and pairs of
them (a chosen and a rejected reply to one prompt) for preference tuning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model.gpt import IGNORE_INDEX
from model.shards import MANIFEST, MASK_END, MASK_VALUES, DataError, load_shard, read_manifest, shard_intact
from model.tokenizer import EOT

# what makes instruction data, named in the errors that tell a user to make some
INSTRUCTION_PRODUCERS = "data_prep/prepare_dolly.py (or prepare_custom_dataset.py, prepare_chat.py)"
PREFERENCE_PRODUCER = "data_prep/prepare_preferences.py"
# manifest kind of masked shards -> (what makes them, what they are called, what trains on them)
MASKED_KINDS = {
    "instructions": (INSTRUCTION_PRODUCERS, "instruction data", "model/finetune_dolly.py"),
    "preferences": (PREFERENCE_PRODUCER, "preference pairs", "model/dpo.py"),
}


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
            raise DataError(
                f"no prepared data in {data_dir} (no {MANIFEST}): run {producer} first (FineWeb-Edu from the Hub, "
                f"or --input FILE for your own text, then --data_dir its --out_dir); offline and in minutes: the "
                "README's CPU quick start, or make demo for every stage at once")
        if manifest.get("kind") in MASKED_KINDS:
            _, what, trainer = MASKED_KINDS[manifest["kind"]]
            raise DataError(
                f"{data_dir} holds {what} from {manifest['producer']}: train on it with {trainer}; "
                f"pretraining reads shards from {producer}"
            )
        # False while data prep is still running (or was stopped): what is there so far can be trained on
        self.complete = manifest.get("complete", True)
        entries = [e for e in manifest["shards"] if e["split"] == split]
        if not entries and self.complete:
            raise DataError(
                f"no {split} shards in {data_dir}: its corpus filled no more than the val shard; rerun {producer} "
                "with a smaller --shard_size into a new --out_dir"
            )
        if not entries:
            raise DataError(f"no {split} shards in {data_dir} yet: {producer} has not finished one (it may still be running)")
        # every shard, now: a missing or cut-short one found hours into a run would stop it there
        for e in entries:
            if not shard_intact(data_dir, e):
                raise DataError(
                    f"{self.data_dir / e['file']} is missing or cut short (the manifest says {e['tokens']} tokens): "
                    f"delete it and rerun {producer} (finished shards are kept)"
                )
        need = self.B * self.T * self.world_size + 1
        self.entries = [e for e in entries if e["tokens"] >= need]
        self.skipped = [e["file"] for e in entries if e["tokens"] < need]  # for the script to report
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
        # past the last window that fits, load_state_dict moves on to the next shard
        self.load_state_dict({"shard": self.shard, "pos": self.pos + span * self.world_size, "epoch": self.epoch})
        return x, y

    def num_batches(self) -> int:
        """Micro-batches in one pass over the split."""
        span = self.B * self.T * self.world_size
        return sum((e["tokens"] - 1) // span for e in self.entries)

    def state_dict(self) -> dict:
        """The position: plain ints, the same on every rank."""
        return {"shard": self.shard, "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        """Go to a position of state_dict(); one saved with other settings is taken to the nearest
        position these settings can read (an exact resume needs the run's own data and batch shape)."""
        if not 0 <= state["shard"] < len(self.entries):
            raise DataError(
                f"the position to resume from is {self.split} shard {state['shard']}, but {self.data_dir} has "
                f"{len(self.entries)} {self.split} shards that fit a micro-batch: resume with the run's own "
                "--data_dir, --batch_size and --seq_len"
            )
        if state["shard"] != self.shard:
            self._tokens = self._load(state["shard"])
        self.shard, self.pos, self.epoch = state["shard"], state["pos"], state["epoch"]
        if self.pos + self.B * self.T * self.world_size + 1 > len(self._tokens):  # a bigger batch than the run's
            nxt = (self.shard + 1) % len(self.entries)
            self.load_state_dict({"shard": nxt, "pos": 0, "epoch": self.epoch + (nxt == 0)})


class InstructionLoader:
    """Batches (x, y) of whole instruction examples from shards made by data_prep/instruction_shards.py.

    Each example (a conversation's turns up to its last trained reply and that reply's
    <|endoftext|>) is one row: x its tokens but the last, y its tokens but the first where the loss
    mask is nonzero (trained replies and their closing tokens) and IGNORE_INDEX elsewhere. Rows are
    padded to the longest row of the micro-batch; padding is ignored too, so the loss is over
    trained reply tokens only.

    Order: the global micro-batch is batch_size * world_size items (examples; pairs of them in
    PairLoader) and rank r takes items [r*B, (r+1)*B) of it. With shuffle (training), every epoch
    draws a permutation seeded by (seed, epoch); with bucket, each window of BUCKET_WINDOW global
    batches of that permutation is sorted by length before it is cut into batches, and the batches
    are shuffled, so a batch holds items of similar length (less padding) while the order stays
    random. A final partial global batch is left out of the epoch (a different remainder each
    epoch). Without shuffle (validation) the items go shortest first and the last batch is filled up
    with empty items, so one pass reads every item exactly once. The position is (epoch, batch) and
    the same on every rank.
    """

    BUCKET_WINDOW = 32
    KIND = "instructions"  # the manifest kind read
    PER_ITEM = 1  # consecutive examples that make one item
    ITEM = "examples"

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        shuffle: bool = True,
        bucket: bool = True,
        seed: int = 0,
        block_size: int | None = None,
    ):
        self.B, self.rank, self.world_size = batch_size, rank, world_size
        self.shuffle, self.bucket, self.seed = shuffle, bucket, seed
        self.tokens, self.mask = load_masked_split(data_dir, split, self.KIND)
        self.ends = np.flatnonzero(self.mask == MASK_END) + 1
        self.starts = np.concatenate([[0], self.ends[:-1]])
        example_lengths = self.ends - self.starts
        if len(example_lengths) % self.PER_ITEM:
            raise DataError(f"the {split} split of {data_dir} holds an odd number of examples, so not whole pairs: "
                            f"run {MASKED_KINDS[self.KIND][0]} again")
        self.lengths = example_lengths.reshape(-1, self.PER_ITEM).max(1)  # an item's longest example
        if block_size is not None and self.lengths.max() - 1 > block_size:
            raise DataError(
                f"{data_dir} holds examples of up to {self.lengths.max()} tokens, more than the model's context of "
                f"{block_size} + 1: prepare the data again with --max_len {block_size + 1}"
            )
        self.global_batch = batch_size * world_size
        if shuffle and len(self.lengths) < self.global_batch:
            raise DataError(
                f"the {split} split of {data_dir} has {len(self.lengths)} {self.ITEM}, fewer than one global micro-batch "
                f"of batch_size * ranks = {self.global_batch}: lower --batch_size"
            )
        self.epoch, self.batch = 0, 0
        self._plan = self._epoch_plan(0)

    def _epoch_plan(self, epoch: int) -> np.ndarray:
        """Item indices of every global batch of an epoch, (batches, B * world_size); -1 = an empty item."""
        n, g = len(self.lengths), self.global_batch
        if not self.shuffle:
            order = np.argsort(self.lengths, kind="stable")
            return np.concatenate([order, np.full(-n % g, -1)]).reshape(-1, g)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n)[: n - n % g]
        if not self.bucket:
            return order.reshape(-1, g)
        window = self.BUCKET_WINDOW * g
        sorted_windows = [w[np.argsort(self.lengths[w], kind="stable")] for w in np.split(order, range(window, len(order), window))]
        batches = np.concatenate(sorted_windows).reshape(-1, g)
        return batches[rng.permutation(len(batches))]

    def reset(self) -> None:
        """Back to the first batch of the first epoch (validation reads the same batches every time)."""
        self.load_state_dict({"epoch": 0, "batch": 0})

    def _next_items(self) -> np.ndarray:
        """This rank's item indices of the next global batch (-1: empty), and the position moved on."""
        items = self._plan[self.batch][self.rank * self.B : (self.rank + 1) * self.B]
        self.load_state_dict({"epoch": self.epoch, "batch": self.batch + 1})  # at the epoch's end, the next
        return items

    def _example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, mask) of example i, in file order."""
        return self.tokens[self.starts[i] : self.ends[i]], self.mask[self.starts[i] : self.ends[i]]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y), each int64 (B, longest row) on the CPU."""
        return padded_batch([self._example(i) for i in self._next_items() if i >= 0], self.B)  # empty rows come last

    def num_batches(self) -> int:
        """Micro-batches in one epoch."""
        return len(self._plan)

    def num_examples(self) -> int:
        """Items (examples; pairs in PairLoader) in the split."""
        return len(self.lengths)

    def prompt_tokens(self, i: int) -> list[int]:
        """The prompt of item i's (first example's) last trained reply, in file order: every token before
        that reply (for a conversation, the earlier turns with their replies)."""
        tokens, mask = self._example(i * self.PER_ITEM)
        reply_start = int(np.flatnonzero(mask == 0)[-1]) + 1
        return tokens[:reply_start].tolist()

    def state_dict(self) -> dict:
        """The position: plain ints, the same on every rank."""
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        """Go to a position of state_dict(); past the end of an epoch (a position saved with a bigger
        batch than this run's plan holds), to the start of the next."""
        if state["epoch"] != self.epoch:
            self._plan = self._epoch_plan(state["epoch"])
        self.epoch, self.batch = state["epoch"], state["batch"]
        if self.batch >= len(self._plan):
            self.load_state_dict({"epoch": self.epoch + 1, "batch": 0})


class PairLoader(InstructionLoader):
    """Batches (x, y, pairs) of preference pairs from data_prep/prepare_preferences.py's shards: pair i
    is examples 2i (the prompt and its chosen reply) and 2i+1 (the same prompt and the rejected reply).

    x and y are (2B, longest row) as in InstructionLoader, with y's targets on each reply and its
    <|endoftext|>: rows [0, B) hold the chosen replies, rows [B, 2B) the rejected ones in the same
    order. pairs (B,) are the pair indices (-1: an empty pair, whose rows are all padding) and
    reference (B, 2) the pairs' rows of the `reference` table a run sets (model/dpo.py: the frozen
    reference's log-probs of chosen and rejected; zeros until it is set). Order, bucketing and
    resume as InstructionLoader's, a pair being one item of the longer of its two examples' length.
    """

    KIND = "preferences"
    PER_ITEM = 2
    ITEM = "pairs"
    reference: torch.Tensor | None = None  # (pairs, 2) float32

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next (x, y, pairs, reference): int64 (2B, longest row) twice, int64 (B,) and float32 (B, 2), on the CPU."""
        pairs = torch.from_numpy(self._next_items().astype(np.int64))
        kept = pairs[pairs >= 0].tolist()  # empty pairs come last
        empty = [(np.array([EOT]), np.array([0]))] * (self.B - len(kept))
        x, y = padded_batch([self._example(2 * i) for i in kept] + empty + [self._example(2 * i + 1) for i in kept], 2 * self.B)
        reference = torch.zeros(self.B, 2)
        if self.reference is not None:
            reference[: len(kept)] = self.reference[kept]
        return x, y, pairs, reference


def padded_batch(examples: list[tuple], rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y), each int64 (rows, longest example - 1) on the CPU, of whole examples given as (tokens, loss
    mask) pairs (arrays or lists), one per row: x an example's tokens but the last, y its tokens but the
    first where the mask is nonzero and IGNORE_INDEX elsewhere. Shorter examples are padded, and rows
    past the examples (rows > len(examples)) are empty: padding is never a target."""
    rows = len(examples) if rows is None else rows
    width = max(1, max((len(tokens) - 1 for tokens, _ in examples), default=1))
    x = np.full((rows, width), EOT, dtype=np.int64)  # any token: padding is never a target
    y = np.full((rows, width), IGNORE_INDEX, dtype=np.int64)
    for row, (tokens, mask) in enumerate(examples):
        tokens = np.asarray(tokens, dtype=np.int64)  # int64 first: -100 does not fit a uint16
        x[row, : len(tokens) - 1] = tokens[:-1]
        y[row, : len(tokens) - 1] = np.where(np.asarray(mask[1:]) > 0, tokens[1:], IGNORE_INDEX)
    return torch.from_numpy(x), torch.from_numpy(y)


def load_masked_split(data_dir: str | Path, split: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The tokens and loss mask of one split of prepared masked data of `kind` (MASKED_KINDS: instruction
    data or preference pairs), every shard checked."""
    producers, what, _ = MASKED_KINDS[kind]
    manifest = read_manifest(data_dir, producers)
    if manifest is None:
        raise DataError(f"no prepared data in {data_dir} (no {MANIFEST}): run {producers} first")
    if manifest.get("kind") != kind:
        found = (f"{MASKED_KINDS[manifest['kind']][1]} from {manifest.get('producer')}, for {MASKED_KINDS[manifest['kind']][2]}"
                 if manifest.get("kind") in MASKED_KINDS else f"pretraining shards from {manifest.get('producer')}")
        raise DataError(f"{data_dir} holds {found}, not {what}: run {producers} and pass its --out_dir")
    producer = manifest["producer"]
    if manifest.get("mask_values") != MASK_VALUES:
        raise DataError(f"{data_dir} was prepared by an earlier version of {producer}, whose masks do not mark where "
                        f"examples end: run {producer} again")
    entries = [e for e in manifest["shards"] if e["split"] == split]
    if not entries:
        raise DataError(f"no {split} shards in {data_dir}: run {producer} again")
    tokens = [load_shard(data_dir, e, producer) for e in entries]
    masks = [
        load_shard(data_dir, {"file": e["mask_file"], "tokens": e["tokens"], "sha256": e["mask_sha256"]}, producer)
        for e in entries
    ]
    tokens, mask = np.concatenate(tokens), np.concatenate(masks)
    if tokens[-1] != EOT or mask[-1] != MASK_END:
        raise DataError(f"the {split} shards of {data_dir} do not end with a closing <|endoftext|>: run {producer} again")
    return tokens, mask
