"""Instruction records and conversations -> masked token shards: the one pipeline behind
prepare_dolly.py, prepare_custom_dataset.py and prepare_chat.py (they differ only in where the rows
come from).

Formats, detected per file from its first record (every line must then be in that format):
  - instruction records: {"instruction", "context" (optional), "response"} (Dolly's, plus fields ignored);
  - OpenAI's fine-tuning format: {"messages": [{"role", "content", "weight" (assistant, 0/1)}, ...]};
  - ShareGPT: {"conversations": [{"from": "system" | "human" | "gpt", "value"}, ...]}.
All three become turns of model/prompt.py (a record is one turn, its context as a system message),
rendered by the one function the server uses.

Pipeline: read and check every row (nothing is written if any is bad, unless --skip_invalid) ->
seeded shuffle and train/val split of whole conversations, before tokenizing -> render and tokenize
-> write, per split, `{split}_NNNNNN.npy` (uint16 tokens, examples back to back) and
`{split}_NNNNNN_mask.npy` (uint8: 1 on trained reply tokens and their closing <|endoftext|>, 2 on the
closing token that ends an example, 0 elsewhere; model/shards.py) -> manifest.json last.

One example per conversation: every reply with weight 1 is trained in the same sequence, and since
attention is causal each reply's loss is exactly the loss it would have alone after the prompt the
server renders for the history before it (tests/test_conversations.py checks both). A conversation
whose replies do not all fit --max_len (tokens of the example) becomes several examples: each trained
reply is kept with as many of its most recent turns as fit (the oldest dropped first, the system
prompt kept, as model/prompt.py's fit_turns does for the server), and replies that keep the same
turns share an example. A reply whose own turn does not fit has its context cut, keeping its start,
until it fits (or, if no piece of it fits beside its header, loses its context section); if it
cannot fit even with no context left, it is dropped. A reply and its closing token are never cut.
Every count is printed and kept in the manifest.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from model.atomic import remove_stale_temp_files
from model.prompt import ChatError, Turn, chat_turns, fit_turns, render_prompt, render_turns
from model.shards import MASK_END, MASK_VALUES, SHARD_FORMAT, DataError, read_manifest, write_manifest, write_shard
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
    obj = json_object(obj)
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


def record_turns(record: Record) -> list[Turn]:
    """A record as a conversation of one turn: its context is a system message's, as the server
    renders a system message followed by a user message."""
    return [Turn(record.instruction, (("system", record.context),) if record.context.strip() else (), record.response)]


def _require_reply(turns: list[Turn], field: str) -> list[Turn]:
    if not any(t.reply is not None and t.weight for t in turns):
        raise ValueError(f"no assistant message to train on in {field} (every reply has weight 0, or there is none)")
    return turns


def json_object(obj: object) -> dict:
    """A decoded jsonl line as a dict, or ValueError saying why it is not one (jsonl_rows yields a bad
    line's JSONDecodeError in place of its value)."""
    if isinstance(obj, json.JSONDecodeError):
        raise ValueError(f"not valid JSON ({obj})")
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def check_messages(obj: object) -> list[Turn]:
    """The turns of an OpenAI fine-tuning record {"messages": [...]}, or ValueError saying what is wrong
    (file:line is added by the caller): roles system, developer, user, assistant (tool messages are
    context); content a string or text parts; "weight" 0 or 1 on assistant messages; "name" ignored."""
    messages = json_object(obj).get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list of {"role", "content"} objects')
    return _require_reply(chat_turns(messages, weights=True), "messages")


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def check_sharegpt(obj: object) -> list[Turn]:
    """The turns of a ShareGPT record {"conversations": [{"from", "value"}, ...]}, or ValueError: "from"
    is system, human or gpt ("user" and "assistant" are accepted too), "value" a string."""
    conversation = json_object(obj).get("conversations")
    if not isinstance(conversation, list) or not conversation:
        raise ValueError('"conversations" must be a non-empty list of {"from", "value"} objects')
    messages = []
    for i, c in enumerate(conversation):
        if not isinstance(c, dict):
            raise ValueError(f"conversations[{i}] must be an object with \"from\" and \"value\"")
        if not isinstance(c.get("from"), str) or c["from"] not in SHAREGPT_ROLES:
            raise ValueError(f"conversations[{i}].from is {c.get('from')!r}: expected one of system, human, gpt")
        if not isinstance(c.get("value"), str):
            raise ValueError(f"conversations[{i}].value is {type(c.get('value')).__name__}, not a string")
        weight = {"weight": c["weight"]} if "weight" in c else {}
        messages.append({"role": SHAREGPT_ROLES[c["from"]], "content": c["value"], **weight})
    return _require_reply(chat_turns(messages, weights=True, field="conversations"), "conversations")


# the key that tells a row's format -> (what to call the format, its reader)
FORMATS: dict[str, tuple[str, Callable[[object], list[Turn]]]] = {
    "messages": ("OpenAI messages", check_messages),
    "conversations": ("ShareGPT conversations", check_sharegpt),
    "instruction": ("instruction records", lambda obj: record_turns(check_record(obj))),
}


def detect_format(obj: object) -> str | None:
    """The FORMATS key a decoded row is in, or None when it is in none of them."""
    if isinstance(obj, dict):
        return next((key for key in FORMATS if key in obj), None)
    return None


def check_row(obj: object, key: str, first: str) -> list[Turn]:
    """The turns of one row of a file in format `key` (detected at `first`), or ValueError."""
    other = detect_format(obj)
    if other is not None and other != key:
        raise ValueError(f"a record in {FORMATS[other][0]} format, in a file of {FORMATS[key][0]} (as its first "
                         f"record, {first}, is): one format per file")
    try:
        return FORMATS[key][1](obj)
    except ChatError as e:
        raise ValueError(str(e)) from None


def read_rows(rows: Rows) -> Iterator[tuple[str, object, list[Turn] | ValueError]]:
    """(where, value, its turns or the ValueError saying what is wrong with it) for every row. The
    format is the first row's that has a format key (FORMATS); every row must be in it."""
    key = first = None
    for where, value in rows:
        if key is None and (key := detect_format(value)) is not None:
            first = where
        try:
            if key is None:
                json_object(value)
                raise ValueError('no "messages", "conversations" or "instruction" field: expected OpenAI messages, '
                                 "ShareGPT conversations or instruction records")
            yield where, value, check_row(value, key, first)
        except ValueError as e:
            yield where, value, e


def collect_conversations(sources: list[Rows], skip_invalid: bool) -> tuple[list[list[Turn]], int]:
    """Check the (where, value) rows of each source (a file: each has its own format); return the good
    rows' turns and how many bad ones were skipped.

    Without skip_invalid any bad row raises DataError listing every bad row (where and why), before
    anything is written. `where` names the row for the user, e.g. "my.jsonl:12".
    """
    conversations, problems = [], []
    for where, _, turns in (row for rows in sources for row in read_rows(rows)):
        if isinstance(turns, ValueError):
            problems.append(f"{where}: {turns}")
        else:
            conversations.append(turns)
    report_problems(problems, skip_invalid)
    if not conversations:
        raise DataError("no valid records to prepare")
    return conversations, len(problems)


def report_problems(problems: list[str], skip_invalid: bool) -> None:
    """Stop with DataError listing the bad rows ("where: why"), or with skip_invalid print that they are
    left out; nothing when there are none."""
    if not problems:
        return
    listed = "\n  ".join(problems[:MAX_LISTED_PROBLEMS])
    more = f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
    if not skip_invalid:
        raise DataError(
            f"{len(problems)} invalid record(s), nothing written:\n  {listed}{more}\n"
            "fix them, or pass --skip_invalid to leave them out"
        )
    print(f"skipping {len(problems)} invalid record(s):\n  {listed}{more}")


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


def split_records(records: list, val_fraction: float, seed: int) -> dict[str, list]:
    """Seeded shuffle, then the first round(n * val_fraction) records (at least one) are val, the rest
    train. Done on records (or conversations), before tokenizing, so the split depends on nothing but
    the data and seed."""
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


def encode_conversation(turns: list[Turn], max_len: int) -> tuple[list[tuple[list[int], list[int]]], Counter]:
    """(tokens, mask) of each example one conversation becomes, and counts: "replies" trained, "truncated"
    (context cut), "dropped" (replies too long even alone), "turns_left_out" (earlier turns left out
    of a trained reply's history to fit, summed over its replies). The policy is the module
    docstring's; each example's mask ends with MASK_END."""
    counts: Counter = Counter()
    examples: list[tuple[list[int], list[int]]] = []

    def add(tokens: list[int], mask: list[int]) -> None:
        examples.append((tokens, mask[:-1] + [MASK_END]))

    def flush(group: tuple[int, Turn, list[int]] | None) -> None:
        if group is None:
            return
        start, first, trained = group
        kept = [first, *turns[start + 1 : trained[-1] + 1]]
        add(*render_turns([replace(t, weight=int(start + k in trained)) for k, t in enumerate(kept)]))

    group = None
    for j, turn in enumerate(turns):
        if turn.reply is None or not turn.weight:
            continue
        kept, start = fit_turns(turns[: j + 1], max_len)
        if group is not None and group[:2] == (start, kept[0]):
            group[2].append(j)
        else:
            flush(group)
            group = None
            if len(kept) == 1 and len(render_turns(kept)[0]) > max_len:  # its own turn alone is too long
                record = Record(turn.instruction, kept[0].context_text(), turn.reply)
                tokens, mask, outcome = encode_record(record, max_len)
                counts[outcome] += 1
                if outcome == "dropped":
                    continue
                add(tokens, mask)
            else:
                group = (start, kept[0], [j])
        counts["replies"] += 1
        counts["turns_left_out"] += start
    flush(group)
    return examples, counts


def check_out_dir(out_dir: Path, producer: str, kind: str = KIND, what: str = "instruction data") -> None:
    """Refuse to write over a directory that holds another kind of prepared data than `kind` (`what`)."""
    manifest = read_manifest(out_dir, producer)
    if manifest is not None and manifest.get("kind") != kind:
        raise DataError(
            f"{out_dir} holds data from {manifest.get('producer', 'another script')}, not {what}: choose another --out_dir"
        )


COUNT_KEYS = ("conversations", "examples", "replies", "tokens", "response_tokens", "truncated", "dropped", "turns_left_out")

Example = tuple[list[int], list[int]]  # (tokens, loss mask ending with MASK_END)
Shard = tuple[list[int], list[int], int]  # (tokens, mask, examples) of one shard


def pack_shards(units: Iterable[list[Example]], shard_size: int) -> list[Shard]:
    """Examples back to back in shards of at most shard_size tokens (a longer unit gets a shard of its
    own). A unit (an example, or a preference pair's two) never spans two shards: a shard closes
    before the unit that would take it past shard_size."""
    shards: list[Shard] = []
    tokens: list[int] = []
    mask: list[int] = []
    n_examples = 0
    for unit in units:
        if tokens and len(tokens) + sum(len(t) for t, _ in unit) > shard_size:
            shards.append((tokens, mask, n_examples))
            tokens, mask, n_examples = [], [], 0
        for example, example_mask in unit:
            tokens += example
            mask += example_mask
            n_examples += 1
    return shards + [(tokens, mask, n_examples)]


def tokenize_split(conversations: list[list[Turn]], split: str, max_len: int, shard_size: int) -> tuple[list[Shard], dict]:
    """Encode one split: (shards, counts)."""
    c: Counter = Counter(dict.fromkeys(COUNT_KEYS, 0))
    units = []
    for turns in tqdm(conversations, desc=f"tokenizing {split}", unit="conversation"):
        examples, counts = encode_conversation(turns, max_len)
        c.update(counts)
        c["conversations"] += 1
        for example, example_mask in examples:
            units.append([(example, example_mask)])
            c["examples"] += 1
            c["tokens"] += len(example)
            c["response_tokens"] += sum(m > 0 for m in example_mask)
    if not c["examples"]:
        raise DataError(f"every {split} example was dropped as longer than --max_len {max_len}: raise --max_len")
    return pack_shards(units, shard_size), dict(c)


def write_masked_shards(out_dir: str | Path, tokenized: dict[str, tuple[list[Shard], dict]], *, kind: str,
                        producer: str, source: str, settings: dict, counts: dict) -> dict:
    """Write the token and mask shards of every split, then the manifest (kind, counts: each split's
    beside the given ones); return it. Shards of an earlier preparation in out_dir that the new
    manifest no longer lists are removed. The caller tokenizes everything first, so a failure there
    leaves out_dir as it was."""
    out_dir = Path(out_dir)
    previous = read_manifest(out_dir, producer)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out_dir)
    shards = []
    counts = dict(counts)
    for split, (split_shards, split_counts) in tokenized.items():
        counts[split] = split_counts
        for index, (tokens, mask, n_examples) in enumerate(split_shards):
            entry = write_shard(out_dir, token_name(split, index), np.array(tokens, dtype=np.uint16))
            mask_entry = write_shard(out_dir, mask_name(split, index), np.array(mask, dtype=np.uint8))
            shards.append(entry | {"split": split, "examples": n_examples,
                                   "mask_file": mask_entry["file"], "mask_sha256": mask_entry["sha256"]})
    manifest = {"format": SHARD_FORMAT, "kind": kind, "mask_values": MASK_VALUES, "producer": producer,
                "source": source, "settings": settings, "counts": counts, "shards": shards}
    write_manifest(out_dir, manifest)
    listed = {s["file"] for s in shards} | {s["mask_file"] for s in shards}
    for old in previous["shards"] if previous else []:
        for name in (old["file"], old["mask_file"]):
            if name not in listed:
                (out_dir / name).unlink(missing_ok=True)  # the earlier preparation had more shards
    return manifest


