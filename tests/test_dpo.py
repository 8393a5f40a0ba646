"""Preference tuning (model/dpo.py): the loss against a by-hand computation, log 2 at step 0, a frozen
reference, exact resume, DDP equivalence, held-out reward accuracy rising, and bad input.

Real `python model/dpo.py` processes on a tiny model and preference pairs the test makes with the
repo's own prep script, so flags, signals, checkpoints and exit codes are the user's.
"""

import json
import math
import random
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT
from model.checkpoint import latest_checkpoint, load_checkpoint, model_from_checkpoint, model_state, save_checkpoint
from model.compute import Compute
from model.data import PairLoader, load_masked_split
from model.dpo import dpo_objective, reference_logps
from model.gpt import GPT, GPTConfig
from model.shards import MASK_END
from test_train import assert_bitwise_equal, final_weights, log_records, run_cmd, script_cmd, started, wait_for

LOG2 = math.log(2)
TINY = ["--batch_size", "4", "--max_lr", "1e-3", "--warmup_steps", "3", "--keep_last", "0", "--device", "cpu",
        "--num_samples", "1", "--sample_tokens", "4", "--val_steps", "-1"]
STEPS = ["--max_steps", "16", "--total_batch_size", "8", "--eval_every", "5", "--save_every", "4"]
CPU = Compute(device=torch.device("cpu"), ddp=False, rank=0, local_rank=0, world_size=1)


