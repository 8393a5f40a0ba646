"""What every script's command line shares. Kept free of torch, so scripts that never touch a
model (data prep, reports) start fast."""

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default and keeps the script docstring's line breaks."""


QUANT_TYPES = ("none", "int8")  # the weights GPT.prepare_inference can serve with; NANOGPT_QUANT takes the same words


def add_quant_argument(parser: argparse.ArgumentParser) -> None:
    """--quant for every script that generates: int8 weights for faster decoding on CPU."""
    parser.add_argument("--quant", default="none", choices=QUANT_TYPES,
                        help="int8: per-channel int8 weights, batch-1 decoding about 2x faster on CPU (README, int8 "
                             "weights in our own engine); none: the checkpoint's float32")
