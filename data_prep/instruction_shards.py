"""Instruction records -> masked token shards: the one pipeline behind prepare_dolly.py and
prepare_custom_dataset.py (they differ only in where the records come from).

Pipeline: read and check every record (nothing is written if any is bad, unless --skip_invalid) ->
seeded shuffle and train/val split, before tokenizing -> render each record with the prompt template
(model/prompt.py) and tokenize -> write, per split, `{split}_NNNNNN.npy` (uint16 tokens: prompt,
response, <|endoftext|>, examples back to back) and `{split}_NNNNNN_mask.npy` (uint8, 1 exactly on the
response tokens and the closing <|endoftext|>) -> manifest.json last.

Length policy (--max_len, tokens of prompt + response + <|endoftext|>): an example that does not fit
has its context cut, keeping its start, until it fits (or, if no piece of it fits beside its
header, loses its context section); if it cannot fit even with no context left (the instruction and
response alone are too long), it is dropped. The instruction, the response
and the closing token are never cut. Both counts are printed and kept in the manifest.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from model.atomic import remove_stale_temp_files
from model.prompt import render_prompt
from model.shards import SHARD_FORMAT, DataError, read_manifest, write_manifest, write_shard
from model.tokenizer import EOT, encode, get_tokenizer

KIND = "instructions"
SPLITS = ("train", "val")
MAX_LISTED_PROBLEMS = 20  # a file of thousands of bad lines lists the first ones and counts the rest


Rows = Iterable[tuple[str, object]]  # (where, decoded JSON value): "my.jsonl:12" names the row for the user


@dataclass
class Record:
    instruction: str
    context: str
    response: str


def mask_name(split: str, index: int) -> str:
    """File name of the loss mask that goes with shard `index` of `split`."""
    return f"{split}_{index:06d}_mask.npy"


def token_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.npy"


def check_record(obj: object) -> Record:
    """A Record from one decoded JSON value, or ValueError saying what is wrong with it.

    instruction and response are required strings and the response must not be blank; context is
    optional (a missing or null context is no context). Other fields (Dolly's category) are ignored.
    """
    if isinstance(obj, json.JSONDecodeError):
        raise ValueError(f"not valid JSON ({obj})")
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    for field in ("instruction", "response"):
        if field not in obj:
            raise ValueError(f'no "{field}" field')
    for field in ("instruction", "context", "response"):
        if obj.get(field) is not None and not isinstance(obj[field], str):
            raise ValueError(f'"{field}" is {type(obj[field]).__name__}, not a string')
    if obj["instruction"] is None or obj["response"] is None:
        raise ValueError('"instruction" and "response" must be strings, not null')
    for field in ("instruction", "response"):
        if not obj[field].strip():
            raise ValueError(f'"{field}" is empty')
    return Record(obj["instruction"], obj.get("context") or "", obj["response"])


def collect_records(rows: Iterable[tuple[str, object]], skip_invalid: bool) -> tuple[list[Record], int]:
    """Check (where, value) pairs; return the good records and how many bad ones were skipped.

    Without skip_invalid any bad row raises DataError listing every bad row (where and why), before
    anything is written. `where` names the row for the user, e.g. "my.jsonl:12".
    """
    records, problems = [], []
    for where, value in rows:
        try:
            records.append(check_record(value))
        except ValueError as e:
            problems.append(f"{where}: {e}")
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED_PROBLEMS])
        more = f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
        if not skip_invalid:
            raise DataError(
                f"{len(problems)} invalid record(s), nothing written:\n  {listed}{more}\n"
                "fix them, or pass --skip_invalid to leave them out"
            )
        print(f"skipping {len(problems)} invalid record(s):\n  {listed}{more}")
    if not records:
        raise DataError("no valid records to prepare")
    return records, len(problems)


def jsonl_rows(path: str | Path) -> Iterable[tuple[str, object]]:
    """(file:line, decoded value) for every non-blank line of a jsonl file; a line that is not JSON
    yields its JSONDecodeError in place of the value, which check_record then reports."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    # only "\n" ends a line: str.splitlines() would also split at U+2028 and other separators that
    # json.dumps(ensure_ascii=False) leaves raw inside strings (a trailing "\r" is JSON whitespace)
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path}:{lineno}", e


