"""Tokenize a text corpus into GPT-2 pretraining shards: FineWeb-Edu from the Hugging Face Hub, or local files.

    python data_prep/fineweb.py                                    # FineWeb-Edu sample-10BT -> data/fineweb_edu10B
    python data_prep/fineweb.py --max_tokens 1_000_000_000 --out_dir data/fineweb_edu1B   # the first 1B tokens
    python data_prep/fineweb.py --input corpus.txt --shard_size 1_000_000 --out_dir data/mytext
    python data_prep/fineweb.py --input a.jsonl b.parquet --text_field content --out_dir data/mine

Output, in --out_dir: `val_000000.npy`, `train_000001.npy`, `train_000002.npy`, ... — 1-D uint16 arrays of
exactly --shard_size tokens (the last one may be shorter) — and `manifest.json` (see model/shards.py), which
TokenShardLoader checks before it trains on a shard. Shard 0 is the validation split. Every document is
`<|endoftext|>` (50256) followed by its tokens; documents run on from one shard into the next.

FineWeb-Edu sample-10BT holds about 10B GPT-2 tokens: with the default --shard_size of 100M that is about
100 shards of ~200 MB, ~19 GB in all. datasets first downloads the sample into its cache (HF_HOME), which
needs network and tens of GB more; without network, pass local files with --input:
  .txt      the whole file is one document (read in blocks, so a file of any size fits in memory)
  .jsonl    one document per line, its --text_field field; blank lines are ignored
  .parquet  one document per row of its --text_field column, read in row batches
Local files are read once before anything is written, so a missing file or a bad line stops the run with
a message (exit code 2) and leaves no shards behind.

Interrupt it at any time (Ctrl-C, a killed job) and rerun the same command: finished shards are kept, the
documents they hold are skipped without being tokenized, and the result is byte for byte what an
uninterrupted run writes. A rerun with other settings (--input, --shard_size, limits, ...) refuses to mix
them into the same directory.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import multiprocessing
import multiprocessing.pool
import os
import re
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the repo root importable
from model.atomic import remove_stale_temp_files  # noqa: E402
from model.hub import load_hub_dataset  # noqa: E402
from model.shards import (  # noqa: E402
    SHARD_FORMAT, DataError, read_manifest, shard_intact, shard_name, write_manifest, write_shard,
)
from model.tokenizer import EOT, get_tokenizer  # noqa: E402

PRODUCER = "data_prep/fineweb.py"
HUB_DATASET = "HuggingFaceFW/fineweb-edu"
PIECE_CHARS = 1 << 20  # documents longer than this are tokenized in pieces (see split_pieces)
TASK_CHARS = 1 << 20  # text per task sent to a tokenizer process: big enough to amortize the round trip
TASK_SEGMENTS = 4096  # ... and a cap on pieces per task, for corpora of tiny documents
READ_ROWS = 1024  # rows per read from a parquet file or the Hub dataset
UINT16_LIMIT = 1 << 16

# A cut point for split_pieces: a space or newline right after a non-whitespace character.
_CUT = re.compile(r"(?<=\S)[ \n]")


class PrepError(Exception):
    """Bad input or settings; main() prints the message and exits with code 2."""


# ----------------------------------------------------------------------------- documents
# A document is an iterable of text blocks that concatenate to its text: one string for a .jsonl line
# or a parquet row, a stream of blocks for a .txt file.


def split_pieces(blocks: Iterable[str], max_chars: int) -> Iterator[str]:
    """Re-cut a text into pieces of a little over max_chars that tokenize, one by one, exactly as the whole does.

    GPT-2's pre-tokenizer regex never puts a non-whitespace character and the whitespace after it in the
    same chunk, and the chunks before such a point do not depend on the text after it; BPE merges stay
    inside chunks. So cutting just before a space or newline that follows a non-whitespace character
    changes no token (what Python's regex calls \\S, tiktoken's calls non-whitespace too). Always yields
    at least one piece, "" for an empty text. A text with no such point for long stretches gives longer
    pieces.
    """
    buf, searched = "", 0  # no cut point before `searched` in buf
    for block in blocks:
        buf += block
        while len(buf) > max_chars:
            cut = _CUT.search(buf, max(searched, max_chars))
            if cut is None:
                searched = len(buf)
                break
            yield buf[: cut.start()]
            buf, searched = buf[cut.start() :], 0
    yield buf


def _txt_blocks(path: Path) -> Iterator[str]:
    try:
        # newline="": keep \r\n as it is in the file, the tokens should be the file's text
        with open(path, encoding="utf-8", newline="") as f:
            while block := f.read(PIECE_CHARS):
                yield block
    except UnicodeDecodeError as e:
        raise PrepError(f"{path}: not UTF-8 text ({e.reason})") from None


def _is_blank(line: bytes) -> bool:
    return not line.strip()


def _jsonl_documents(path: Path, text_field: str, skip: int) -> Iterator[tuple[str]]:
    with open(path, "rb") as f:  # bytes: json.loads decodes UTF-8 itself, and skipped lines need no decoding
        seen = 0
        for lineno, line in enumerate(f, 1):
            if _is_blank(line):
                continue
            seen += 1
            if seen <= skip:
                continue
            try:
                record = json.loads(line)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                raise PrepError(f"{path}:{lineno}: not a JSON line ({e})") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise PrepError(f'{path}:{lineno}: no string "{text_field}" field (see --text_field)')
            yield (text,)


def _parquet_file(path: Path, text_field: str) -> pq.ParquetFile:
    try:
        pf = pq.ParquetFile(path)
    except pa.ArrowException as e:
        raise PrepError(f"{path}: not a readable parquet file ({e})") from None
    schema = pf.schema_arrow
    if text_field not in schema.names or schema.field(text_field).type not in (
        pa.string(),
        pa.large_string(),
        pa.string_view(),
    ):
        raise PrepError(f'{path}: no string column "{text_field}" (see --text_field); columns: {schema.names}')
    return pf


def _parquet_documents(path: Path, text_field: str, skip: int) -> Iterator[tuple[str]]:
    pf = _parquet_file(path, text_field)
    # whole row groups are skipped through the metadata: resuming deep into a file reads nothing before it
    group, row = 0, 0
    while group < pf.num_row_groups and row + pf.metadata.row_group(group).num_rows <= skip:
        row += pf.metadata.row_group(group).num_rows
        group += 1
    if group == pf.num_row_groups:
        return
    groups = list(range(group, pf.num_row_groups))
    for batch in pf.iter_batches(batch_size=READ_ROWS, row_groups=groups, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if row >= skip:
                if text is None:
                    raise PrepError(f'{path}: row {row}: "{text_field}" is null')
                yield (text,)
            row += 1


def _count_documents(path: Path, text_field: str) -> int:
    """Documents in one input file, found without parsing them."""
    kind = path.suffix.lower()
    if kind == ".txt":
        return 1
    if kind == ".jsonl":
        with open(path, "rb") as f:
            return sum(not _is_blank(line) for line in f)
    return _parquet_file(path, text_field).metadata.num_rows


def local_documents(paths: list[str], text_field: str, start_doc: int = 0) -> Iterator[Iterable[str]]:
    """The documents of local files in order, from document start_doc on (counted across all the files).

    The documents before start_doc are skipped without parsing them: whole files by their document count,
    then lines or rows within the file where start_doc falls.
    """
    skip = start_doc
    for path in map(Path, paths):
        if skip:
            n = _count_documents(path, text_field)
            if skip >= n:
                skip -= n
                continue
        kind = path.suffix.lower()
        if kind == ".txt":
            yield _txt_blocks(path)
        elif kind == ".jsonl":
            yield from _jsonl_documents(path, text_field, skip)
        else:
            yield from _parquet_documents(path, text_field, skip)
        skip = 0


def check_inputs(paths: list[str], text_field: str, max_docs: int | None) -> int:
    """Read every input document once, without tokenizing, and return how many there are (at most max_docs).

    A missing file, a bad line or a wrong column fails here, before anything is written. Reading the
    input twice costs far less than tokenizing it.
    """
    for p in map(Path, paths):
        if p.suffix.lower() not in (".txt", ".jsonl", ".parquet"):
            raise PrepError(f"{p}: unsupported input type {p.suffix!r} (use .txt, .jsonl or .parquet)")
        if not p.is_file():
            raise PrepError(f"{p}: no such file")
    n = 0
    try:
        for blocks in itertools.islice(local_documents(paths, text_field), max_docs):
            for _ in blocks:  # reading a .txt file's blocks is what decodes it
                pass
            n += 1
    except OSError as e:
        raise PrepError(f"cannot read {e.filename or 'the input'}: {e.strerror or e}") from None
    if n == 0:
        raise PrepError(f"no documents in {' '.join(paths)}")
    return n


def hub_documents(config: str, text_field: str, start_doc: int) -> tuple[int, Iterator[Iterable[str]]]:
    """FineWeb-Edu's train split of `config` from the Hub: (its number of documents, its documents from start_doc)."""
    try:
        ds = load_hub_dataset(HUB_DATASET, split="train", name=config)
    except OSError as e:
        raise PrepError(f"{e}\nwithout network, tokenize local files instead: "
                        "--input FILE.txt|FILE.jsonl|FILE.parquet ...") from None
    if text_field not in ds.column_names:
        raise PrepError(f'{HUB_DATASET} ({config}) has no column "{text_field}"; columns: {ds.column_names}')
    ds = ds.select_columns([text_field])

    def documents() -> Iterator[Iterable[str]]:
        # index from start_doc: skipping is a slice of the memory-mapped table, nothing is read before it
        for start in range(start_doc, len(ds), READ_ROWS):
            for row, text in enumerate(ds[start : start + READ_ROWS][text_field], start):
                if not isinstance(text, str):
                    raise PrepError(f'{HUB_DATASET} ({config}) row {row}: "{text_field}" is {type(text).__name__}')
                yield (text,)

    return len(ds), documents()


