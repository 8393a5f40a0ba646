"""eval/report.py on synthetic logs: the plots are real PNGs drawn from the data, the summary figures
are the log's (later records winning after a resume), and a missing or broken log is handled."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from eval.report import main, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PROMPT = "### Instruction:\nSay hi | politely.\n\n### Response:\n"
PLOTS = ("loss.png", "lr.png", "hellaswag.png", "throughput.png", "metric_exact_match.png")


RESUMED_LOSS, RESUMED_VAL = 2.125, 4.0  # what the resumed run logged again for step 100


def train_loss(step: int, scale: float = 1.0) -> float:
    return 3.0 + scale * 8.0 * math.exp(-step / 30)


def val_loss(step: int) -> float:
    # a dip at step 50, so the best val loss is not the last one
    return 3.5 + 6.0 * math.exp(-step / 30) - (1.5 if step == 50 else 0.0)


def train_record(step: int, loss: float) -> dict:
    # step 1 is slow (compile), so the median must leave it out; 5.25 s + 99 x 0.25 s = 30 s in all
    return {"step": step, "train_loss": loss, "lr": 6e-4 * min(1.0, step / 10), "grad_norm": 1.0,
            "dt_ms": 5250.0 if step == 1 else 250.0, "tokens_per_s": 1000.0 if step == 1 else 40000.0 + step, "mfu": 0.3}


def make_run(run_dir: Path, *, scale: float = 1.0, hellaswag: bool = True, sft: bool = True) -> None:
    """A 100-step run whose last steps were logged again by a resume, ending in a half-written line."""
    run_dir.mkdir(parents=True)
    records = []
    for step in range(0, 101):
        if step % 25 == 0:
            records.append({"step": step, "val_loss": val_loss(step)})
        if hellaswag and step % 50 == 0:
            records.append({"step": step, "hellaswag_acc_norm": 0.25 + step / 1000, "hellaswag_acc": 0.24 + step / 2000})
        if sft and step % 50 == 0:
            records.append({"step": step, "samples": [{"prompt": PROMPT, "answer": f"Hi ``` at step {step}"},
                                                      {"prompt": "Name a color.", "answer": f"blue {step}"}]})
            records.append({"step": step, "exact_match": step / 200, "exact_match_new_operands": step / 400})
        if step > 0:
            records.append(train_record(step, train_loss(step, scale)))
    # the resume: the same steps and kinds again, with values that must replace the first ones
    records += [train_record(100, RESUMED_LOSS), {"step": 100, "val_loss": RESUMED_VAL}]
    if sft:
        records.append({"step": 50, "samples": [{"prompt": PROMPT, "answer": "Hello again at step 50"}]})
    lines = [json.dumps(r) for r in records] + ['{"step": 101, "train_lo']
    (run_dir / "log.jsonl").write_text("\n".join(lines))
    (run_dir / "args.json").write_text(json.dumps({"max_steps": 100, "max_lr": 6e-4, "n_layer": 4, "init_from": "gpt2",
                                                    "pretrained_checkpoint": None, "data_dir": "data/a|b"}))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_and_plots_of_a_resumed_sft_run(tmp_path, capsys):
    run = tmp_path / "dolly"
    make_run(run)
    report = write_report(run)
    assert report == run / "report.md"
    text = report.read_text()

    for name in PLOTS:
        width, height = png_size(run / name)
        assert 300 < width < 2000 and 200 < height < 1500, (name, width, height)
        assert (run / name).stat().st_size > 5000, f"{name} looks empty"
        assert f"]({name})" in text

    # the log's figures as the report prints them; step 100's resumed records win over the first ones
    assert f"Val loss: best {val_loss(50):.4f} (step 50), last {RESUMED_VAL:.4f} (step 100)" in text
    assert f"Train loss: {train_loss(1):.4f} (step 1) -> {RESUMED_LOSS:.4f} (step 100)" in text
    assert "Steps done: 100 of 100" in text
    assert "HellaSwag acc_norm: last 0.3500 (step 100), best 0.3500 (step 100)" in text
    assert "median 40,051 tokens/s" in text  # steps 2..100 at 40000 + step; step 1's 1000 left out
    assert "median MFU 30.0%" in text
    assert "Training time: 30.0s" in text  # step 100, logged twice, counts once
    assert "exact_match: last 0.5 (step 100)" in text
    # a breakdown of a metric (NAME_...) is a line on that metric's plot, not a plot of its own
    assert "exact_match_new_operands: last 0.25 (step 100)" in text
    assert not (run / "metric_exact_match_new_operands.png").exists() and (run / "metric_exact_match.png").exists()
    assert "| data_dir | data/a\\|b |" in text and "pretrained_checkpoint" not in text  # None is left out
    assert "log.jsonl:" in capsys.readouterr().err  # the half-written last line

    samples = text[text.index("## Sample answers over training"):]
    assert samples.index("### Prompt 1") < samples.index("### Prompt 2")
    prompt_1 = samples[: samples.index("### Prompt 2")]
    assert "```text\n" + PROMPT + "\n```" in prompt_1  # the prompt's own ### headers stay inside the fence
    # step 50 was logged again after step 100: it still shows between them, with the later answer
    order = [prompt_1.index(f"Step {s}:") for s in (0, 50, 100)]
    assert order == sorted(order)
    assert "Hello again at step 50" in prompt_1 and "Hi ``` at step 50" not in prompt_1
    assert "````text\nHi ``` at step 100\n````" in prompt_1  # a longer fence than the answer's backticks


def test_half_written_line_warns_with_its_number(tmp_path, capsys):
    make_run(tmp_path / "run", sft=False, hellaswag=False)
    n_lines = len((tmp_path / "run" / "log.jsonl").read_text().splitlines())
    assert main(["--run", str(tmp_path / "run")]) == 0
    assert f"log.jsonl:{n_lines}: not JSON, skipped" in capsys.readouterr().err


def test_later_record_wins_after_a_resume(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    log = [{"step": 1, "train_loss": 9.0, "lr": 1e-4, "grad_norm": 1.0, "dt_ms": 100.0, "tokens_per_s": 10.0},
           {"step": 2, "train_loss": 8.0, "lr": 1e-4, "grad_norm": 1.0, "dt_ms": 100.0, "tokens_per_s": 10.0},
           {"step": 2, "val_loss": 7.5},
           {"step": 2, "train_loss": 6.0, "lr": 1e-4, "grad_norm": 1.0, "dt_ms": 100.0, "tokens_per_s": 10.0},
           {"step": 2, "val_loss": 5.5}]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    text = write_report(run).read_text()
    assert "9.0000 (step 1) -> 6.0000 (step 2)" in text
    assert "best 5.5000 (step 2), last 5.5000 (step 2)" in text
    assert "Training time: 0.2s" in text


def test_plots_follow_the_data(tmp_path):
    make_run(tmp_path / "a")
    make_run(tmp_path / "b", scale=0.5)
    write_report(tmp_path / "a")
    write_report(tmp_path / "b")
    assert (tmp_path / "a" / "loss.png").read_bytes() != (tmp_path / "b" / "loss.png").read_bytes()
    # same data, same picture: what differs above is the data, not a timestamp
    assert (tmp_path / "a" / "lr.png").read_bytes() == (tmp_path / "b" / "lr.png").read_bytes()


def test_absent_series_give_no_plot_and_no_link(tmp_path):
    run = tmp_path / "pretrain"
    make_run(run, hellaswag=False, sft=False)
    out = tmp_path / "report"
    report = write_report(run, out)
    text = report.read_text()
    assert report == out / "report.md" and (out / "loss.png").is_file()
    assert not (out / "hellaswag.png").exists() and "hellaswag.png" not in text and "HellaSwag" not in text
    assert "Sample answers" not in text and not list(out.glob("metric_*.png"))
    assert not (run / "report.md").exists()


def test_empty_log_reports_no_records(tmp_path):
    (tmp_path / "log.jsonl").write_text("")
    assert main(["--run", str(tmp_path)]) == 0
    assert "No records in log.jsonl yet" in (tmp_path / "report.md").read_text()
    assert not list(tmp_path.glob("*.png"))


def test_no_log_exits_2_and_says_what_to_run(tmp_path, capsys):
    assert main(["--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"error: no log.jsonl in {tmp_path}: train a run first (model/train_gpt2.py or model/finetune_dolly.py)" in err
    assert not (tmp_path / "report.md").exists()


def test_help(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    assert "--out_dir" in capsys.readouterr().out


def test_runs_as_a_script_from_the_repo_root_without_torch(tmp_path, repo_root):
    make_run(tmp_path / "run", sft=False)
    done = subprocess.run([sys.executable, "eval/report.py", "--run", str(tmp_path / "run")],
                          cwd=repo_root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"wrote {tmp_path / 'run' / 'report.md'}" in done.stdout
    assert (tmp_path / "run" / "hellaswag.png").is_file()
    # torch takes seconds to import: a report must not pay for it
    check = "import sys, eval.report; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", check], cwd=repo_root, timeout=60).returncode == 0