def split_records(records: list[Record], val_fraction: float, seed: int) -> dict[str, list[Record]]:
    """Seeded shuffle, then the first round(n * val_fraction) records (at least one) are val, the rest
    train. Done on records, before tokenizing, so the split depends on nothing but the data and seed."""
    order = np.random.default_rng(seed).permutation(len(records))
    n_val = max(1, round(len(records) * val_fraction))
    if len(records) - n_val < 1:
        raise DataError(f"{len(records)} record(s) cannot be split into train and val (--val_fraction {val_fraction})")
    shuffled = [records[i] for i in order]
    return {"val": shuffled[:n_val], "train": shuffled[n_val:]}


def _decode_prefix(tokens: list[int]) -> str:
    """The text of a token prefix, without a character the cut left half-encoded at its end."""
    return get_tokenizer().decode_bytes(tokens).decode("utf-8", errors="ignore")


def encode_record(record: Record, max_len: int) -> tuple[list[int], list[int], str]:
    """(tokens, mask, outcome) of one example, outcome being "kept", "truncated" (context cut to fit
    max_len) or "dropped" (tokens and mask empty). See the module docstring for the policy."""
    response = encode(record.response) + [EOT]
    prompt = encode(render_prompt(record.instruction, record.context))
    outcome = "kept"
    if len(prompt) + len(response) > max_len:
        budget = max_len - len(response)
        context_tokens = encode(record.context) if record.context.strip() else []
        keep = len(context_tokens) - (len(prompt) - budget)
        prompt, outcome = [], "dropped"
        while keep > 0:
            context = _decode_prefix(context_tokens[:keep])
            candidate = encode(render_prompt(record.instruction, context))
            if len(candidate) <= budget and context.strip():
                prompt, outcome = candidate, "truncated"
                break
            keep -= max(1, len(candidate) - budget)
        if outcome == "dropped":
            # no piece of the context fits beside its header: the example without its context might
            no_context = encode(render_prompt(record.instruction))
            if not context_tokens or len(no_context) > budget:
                return [], [], outcome
            prompt, outcome = no_context, "truncated"
    return prompt + response, [0] * len(prompt) + [1] * len(response), outcome


def check_out_dir(out_dir: Path, producer: str) -> None:
    """Refuse to write over a directory that holds another kind of prepared data."""
    manifest = read_manifest(out_dir, producer)
    if manifest is not None and manifest.get("kind") != KIND:
        raise DataError(
            f"{out_dir} holds data from {manifest.get('producer', 'another script')}, not instruction data: "
            "choose another --out_dir"
        )


def tokenize_split(records: list[Record], split: str, max_len: int, shard_size: int) -> tuple[list, dict]:
    """Encode one split: ([(tokens, mask, examples) per shard], counts). A shard closes before the
    example that would take it past shard_size tokens, so no example spans two shards."""
    c = {"examples": 0, "tokens": 0, "response_tokens": 0, "truncated": 0, "dropped": 0}
    shards: list[tuple[list[int], list[int], int]] = []
    tokens: list[int] = []
    mask: list[int] = []
    n_examples = 0
    for record in tqdm(records, desc=f"tokenizing {split}", unit="example"):
        example, example_mask, outcome = encode_record(record, max_len)
        if outcome == "dropped":
            c["dropped"] += 1
            continue
        c["truncated"] += outcome == "truncated"
        if tokens and len(tokens) + len(example) > shard_size:
            shards.append((tokens, mask, n_examples))
            tokens, mask, n_examples = [], [], 0
        tokens += example
        mask += example_mask
        n_examples += 1
        c["examples"] += 1
        c["tokens"] += len(example)
        c["response_tokens"] += sum(example_mask)
    if not c["examples"]:
        raise DataError(f"every {split} example was dropped as longer than --max_len {max_len}: raise --max_len")
    return shards + [(tokens, mask, n_examples)], c


