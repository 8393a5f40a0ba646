"""Prepare your own instruction data for model/finetune_dolly.py.

    python data_prep/prepare_custom_dataset.py my.jsonl                      # -> data/custom
    python model/finetune_dolly.py --data_dir data/custom --out_dir checkpoints/custom --pretrained_checkpoint ...

The input is a jsonl file, one record per line:
    {"instruction": "Summarize the text.", "context": "optional reference text", "response": "The answer."}
"context" may be left out or null; other fields are ignored. A line that is not JSON, lacks
"instruction" or "response", has a non-string field or a blank instruction or response stops the run
with its file and line number, and nothing is written (or, with --skip_invalid, is left out and
counted). The input file is only read.

Output (in --out_dir): train/val token shards with loss masks and manifest.json, as described in
data_prep/instruction_shards.py, which this script shares with prepare_dolly.py.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the repo root importable

from data_prep.instruction_shards import jsonl_rows, run_cli  # noqa: E402
from model.cli import HelpFormatter  # noqa: E402

PRODUCER = "data_prep/prepare_custom_dataset.py"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for bad input or settings)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("input", help="a jsonl file of {instruction, context (optional), response} records")
    return run_cli(parser, argv, out_dir="data/custom", producer=PRODUCER,
                   rows_and_source=lambda args: (jsonl_rows(args.input), str(Path(args.input).resolve())))


if __name__ == "__main__":
    sys.exit(main())
