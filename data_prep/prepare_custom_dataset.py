"""Prepare your own instruction data or conversations for model/finetune_dolly.py.

    python data_prep/prepare_custom_dataset.py my.jsonl                      # -> data/custom
    python data_prep/prepare_custom_dataset.py instructions.jsonl chats.jsonl   # several files, one format each
    python model/finetune_dolly.py --data_dir data/custom --out_dir checkpoints/custom --pretrained_checkpoint ...

Each input is a jsonl file, one record per line, in one of three formats (told from its first record):
    {"instruction": "Summarize the text.", "context": "optional reference text", "response": "The answer."}
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!", "weight": 0}, ...]}      # OpenAI fine-tuning format
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}, ...]}   # ShareGPT
Instruction records: "context" may be left out or null; other fields are ignored. Conversations:
roles system, developer, user, assistant (and tool, as context); content a string or a list of text
parts; an assistant message with "weight": 0 is kept as history but not trained on; "name" is
ignored. Every reply is trained after exactly the prompt the server renders for the messages before
it. A line that is not JSON, is in another format than the first, lacks a field, has an unknown
role, a weight other than 0/1, non-text content, an empty reply or nothing to train on stops the run
with its file and line number and why, and nothing is written (or, with --skip_invalid, is left out
and counted). The input file is only read.

Output (in --out_dir): train/val token shards with loss masks and manifest.json, as described in
data_prep/instruction_shards.py, which this script shares with prepare_dolly.py and prepare_chat.py.
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
    parser.add_argument("input", nargs="+",
                        help="jsonl files of instruction records, OpenAI messages or ShareGPT conversations")
    return run_cli(parser, argv, out_dir="data/custom", producer=PRODUCER,
                   rows_and_source=lambda args: ([jsonl_rows(path) for path in args.input],
                                                 ", ".join(str(Path(path).resolve()) for path in args.input)))


if __name__ == "__main__":
    sys.exit(main())