def write_instruction_shards(
    out_dir: str | Path,
    splits: dict[str, list[list[Turn]]],
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
    """
    check_out_dir(Path(out_dir), producer)
    tokenized = {split: tokenize_split(splits[split], split, max_len, shard_size) for split in SPLITS}
    counts = {"records": sum(len(r) for r in splits.values()) + invalid_skipped, "invalid_skipped": invalid_skipped}
    return write_masked_shards(out_dir, tokenized, kind=KIND, producer=producer, source=source, settings=settings,
                               counts=counts)


def add_prep_args(parser: argparse.ArgumentParser, out_dir: str) -> None:
    """The flags every instruction-prep script shares."""
    parser.add_argument("--out_dir", default=out_dir, help="where the shards and manifest.json go")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="share of records held out for validation")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the shuffle that makes the split")
    parser.add_argument("--max_len", type=int, default=1024,
                        help="most tokens per example (prompts + replies + their <|endoftext|>): a conversation "
                             "that is longer loses its oldest turns, a single turn its context, or is dropped")
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


def prepare(sources: list[Rows], args: argparse.Namespace, *, producer: str, source: str) -> dict:
    """The whole pipeline for sources of rows (where, decoded JSON value); returns the manifest it wrote."""
    records, skipped = collect_conversations(sources, args.skip_invalid)
    splits = split_records(records, args.val_fraction, args.seed)
    settings = {"val_fraction": args.val_fraction, "seed": args.seed, "max_len": args.max_len}
    manifest = write_instruction_shards(
        args.out_dir, splits, producer=producer, source=source, settings=settings, invalid_skipped=skipped,
        max_len=args.max_len, shard_size=args.shard_size,
    )
    for split in SPLITS:
        c = manifest["counts"][split]
        print(f"{split}: {c['conversations']} conversations -> {c['examples']} examples training {c['replies']} replies, "
              f"{c['tokens']:,} tokens ({c['response_tokens']:,} trained); to fit --max_len {args.max_len}: "
              f"{c['turns_left_out']} earlier turns left out of replies' histories, {c['truncated']} with context cut, "
              f"{c['dropped']} replies dropped as too long")
    print(f"wrote {len(manifest['shards'])} token shard(s) with masks and {Path(args.out_dir) / 'manifest.json'}")
    return manifest



def run_cli(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    *,
    out_dir: str,
    producer: str,
    rows_and_source: Callable[[argparse.Namespace], tuple[list[Rows], str]],
) -> int:
    """A prep script's main: the shared flags (default --out_dir out_dir) beside the script's own, then
    prepare() on the sources of rows that rows_and_source(args) gives (one per input file, each in a
    format of its own); returns the exit code (2 for bad input)."""
    add_prep_args(parser, out_dir=out_dir)
    args = parser.parse_args(argv)
    check_prep_args(parser, args)
    try:
        sources, source = rows_and_source(args)
        prepare(sources, args, producer=producer, source=source)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
