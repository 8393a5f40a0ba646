"""A training run's report: report.md and PNG plots, from the run directory's log.jsonl (and args.json).

    python eval/report.py --run checkpoints/pretrain                  # writes into checkpoints/pretrain/
    python eval/report.py --run checkpoints/dolly --out_dir artifacts/dolly_report

Written (each plot only when its data is in the log):
    report.md        key settings (args.json), summary figures, the plots, and for instruction tuning
                     the sample answers of each logged step
    loss.png         train loss (raw and smoothed) and val loss over steps
    lr.png           the learning rate schedule
    hellaswag.png    acc_norm and acc, against OpenAI's GPT-2 124M (0.2955) and chance (0.25)
    throughput.png   tokens/s, and MFU where the log has it
    reward_accuracy.png, rewards.png
                     preference tuning (model/dpo.py): the share of pairs whose chosen reply has the
                     higher reward, and the mean chosen and rejected rewards and their margin, train
                     (smoothed) and val
    metric_KEY.png   one per other numeric key an evaluation logged (e.g. metric_exact_match.png), with
                     the keys that break it down (exact_match_new_operands, ...) as further lines

log.jsonl is the one model/trainer.py appends to: a record per training step and per evaluation. A
resumed run may log a step twice; the later record of the same step and kind wins. A line that is
not JSON (the last one of a killed run can be half-written) is skipped with a warning.

Training scripts call write_report(run_dir) in-process. Nothing here imports torch (slow to import)
or loads a checkpoint, and plots are drawn on Agg canvases without pyplot, so no display is needed
and the calling process's own matplotlib backend and figures are left alone.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the repo root importable

from model.atomic import atomic_write
from model.cli import HelpFormatter

TRAIN_KEYS = ("train_loss", "lr", "grad_norm", "dt_ms", "tokens_per_s", "mfu")
# figures model/dpo.py logs every step, and as val_KEY at evaluations: (file, title, keys drawn together,
# whether they are fractions, drawn in percent)
DPO_PLOTS = (("reward_accuracy.png", "Reward accuracy", ("reward_accuracy",), True),
             ("rewards.png", "Rewards", ("reward_chosen", "reward_rejected", "reward_margin"), False))
DPO_KEYS = tuple(k for _, _, keys, _ in DPO_PLOTS for key in keys for k in (key, "val_" + key))
KNOWN_EVAL_KEYS = ("val_loss", "hellaswag_acc_norm", "hellaswag_acc", *DPO_KEYS)
GPT2_HELLASWAG = 0.2955  # OpenAI GPT-2 124M's acc_norm, the usual target of a 124M reproduction
CHANCE = 0.25  # four endings
# args.json keys shown in the settings table, in this order, where the run has them
KEY_SETTINGS = (
    "init_from", "pretrained_checkpoint", "data_dir", "max_steps", "epochs", "max_lr", "min_lr_frac",
    "warmup_steps", "weight_decay", "total_batch_size", "batch_size", "seq_len", "n_layer", "n_head",
    "n_embd", "dropout", "dtype", "compile", "seed", "sft_checkpoint", "beta", "sft_weight",
)
FIGSIZE, DPI = (7, 4), 110


@dataclass
class RunLog:
    """A log after de-duplication, in step order: each metric a list of (step, value)."""

    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    samples: list[tuple[int, list[dict]]] = field(default_factory=list)  # (step, [{"prompt", "answer"}])
    num_records: int = 0


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(record: dict) -> tuple:
    """What a record reports, so that a resumed run's repeat of it replaces it.

    A training record is one kind whatever its optional keys (a resume may gain or lose "mfu");
    an evaluation's kind is its set of keys, so two evaluations at one step both stay.
    """
    return ("train",) if "train_loss" in record else tuple(sorted(record))


def read_log(path: str | Path) -> RunLog:
    """The records of a log.jsonl, the later one winning where a step and kind repeat.

    Lines that are not a JSON object with an integer "step" are skipped with a warning on stderr.
    """
    path = Path(path)
    latest: dict[tuple, dict] = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            print(f"warning: {path}:{number}: not JSON, skipped (a killed run can leave a half-written line)",
                  file=sys.stderr)
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or isinstance(record["step"], bool):
            print(f"warning: {path}:{number}: not a record with an integer \"step\", skipped", file=sys.stderr)
            continue
        key = (record["step"], _kind(record))
        latest.pop(key, None)  # re-insert, so the dict keeps the order in which the winners were logged
        latest[key] = record

    log = RunLog(num_records=len(latest))
    for record in sorted(latest.values(), key=lambda r: r["step"]):  # stable: same-step records keep log order
        step = record["step"]
        for name, value in record.items():
            if name != "step" and _is_number(value):
                log.series.setdefault(name, []).append((step, float(value)))
        samples = record.get("samples")
        if isinstance(samples, list):
            good = [s for s in samples if isinstance(s, dict) and isinstance(s.get("prompt"), str)
                    and isinstance(s.get("answer"), str)]
            if good:
                log.samples.append((step, good))
    return log


def read_args(path: Path) -> dict:
    """args.json as a dict; {} where it is absent or unreadable (the report is still useful without it)."""
    if not path.is_file():
        return {}
    try:
        args = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        print(f"warning: {path}: unreadable ({e}), settings left out of the report", file=sys.stderr)
        return {}
    return args if isinstance(args, dict) else {}


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving mean over `window` values (fewer at the start), skipping non-finite ones."""
    out, kept = [], []
    for v in values:
        kept.append(v)
        recent = [x for x in kept[-window:] if math.isfinite(x)]
        out.append(sum(recent) / len(recent) if recent else math.nan)
    return out



