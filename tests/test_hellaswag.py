"""eval/hellaswag.py: equal to transformers' GPT2LMHeadModel scoring one ending at a time, the same
batched or not and on 1 or 2 ranks, errors that say what to do, and training weights untouched."""

import functools
import http.server
import json
import socket
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import model_state, save_checkpoint
from model.export_hf import export_hf
from model.gpt import GPT, GPTConfig
from model.tokenizer import VOCAB_SIZE, encode
from test_train import assert_bitwise_equal, final_weights, log_records, run_cmd, run_train, script_cmd

from eval.hellaswag import load_examples, parse_examples, score

transformers = pytest.importorskip(
    "transformers", reason="transformers is the reference: pip install -r requirements-test.txt"
)

TINY = dict(block_size=64, n_layer=2, n_head=4, n_embd=64)


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**(TINY | overrides)))
    # a fresh init has gains of 1 and biases of 0; random ones make any mix-up of tensors show
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(mean=1.0 if name.endswith(".weight") else 0.0, std=0.1)
    return model.eval()


def write_checkpoint(model: GPT, path: Path) -> Path:
    save_checkpoint(model_state(model) | {"step": 0, "kind": "pretrain"}, path)
    return path


def synthetic_examples(n: int, seed: int = 0) -> list[dict]:
    """HellaSwag-shaped rows of made-up sentences, so tests that need no real data never skip."""
    g = torch.Generator().manual_seed(seed)
    words = "the a man woman dog runs jumps into water while holding ball then quickly slowly walks".split()

    def sentence(k):
        return " ".join(words[i] for i in torch.randint(0, len(words), (k,), generator=g).tolist())

    return [{"ind": 1000 + i, "ctx": sentence(8 + i % 5), "endings": [sentence(3 + (i + j) % 4) for j in range(4)],
             "label": i % 4} for i in range(n)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def hellaswag_cmd(*args, nproc=1):
    return script_cmd("eval/hellaswag.py", "--device", "cpu", *args, nproc=nproc)


def hf_ending_losses(hf, ctx: str, ending: str) -> torch.Tensor:
    """The per-token losses of one ending after its context, from transformers, one sequence alone."""
    c, e = encode(ctx), encode(" " + ending)
    ids = torch.tensor([c + e])
    with torch.no_grad():
        logits = hf(ids).logits[0]
    return F.cross_entropy(logits[len(c) - 1 : -1], ids[0, len(c) :], reduction="none")


def test_equals_transformers_one_ending_at_a_time(tmp_path, shared_data):
    examples = load_examples(shared_data / "hellaswag_val_head10.jsonl")
    model = tiny_gpt()
    export_hf(model, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ours = score(model, examples, torch.device("cpu"), batch_size=10)
    for ex, r in zip(examples, ours):
        sums, means = [], []
        for ending in ex.endings:
            losses = hf_ending_losses(hf, ex.ctx, ending)
            sums.append(losses.sum().item())
            means.append(losses.mean().item())
        assert r["losses_sum"] == pytest.approx(sums, abs=1e-4)
        assert r["losses_mean"] == pytest.approx(means, abs=1e-4)
        assert r["pred"] == min(range(4), key=sums.__getitem__)
        assert r["pred_norm"] == min(range(4), key=means.__getitem__)
        assert (r["ind"], r["label"]) == (ex.ind, ex.label)
    # not every prediction is the same ending, or the check above would be weak
    assert len({r["pred_norm"] for r in ours}) > 1


def test_batched_equals_one_ending_per_forward():
    """Any batch size gives each ending's loss from a plain forward over its context and itself."""
    rows = synthetic_examples(13)
    examples = parse_examples([json.dumps(r) for r in rows], "synthetic")
    model = tiny_gpt(seed=1)
    expected = []
    with torch.no_grad():
        for r in rows:
            ctx, sums = encode(r["ctx"]), []
            for ending in r["endings"]:
                ids = torch.tensor([ctx + encode(" " + ending)])
                logits, _ = model(ids)
                sums.append(F.cross_entropy(logits[0, len(ctx) - 1 : -1, :VOCAB_SIZE], ids[0, len(ctx) :],
                                            reduction="sum").item())
            expected.append(sums)
    for batch_size in (1, 4, 13):
        for r, sums in zip(score(model, examples, torch.device("cpu"), batch_size=batch_size), expected):
            assert r["losses_sum"] == pytest.approx(sums, abs=1e-4)
            assert r["pred"] == min(range(4), key=sums.__getitem__)


def test_long_context_keeps_its_end_and_restores_train_mode():
    """A context longer than the model's window loses its first tokens, exactly as if it were cut by hand."""
    model = tiny_gpt(seed=2, block_size=24)
    row = synthetic_examples(1)[0] | {"ctx": " ".join(["the water runs into the dog while"] * 6)}
    longest = max(len(encode(" " + e)) for e in row["endings"])
    (ex,) = parse_examples([json.dumps(row)], "long")
    model.train()
    (r,) = score(model, [ex], torch.device("cpu"))
    assert model.training
    model.eval()
    # an ending's last token is only predicted, so the context keeps block_size - longest + 1 tokens
    ctx = encode(row["ctx"])[-(24 - longest + 1) :]
    for i, ending in enumerate(row["endings"]):
        ids = torch.tensor([ctx + encode(" " + ending)])
        with torch.no_grad():
            logits, _ = model(ids[:, :-1])
        expected = F.cross_entropy(logits[0, len(ctx) - 1 :, :VOCAB_SIZE], ids[0, len(ctx) :], reduction="sum")
        assert r["losses_sum"][i] == pytest.approx(expected.item(), abs=1e-4)


@pytest.mark.parametrize(
    "line, why",
    [
        ("{not json", "not valid JSON"),
        ('{"ctx": "a", "endings": ["b", "c", "d"], "label": 0}', "'endings' must be a list of 4"),
        ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 4}', "'label' must be an integer from 0 to 3"),
        ('{"ctx": "", "endings": ["b", "c", "d", "e"], "label": 1}', "'ctx' must be a non-empty string"),
        ('["ctx"]', "expected a JSON object"),
    ],
)
def test_malformed_line_names_its_line(tmp_path, line, why):
    good = json.dumps(synthetic_examples(1)[0])
    data = write_jsonl(tmp_path / "bad.jsonl", [good, good, line, good])
    ckpt = write_checkpoint(tiny_gpt(), tmp_path / "step_000000.pt")
    proc = run_cmd(hellaswag_cmd("--checkpoint", ckpt, "--data", data), check=False)
    assert proc.returncode == 2
    assert f"bad.jsonl:3: {why}" in proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("nproc", [1, 2])
def test_no_cache_and_no_network_says_to_pass_data(tmp_path, nproc):
    """Also under torchrun: rank 0's failed download stops every rank (none waits for it forever)."""
    ckpt = write_checkpoint(tiny_gpt(), tmp_path / "step_000000.pt")
    url = f"http://127.0.0.1:{free_port()}/hellaswag_val.jsonl"  # nothing listens there
    proc = run_cmd(hellaswag_cmd("--checkpoint", ckpt, "--url", url, "--cache_dir", tmp_path / "cache", nproc=nproc),
                   check=False)
    assert proc.returncode != 0 if nproc > 1 else proc.returncode == 2  # torchrun reports its own exit code
    assert "Pass --data PATH" in proc.stderr and url in proc.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_downloads_once_then_reads_the_cache(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    write_jsonl(served / "hellaswag_val.jsonl", synthetic_examples(6))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    ckpt = write_checkpoint(tiny_gpt(), tmp_path / "step_000000.pt")
    url = f"http://127.0.0.1:{server.server_address[1]}/hellaswag_val.jsonl"
    args = ["--checkpoint", ckpt, "--url", url, "--cache_dir", tmp_path / "cache", "--out_json"]
    try:
        run_cmd(hellaswag_cmd(*args, tmp_path / "first.json"))
    finally:
        server.shutdown()
        server.server_close()
    assert (tmp_path / "cache" / "hellaswag_val.jsonl").read_bytes() == (served / "hellaswag_val.jsonl").read_bytes()
    run_cmd(hellaswag_cmd(*args, tmp_path / "second.json"))  # the server is gone: only the cache can answer
    first, second = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("first", "second"))
    assert first["n"] == second["n"] == 6 and first["examples"] == second["examples"]


def test_cli_report_and_two_ranks_count_every_example_once(tmp_path, shared_data):
    data = shared_data / "hellaswag_val_head10.jsonl"
    model = tiny_gpt(seed=3)
    write_checkpoint(model, tmp_path / "run" / "step_000000.pt")
    expected = score(model, load_examples(data), torch.device("cpu"))
    for limit in (10, 9, 1):  # 9 over 2 ranks: one rank scores one example more; 1: a rank with none
        reports = {}
        for nproc in (1, 2):
            out = tmp_path / f"report_{limit}_{nproc}.json"
            proc = run_cmd(hellaswag_cmd("--checkpoint", tmp_path / "run", "--data", data, "--limit", limit,
                                         "--batch_size", 3, "--out_json", out, nproc=nproc))
            reports[nproc] = report = json.loads(out.read_text())
            assert f"hellaswag: {limit} examples" in proc.stdout
            assert report["n"] == limit and len(report["examples"]) == limit
            assert [r["ind"] for r in report["examples"]] == [r["ind"] for r in expected[:limit]]
            assert report["acc"] == sum(r["pred"] == r["label"] for r in report["examples"]) / limit
            assert report["acc_norm"] == sum(r["pred_norm"] == r["label"] for r in report["examples"]) / limit
            for got, want in zip(report["examples"], expected):
                assert set(got) == {"ind", "label", "pred", "pred_norm", "losses_sum", "losses_mean"}
                assert got["losses_sum"] == pytest.approx(want["losses_sum"], abs=1e-4)
                assert got["losses_mean"] == pytest.approx(want["losses_mean"], abs=1e-4)
        assert (reports[1]["acc"], reports[1]["acc_norm"]) == (reports[2]["acc"], reports[2]["acc_norm"])
        assert [(r["pred"], r["pred_norm"]) for r in reports[1]["examples"]] == \
               [(r["pred"], r["pred_norm"]) for r in reports[2]["examples"]]


def test_training_weights_equal_with_hellaswag_on_and_off(tmp_path, synthetic_shards):
    data = write_jsonl(tmp_path / "hellaswag.jsonl", synthetic_examples(7))
    # dropout on: any RNG draw by the evaluation would change the masks that follow it
    steps = ["--max_steps", "6", "--total_batch_size", "256", "--eval_every", "3", "--save_every", "6", "--dropout", "0.1"]
    run_train(synthetic_shards, tmp_path / "off", *steps)
    run_train(synthetic_shards, tmp_path / "on", *steps, "--hellaswag_every", "2", "--hellaswag_data", data,
              "--hellaswag_batch_size", "3")
    assert_bitwise_equal(final_weights(tmp_path / "off", 6), final_weights(tmp_path / "on", 6))
    scored = [r for r in log_records(tmp_path / "on") if "hellaswag_acc_norm" in r]
    assert [r["step"] for r in scored] == [0, 2, 4, 6]
    # the last in-training score is the standalone script's on the final checkpoint (dropout off for both)
    report = tmp_path / "report.json"
    run_cmd(hellaswag_cmd("--checkpoint", tmp_path / "off", "--data", data, "--out_json", report))
    standalone = json.loads(report.read_text())
    assert (scored[-1]["hellaswag_acc"], scored[-1]["hellaswag_acc_norm"]) == (standalone["acc"], standalone["acc_norm"])


def test_training_stops_before_step_0_without_hellaswag_data(tmp_path, synthetic_shards):
    proc = run_train(synthetic_shards, tmp_path / "run", "--max_steps", "2", "--total_batch_size", "128",
                     "--hellaswag_every", "1", "--hellaswag_cache", tmp_path / "cache",
                     "--hellaswag_data", tmp_path / "missing.jsonl", check=False)
    assert proc.returncode == 2
    assert "missing.jsonl: no such file" in proc.stderr and "--hellaswag_every 0" in proc.stderr
    assert not (tmp_path / "run").exists()
    url = f"http://127.0.0.1:{free_port()}/hellaswag_val.jsonl"  # nothing listens there
    proc = run_train(synthetic_shards, tmp_path / "run", "--max_steps", "2", "--total_batch_size", "128",
                     "--hellaswag_every", "1", "--hellaswag_cache", tmp_path / "cache", "--hellaswag_url", url, check=False)
    assert proc.returncode == 2
    assert "Pass --hellaswag_data PATH" in proc.stderr and "--hellaswag_every 0" in proc.stderr
