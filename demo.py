"""make demo: every stage at toy scale, offline, in minutes, ending with a chat server for the tuned model.

    python demo.py                      # built-in corpus (data_prep/demo_corpus.py), no network needed
    python demo.py --source hub         # a slice of FineWeb-Edu and Dolly-15k instead (needs network)
    python demo.py --port 8001          # serve elsewhere (make demo PORT=8001); --no_serve to stop before

Stages: make the corpus -> pretraining shards -> instruction shards -> pretrain a tiny GPT from
random weights -> fine-tune it -> preference pairs from the tuned model's own graded answers to
training questions (hh-rlhf pairs for --source hub) -> DPO -> score the three models on held-out
instructions (HellaSwag for --source hub) -> write each run's report (eval/report.py) -> serve them
with gunicorn.

Every stage runs the repo's own script in a subprocess and prints the command first, so any step
can be rerun, or scaled up, by hand. A second run reuses what the first made: prepared data whose
manifest is newer than its input is kept, a finished training run is skipped and an interrupted
one resumed (--resume auto). Ctrl-C stops a stage (training saves a checkpoint) or the server.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from model.checkpoint import checkpoint_step, latest_checkpoint
from model.cli import HelpFormatter
from model.cpu_linear import native_bf16

ROOT = Path(__file__).resolve().parent
PY = sys.executable


@dataclass
class Paths:
    """Where one demo's data and runs go (--work_dir, --runs_dir)."""

    work: Path
    runs: Path

    @property
    def source(self) -> Path:
        return self.work / "source"

    @property
    def heldout(self) -> Path:
        return self.source / "heldout.jsonl"

    @property
    def heldout_chat(self) -> Path:
        return self.source / "heldout_chat.jsonl"

    @property
    def pretrain_data(self) -> Path:
        return self.work / "pretrain"

    @property
    def instruction_data(self) -> Path:
        return self.work / "instructions"

    @property
    def pretrained(self) -> Path:
        return self.runs / "pretrained"

    @property
    def tuned(self) -> Path:
        return self.runs / "tuned"

    @property
    def graded_pairs(self) -> Path:
        return self.work / "graded_pairs.jsonl"

    @property
    def preference_data(self) -> Path:
        return self.work / "preferences"

    @property
    def dpo(self) -> Path:
        return self.runs / "dpo"

    @property
    def all_runs(self) -> tuple[Path, Path, Path]:
        return self.pretrained, self.tuned, self.dpo


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def shown_python() -> str:
    """This interpreter as a user types it: .venv/bin/python inside the repo (make demo's), else its full path."""
    try:
        return Path(PY).relative_to(ROOT).as_posix()
    except ValueError:
        return PY


def serve_command(paths: Paths) -> str:
    """The command that serves the demo's runs, as the README gives it."""
    beside = Path(PY).with_name("gunicorn")  # the venv's own script, as make demo installs it
    gunicorn = Path(shown_python()).with_name("gunicorn").as_posix() if beside.exists() else f"{shown_python()} -m gunicorn"
    return f"NANOGPT_MODELS_DIR={paths.runs} NANOGPT_DROP_OLD_TURNS=1 {gunicorn} -c gunicorn_config.py web.app:app"


def run(cmd: list[str]) -> None:
    """Print a command as the user would type it, then run it; a failure ends the demo with its code."""
    shown = [shown_python() if c == PY else Path(c).relative_to(ROOT).as_posix() if c.startswith(str(ROOT)) else c
             for c in cmd]
    print("$ " + shlex.join(shown), flush=True)
    started = time.monotonic()
    result = subprocess.run(cmd, cwd=ROOT)
    print(f"({time.monotonic() - started:.0f} s)", flush=True)
    if result.returncode:
        print(f"demo: the stage above failed (exit {result.returncode}); fix what it says and rerun make demo",
              file=sys.stderr)
        sys.exit(result.returncode)


