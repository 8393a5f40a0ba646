"""Batch-1 decode speed at the GPT-2 124M shape: our engine with float32 and with int8 weights, against
transformers' generate and llama.cpp on our GGUF export, same weights, same threads.

Claims under test: our float32 engine decodes at least 1.3x as many tokens/s as
`GPT2LMHeadModel.generate`; with int8 weights (--quant int8, model/int8_linear.py) at least 2x our
float32, since a decode step reads every weight once and int8 reads a quarter of the bytes; and
within 1.5x of llama.cpp running the q8_0 file (model/export_gguf.py) with the same thread count.

    python bench/decode.py                                  # everything, 64 new tokens after a 14-token prompt
    python bench/decode.py --quant int8 --against q8_0      # our int8 against llama.cpp's q8_0 only
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python bench/decode.py --llama_cpu haswell   # as on an AVX2 CPU

What is timed: a whole request, prompt prefill included (14 tokens, a few % of the time), through
model/engine.py (one-row engine, TextStream detokenizing as it goes, weights prepared by
GPT.prepare_inference as the CLI and the server do: float32 packed for oneDNN, or int8); through
transformers' generate(do_sample=False, use_cache=True) on the same weights, exported with
model/export_hf.py; and through llama.cpp's C library (the prebuilt one `make .venv/llama.cpp`
unpacks, tests/llama_cpp.py: a context, the prompt in one llama_decode, then one per token, greedy
argmax of the logits in numpy). Every run makes exactly --new_tokens tokens (random weights rarely
pick <|endoftext|>, and the count is checked). Runs alternate, after one warm-up each; the figure is
the ratio of medians. Greedy tokens are compared with our float32 engine's as a check: float32
contenders should agree, quantized ones drift apart on random weights' near ties.

The floor: read bandwidth is measured on the machine (a sum over a 1 GiB float32 tensor, best of 5);
bytes per token = every matrix read once (the tied embedding counted once, as the product reads it;
the position table is a lookup), for float32 and for int8 (values and scales).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the ctypes binding of llama.cpp that the GGUF tests use

import torch

from model.cli import QUANT_TYPES, HelpFormatter
from model.compute import describe_cpu
from model.engine import Engine, SamplingParams
from model.export_gguf import TYPES as GGUF_TYPES
from model.export_gguf import write_gguf
from model.export_hf import export_hf
from model.gpt import GPT, GPTConfig, Linear
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


def matrix_bytes(model: GPT) -> int:
    """Bytes of weights one decode step reads: every Linear's matrix (int8 or float; the tied token table
    once, as the vocabulary projection) and every bias and norm. The position table is a lookup."""
    matrices = sum(m.int8.nbytes() if m.int8 is not None else m.weight.numel() * m.weight.element_size()
                   for m in model.modules() if isinstance(m, Linear))
    return matrices + sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() == 1)


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--n_layer", type=int, default=12)
    parser.add_argument("--n_head", type=int, default=12)
    parser.add_argument("--n_embd", type=int, default=768)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch's and llama.cpp's threads; 0 = torch's default")
    parser.add_argument("--quant", default=",".join(QUANT_TYPES),
                        help=f"our engine's weights to time, comma-separated ({', '.join(QUANT_TYPES)}; none = float32)")
    parser.add_argument("--against", default="transformers,q8_0",
                        help=f"others to time, comma-separated: transformers, and GGUF types in llama.cpp ({', '.join(GGUF_TYPES)})")
    parser.add_argument("--llama_cpu", default=None,
                        help="llama.cpp's CPU backend (libggml-cpu-<name>.so), e.g. haswell for AVX2 as on a Zen 2; "
                             "default: the best for this CPU")
    args = parser.parse_args()
    quants = [q for q in args.quant.split(",") if q]
    against = [a for a in args.against.split(",") if a]
    if unknown := [q for q in quants if q not in QUANT_TYPES] + [a for a in against if a not in ("transformers", *GGUF_TYPES)]:
        parser.error(f"unknown --quant / --against: {', '.join(unknown)}")
    if args.device != "cpu" and "int8" in quants:
        parser.error("int8 weights are for decoding on CPU: pass --quant none with another device")
    print(describe_cpu(), flush=True)  # figures from different CPUs and ISAs are not comparable

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)).eval().requires_grad_(False)
    prompt = encode("The history of the printing press begins in the fifteenth century, when")[:16]
    n = args.new_tokens
    runs, weight_bytes, closers = {}, {}, []
    tmp = tempfile.TemporaryDirectory()
    closers.append(tmp.cleanup)
    for kind in against:
        if kind == "transformers":
            import transformers  # test requirement only

            export_hf(model, tmp.name)
            hf = transformers.GPT2LMHeadModel.from_pretrained(tmp.name).to(device).eval()

            @torch.inference_mode()
            def theirs(hf=hf) -> list[int]:
                ids = torch.tensor([prompt], device=device)
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, use_cache=True, pad_token_id=EOT)
                return out[0, len(prompt):].tolist()

            runs["transformers generate"] = theirs
        else:
            from llama_cpp import LlamaModel  # tests/llama_cpp.py

            path = Path(tmp.name) / f"bench-{kind}.gguf"
            write_gguf(model, path, kind)
            llama = LlamaModel(path, threads=threads, cpu=args.llama_cpu)
            closers.insert(0, llama.close)
            runs[f"llama.cpp {kind}"] = lambda llama=llama: llama.greedy(prompt, n)
            weight_bytes[f"llama.cpp {kind}"] = path.stat().st_size
    for quant in quants:
        ready = copy.deepcopy(model).to(device)  # int8 drops the float weights: each kind gets its own copy
        how = ready.prepare_inference(quant)  # as the server and the CLI do
        name = "ours float32" if quant == "none" else f"ours {quant}"
        print(f"{name}: {how}")
        runs[name] = lambda m=ready: ours(m, prompt, n)
        weight_bytes[name] = matrix_bytes(ready)

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
    for close in closers:
        close()

    bandwidth = read_bandwidth(device)
    print(f"{model.num_params() / 1e6:.0f}M parameters | device {device} | {threads} threads | "
          f"{len(prompt)}-token prompt, {n} new tokens, greedy | read bandwidth {bandwidth / 1e9:.1f} GB/s")
    rate = {name: n / statistics.median(ts) for name, ts in times.items()}
    reference = outputs.get("ours float32")
    for name, ts in times.items():
        line = f"{name:<24} {rate[name]:7.1f} tokens/s   (seconds per request: {'  '.join(f'{t:.2f}' for t in ts)})"
        if name in weight_bytes:
            floor = bandwidth / weight_bytes[name]
            line += f" | {weight_bytes[name] / 1e6:.0f} MB read per token: floor {floor:.0f} tokens/s, {rate[name] / floor:.0%} of it"
        if reference is not None and name != "ours float32":
            same = next((i for i, (a, b) in enumerate(zip(outputs[name], reference)) if a != b), n)
            line += f" | first {same} tokens equal ours float32's"
        print(line)
    for a, b in [("ours float32", "transformers generate"), ("ours int8", "ours float32"), ("ours int8", "llama.cpp q8_0"),
                 ("ours float32", "llama.cpp f32")]:
        if a in rate and b in rate:
            print(f"{a} / {b}: {rate[a] / rate[b]:.2f}x")


if __name__ == "__main__":
    main()