# ----------------------------------------------------------------------------- tokenizing


def text_segments(docs: Iterable[Iterable[str]], max_chars: int = PIECE_CHARS) -> Iterator[tuple[str, bool, bool]]:
    """(text, starts_doc, ends_doc) for each piece of each document (see split_pieces); one piece for most."""
    for blocks in docs:
        pieces = split_pieces(blocks, max_chars)
        piece, first = next(pieces), True
        for following in pieces:
            yield piece, first, False
            piece, first = following, False
        yield piece, first, True


def tokenize_task(task: list[tuple[str, bool, bool]]) -> list[tuple[np.ndarray, bool]]:
    """Tokenize text segments into (uint16 tokens, ends_doc), EOT first in each document's first segment.

    Runs in a worker process, which builds its own tokenizer on first use (an Encoding is never pickled).
    """
    enc = get_tokenizer()
    out = []
    for text, starts_doc, ends_doc in task:
        ids = enc.encode_ordinary(text)  # a literal "<|endoftext|>" in the text is ordinary text
        tokens = np.array([EOT, *ids] if starts_doc else ids, dtype=np.int64)
        if len(tokens) and tokens.max() >= UINT16_LIMIT:
            raise ValueError(f"token id {tokens.max()} does not fit the uint16 shards")
        out.append((tokens.astype(np.uint16), ends_doc))
    return out


