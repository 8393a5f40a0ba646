"""Prepare preference pairs (a prompt, a chosen reply and a rejected one) for model/dpo.py.

    python data_prep/prepare_preferences.py                          # Anthropic/hh-rlhf helpful-base -> data/preferences
    python data_prep/prepare_preferences.py --dataset HuggingFaceH4/ultrafeedback_binarized
    python data_prep/prepare_preferences.py --input pairs.jsonl      # your own pairs, no network
    python data_prep/prepare_preferences.py --limit 2000             # the first 2000 rows of each Hub split

--input: one JSON object per line, the prompt as "prompt" (a string: one user message) or "messages"
(OpenAI chat messages ending with the user's), and the two replies as "chosen" and "rejected": strings,
assistant messages, or lists of messages ending with one (ultrafeedback_binarized's form). data_prep/graded_pairs.py
writes such a file from a model's own answers.

The prompt is rendered by model/prompt.py exactly as the server renders the conversation, and each
reply ends with <|endoftext|>. Pair i is examples 2i (prompt + chosen) and 2i+1 (prompt + rejected)
of the masked shards of data_prep/instruction_shards.py, the mask marking the reply's tokens and its
<|endoftext|> (manifest kind "preferences"). A pair longer than --max_len loses its oldest turns
first, as the server drops them, until the prompt and the longer reply fit; a pair whose last turn
alone does not fit is dropped. Both are counted.

Hub sets: Anthropic/hh-rlhf's "chosen" and "rejected" are whole transcripts ("\\n\\nHuman: ...
\\n\\nAssistant: ...") that share everything but the last reply: the dialogue becomes user and
assistant messages, the last replies the pair (--subset picks helpful-base, harmless-base, ...).
HuggingFaceH4/ultrafeedback_binarized's are message lists. Any other Hub set is read in the --input
form. Hub sets keep their own splits (train and test) as train and val; --input is split by
--val_fraction. Hub rows that make no pair (an empty reply, the same reply twice, transcripts that
differ before the last reply) are skipped and counted; a bad line of --input stops the run with
file:line and why, nothing written, unless --skip_invalid.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the repo root importable

from tqdm import tqdm  # noqa: E402

from data_prep.instruction_shards import (  # noqa: E402
    SPLITS, Example, Rows, json_object, add_prep_args, check_out_dir, check_prep_args, jsonl_rows, pack_shards,
    report_problems, split_records, write_masked_shards,
)
from model.cli import HelpFormatter  # noqa: E402
from model.hub import load_hub_dataset  # noqa: E402
from model.prompt import ChatError, Turn, chat_turns, check_awaiting, fit_turns, message_text, render_turns  # noqa: E402
from model.shards import MASK_END, DataError  # noqa: E402
from model.tokenizer import encode  # noqa: E402

PRODUCER = "data_prep/prepare_preferences.py"
KIND = "preferences"


@dataclass(frozen=True)
class Pair:
    """A conversation up to the turn to answer (its reply None) and two replies to it, the first preferred."""

    turns: tuple[Turn, ...]
    chosen: str
    rejected: str


def reply_text(value: object, field: str) -> str:
    """A reply given as a string, an assistant message, or a list of messages ending with one."""
    if isinstance(value, list) and value:
        value = value[-1]
    if isinstance(value, dict):
        if value.get("role") != "assistant":
            raise ValueError(f'"{field}" must be a reply: a string or an assistant message, not a {value.get("role")!r} message')
        value = message_text(value.get("content"))
    if not isinstance(value, str):
        raise ValueError(f'"{field}" is {type(value).__name__}: give the reply as a string')
    if not value.strip():
        raise ValueError(f'"{field}" is empty')
    return value


def check_pair(obj: object) -> Pair:
    """The Pair of one decoded JSON value in the --input form, or ValueError saying what is wrong."""
    obj = json_object(obj)
    for field in ("chosen", "rejected"):
        if field not in obj:
            raise ValueError(f'no "{field}" field')
    if ("prompt" in obj) == ("messages" in obj):
        raise ValueError('give the prompt as "prompt" (a string) or as "messages" (a list of chat messages): one of the two')
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise ValueError('"prompt" must be a non-empty string')
        messages = [{"role": "user", "content": obj["prompt"]}]
    else:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError('"messages" must be a non-empty list of {"role", "content"} objects')
    try:
        turns = chat_turns(messages)
        check_awaiting(turns)
    except ChatError as e:
        raise ValueError(str(e)) from None
    chosen, rejected = reply_text(obj["chosen"], "chosen"), reply_text(obj["rejected"], "rejected")
    if chosen == rejected:
        raise ValueError('"chosen" and "rejected" are the same reply: there is nothing to prefer')
    return Pair(tuple(turns), chosen, rejected)


HH_SPEAKER = re.compile(r"(?:^|\n\n)(Human|Assistant): ")


def hh_messages(transcript: str) -> list[dict]:
    """An hh-rlhf transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as chat messages."""
    parts = HH_SPEAKER.split(transcript)
    if parts[0].strip() or len(parts) < 3 or parts[1] != "Human":
        raise ValueError("not an hh-rlhf transcript (it does not start with a Human: turn)")
    return [{"role": "user" if who == "Human" else "assistant", "content": text}
            for who, text in zip(parts[1::2], parts[2::2])]


def hh_pair(row: dict) -> dict:
    """An Anthropic/hh-rlhf row in the --input form: the shared dialogue and the two last replies."""
    chosen, rejected = hh_messages(row["chosen"]), hh_messages(row["rejected"])
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise ValueError("a transcript does not end with an Assistant: reply")
    if chosen[:-1] != rejected[:-1]:
        raise ValueError("the two transcripts differ before their last reply")
    return {"messages": chosen[:-1], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}


def ultrafeedback_pair(row: dict) -> dict:
    """A HuggingFaceH4/ultrafeedback_binarized row in the --input form (its "messages" is the chosen chat)."""
    return {"messages": row["chosen"][:-1], "chosen": row["chosen"], "rejected": row["rejected"]}


@dataclass(frozen=True)
class HubSet:
    subset: str | None  # the default --subset (a data_dir of the repository)
    splits: tuple[str, str]  # the Hub's splits read as train and val
    to_pair: Callable[[dict], dict]


HUB_SETS = {
    "Anthropic/hh-rlhf": HubSet("helpful-base", ("train", "test"), hh_pair),
    "HuggingFaceH4/ultrafeedback_binarized": HubSet(None, ("train_prefs", "test_prefs"), ultrafeedback_pair),
}
OTHER_HUB_SET = HubSet(None, ("train", "test"), lambda row: row)


def hub_rows(dataset: str, subset: str | None, split: str, limit: int) -> Rows:
    """(where, row in the --input form) for the first `limit` rows (0: all) of a Hub split; a row that
    cannot be put in that form comes as its ValueError."""
    hub = HUB_SETS.get(dataset, OTHER_HUB_SET)
    try:
        ds = load_hub_dataset(dataset, split=split, data_dir=subset)
    except OSError as e:
        raise DataError(f"{e}\nwithout network, pass your pairs as jsonl: --input FILE.jsonl") from None
    for row, record in enumerate(ds if not limit else itertools.islice(ds, limit)):
        try:
            yield f"{dataset} {split} row {row}", hub.to_pair(record)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            yield f"{dataset} {split} row {row}", ValueError(f"not a preference pair ({type(e).__name__}: {e})")


def collect_pairs(rows: Rows, skip_invalid: bool) -> tuple[list[Pair], int]:
    """The pairs of (where, value) rows and how many bad ones were skipped; without skip_invalid a bad
    row stops with DataError listing every bad row, before anything is written."""
    pairs, problems = [], []
    for where, value in rows:
        try:
            if isinstance(value, ValueError) and not isinstance(value, json.JSONDecodeError):
                raise value  # a Hub row that is no pair (check_pair reports a line that is not JSON)
            pairs.append(check_pair(value))
        except ValueError as e:
            problems.append(f"{where}: {e}")
    report_problems(problems, skip_invalid)
    return pairs, len(problems)


def encode_pair(pair: Pair, max_len: int) -> tuple[list[Example], int]:
    """The pair's two examples (prompt + chosen, prompt + rejected; [] if dropped) and the turns left
    out of the prompt to fit max_len tokens. Both examples share one prompt: the newest turns that fit
    beside the longer reply (model/prompt.py's fit_turns, as the server fits a long chat)."""
    longer = max(pair.chosen, pair.rejected, key=lambda reply: len(encode(reply)))
    kept, left_out = fit_turns([*pair.turns[:-1], replace(pair.turns[-1], reply=longer)], max_len)
    history = [replace(t, weight=0) for t in kept[:-1]]  # earlier replies are prompt, never trained
    examples = []
    for reply in (pair.chosen, pair.rejected):
        tokens, mask = render_turns([*history, replace(kept[-1], reply=reply, weight=1)])
        if len(tokens) > max_len:
            return [], left_out
        examples.append((tokens, mask[:-1] + [MASK_END]))
    return examples, left_out


def tokenize_pairs(pairs: list[Pair], split: str, max_len: int, shard_size: int) -> tuple[list, dict]:
    """Encode one split: (shards, counts of pairs kept, shortened, dropped, turns left out, tokens, reply tokens)."""
    c: Counter = Counter(dict.fromkeys(("pairs", "kept", "shortened", "dropped", "turns_left_out", "tokens",
                                        "reply_tokens"), 0))
    units = []
    for pair in tqdm(pairs, desc=f"tokenizing {split}", unit="pair"):
        examples, left_out = encode_pair(pair, max_len)
        c["pairs"] += 1
        if not examples:
            c["dropped"] += 1
            continue
        c["kept"] += 1
        c["shortened"] += left_out > 0
        c["turns_left_out"] += left_out
        c["tokens"] += sum(len(t) for t, _ in examples)
        c["reply_tokens"] += sum(sum(m > 0 for m in mask) for _, mask in examples)
        units.append(examples)
    if not units:
        raise DataError(f"every {split} pair was dropped as longer than --max_len {max_len}: raise --max_len")
    return pack_shards(units, shard_size), dict(c)


def prepare(splits: dict[str, list[Pair]], args: argparse.Namespace, *, source: str, invalid_skipped: int) -> dict:
    """Tokenize both splits, then write shards and manifest; returns the manifest."""
    tokenized = {split: tokenize_pairs(splits[split], split, args.max_len, args.shard_size) for split in SPLITS}
    settings = {"val_fraction": args.val_fraction, "seed": args.seed, "max_len": args.max_len}
    counts = {"records": sum(map(len, splits.values())) + invalid_skipped, "invalid_skipped": invalid_skipped}
    manifest = write_masked_shards(args.out_dir, tokenized, kind=KIND, producer=PRODUCER, source=source,
                                   settings=settings, counts=counts)
    for split in SPLITS:
        c = manifest["counts"][split]
        print(f"{split}: {c['pairs']} pairs -> {c['kept']} kept, {c['tokens']:,} tokens ({c['reply_tokens']:,} in replies); "
              f"to fit --max_len {args.max_len}: {c['shortened']} lost {c['turns_left_out']} earlier turns, "
              f"{c['dropped']} dropped as too long")
    print(f"wrote {len(manifest['shards'])} token shard(s) with masks and {Path(args.out_dir) / 'manifest.json'}")
    return manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dataset", default="Anthropic/hh-rlhf",
                        help=f"a Hub preference set: {', '.join(HUB_SETS)}, or one in the --input form")
    parser.add_argument("--subset", default=None,
                        help="the Hub set's data directory (hh-rlhf: helpful-base by default, harmless-base, helpful-online, ...)")
    parser.add_argument("--limit", type=int, default=0, help="read only the first N rows of each split (0: all)")
    parser.add_argument("--input", default=None, help="a local jsonl of pairs instead of the Hub (see above)")
    add_prep_args(parser, out_dir="data/preferences")
    args = parser.parse_args(argv)
    check_prep_args(parser, args)
    if args.limit < 0:
        parser.error("--limit must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for bad input or settings)."""
    args = parse_args(argv)
    try:
        check_out_dir(Path(args.out_dir), PRODUCER, KIND, "preference pairs")
        if args.input:
            rows = jsonl_rows(args.input)
            pairs, skipped = collect_pairs(itertools.islice(rows, args.limit) if args.limit else rows, args.skip_invalid)
            if not pairs:
                raise DataError(f"{args.input}: no pairs")
            splits, source = split_records(pairs, args.val_fraction, args.seed), str(Path(args.input).resolve())
        else:
            hub = HUB_SETS.get(args.dataset, OTHER_HUB_SET)
            subset = args.subset if args.subset is not None else hub.subset
            splits, skipped = {}, 0
            for ours, theirs in zip(("train", "val"), hub.splits):
                # the Hub's rows are not the user's to fix: bad ones are counted and left out
                splits[ours], bad = collect_pairs(hub_rows(args.dataset, subset, theirs, args.limit), skip_invalid=True)
                skipped += bad
                if not splits[ours]:
                    raise DataError(f"{args.dataset} {theirs}: no pairs")
            source = f"{args.dataset}{f' ({subset})' if subset else ''} {'/'.join(hub.splits)}"
        prepare(splits, args, source=source, invalid_skipped=skipped)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