@pytest.fixture(scope="module")
def pairs_data(tmp_path_factory):
    """110 arithmetic pairs (99 train, 11 val): the right sum chosen, a wrong one rejected, in replies of
    different lengths; a quarter of the prompts with a system message. Prepared by prepare_preferences.py."""
    root = tmp_path_factory.mktemp("pairs")
    rng = random.Random(0)
    lines = []
    for i in range(110):
        a, b = rng.randint(0, 30), rng.randint(0, 30)
        wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
        question = f"What is {a} plus {b}?"
        if i % 4 == 0:
            pair = {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": question}]}
        else:
            pair = {"prompt": question}
        pair["chosen"] = f"{a} plus {b} is {a + b}."
        pair["rejected"] = f"I think that {a} plus {b} is {wrong}, but I am not sure." if i % 2 else f"{wrong}."
        lines.append(json.dumps(pair))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    proc = subprocess.run([sys.executable, "data_prep/prepare_preferences.py", "--input", str(root / "pairs.jsonl"),
                           "--out_dir", str(root / "data"), "--max_len", "64"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return root / "data"


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory):
    """A tiny 'instruction-tuned' checkpoint, in the format finetune_dolly.py writes."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32))
    path = tmp_path_factory.mktemp("sft") / "step_000010.pt"
    save_checkpoint(model_state(model) | {"kind": "sft", "step": 10}, path)
    return path


def dpo_cmd(data_dir, out_dir, *extra, nproc=1):
    return script_cmd("model/dpo.py", "--data_dir", data_dir, "--out_dir", out_dir, *TINY, *extra, nproc=nproc)


def run_dpo(data_dir, out_dir, *extra, nproc=1, check=True):
    return run_cmd(dpo_cmd(data_dir, out_dir, *extra, nproc=nproc), check)


@pytest.fixture(scope="module")
def uninterrupted(pairs_data, sft_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run_dpo(pairs_data, out, *STEPS, "--sft_checkpoint", sft_checkpoint)
    return out


def sft_model(sft_checkpoint) -> GPT:
    return model_from_checkpoint(load_checkpoint(sft_checkpoint))


def examples_of(data_dir, split):
    """(tokens, mask) of every example of a split, in file order, cut at each example's end."""
    tokens, mask = load_masked_split(data_dir, split, "preferences")
    ends = np.flatnonzero(mask == MASK_END) + 1
    return [(torch.from_numpy(tokens[s:e].astype(np.int64)), torch.from_numpy(mask[s:e].astype(np.int64)))
            for s, e in zip(np.concatenate([[0], ends[:-1]]), ends)]


def reply_logp(model, tokens, mask):
    """(log-prob of the reply and its <|endoftext|>, summed, in float64; its token count) from a plain
    forward pass over the example alone, unpadded."""
    logits, _ = model(tokens[None, :-1])
    logp = F.log_softmax(logits[0].double(), dim=-1).gather(1, tokens[1:, None])[:, 0]
    is_reply = mask[1:] > 0
    return logp[is_reply].sum(), int(is_reply.sum())


# ----------------------------------------------------------------------------- the loss

def test_at_step_0_the_loss_is_log_2_and_every_reward_0_in_a_real_run(uninterrupted):
    """The run's step-0 validation (and first training step, with dropout 0) have loss log 2 and rewards 0."""
    records = log_records(uninterrupted)
    val0 = next(r for r in records if r["step"] == 0 and "val_loss" in r)
    assert val0["val_loss"] == pytest.approx(LOG2, abs=1e-5)
    for name in ("val_reward_chosen", "val_reward_rejected", "val_reward_margin"):
        assert abs(val0[name]) < 1e-5, (name, val0[name])
    first = next(r for r in records if r["step"] == 1 and "train_loss" in r)
    assert first["train_loss"] == pytest.approx(LOG2, abs=1e-5)
    for name in ("reward_chosen", "reward_rejected", "reward_margin"):
        assert abs(first[name]) < 1e-5, (name, first[name])


def test_at_step_0_the_loss_of_every_padded_batch_is_log_2_per_pair(pairs_data, sft_checkpoint):
    """With policy = reference, every batch (shuffled, padded, or with an empty pair) sums to log 2 a pair."""
    model = sft_model(sft_checkpoint)
    objective = dpo_objective(beta=0.1, sft_weight=0.0)
    reference = reference_logps(model, PairLoader(pairs_data, "val", 4, shuffle=False), CPU, "float32")
    assert reference.shape == (11, 2) and torch.all(reference < 0)
    empty = 0
    # the reference's own batches (the last with an empty pair), and batches of other rows and widths
    for loader in (PairLoader(pairs_data, "val", 4, shuffle=False), PairLoader(pairs_data, "val", 3, bucket=False, seed=3)):
        loader.reference = reference
        with torch.no_grad():
            for _ in range(loader.num_batches()):
                batch = loader.next_batch()
                x, y, pairs, _ = batch
                assert len(set((y != -100).sum(1).tolist()) - {0}) > 1  # replies of different lengths: padding
                empty += int((pairs < 0).sum())
                loss, figures = objective.loss(model, batch)
                count = objective.count(batch)
                assert count == int((pairs >= 0).sum())
                assert loss.item() == pytest.approx(count * LOG2, abs=1e-5 * count)
                for name in ("reward_chosen", "reward_rejected", "reward_margin"):
                    assert abs(figures[name].item()) < 1e-5 * count
    assert empty == 1  # 11 val pairs in batches of 4


@pytest.mark.parametrize("sft_weight", [0.0, 0.3])
def test_loss_and_gradient_of_a_padded_batch_equal_the_pair_by_pair_computation(pairs_data, sft_checkpoint, sft_weight):
    """The batched DPO loss and its gradients equal -log sigmoid of the reward margins computed pair by pair by hand."""
    beta = 0.5
    model = sft_model(sft_checkpoint)
    torch.manual_seed(1)
    for p in model.parameters():  # a policy that has moved away from the reference
        p.data += 0.02 * torch.randn_like(p)
    objective = dpo_objective(beta, sft_weight)
    for split, shuffle in (("train", True), ("val", False)):
        examples = examples_of(pairs_data, split)
        loader = PairLoader(pairs_data, split, 3 if shuffle else 4, shuffle=shuffle, bucket=False, seed=0)
        reference = -30 + 5 * torch.randn(loader.num_examples(), 2)  # not the policy's log-probs
        loader.reference = reference
        for _ in range(loader.num_batches()):
            batch = loader.next_batch()
        x, y, pairs, ref = batch  # the last batch: padded rows, and in val an empty pair
        assert torch.equal(ref[pairs >= 0], reference[pairs[pairs >= 0]])

        model.zero_grad()
        loss, figures = objective.loss(model, batch)
        loss.backward()
        batched = {n: p.grad.clone() for n, p in model.named_parameters()}

        model.zero_grad()
        by_hand, margins = torch.zeros((), dtype=torch.float64), []
        for i in pairs[pairs >= 0].tolist():
            chosen, n_chosen = reply_logp(model, *examples[2 * i])
            rejected, _ = reply_logp(model, *examples[2 * i + 1])
            margin = beta * ((chosen - reference[i, 0].double()) - (rejected - reference[i, 1].double()))
            by_hand = by_hand - F.logsigmoid(margin) + sft_weight * -chosen / n_chosen
            margins.append(margin.item())
        by_hand.backward()
        torch.testing.assert_close(loss.double(), by_hand.detach(), atol=1e-5, rtol=1e-6)
        assert figures["reward_margin"].item() == pytest.approx(sum(margins), abs=1e-4)
        assert figures["reward_accuracy"].item() == sum(m > 0 for m in margins) + 0.5 * sum(m == 0 for m in margins)
        for n, p in model.named_parameters():
            torch.testing.assert_close(batched[n], p.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")
        assert any(batched[n].abs().max() > 1e-3 for n in batched)  # a real gradient was compared


# ----------------------------------------------------------------------------- the run

def test_the_reference_is_frozen_and_travels_in_every_checkpoint(pairs_data, sft_checkpoint, uninterrupted):
    """Every checkpoint holds the same reference log-probs: the SFT model's, not the policy's."""
    first, last = load_checkpoint(uninterrupted / "step_000004.pt"), load_checkpoint(uninterrupted / "step_000016.pt")
    assert first["kind"] == last["kind"] == "dpo"
    sft = sft_model(sft_checkpoint)
    for split in ("train", "val"):
        a, b = first["reference_logps"][split], last["reference_logps"][split]
        assert a.shape == (PairLoader(pairs_data, split, 1, shuffle=False).num_examples(), 2)
        assert torch.equal(a, b)
        recomputed = reference_logps(sft, PairLoader(pairs_data, split, 4, shuffle=False), CPU, "float32")
        torch.testing.assert_close(b, recomputed, atol=1e-5, rtol=0)
    # the policy has moved: its own log-probs are no longer the reference's
    policy = reference_logps(model_from_checkpoint(last), PairLoader(pairs_data, "val", 4, shuffle=False), CPU, "float32")
    assert (policy - last["reference_logps"]["val"]).abs().max() > 0.1


def test_tuning_raises_held_out_reward_accuracy_and_logs_the_rewards(uninterrupted):
    """A short run on arithmetic pairs ranks the right sum above the wrong one on most held-out pairs."""
    records = log_records(uninterrupted)
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 5, 10, 15, 16]
    assert val[0]["val_reward_accuracy"] <= 0.5 and val[-1]["val_reward_accuracy"] > 0.8, val
    assert val[-1]["val_loss"] < LOG2 - 0.1 and val[-1]["val_reward_margin"] > 0
    train = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 17))
    for r in train + val:
        prefix = "val_" if "val_loss" in r else ""
        assert 0 <= r[f"{prefix}reward_accuracy"] <= 1
        assert r[f"{prefix}reward_margin"] == pytest.approx(r[f"{prefix}reward_chosen"] - r[f"{prefix}reward_rejected"],
                                                            abs=1e-5)
    samples = [r for r in records if "samples" in r]
    assert samples and samples[0]["samples"][0]["prompt"].endswith("### Response:\n")