def _tasks(segments: Iterable[tuple[str, bool, bool]], task_chars: int) -> Iterator[list[tuple[str, bool, bool]]]:
    task, chars = [], 0
    for segment in segments:
        task.append(segment)
        chars += len(segment[0])
        if chars >= task_chars or len(task) >= TASK_SEGMENTS:
            yield task
            task, chars = [], 0
    if task:
        yield task


def tokenize_segments(
    segments: Iterable[tuple[str, bool, bool]],
    pool: multiprocessing.pool.Pool | None,
    max_pending: int = 2,
    task_chars: int = TASK_CHARS,
) -> Iterator[tuple[np.ndarray, bool]]:
    """Tokenize segments on the pool's processes (here, without a pool), yielding results in input order.

    At most max_pending tasks are queued at a time: Pool.imap would read the whole input ahead of the
    workers, and memory would grow with the corpus.
    """
    tasks = _tasks(segments, task_chars)
    if pool is None:
        for task in tasks:
            yield from tokenize_task(task)
        return
    pending = collections.deque()
    for task in tasks:
        pending.append(pool.apply_async(tokenize_task, (task,)))
        if len(pending) >= max_pending:
            yield from pending.popleft().get()
    while pending:
        yield from pending.popleft().get()


# ----------------------------------------------------------------------------- shards


