"""Prepare a chat dataset (whole conversations) for model/finetune_dolly.py.

    python data_prep/prepare_chat.py                                   # HuggingFaceTB/smol-smoltalk -> data/chat
    python data_prep/prepare_chat.py --limit 20000                     # its first 20k conversations
    python data_prep/prepare_chat.py --input smol-smoltalk.jsonl       # a local copy, no network
    python model/finetune_dolly.py --data_dir data/chat --out_dir checkpoints/chat --pretrained_checkpoint ...

The default set is HuggingFaceTB/smol-smoltalk (Apache-2.0): some hundred thousand synthetic
conversations written for small models, in OpenAI's {"messages": [...]} form. Any
Hub dataset with a "messages" column (or ShareGPT's "conversations") works with --dataset. Every
assistant reply is trained after exactly the prompt the server renders for the conversation before
it (model/prompt.py); a conversation longer than --max_len loses its oldest turns first. Bad
conversations stop the run with where they are, unless --skip_invalid. Output as in
data_prep/instruction_shards.py.
"""

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the repo root importable

from data_prep.instruction_shards import Rows, jsonl_rows, run_cli  # noqa: E402
from model.cli import HelpFormatter  # noqa: E402
from model.hub import load_hub_dataset  # noqa: E402
from model.shards import DataError  # noqa: E402

PRODUCER = "data_prep/prepare_chat.py"
HUB_DATASET = "HuggingFaceTB/smol-smoltalk"


def hub_rows(dataset: str, split: str, limit: int) -> Rows:
    """(where, record) for the first `limit` rows (0: all) of a Hub dataset's split (or the datasets cache)."""
    try:
        ds = load_hub_dataset(dataset, split=split)
    except OSError as e:
        raise DataError(f"{e}\nwithout network, pass a local copy as jsonl "
                        "({\"messages\": [...]} per line): --input FILE.jsonl") from None
    rows = ds if not limit else itertools.islice(ds, limit)
    for row, record in enumerate(rows):
        yield f"{dataset} {split} row {row}", record


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for bad input or settings)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dataset", default=HUB_DATASET, help="a Hub dataset of conversations ('messages' column)")
    parser.add_argument("--split", default="train", help="the Hub dataset's split to read")
    parser.add_argument("--limit", type=int, default=0, help="read only the first N conversations (0: all)")
    parser.add_argument("--input", default=None,
                        help="a local jsonl of OpenAI messages or ShareGPT conversations instead of the Hub")

    def rows_and_source(args: argparse.Namespace) -> tuple[list[Rows], str]:
        if args.limit < 0:
            parser.error("--limit must be >= 0")
        if args.input:
            rows = jsonl_rows(args.input)
            return [itertools.islice(rows, args.limit) if args.limit else rows], str(Path(args.input).resolve())
        return [hub_rows(args.dataset, args.split, args.limit)], f"{args.dataset} ({args.split})"

    return run_cli(parser, argv, out_dir="data/chat", producer=PRODUCER, rows_and_source=rows_and_source)


if __name__ == "__main__":
    sys.exit(main())
