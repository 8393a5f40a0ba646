"""Prepare databricks-dolly-15k for instruction tuning (model/finetune_dolly.py).

    python data_prep/prepare_dolly.py                              # from the Hugging Face Hub -> data/dolly
    python data_prep/prepare_dolly.py --input databricks-dolly-15k.jsonl   # a local copy, no network

Each of Dolly's 15,011 records (instruction, context, response, category) becomes one example: the
prompt template of model/prompt.py, the response and <|endoftext|>; only the response and that
closing token are trained on. 10% of the records, chosen by a seeded shuffle, are held out for
validation. Records that are not valid (a blank response, a non-string field) stop the run with
where they are, unless --skip_invalid. Output as in data_prep/instruction_shards.py.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the repo root importable

from data_prep.instruction_shards import Rows, jsonl_rows, run_cli  # noqa: E402
from model.hub import load_hub_dataset  # noqa: E402
from model.shards import DataError  # noqa: E402
from model.cli import HelpFormatter  # noqa: E402

PRODUCER = "data_prep/prepare_dolly.py"
HUB_DATASET = "databricks/databricks-dolly-15k"


def hub_rows() -> Rows:
    """(where, record) for every row of Dolly's only split, from the Hub (or the datasets cache)."""
    try:
        ds = load_hub_dataset(HUB_DATASET, split="train")
    except OSError as e:
        raise DataError(f"{e}\nwithout network, pass a local copy in Dolly's jsonl format: --input FILE.jsonl") from None
    for row, record in enumerate(ds):
        yield f"{HUB_DATASET} row {row}", record


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for bad input or settings)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--input", default=None,
                        help=f"a local jsonl in Dolly's schema instead of {HUB_DATASET} from the Hub")

    def rows_and_source(args: argparse.Namespace) -> tuple[list[Rows], str]:
        if args.input:
            return [jsonl_rows(args.input)], str(Path(args.input).resolve())
        return [hub_rows()], HUB_DATASET

    return run_cli(parser, argv, out_dir="data/dolly", producer=PRODUCER, rows_and_source=rows_and_source)


if __name__ == "__main__":
    sys.exit(main())