def _figure():
    # a bare Figure on its own Agg canvas: no pyplot, so no global backend switch and no figure registry
    # to leak into when training scripts call write_report again and again
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _finish(fig, ax, title: str, ylabel: str, path: Path, legend: bool = True) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if legend:
        ax.legend(loc="best", fontsize="small")
    fig.savefig(path, bbox_inches="tight")


def _xy(points: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
    return [s for s, _ in points], [v for _, v in points]


def smoothing_window(n: int) -> int:
    """~5% of a run's steps (5 to 100): the trend shows through the step-to-step noise."""
    return min(100, max(5, n // 20))


def plot_loss(train: list[tuple[int, float]], val: list[tuple[int, float]], path: Path) -> None:
    """Log-scale loss: a run falls from ~11 to ~1 in its first few hundred steps, and on a linear axis
    everything after that is a flat line. Val is evaluated every so often: markers, not a line
    drawn straight between them."""
    fig, ax = _figure()
    if train:
        steps, losses = _xy(train)
        ax.plot(steps, losses, lw=0.7, alpha=0.3, color="C0", label="train")
        window = smoothing_window(len(losses))
        if len(losses) > window:
            ax.plot(steps, smooth(losses, window), lw=1.8, color="C0", label=f"train (mean of last {window} steps)")
    if val:
        steps, losses = _xy(val)
        ax.plot(steps, losses, ls="none", marker="o", ms=5, color="C3", label="val", zorder=3)
    if all(v > 0 for _, v in train + val):
        ax.set_yscale("log")
    _finish(fig, ax, "Loss", "cross-entropy loss (log scale)", path)


def plot_lr(lr: list[tuple[int, float]], path: Path) -> None:
    fig, ax = _figure()
    ax.plot(*_xy(lr), lw=1.4, color="C2")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    _finish(fig, ax, "Learning rate", "learning rate", path, legend=False)


def plot_hellaswag(acc_norm: list[tuple[int, float]], acc: list[tuple[int, float]], path: Path) -> None:
    fig, ax = _figure()
    if acc_norm:
        ax.plot(*_xy(acc_norm), marker="o", ms=4, lw=1.4, color="C0", label="acc_norm")
    if acc:
        ax.plot(*_xy(acc), marker="s", ms=3, lw=1, alpha=0.7, color="C1", label="acc")
    ax.axhline(GPT2_HELLASWAG, ls="--", lw=1, color="C3", label=f"GPT-2 124M (OpenAI), {GPT2_HELLASWAG}")
    ax.axhline(CHANCE, ls="--", lw=1, color="gray", label=f"chance, {CHANCE}")
    _finish(fig, ax, "HellaSwag", "accuracy", path)


def plot_throughput(tokens_per_s: list[tuple[int, float]], mfu: list[tuple[int, float]], path: Path) -> None:
    """Tokens/s smoothed like the loss (each step's own figure is noise: evaluations, saves, the OS),
    the raw figures faint behind."""
    fig, ax = _figure()
    steps, values = _xy(tokens_per_s)
    window = smoothing_window(len(values))
    ax.plot(steps, values, lw=0.6, alpha=0.25, color="C0")
    lines = ax.plot(steps, smooth(values, window), lw=1.8, color="C0", label=f"tokens/s (mean of last {window} steps)")
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:,.0f}")
    ax.set_ylim(bottom=0)
    if mfu:
        ax2 = ax.twinx()
        steps, values = _xy(mfu)
        lines += ax2.plot(steps, smooth([100 * v for v in values], window), lw=1.4, color="C1", label="MFU (%)")
        ax2.set_ylabel("MFU (%)")
        ax2.set_ylim(bottom=0)
    ax.legend(lines, [line.get_label() for line in lines], loc="best", fontsize="small")
    _finish(fig, ax, "Throughput", "tokens/s", path, legend=False)


def plot_train_val(title: str, series: dict[str, list[tuple[int, float]]], keys: tuple[str, ...], fraction: bool,
                   path: Path) -> None:
    """Figures logged every training step (smoothed, raw faint behind) and at evaluations (val_KEY,
    markers), one colour per key; fractions are drawn in percent."""
    fig, ax = _figure()
    scale = 100 if fraction else 1
    for i, key in enumerate(keys):
        label, colour = key.removeprefix("reward_").replace("_", " "), METRIC_COLOURS[i]
        if series.get(key):
            steps, values = _xy(series[key])
            window = smoothing_window(len(values))
            ax.plot(steps, [scale * v for v in values], lw=0.6, alpha=0.25, color=colour)
            ax.plot(steps, [scale * v for v in smooth(values, window)], lw=1.8, color=colour,
                    label=f"{label}, train (mean of last {window} steps)")
        if series.get("val_" + key):
            steps, values = _xy(series["val_" + key])
            ax.plot(steps, [scale * v for v in values], ls="none", marker=METRIC_MARKERS[i], ms=5, color=colour,
                    label=f"{label}, val", zorder=3)
    if fraction:
        ax.set_ylim(-2, 102)
    else:
        ax.axhline(0, lw=0.8, color="gray")
    _finish(fig, ax, title, title.lower() + (" (%)" if fraction else " (beta x log-prob ratio)"), path)


# well apart from each other, in order, for a metric and its breakdowns (matplotlib's C4-C9 have near twins)
METRIC_COLOURS = ("#1f3b99", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#17becf", "#8c564b", "#e377c2")
METRIC_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def metric_title(name: str) -> str:
    """A key as people read it: "exact_match" -> "Exact match"."""
    words = name.replace("_", " ").strip()
    return words[:1].upper() + words[1:]


def plot_metric(name: str, series: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """One metric over steps, with its breakdowns (exact_match_new_operands: "new operands") as further
    lines, each its own colour and marker; a fraction is drawn in percent, on 0-100."""
    fig, ax = _figure()
    fraction = all(0 <= v <= 1 for points in series.values() for _, v in points)
    for i, (key, points) in enumerate(series.items()):
        steps, values = _xy(points)
        label = "all" if key == name else key.removeprefix(name + "_").replace("_", " ")
        ax.plot(steps, [100 * v for v in values] if fraction else values, marker=METRIC_MARKERS[i % len(METRIC_MARKERS)],
                ms=5, lw=2.2 if key == name else 1.2, color=METRIC_COLOURS[i % len(METRIC_COLOURS)], label=label)
    if fraction:
        ax.set_ylim(-2, 102)
    _finish(fig, ax, metric_title(name), metric_title(name) + (" (%)" if fraction else ""), path, legend=len(series) > 1)


def other_metrics(log: RunLog) -> dict[str, list[str]]:
    """Numeric keys of evaluation records that have no plot of their own, in order of appearance,
    each with the keys that break it down (NAME_...) drawn on the same plot: {name: [name, NAME_a, ...]}."""
    keys = [k for k in log.series if k not in TRAIN_KEYS and k not in KNOWN_EVAL_KEYS]
    heads = [k for k in keys if not any(k.startswith(other + "_") for other in keys)]
    return {h: [h] + [k for k in keys if k.startswith(h + "_")] for h in heads}


def metric_filename(name: str) -> str:
    return "metric_" + re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".png"


def write_plots(log: RunLog, out_dir: Path) -> list[tuple[str, str]]:
    """Draw every plot the log has data for; return (caption, file name) of each, in report order."""
    s = log.series
    written = []
    if s.get("train_loss") or s.get("val_loss"):
        plot_loss(s.get("train_loss", []), s.get("val_loss", []), out_dir / "loss.png")
        written.append(("Loss", "loss.png"))
    if s.get("lr"):
        plot_lr(s["lr"], out_dir / "lr.png")
        written.append(("Learning rate", "lr.png"))
    if s.get("hellaswag_acc_norm") or s.get("hellaswag_acc"):
        plot_hellaswag(s.get("hellaswag_acc_norm", []), s.get("hellaswag_acc", []), out_dir / "hellaswag.png")
        written.append(("HellaSwag", "hellaswag.png"))
    if s.get("tokens_per_s"):
        plot_throughput(s["tokens_per_s"], s.get("mfu", []), out_dir / "throughput.png")
        written.append(("Throughput", "throughput.png"))
    for filename, title, keys, fraction in DPO_PLOTS:
        if any(s.get(k) or s.get("val_" + k) for k in keys):
            plot_train_val(title, s, keys, fraction, out_dir / filename)
            written.append((title, filename))
    for name, keys in other_metrics(log).items():
        plot_metric(name, {k: s[k] for k in keys}, out_dir / metric_filename(name))
        written.append((name, metric_filename(name)))
    return written



def _cell(value) -> str:
    """A markdown table cell: a "|" or a newline in the value would end the cell or the row."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _fenced(text: str) -> str:
    """A fenced code block that no run of backticks inside the text can close early."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def _best(points: list[tuple[int, float]], highest: bool) -> tuple[int, float] | None:
    finite = [p for p in points if math.isfinite(p[1])]
    if not finite:
        return None
    # the earliest step wins a tie: min/max return the first extreme they meet
    return max(finite, key=lambda p: p[1]) if highest else min(finite, key=lambda p: p[1])


def _steady(points: list[tuple[int, float]]) -> list[float]:
    """The finite values less the first step's, which includes torch.compile and warmup (unless it is alone)."""
    values = [v for _, v in (points[1:] if len(points) > 1 else points)]
    return [v for v in values if math.isfinite(v)]


def summary_lines(log: RunLog, args: dict) -> list[str]:
    """The summary bullets: progress, losses, HellaSwag, throughput, time, other metrics' last values."""
    s = log.series
    lines = []
    train = s.get("train_loss", [])
    if train:
        done = f"{train[-1][0]}"
        if _is_number(args.get("max_steps")) and args["max_steps"] > 0:
            done += f" of {args['max_steps']}"
        lines.append(f"- Steps done: {done}")
        lines.append(f"- Train loss: {train[0][1]:.4f} (step {train[0][0]}) -> {train[-1][1]:.4f} (step {train[-1][0]})")
    else:
        lines.append("- Steps done: no training step logged")
    val = s.get("val_loss", [])
    if val:
        best = _best(val, highest=False)
        best_text = f"best {best[1]:.4f} (step {best[0]}), " if best else ""
        lines.append(f"- Val loss: {best_text}last {val[-1][1]:.4f} (step {val[-1][0]})")
    for key, name in (("hellaswag_acc_norm", "HellaSwag acc_norm"), ("hellaswag_acc", "HellaSwag acc")):
        points = s.get(key, [])
        if points:
            best = _best(points, highest=True)
            best_text = f", best {best[1]:.4f} (step {best[0]})" if best else ""
            lines.append(f"- {name}: last {points[-1][1]:.4f} (step {points[-1][0]}){best_text}")
    for key in ("reward_accuracy", "reward_margin"):
        if s.get("val_" + key):
            step, value = s["val_" + key][-1]
            lines.append(f"- Val {key.replace('_', ' ')}: {s['val_' + key][0][1]:.4f} (step {s['val_' + key][0][0]}) "
                         f"-> {value:.4f} (step {step})")
    throughput = _steady(s.get("tokens_per_s", []))
    if throughput:
        text = f"- Throughput: median {statistics.median(throughput):,.0f} tokens/s"
        mfu = _steady(s.get("mfu", []))
        if mfu:
            text += f", median MFU {100 * statistics.median(mfu):.1f}%"
        lines.append(text + (" (first step left out: compile and warmup)" if len(s["tokens_per_s"]) > 1 else ""))
    dt_ms = [v for _, v in s.get("dt_ms", []) if math.isfinite(v)]
    if dt_ms:
        lines.append(f"- Training time: {_duration(sum(dt_ms) / 1000)} (sum of step times: no evaluation or checkpoints)")
    for name in (k for keys in other_metrics(log).values() for k in keys):
        step, value = s[name][-1]
        lines.append(f"- {name}: last {value:.4g} (step {step})")
    return lines


def samples_section(samples: list[tuple[int, list[dict]]]) -> list[str]:
    """Each prompt's answers in step order (samples must be in step order), prompts in order of first appearance."""
    by_prompt: dict[str, list[tuple[int, str]]] = {}
    for step, entries in samples:
        for entry in entries:
            by_prompt.setdefault(entry["prompt"], []).append((step, entry["answer"]))
    lines = ["## Sample answers over training", ""]
    for number, (prompt, answers) in enumerate(by_prompt.items(), start=1):
        lines += [f"### Prompt {number}", "", _fenced(prompt), ""]
        for step, answer in answers:  # read_log put the records in step order
            lines += [f"Step {step}:", "", _fenced(answer), ""]
    return lines


def render_report(run_name: str, log: RunLog, args: dict, plots: list[tuple[str, str]], checkpoints: list[str]) -> str:
    """report.md's text; the plots are (caption, path relative to report.md)."""
    lines = [f"# Run report: {run_name}", ""]
    settings = [(k, args[k]) for k in KEY_SETTINGS if k in args and args[k] is not None]
    if settings:
        lines += ["## Settings", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in settings]
        lines.append("")
    lines += ["## Summary", ""]
    if not log.num_records:
        lines += ["No records in log.jsonl yet: nothing to summarise or plot.", ""]
    else:
        lines += summary_lines(log, args)
        if checkpoints:
            lines.append(f"- Checkpoints: {len(checkpoints)}, newest {checkpoints[-1]}")
        lines.append("")
    if plots:
        lines += ["## Plots", ""]
        for caption, name in plots:
            lines += [f"![{caption}]({name})", ""]
    if log.samples:
        lines += samples_section(log.samples)
    return "\n".join(lines).rstrip("\n") + "\n"


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write report.md and the plots of run_dir's log.jsonl into out_dir (default: run_dir); return report.md's path.

    Raises FileNotFoundError, saying which script makes one, when run_dir has no log.jsonl.
    """
    run_dir = Path(run_dir)
    log_path = run_dir / "log.jsonl"
    if not log_path.is_file():
        raise FileNotFoundError(
            f"no log.jsonl in {run_dir}: train a run first (model/train_gpt2.py or model/finetune_dolly.py)"
        )
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    log = read_log(log_path)
    args = read_args(run_dir / "args.json")
    plots = write_plots(log, out_dir)  # beside report.md, so its links are the bare file names
    checkpoints = sorted(p.name for p in run_dir.glob("step_*.pt"))
    text = render_report(run_dir.resolve().name, log, args, plots, checkpoints)
    report = out_dir / "report.md"
    atomic_write(report, lambda f: f.write(text.encode()))  # a reader never sees half a report
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--run", required=True, help="run directory holding log.jsonl (and args.json), e.g. checkpoints/pretrain")
    parser.add_argument("--out_dir", default=None, help="where report.md and the plots go; default: the run directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        path = write_report(args.run, args.out_dir)
    except OSError as e:  # FileNotFoundError: no log yet; others: an unwritable --out_dir
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
