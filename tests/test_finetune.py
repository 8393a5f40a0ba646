"""Instruction tuning: exact resume, DDP equivalence, the loss falling on held-out responses, and errors.

Real `python model/finetune_dolly.py` processes on a tiny model and instruction data the test makes
with the repo's own prep script, so flags, signals, checkpoints and exit codes are the user's.
"""

import json
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from model.checkpoint import latest_checkpoint, load_checkpoint, model_state, save_checkpoint
from model.gpt import GPT, GPTConfig
from test_train import assert_bitwise_equal, final_weights, log_records, run_cmd, script_cmd, started, wait_for

TINY = ["--batch_size", "4", "--max_lr", "1e-2", "--warmup_steps", "3", "--keep_last", "0", "--device", "cpu",
        "--num_samples", "1", "--sample_tokens", "4"]
STEPS = ["--max_steps", "16", "--total_batch_size", "8", "--eval_every", "5", "--save_every", "4", "--dropout", "0.1"]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    """Arithmetic instructions, some with context, prepared by prepare_custom_dataset.py."""
    root = tmp_path_factory.mktemp("sft")
    rng = random.Random(0)
    lines = []
    for i in range(240):
        a, b = rng.randint(0, 30), rng.randint(0, 30)
        record = {"instruction": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."}
        if i % 3 == 0:
            record["context"] = f"Add the two numbers {a} and {b}."
        lines.append(json.dumps(record))
    (root / "records.jsonl").write_text("\n".join(lines) + "\n")
    proc = subprocess.run([sys.executable, "data_prep/prepare_custom_dataset.py", str(root / "records.jsonl"),
                           "--out_dir", str(root / "data")], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return root / "data"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny 'pretrained' checkpoint, in the format train_gpt2.py writes."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32))
    path = tmp_path_factory.mktemp("pretrain") / "step_000010.pt"
    save_checkpoint(model_state(model) | {"kind": "pretrain", "step": 10}, path)
    return path


def finetune_cmd(data_dir, out_dir, *extra, nproc=1):
    return script_cmd("model/finetune_dolly.py", "--data_dir", data_dir, "--out_dir", out_dir, *TINY, *extra, nproc=nproc)


def run_finetune(data_dir, out_dir, *extra, nproc=1, check=True):
    return run_cmd(finetune_cmd(data_dir, out_dir, *extra, nproc=nproc), check)


@pytest.fixture(scope="module")
def uninterrupted(sft_data, pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run_finetune(sft_data, out, *STEPS, "--pretrained_checkpoint", str(pretrained))
    return out


def test_tuning_lowers_held_out_response_loss_and_logs_samples(uninterrupted):
    records = log_records(uninterrupted)
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 5  # steps 0, 5, 10, 15 and the end
    assert val[-1] < val[0] - 2.0, val
    samples = [r for r in records if "samples" in r]
    assert [r["step"] for r in samples] == [0, 5, 10, 15, 16]
    assert samples[0]["samples"][0]["prompt"].endswith("### Response:\n")
    ckpt = load_checkpoint(uninterrupted / "step_000016.pt")
    assert ckpt["kind"] == "sft" and ckpt["config"]["dropout"] == 0.1


def test_sigterm_then_resume_auto_is_bitwise_exact(sft_data, pretrained, uninterrupted, tmp_path):
    out = tmp_path / "run"
    cmd = finetune_cmd(sft_data, out, *STEPS, "--pretrained_checkpoint", str(pretrained))
    with started(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        wait_for(lambda: (out / "log.jsonl").is_file() and any(r["step"] >= 6 for r in log_records(out)), proc)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    stopped_at = load_checkpoint(latest_checkpoint(out))["step"]
    assert 6 <= stopped_at < 16
    # the resumed run takes everything from the checkpoint: no --pretrained_checkpoint needed
    run_finetune(sft_data, out, *STEPS, "--resume", "auto")
    assert_bitwise_equal(final_weights(out, 16), final_weights(uninterrupted, 16))
    assert [r["step"] for r in log_records(out) if "train_loss" in r] == list(range(1, 17))


def test_kill9_and_a_half_written_checkpoint_then_resume_is_bitwise_exact(sft_data, uninterrupted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    for p in out.glob("step_0000[01][26].pt"):  # as if killed after step 8's save, mid-way through step 12's
        p.unlink()
    good = (out / "step_000008.pt").read_bytes()
    (out / "step_000012.pt").write_bytes(good[: len(good) // 2])
    assert latest_checkpoint(out) == out / "step_000008.pt"
    run_finetune(sft_data, out, *STEPS, "--resume", "auto")
    assert_bitwise_equal(final_weights(out, 16), final_weights(uninterrupted, 16))


def test_two_ranks_equal_one_rank_at_the_same_global_batch(sft_data, pretrained, tmp_path):
    common = ["--max_steps", "4", "--eval_every", "0", "--save_every", "0", "--dropout", "0", "--num_samples", "0",
              "--pretrained_checkpoint", str(pretrained)]
    run_finetune(sft_data, tmp_path / "one", *common, "--total_batch_size", "8", "--batch_size", "8")
    run_finetune(sft_data, tmp_path / "two", *common, "--total_batch_size", "8", "--batch_size", "4", nproc=2)
    losses = [[r["train_loss"] for r in log_records(tmp_path / run) if "train_loss" in r] for run in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    one, two = final_weights(tmp_path / "one", 4), final_weights(tmp_path / "two", 4)
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=1e-5, rtol=0)


def test_epochs_set_the_number_of_steps(sft_data, pretrained, tmp_path):
    proc = run_finetune(sft_data, tmp_path / "run", "--epochs", "1", "--total_batch_size", "8", "--eval_every", "0",
                        "--num_samples", "0", "--pretrained_checkpoint", str(pretrained))
    # 216 training examples in global batches of 4 -> 54 micro-batches, 2 per step -> 27 steps
    assert "1 epochs of 54 micro-batches = 27 steps" in proc.stdout
    assert load_checkpoint(latest_checkpoint(tmp_path / "run"))["step"] == 27


@pytest.mark.parametrize(
    "args, message",
    [
        (["--resume", "auto"], "no checkpoint in {out}"),
        ([], "no starting weights: pass --pretrained_checkpoint"),
        (["--pretrained_checkpoint", "{missing}"], "does not exist"),
    ],
)
def test_missing_weights_are_explained(sft_data, tmp_path, args, message):
    out, missing = tmp_path / "out", tmp_path / "missing.pt"
    args = [a.format(missing=missing) for a in args]
    proc = run_finetune(sft_data, out, *args, check=False)
    assert proc.returncode == 2
    assert message.format(out=out) in proc.stderr
    if args == ["--resume", "auto"]:
        assert "run without --resume, or pass --pretrained_checkpoint" in proc.stderr
    assert not out.exists() or not list(out.glob("*.pt"))


def test_pretraining_shards_are_refused(synthetic_shards, pretrained, tmp_path):
    proc = run_finetune(synthetic_shards, tmp_path / "out", "--pretrained_checkpoint", str(pretrained), check=False)
    assert proc.returncode == 2
    assert "not instruction data" in proc.stderr and "prepare_dolly.py" in proc.stderr


def test_instruction_data_is_refused_by_pretraining(sft_data, tmp_path):
    proc = subprocess.run([sys.executable, "model/train_gpt2.py", "--data_dir", str(sft_data), "--out_dir",
                           str(tmp_path / "out"), "--device", "cpu"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "holds instruction data" in proc.stderr and "finetune_dolly.py" in proc.stderr


def test_init_from_a_local_hugging_face_directory(sft_data, tmp_path):
    from model.export_hf import export_hf

    torch.manual_seed(0)
    base = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32))
    export_hf(base, tmp_path / "hf")
    run_finetune(sft_data, tmp_path / "run", "--init_from", str(tmp_path / "hf"), "--max_steps", "2",
                 "--total_batch_size", "4", "--eval_every", "0", "--num_samples", "0")
    ckpt = load_checkpoint(tmp_path / "run" / "step_000002.pt")
    assert ckpt["kind"] == "sft" and ckpt["config"]["n_embd"] == 32
    assert ckpt["config"]["vocab_size"] == 50257  # an imported model keeps GPT-2's own vocabulary



def test_hellaswag_while_tuning_equals_scoring_the_tuned_checkpoint(sft_data, pretrained, tmp_path):
    """The in-training evaluation and eval/hellaswag.py agree on a fine-tuned (dropout 0.1) checkpoint."""
    from test_hellaswag import synthetic_examples, write_jsonl

    data = write_jsonl(tmp_path / "hellaswag.jsonl", synthetic_examples(9))
    run_finetune(sft_data, tmp_path / "run", "--max_steps", "4", "--total_batch_size", "8", "--eval_every", "0",
                 "--num_samples", "0", "--dropout", "0.1", "--pretrained_checkpoint", str(pretrained),
                 "--hellaswag_every", "2", "--hellaswag_data", str(data))
    logged = [r for r in log_records(tmp_path / "run") if "hellaswag_acc_norm" in r]
    assert [r["step"] for r in logged] == [0, 2, 4]
    report = tmp_path / "report.json"
    run_cmd(script_cmd("eval/hellaswag.py", "--checkpoint", tmp_path / "run", "--data", data, "--device", "cpu",
                       "--out_json", report))
    scored = json.loads(report.read_text())
    assert (scored["acc"], scored["acc_norm"]) == (logged[-1]["hellaswag_acc"], logged[-1]["hellaswag_acc_norm"])