def write_instruction_shards(
    out_dir: str | Path,
    splits: dict[str, list[Record]],
    *,
    producer: str,
    source: str,
    settings: dict,
    invalid_skipped: int,
    max_len: int,
    shard_size: int,
) -> dict:
    """Tokenize every split, then write the token and mask shards and last the manifest; return it.

    Everything is tokenized before the first file is written, so a failure leaves out_dir as it was.
    Shards of an earlier preparation in out_dir that the new manifest no longer lists are removed.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, producer)
    tokenized = {split: tokenize_split(splits[split], split, max_len, shard_size) for split in SPLITS}
    previous = read_manifest(out_dir, producer)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out_dir)
    shards = []
    counts = {"records": sum(len(r) for r in splits.values()) + invalid_skipped, "invalid_skipped": invalid_skipped}
    for split, (split_shards, split_counts) in tokenized.items():
        counts[split] = split_counts
        for index, (tokens, mask, n_examples) in enumerate(split_shards):
            entry = write_shard(out_dir, token_name(split, index), np.array(tokens, dtype=np.uint16))
            mask_entry = write_shard(out_dir, mask_name(split, index), np.array(mask, dtype=np.uint8))
            shards.append(entry | {"split": split, "examples": n_examples,
                                   "mask_file": mask_entry["file"], "mask_sha256": mask_entry["sha256"]})
    manifest = {"format": SHARD_FORMAT, "kind": KIND, "producer": producer, "source": source,
                "settings": settings, "counts": counts, "shards": shards}
    write_manifest(out_dir, manifest)
    listed = {s["file"] for s in shards} | {s["mask_file"] for s in shards}
    for old in previous["shards"] if previous else []:
        for name in (old["file"], old["mask_file"]):
            if name not in listed:
                (out_dir / name).unlink(missing_ok=True)  # the earlier preparation had more shards
    return manifest


def add_prep_args(parser: argparse.ArgumentParser, out_dir: str) -> None:
    """The flags both instruction-prep scripts share."""
    parser.add_argument("--out_dir", default=out_dir, help="where the shards and manifest.json go")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="share of records held out for validation")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the shuffle that makes the split")
    parser.add_argument("--max_len", type=int, default=1024,
                        help="most tokens per example (prompt + response + <|endoftext|>); longer ones have their "
                             "context cut, or are dropped if that is not enough")
    parser.add_argument("--shard_size", type=int, default=100_000_000, help="most tokens per shard")
    parser.add_argument("--skip_invalid", action="store_true",
                        help="leave out invalid records (counted) instead of stopping with nothing written")


def check_prep_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0 < args.val_fraction < 1:
        # fine-tuning reports its held-out loss and sample answers from the val split, so there must be one
        parser.error(f"--val_fraction must be in (0, 1), not {args.val_fraction}")
    if args.max_len < 8:
        parser.error(f"--max_len must be at least 8, not {args.max_len}")
    if args.shard_size < args.max_len:
        parser.error(f"--shard_size must be at least --max_len ({args.max_len})")


def prepare(rows: Rows, args: argparse.Namespace, *, producer: str, source: str) -> dict:
    """The whole pipeline for rows of (where, decoded JSON value); returns the manifest it wrote."""
    records, skipped = collect_records(rows, args.skip_invalid)
    splits = split_records(records, args.val_fraction, args.seed)
    settings = {"val_fraction": args.val_fraction, "seed": args.seed, "max_len": args.max_len}
    manifest = write_instruction_shards(
        args.out_dir, splits, producer=producer, source=source, settings=settings, invalid_skipped=skipped,
        max_len=args.max_len, shard_size=args.shard_size,
    )
    for split in SPLITS:
        c = manifest["counts"][split]
        print(f"{split}: {c['examples']} examples, {c['tokens']:,} tokens ({c['response_tokens']:,} in responses), "
              f"{c['truncated']} with context cut to fit --max_len {args.max_len}, {c['dropped']} dropped as too long")
    print(f"wrote {len(manifest['shards'])} token shard(s) with masks and {Path(args.out_dir) / 'manifest.json'}")
    return manifest



def run_cli(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    *,
    out_dir: str,
    producer: str,
    rows_and_source: Callable[[argparse.Namespace], tuple[Rows, str]],
) -> int:
    """A prep script's main: the shared flags (default --out_dir out_dir) beside the script's own, then
    prepare() on the rows that rows_and_source(args) gives; returns the exit code (2 for bad input)."""
    add_prep_args(parser, out_dir=out_dir)
    args = parser.parse_args(argv)
    check_prep_args(parser, args)
    try:
        rows, source = rows_and_source(args)
        prepare(rows, args, producer=producer, source=source)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