def fresh(output: Path, *inputs: Path) -> bool:
    """True when output exists and is newer than every input: a prep stage's result can be reused."""
    return output.is_file() and all(output.stat().st_mtime >= i.stat().st_mtime for i in inputs if i.exists())


def train(script: str, run_dir: Path, max_steps: int, flags: list[str]) -> None:
    """Run a training script unless run_dir already finished max_steps; resume it if it has started."""
    latest = latest_checkpoint(run_dir)  # what --resume auto would pick
    if latest is not None and checkpoint_step(latest) >= max_steps:
        print(f"{run_dir} has finished step {checkpoint_step(latest)}: reused (delete it to train again)", flush=True)
        return
    resume = ["--resume", "auto"] if latest is not None else []
    run([PY, script, "--out_dir", str(run_dir), "--max_steps", str(max_steps), *flags, *resume])


def tiny_model_flags(args: argparse.Namespace) -> list[str]:
    return ["--n_layer", str(args.n_layer), "--n_head", str(args.n_head), "--n_embd", str(args.n_embd),
            "--seq_len", str(args.seq_len)]


def prepare_builtin(args: argparse.Namespace, paths: Paths) -> None:
    banner("1/10 the built-in corpus: facts and skills as prose, instructions and held-out questions")
    run([PY, "data_prep/demo_corpus.py", "--out_dir", str(paths.source), "--seed", str(args.seed)])
    banner("2/10 pretraining shards (GPT-2 BPE, uint16; shard 0 is val)")
    if fresh(paths.pretrain_data / "manifest.json", paths.source / "pretrain.jsonl"):
        print(f"{paths.pretrain_data}: reused")
    else:
        run([PY, "data_prep/fineweb.py", "--input", str(paths.source / "pretrain.jsonl"), "--out_dir",
             str(paths.pretrain_data), "--shard_size", "100000", "--num_proc", "1"])
    banner("3/10 instruction shards: instructions and conversations (prompt template + replies; loss only on the replies)")
    inputs = [paths.source / "instructions.jsonl", paths.source / "conversations.jsonl"]
    if fresh(paths.instruction_data / "manifest.json", *inputs):
        print(f"{paths.instruction_data}: reused")
    else:
        run([PY, "data_prep/prepare_custom_dataset.py", *map(str, inputs), "--out_dir",
             str(paths.instruction_data), "--max_len", str(args.seq_len)])