def test_sigterm_then_resume_auto_is_bitwise_exact(pairs_data, sft_checkpoint, uninterrupted, tmp_path):
    """SIGTERM mid-run saves and exits 0; --resume auto (no --sft_checkpoint) ends bitwise equal to the uninterrupted run."""
    out = tmp_path / "run"
    cmd = dpo_cmd(pairs_data, out, *STEPS, "--sft_checkpoint", sft_checkpoint)
    with started(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        wait_for(lambda: (out / "log.jsonl").is_file() and any(r["step"] >= 6 for r in log_records(out)), proc)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    stopped_at = load_checkpoint(latest_checkpoint(out))["step"]
    assert 6 <= stopped_at < 16
    run_dpo(pairs_data, out, *STEPS, "--resume", "auto")
    assert_bitwise_equal(final_weights(out, 16), final_weights(uninterrupted, 16))
    assert [r["step"] for r in log_records(out) if "train_loss" in r] == list(range(1, 17))
    resumed, whole = load_checkpoint(out / "step_000016.pt"), load_checkpoint(uninterrupted / "step_000016.pt")
    for split in ("train", "val"):
        assert torch.equal(resumed["reference_logps"][split], whole["reference_logps"][split])


def test_kill9_and_a_half_written_checkpoint_then_resume_is_bitwise_exact(pairs_data, uninterrupted, tmp_path):
    """From a run killed after step 8's save and midway through step 12's, --resume auto ends bitwise equal."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    for p in out.glob("step_0000[01][26].pt"):
        p.unlink()
    good = (out / "step_000008.pt").read_bytes()
    (out / "step_000012.pt").write_bytes(good[: len(good) // 2])
    assert latest_checkpoint(out) == out / "step_000008.pt"
    run_dpo(pairs_data, out, *STEPS, "--resume", "auto")
    assert_bitwise_equal(final_weights(out, 16), final_weights(uninterrupted, 16))
    resumed, whole = log_records(out), log_records(uninterrupted)
    assert [r["train_loss"] for r in resumed if "train_loss" in r] == [r["train_loss"] for r in whole if "train_loss" in r]


def test_a_resume_on_pairs_prepared_again_is_refused_and_leaves_the_run_alone(pairs_data, uninterrupted, tmp_path):
    """The same pairs split with another seed (as many train and val pairs, other ones): the stored reference
    does not belong to them, so --resume auto exits 2 saying so, and no file of the run changes."""
    other = tmp_path / "other"
    proc = subprocess.run([sys.executable, "data_prep/prepare_preferences.py", "--input", str(pairs_data.parent / "pairs.jsonl"),
                           "--out_dir", str(other), "--max_len", "64", "--seed", "1"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for split in ("train", "val"):
        assert PairLoader(other, split, 4).num_examples() == PairLoader(pairs_data, split, 4).num_examples()
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    for p in out.glob("step_0000[01][26].pt"):
        p.unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = run_dpo(other, out, *STEPS, "--resume", "auto", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "does not hold the pairs this run's reference log-probs were computed on" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_two_ranks_equal_one_rank_at_the_same_global_batch(pairs_data, sft_checkpoint, tmp_path):
    """2 ranks x 4 pairs x 2 micro-steps train as 1 rank x 8 pairs x 2 micro-steps: same losses, rewards, weights."""
    common = ["--max_steps", "3", "--total_batch_size", "16", "--eval_every", "0", "--save_every", "0",
              "--num_samples", "0", "--sft_checkpoint", sft_checkpoint]
    run_dpo(pairs_data, tmp_path / "one", *common, "--batch_size", "8")
    run_dpo(pairs_data, tmp_path / "two", *common, "--batch_size", "4", nproc=2)
    one, two = log_records(tmp_path / "one"), log_records(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 3]
    for a, b in zip(one, two):
        for name in ("train_loss", "reward_chosen", "reward_rejected", "reward_margin", "val_loss", "val_reward_margin"):
            if name in a:
                assert a[name] == pytest.approx(b[name], abs=1e-5), (a["step"], name)
        if a["step"] > 1:  # at step 1 every margin is 0 but for rounding, which padding may tip either way
            assert a.get("reward_accuracy") == b.get("reward_accuracy")
    ckpt_one, ckpt_two = load_checkpoint(tmp_path / "one" / "step_000003.pt"), load_checkpoint(tmp_path / "two" / "step_000003.pt")
    for split in ("train", "val"):
        torch.testing.assert_close(ckpt_one["reference_logps"][split], ckpt_two["reference_logps"][split], atol=1e-5, rtol=0)
    for k in ckpt_one["model"]:
        torch.testing.assert_close(ckpt_one["model"][k], ckpt_two["model"][k], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize(
    "args, message",
    [
        ([], "no starting weights: pass --sft_checkpoint"),
        (["--resume", "auto"], "no checkpoint in {out} to resume: run without --resume, and with --sft_checkpoint"),
        (["--sft_checkpoint", "{missing}"], "{missing} does not exist"),
        (["--sft_checkpoint", "{sft}", "--beta", "0"], "--beta must be > 0"),
        (["--sft_checkpoint", "{sft}", "--data_dir", "{missing}"], "no prepared data in {missing}"),
    ],
    ids=["no-sft-checkpoint", "resume-nothing", "missing-sft-checkpoint", "beta-0", "missing-data-dir"],
)
def test_bad_input_is_explained_and_writes_nothing(pairs_data, sft_checkpoint, tmp_path, args, message):
    """Missing weights or data, or --beta 0: exit 2, the message, and no out_dir."""
    out, missing = tmp_path / "out", tmp_path / "missing"
    names = {"out": out, "missing": missing, "sft": sft_checkpoint}
    proc = run_dpo(pairs_data, out, *(a.format(**names) for a in args), check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message.format(**names) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
