"""What every script's command line shares. Kept free of torch, so scripts that never touch a
model (data prep, reports) start fast."""

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default and keeps the script docstring's line breaks."""
