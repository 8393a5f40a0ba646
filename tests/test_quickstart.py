"""The README's CPU quick start, run as the README gives it (shortened to a few steps), from the
repo's own corpus: offline, no file from outside the repo, and it ends with a trained model."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

from conftest import REPO_ROOT
from model.checkpoint import latest_checkpoint

SECTION = "### A tiny model on a laptop CPU, in minutes"
SHORTER = {"--max_steps": "30", "--eval_every": "10", "--save_every": "30", "--warmup_steps": "3"}


def readme_commands() -> list[list[str]]:
    """The quick start's code block, one argv per command (continuation lines joined, comments dropped)."""
    block = (REPO_ROOT / "README.md").read_text().split(SECTION, 1)[1].split("```", 2)[1]
    lines = block.replace("\\\n", " ").strip().splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip()]


def test_the_readme_quick_start_trains_a_model_offline(tmp_path):
    commands = readme_commands()
    assert [c[1] for c in commands] == ["data_prep/demo_corpus.py", "data_prep/fineweb.py", "model/train_gpt2.py"]
    for argv in commands:
        assert argv[0] == "python" and not any(".." in a for a in argv), argv  # nothing from outside the repo
        argv = [sys.executable, *argv[1:]]
        for i, arg in enumerate(argv):
            if arg.startswith(("data/", "checkpoints/")):
                argv[i] = str(tmp_path / arg)
            elif arg in SHORTER:
                argv[i + 1] = SHORTER[arg]
        result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                                env=os.environ | {"HF_HUB_OFFLINE": "1"})  # offline: the Hub is never needed
        assert result.returncode == 0, (argv, result.stdout[-2000:], result.stderr[-2000:])
    run = tmp_path / "checkpoints" / "tiny"
    assert latest_checkpoint(run).name == "step_000030.pt"
    val = [r["val_loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert val[-1] < val[0] - 3  # from ~10.8 (random) to far below