def fill_shards(
    segments: Iterable[tuple[np.ndarray, bool]],
    shard_size: int,
    start_doc: int = 0,
    start_offset: int = 0,
    max_tokens: int | None = None,
) -> Iterator[tuple[np.ndarray, int, int]]:
    """Cut a token stream into shards of exactly shard_size tokens (the last may be shorter).

    segments: (tokens, ends_doc) in order, from the first token of document start_doc; a document may
    come in several segments, the last one with ends_doc set. The first start_offset tokens are dropped
    (an earlier run wrote them), then at most max_tokens are kept; the document the limit cuts counts
    as ended.

    Yields (shard, next_doc, next_offset): where the stream goes on after the shard, namely in document
    next_doc after its first next_offset tokens (EOT included). Passing them back as start_doc and
    start_offset, with the segments from that document on, continues the same shards.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, not {shard_size}")
    doc, offset = start_doc, 0  # offset: tokens of `doc` passed so far, dropped ones included
    skip, budget = start_offset, max_tokens
    shard, fill = np.empty(shard_size, np.uint16), 0
    for tokens, ends_doc in segments:
        if skip:
            n = min(skip, len(tokens))
            tokens, skip, offset = tokens[n:], skip - n, offset + n
        stop = budget is not None and len(tokens) >= budget
        if stop:
            tokens, ends_doc = tokens[:budget], True
        elif budget is not None:
            budget -= len(tokens)
        while len(tokens):
            n = min(len(tokens), shard_size - fill)
            shard[fill : fill + n] = tokens[:n]
            tokens, fill, offset = tokens[n:], fill + n, offset + n
            if fill == shard_size:
                # a shard that ends with its document resumes at the next one, never at (doc, its length)
                next_doc, next_offset = (doc + 1, 0) if ends_doc and not len(tokens) else (doc, offset)
                yield shard, next_doc, next_offset
                shard, fill = np.empty(shard_size, np.uint16), 0
        if ends_doc:
            doc, offset = doc + 1, 0
        if stop:
            break
    if fill:
        yield shard[:fill], doc, offset


def _manifest(identity: dict, entries: list[dict], complete: bool) -> dict:
    # documents begun: the next shard's document counts when part of it is already written
    documents = entries[-1]["next_doc"] + (entries[-1]["next_offset"] > 0) if entries else 0
    return {
        **identity,
        "shards": entries,
        "complete": complete,
        "documents": documents,
        "tokens": sum(e["tokens"] for e in entries),
    }


def _count_into(bar: tqdm, segments: Iterable[tuple[np.ndarray, bool]]) -> Iterator[tuple[np.ndarray, bool]]:
    for segment in segments:
        yield segment
        if segment[1]:
            bar.update()


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group: let the main process alone handle it (and stop the workers)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def finished_shards(out_dir: Path, identity: dict) -> tuple[list[dict], bool]:
    """Manifest entries of the shards an earlier run finished in out_dir, and whether that run completed.

    Refuses a directory prepared with other settings. Keeps the entries up to the first whose file is
    missing or has the wrong length, so a deleted or cut-short shard (the loader's advice for a damaged
    one) is made again, with every shard after it. Only .npy headers are read, which is cheap; the
    loader checks the sha256 when it reads a shard.
    """
    manifest = read_manifest(out_dir, PRODUCER)
    if manifest is None:
        return [], False  # shard files without a manifest are unfinished: they get overwritten
    differ = [key for key in identity if manifest.get(key) != identity[key]]
    if differ:
        raise PrepError(
            f"{out_dir} holds shards prepared with other settings (different {', '.join(differ)}): "
            f"use another --out_dir, or delete {out_dir} to start over"
        )
    for i, entry in enumerate(manifest["shards"]):
        if not shard_intact(out_dir, entry):
            print(f"{entry['file']} is missing or cut short: preparing it again, and the shards after it")
            return manifest["shards"][:i], False
    return manifest["shards"], manifest["complete"]


def open_documents(args: argparse.Namespace, start_doc: int) -> tuple[int, Iterator[Iterable[str]]]:
    """The documents args name from start_doc on, after max_docs is applied, and their number from 0."""
    if args.input:
        total = check_inputs(args.input, args.text_field, args.max_docs)
        docs = local_documents(args.input, args.text_field, start_doc)
    else:
        total, docs = hub_documents(args.hub_config, args.text_field, start_doc)
    if args.max_docs is None:
        return total, docs
    return min(total, args.max_docs), itertools.islice(docs, max(0, args.max_docs - start_doc))


def prepare(args: argparse.Namespace) -> int:
    """Write or finish the shards and manifest that args describe; returns the exit code."""
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PrepError(f"--out_dir {out_dir} is a file: pass a directory for the shards")
    if args.input:
        source = [str(Path(p).resolve()) for p in args.input]
    else:
        source = {"hub": HUB_DATASET, "name": args.hub_config, "split": "train"}
    # what the shards depend on: a rerun must match it to build on the shards already written
    identity = {
        "format": SHARD_FORMAT,
        "producer": PRODUCER,
        "tokenizer": "gpt2",
        "eot": EOT,
        "dtype": "uint16",
        "source": source,
        "text_field": args.text_field,
        "shard_size": args.shard_size,
        "limits": {"max_docs": args.max_docs, "max_tokens": args.max_tokens},
    }
    entries, complete = finished_shards(out_dir, identity)
    manifest = _manifest(identity, entries, complete)
    if complete:
        print(
            f"{out_dir} is already complete: {len(entries)} shards, "
            f"{manifest['documents']:,} documents, {manifest['tokens']:,} tokens"
        )
        return 0
    start_doc, start_offset = (entries[-1]["next_doc"], entries[-1]["next_offset"]) if entries else (0, 0)
    tokens_before, shards_before = manifest["tokens"], len(entries)
    total_docs, docs = open_documents(args, start_doc)  # bad input stops here, before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out_dir)  # what a killed run was writing
    if entries:
        print(f"resuming after {len(entries)} finished shards, at document {start_doc:,} (+{start_offset:,} tokens)")

    t0 = time.time()
    # the pool starts before tqdm does: forking after tqdm's monitor thread exists risks a deadlock
    pool = multiprocessing.Pool(args.num_proc, initializer=_ignore_sigint) if args.num_proc > 1 else None
    try:
        with tqdm(total=total_docs, initial=start_doc, unit="doc", desc=f"tokenizing -> {out_dir}") as bar:
            segments = _count_into(bar, tokenize_segments(text_segments(docs), pool, max_pending=2 * args.num_proc))
            budget = None if args.max_tokens is None else args.max_tokens - tokens_before
            for shard, next_doc, next_offset in fill_shards(segments, args.shard_size, start_doc, start_offset, budget):
                split = "val" if not entries else "train"
                entry = write_shard(out_dir, shard_name(split, len(entries)), shard)
                entries.append({**entry, "split": split, "next_doc": next_doc, "next_offset": next_offset})
                # only now is the shard in the manifest: a run stopped before this rewrites the file
                write_manifest(out_dir, _manifest(identity, entries, complete=False))
                bar.set_postfix(shards=len(entries))
    finally:
        if pool is not None:
            pool.terminate()
    manifest = _manifest(identity, entries, complete=True)
    write_manifest(out_dir, manifest)

    seconds = time.time() - t0
    rate = (manifest["tokens"] - tokens_before) / max(seconds, 1e-9)
    print(
        f"done: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens in {len(entries)} shards "
        f"({len(entries) - shards_before} new) in {out_dir}; {seconds:.1f} s, {rate:,.0f} tokens/s"
    )
    if len(entries) == 1:
        print(
            "note: one shard only, the val one; for train shards too, rerun into a new --out_dir with a "
            f"--shard_size below {manifest['tokens']:,}"
        )
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Commands, output sizes and resuming: see the top of data_prep/fineweb.py.",
    )
    # source
    p.add_argument(
        "--input",
        nargs="+",
        metavar="PATH",
        help="local .txt (a document per file), .jsonl (a document per line) or .parquet (a document per row) "
        f"files, read in the order given (default: {HUB_DATASET} from the Hugging Face Hub)",
    )
    p.add_argument(
        "--hub_config",
        default="sample-10BT",
        help=f"config of {HUB_DATASET} to load when no --input is given, e.g. sample-100BT (default: %(default)s)",
    )
    p.add_argument(
        "--text_field",
        default="text",
        help="the .jsonl field, or parquet or Hub column, that holds the text (default: %(default)s)",
    )
    # a slice of the source
    p.add_argument("--max_docs", type=int, help="take only the first N documents (default: all)")
    p.add_argument(
        "--max_tokens", type=int, help="take only the first N tokens, cutting the last document short (default: all)"
    )
    # output
    p.add_argument(
        "--out_dir", default="data/fineweb_edu10B", help="where the shards and manifest.json go (default: %(default)s)"
    )
    p.add_argument(
        "--shard_size", type=int, default=100_000_000, help="tokens per shard, 2 bytes each (default: %(default)s)"
    )
    # compute
    p.add_argument(
        "--num_proc",
        type=int,
        default=max(1, (os.cpu_count() or 1) // 2),
        help="tokenizer processes; 1 = tokenize in the main process (default: half the CPU cores, %(default)s)",
    )
    args = p.parse_args(argv)
    for name in ("shard_size", "num_proc", "max_docs", "max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be at least 1, not {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for bad input or settings)."""
    args = parse_args(argv)
    try:
        return prepare(args)
    except (PrepError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: finished shards in {args.out_dir} are kept; rerun the same command to go on",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