def prepare_hub(args: argparse.Namespace, paths: Paths) -> None:
    # both scripts keep what they finished before (fineweb.py its shards, datasets its download cache)
    banner("1/10 --source hub: no built-in corpus; FineWeb-Edu and Dolly-15k come from the Hugging Face Hub")
    banner("2/10 pretraining shards from a slice of FineWeb-Edu sample-10BT (GPT-2 BPE, uint16; shard 0 is val)")
    run([PY, "data_prep/fineweb.py", "--max_tokens", str(args.hub_tokens), "--out_dir", str(paths.pretrain_data),
         "--shard_size", str(max(100_000, args.hub_tokens // 10))])
    banner("3/10 instruction shards from databricks-dolly-15k")
    run([PY, "data_prep/prepare_dolly.py", "--out_dir", str(paths.instruction_data), "--max_len", str(args.seq_len)])


def prepare_preferences(args: argparse.Namespace, paths: Paths) -> None:
    """Preference shards: with the built-in corpus, pairs from the tuned model's graded answers to training
    questions (data_prep/graded_pairs.py); with --source hub, a slice of Anthropic/hh-rlhf."""
    if args.source == "hub":
        run([PY, "data_prep/prepare_preferences.py", "--limit", "2000", "--out_dir", str(paths.preference_data),
             "--max_len", str(args.seq_len)])
        return
    tuned = latest_checkpoint(paths.tuned)
    if fresh(paths.graded_pairs, tuned):
        print(f"{paths.graded_pairs}: reused")
    else:
        run([PY, "data_prep/graded_pairs.py", "--checkpoint", str(paths.tuned), "--data",
             str(paths.source / "instructions.jsonl"), str(paths.source / "conversations.jsonl"),
             "--limit", str(args.graded_questions), "--samples", "2", "--temperature", "1.5", "--max_tokens", "16",
             "--seed", str(args.seed), "--out", str(paths.graded_pairs)])
    if fresh(paths.preference_data / "manifest.json", paths.graded_pairs):
        print(f"{paths.preference_data}: reused")
    else:
        run([PY, "data_prep/prepare_preferences.py", "--input", str(paths.graded_pairs), "--out_dir",
             str(paths.preference_data), "--max_len", str(args.seq_len), "--seed", str(args.seed)])


def port_is_free(args: argparse.Namespace) -> bool:
    """Whether --port can be listened on; if not, say so and how to pick another."""
    with socket.socket() as s:
        # as gunicorn binds: connections of an earlier server lingering in TIME_WAIT do not count
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((args.host, args.port))
            return True
        except OSError as e:
            print(f"demo: cannot listen on {args.host}:{args.port} ({e.strerror}): stop what runs there or pick "
                  f"another port, e.g. make demo PORT={args.port + 1}", file=sys.stderr)
            return False


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return True
        except OSError:
            time.sleep(0.3)
    return False


def example_messages(args: argparse.Namespace, paths: Paths) -> list[dict]:
    """A chat for the printed snippets: with the built-in corpus, a held-out follow-up conversation the
    preference-tuned model answered right (else a held-out question, its context as the system message)."""
    if args.source == "hub":
        return [{"role": "user", "content": "Name three primary colours."}]
    singles = [json.loads(line) for line in paths.heldout.read_text().splitlines()]
    chats = [json.loads(line) for line in paths.heldout_chat.read_text().splitlines()]
    answers = json.loads((paths.runs / "exact_match.json").read_text())["models"][paths.dpo.name]["answers"]
    followed = [c["messages"][:-1] for c, a in zip(chats, answers[len(singles) :])
                if a.strip() == c["messages"][-1]["content"].strip()]
    if followed:
        return followed[0]
    right = [r for r, a in zip(singles, answers) if a.strip() == r["response"].strip()]
    record = (right or singles)[0]
    system = [{"role": "system", "content": record["context"]}] if record["context"] else []
    return system + [{"role": "user", "content": record["instruction"]}]


def serve(args: argparse.Namespace, paths: Paths) -> int:
    """gunicorn serving every run under --runs_dir until Ctrl-C; returns its exit code."""
    banner(f"10/10 serving {paths.runs} (models: {', '.join(r.name for r in paths.all_runs)})")
    if not port_is_free(args):
        return 2
    # the tiny model's context holds a few exchanges: a longer chat loses its oldest turns, as in tuning, not a 400
    env = {**os.environ, "NANOGPT_MODELS_DIR": str(paths.runs.resolve()), "NANOGPT_BIND": f"{args.host}:{args.port}",
           "NANOGPT_DROP_OLD_TURNS": "1"}
    cmd = [PY, "-m", "gunicorn", "-c", "gunicorn_config.py", "web.app:app"]
    print(f"$ NANOGPT_BIND={args.host}:{args.port} {serve_command(paths)}", flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    url = f"http://{args.host}:{args.port}"
    try:
        if not wait_until_up(url, proc):
            print("demo: gunicorn did not come up; its log is above", file=sys.stderr)
            return proc.poll() or 1
        messages = example_messages(args, paths)
        body = json.dumps({"model": paths.dpo.name, "messages": messages})
        print(f"""
The tuned models are served at {url}/  (the chat page opens on "{paths.dpo.name}", the last stage; "{paths.tuned.name}" is
before preference tuning, "{paths.pretrained.name}" the base model)

curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\
  -d {shlex.quote(body)}

{shown_python()} - <<'EOF'
from openai import OpenAI
client = OpenAI(base_url="{url}/v1", api_key="unused")
reply = client.chat.completions.create(model="{paths.dpo.name}", messages={json.dumps(messages)})
print(reply.choices[0].message.content)
EOF

serving: {url}  (Ctrl-C stops the server)""", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
        print(f"\nto serve the demo's models again (http://127.0.0.1:8000/):\n  {serve_command(paths)}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--source", choices=["builtin", "hub"], default="builtin",
                        help="builtin: the generated corpus, offline; hub: FineWeb-Edu and Dolly-15k slices")
    parser.add_argument("--work_dir", default=None, help="prepared data (default: data/demo, or data/demo_hub)")
    parser.add_argument("--runs_dir", default=None, help="the three runs (default: checkpoints/demo, or checkpoints/demo_hub)")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the corpus, of every run and of the sampled answers")
    g = parser.add_argument_group("the tiny model and its three runs")
    g.add_argument("--n_layer", type=int, default=6)
    g.add_argument("--n_head", type=int, default=4)
    g.add_argument("--n_embd", type=int, default=128)
    g.add_argument("--seq_len", type=int, default=128, help="context length, also the longest instruction example")
    # chosen on a CPU capped to AVX2, in float32: 350 + 1600 steps and the rest took 539-549 s there, with
    # single-turn held-out exact match >= 80%; tuning steps count far more than pretraining ones (500 + 1000
    # gave 83% and 65%), and conversations made them 20% slower: 1700 took 621 s (README, "The demo, measured")
    g.add_argument("--pretrain_steps", type=int, default=350, help="pretraining steps of 8 x seq_len tokens")
    g.add_argument("--finetune_steps", type=int, default=1600, help="fine-tuning steps")
    g.add_argument("--finetune_batch_size", type=int, default=32,
                   help="examples per fine-tuning step (16 left the tuned model far more seed-dependent: 73-88%% held-out)")
    g.add_argument("--graded_questions", type=int, default=600,
                   help="training questions the tuned model answers (greedily and twice sampled) for preference pairs")
    # measured on the seed-1337 tuned model: every setting tried moved held-out exact match by -1 to +4 questions of
    # 338 (pairs from 600 to 3000 questions, lr 2e-5 to 1e-4, beta 0.1 or 0.5, with and without --sft_weight);
    # 3e-4 cost 22. 600 questions keep the stage to 20 s (README, "The demo, measured")
    g.add_argument("--dpo_steps", type=int, default=24, help="DPO steps of 32 pairs")
    g.add_argument("--dpo_lr", type=float, default=5e-5, help="DPO's peak learning rate")
    g.add_argument("--dpo_beta", type=float, default=0.5, help="DPO's beta")
    g.add_argument("--dtype", default="bfloat16" if native_bf16() else "auto", choices=["auto", "bfloat16", "float32"],
                   help="every run's --dtype; the default takes bf16 autocast on a CPU that multiplies bf16 natively "
                        "(AVX512-BF16 or AMX, which oneDNN runs: 1.5x faster steps than float32 on an AMD EPYC Zen 4), "
                        "else the scripts' auto (float32 on CPU)")
    g.add_argument("--hub_tokens", type=int, default=2_000_000, help="FineWeb-Edu tokens to take with --source hub")
    g = parser.add_argument_group("serving")
    g.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    g.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")), help="port (or the PORT variable)")
    g.add_argument("--no_serve", action="store_true", help="stop after the reports")
    args = parser.parse_args(argv)
    suffix = "" if args.source == "builtin" else "_hub"
    args.work_dir = args.work_dir or f"data/demo{suffix}"
    args.runs_dir = args.runs_dir or f"checkpoints/demo{suffix}"
    return args


def main(argv: list[str] | None = None) -> int:
    """Every stage, then serve until Ctrl-C; returns the exit code (2: the port is taken)."""
    args = parse_args(argv)
    paths = Paths(Path(args.work_dir), Path(args.runs_dir))
    if not args.no_serve and not port_is_free(args):  # before minutes of training, not after
        return 2
    started = time.monotonic()
    (prepare_builtin if args.source == "builtin" else prepare_hub)(args, paths)

    banner("4/10 pretraining a tiny GPT from random weights")
    # small batches, many steps: a tiny model learns facts from the number of updates more than from batch size
    train("model/train_gpt2.py", paths.pretrained, args.pretrain_steps, [
        "--data_dir", str(paths.pretrain_data), *tiny_model_flags(args), "--dtype", args.dtype, "--batch_size", "8",
        "--total_batch_size", str(8 * args.seq_len), "--warmup_steps", str(max(1, args.pretrain_steps // 15)),
        "--max_lr", "3e-3", "--eval_every", str(max(1, args.pretrain_steps // 5)), "--val_steps", "8",
        "--save_every", str(max(1, args.pretrain_steps // 3)), "--hellaswag_every", "0", "--seed", str(args.seed),
        "--log_every", "50",
    ])

    banner("5/10 fine-tuning it to follow instructions (the pretrained model's answers are logged at step 0)")
    heldout = [str(paths.heldout), str(paths.heldout_chat)]
    extra = ["--exact_match_data", *heldout] if args.source == "builtin" else []
    train("model/finetune_dolly.py", paths.tuned, args.finetune_steps, [
        "--data_dir", str(paths.instruction_data), "--pretrained_checkpoint", str(paths.pretrained), "--dtype", args.dtype,
        "--dropout", "0", "--batch_size", str(args.finetune_batch_size), "--total_batch_size", str(args.finetune_batch_size),
        "--warmup_steps", str(max(1, args.finetune_steps // 40)), "--max_lr", "2e-3",
        "--eval_every", str(max(1, args.finetune_steps // 4)), "--save_every", str(max(1, args.finetune_steps // 2)),
        "--num_samples", "3", "--sample_tokens", "24", "--seed", str(args.seed), "--log_every", "100", *extra,
    ])

    banner("6/10 preference pairs: a right answer (chosen) against the tuned model's own wrong one (rejected)")
    prepare_preferences(args, paths)

    banner("7/10 preference tuning (DPO): the tuned model is the policy's start and the frozen reference")
    train("model/dpo.py", paths.dpo, args.dpo_steps, [
        "--data_dir", str(paths.preference_data), "--sft_checkpoint", str(paths.tuned), "--dtype", args.dtype,
        "--batch_size", "32", "--total_batch_size", "32", "--max_lr", str(args.dpo_lr), "--beta", str(args.dpo_beta),
        "--warmup_steps", "2", "--eval_every", str(max(1, args.dpo_steps // 4)), "--val_steps", "-1",
        "--save_every", "0", "--num_samples", "3", "--sample_tokens", "24", "--seed", str(args.seed), "--log_every", "8",
    ])

    banner("8/10 before and after each stage of tuning")
    if args.source == "builtin":
        run([PY, "eval/exact_match.py", "--checkpoint", *map(str, paths.all_runs),
             "--data", *heldout, "--show", "4", "--out_json", str(paths.runs / "exact_match.json")])
    else:
        for run_dir in paths.all_runs:
            run([PY, "eval/hellaswag.py", "--checkpoint", str(run_dir), "--limit", "500"])

    banner("9/10 run reports (loss, learning rate, throughput, evaluations, sample answers)")
    for run_dir in paths.all_runs:
        run([PY, "eval/report.py", "--run", str(run_dir)])
    print(f"\nall stages done in {time.monotonic() - started:.0f} s", flush=True)
    if args.no_serve:
        print(f"to serve the models (http://127.0.0.1:8000/; the chat page opens on {paths.dpo.name!r}):\n"
              f"  {serve_command(paths)}", flush=True)
        return 0
    return serve(args, paths)


if __name__ == "__main__":
    sys.exit(main())
