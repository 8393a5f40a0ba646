"""Batch-1 decode speed: model/engine.py vs transformers' generate (KV cache, greedy), same weights.

Claim under test: at the GPT-2 124M shape our engine decodes at least 1.3x as many tokens/s as
`GPT2LMHeadModel.generate`, and both sit near the machine's memory-bandwidth floor: decoding one
token reads every weight once, so tokens/s cannot exceed (read bandwidth) / (bytes of weights).

    python bench/decode.py                          # 124M shape, CPU, 64 new tokens after a 16-token prompt
    python bench/decode.py --device cuda --new_tokens 256

What is timed: a whole request, prompt prefill included (16 tokens, a few % of the time), through
model/engine.py (one-row engine, TextStream detokenizing as it goes, weights packed by
GPT.pack_for_cpu_inference() as the CLI and the server do on CPU) and through transformers'
generate(do_sample=False, use_cache=True) on the same weights, exported with model/export_hf.py.
Both are forced to produce exactly --new_tokens tokens (an <|endoftext|> cannot end either: random
weights rarely pick it, and the count is checked). Runs alternate, after one warm-up each; the
figure is the ratio of medians. The greedy tokens of the two are compared as a check.

The floor: read bandwidth is measured on the machine (a sum over a 1 GiB float32 tensor, best of 5),
bytes per token = every weight read once (the tied embedding counted once, as the matmul reads it;
the position table is a lookup). Fraction of floor = our tokens/s / floor tokens/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from model.compute import describe_cpu
from model.engine import Engine, SamplingParams
from model.export_hf import export_hf
from model.gpt import GPT, GPTConfig
from model.text_stream import TextStream
from model.tokenizer import EOT, encode


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_bandwidth(device: torch.device) -> float:
    """Bytes/s of a streaming read of a tensor far larger than any cache."""
    x = torch.ones(256 * 1024 * 1024, device=device)  # 1 GiB of float32
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def ours(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Our engine, one row, streaming text through TextStream as a client would get it."""
    engine = Engine(model, max_rows=1, max_len=len(prompt) + n)
    seq = engine.start(prompt, SamplingParams(max_tokens=n, temperature=0))
    text = TextStream()
    while engine.prefill_step() is None:
        pass
    text.push(seq.output[-1])
    while seq.finish_reason is None:
        engine.decode_step()
        text.push(seq.output[-1])
    return seq.output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_layer", type=int, default=12)
    parser.add_argument("--n_head", type=int, default=12)
    parser.add_argument("--n_embd", type=int, default=768)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = torch's default")
    args = parser.parse_args()
    print(describe_cpu(), flush=True)  # figures from different CPUs and ISAs are not comparable
    import transformers  # test requirement only

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)).eval()
    with tempfile.TemporaryDirectory() as hf_dir:
        export_hf(model, hf_dir)
        hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).to(device).eval()
    model.to(device).requires_grad_(False).pack_for_cpu_inference()  # as the server and the CLI do
    prompt = encode("The history of the printing press begins in the fifteenth century, when")[:16]
    n = args.new_tokens

    @torch.inference_mode()
    def theirs() -> list[int]:
        ids = torch.tensor([prompt], device=device)
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, use_cache=True, pad_token_id=EOT)
        return out[0, len(prompt):].tolist()

    runs = {"ours (engine)": lambda: ours(model, prompt, n), "transformers generate": theirs}
    outputs = {name: run() for name, run in runs.items()}  # warm-up, and the outputs to compare
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            sync(device)
            t0 = time.perf_counter()
            tokens = run()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            assert len(tokens) == n, f"{name} made {len(tokens)} tokens, not {n}"

    bandwidth = read_bandwidth(device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) - \
        model.transformer.wpe.weight.numel() * model.transformer.wpe.weight.element_size()
    floor = bandwidth / weight_bytes
    print(f"{model.num_params() / 1e6:.0f}M parameters | device {device} | {torch.get_num_threads()} threads | "
          f"{len(prompt)}-token prompt, {n} new tokens, greedy")
    rate = {name: n / statistics.median(ts) for name, ts in times.items()}
    for name, ts in times.items():
        print(f"{name:<24} {rate[name]:7.1f} tokens/s   (seconds per request: {'  '.join(f'{t:.2f}' for t in ts)})")
    print(f"ours / transformers: {rate['ours (engine)'] / rate['transformers generate']:.2f}x")
    print(f"memory floor: {bandwidth / 1e9:.1f} GB/s read / {weight_bytes / 1e6:.0f} MB of weights per token = "
          f"{floor:.1f} tokens/s; ours reaches {rate['ours (engine)'] / floor:.0%} of it")
    same = outputs["ours (engine)"] == outputs["transformers generate"]
    print(f"greedy tokens identical: {same}")


if __name__ == "__main__":
    main()
