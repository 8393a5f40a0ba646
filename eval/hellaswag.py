"""HellaSwag, completion style, as in the GPT-2 paper: the tell that pretraining worked.

    python eval/hellaswag.py --checkpoint checkpoints/pretrain/step_019073.pt   # full val, 10042 examples
    python eval/hellaswag.py --init_from gpt2               # OpenAI GPT-2 124M: acc_norm about 0.2955
    python eval/hellaswag.py --checkpoint checkpoints/dolly --limit 1000 --out_json dolly_hellaswag.json
    torchrun --standalone --nproc_per_node=8 eval/hellaswag.py --checkpoint checkpoints/pretrain

Each example is a context and four endings, one of them right. An ending is scored by the model's
loss on its own tokens, `ctx` then `" " + ending`: `acc` picks the ending with the lowest summed
loss, `acc_norm` the lowest mean loss per token (the figure usually quoted: GPT-2 124M about 29.5%,
GPT-3 125M 33.7%, chance 25%).

Speed: a context and its four endings share one row. Positions restart after the context for each
ending and an attention mask lets each ending see the context and itself only, so every ending is
scored exactly as if it ran alone after its context, but the context runs once instead of four
times. Many such rows, sorted by length, are padded into one forward, and lm_head only runs where a
loss is wanted. Under torchrun each rank scores its own slice and the counts are summed.

The validation split is downloaded once from its public URL into --cache_dir; --data reads a local
copy (or any jsonl with the same fields: ctx, endings, label, and optionally ind). Training scripts
run the same evaluation every --hellaswag_every steps (see add_hellaswag_args).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the repo root importable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.atomic import atomic_write
from model.compute import Compute, check_device, cleanup, setup_compute
from model.gpt import GPT
from model.pretrained import load_pretrained
from model.tokenizer import VOCAB_SIZE, encode
from model.trainer import emulated_bf16_note, resolve_dtype

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
CACHE_DIR = "data/hellaswag"
NUM_ENDINGS = 4
CONTEXT, PADDING = -1, NUM_ENDINGS  # segment ids of a packed row besides the endings 0..3
LOGITS_CHUNK, SOFTMAX_CHUNK = 1024, 64  # targets whose logits, and whose log-softmax, are computed at once


@dataclass
class Example:
    ind: int  # the dataset's own id (its line number where the file has none)
    ctx: str
    endings: list[str]
    label: int


def parse_examples(lines: list[str], source: str) -> list[Example]:
    """Examples of jsonl lines; a bad line raises ValueError naming source:line and what is wrong."""
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object with ctx, endings and label")
        ctx, endings, label = row.get("ctx"), row.get("endings"), row.get("label")
        if not isinstance(ctx, str) or not ctx.strip():
            raise ValueError(f"{where}: 'ctx' must be a non-empty string")
        if not (isinstance(endings, list) and len(endings) == NUM_ENDINGS and all(isinstance(e, str) and e.strip() for e in endings)):
            raise ValueError(f"{where}: 'endings' must be a list of {NUM_ENDINGS} non-empty strings")
        if isinstance(label, str) and label.isdigit():
            label = int(label)
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < NUM_ENDINGS:
            raise ValueError(f"{where}: 'label' must be an integer from 0 to {NUM_ENDINGS - 1}, got {label!r}")
        ind = row.get("ind", number)
        examples.append(Example(ind=ind if isinstance(ind, int) else number, ctx=ctx, endings=endings, label=label))
    if not examples:
        raise ValueError(f"{source} holds no examples")
    return examples


def load_examples(path: str | Path) -> list[Example]:
    """The examples of a HellaSwag-format jsonl file (lines end at \\n only, as JSON allows U+2028 in strings)."""
    path = Path(path)
    return parse_examples(path.read_text(encoding="utf-8").split("\n"), str(path))


def download(url: str, cache_dir: str | Path, data_flag: str = "--data") -> Path:
    """The cached copy of url, downloaded (and checked to parse) once; later calls read the cache.

    data_flag names the caller's flag for a local copy, for the message when there is no network.
    """
    path = Path(cache_dir) / Path(url).name
    if path.is_file():
        return path
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            body = response.read()
    except (urllib.error.URLError, OSError) as e:
        raise FileNotFoundError(
            f"HellaSwag is not in {cache_dir} and downloading {url} failed ({getattr(e, 'reason', e)}). "
            f"Offline? Pass {data_flag} PATH to a local copy of hellaswag_val.jsonl"
        ) from None
    try:  # a proxy's error page must not become the cache
        parse_examples(body.decode("utf-8", errors="replace").split("\n"), url)
    except ValueError as e:
        raise ValueError(f"{e}: this is not HellaSwag; pass {data_flag} PATH to a local copy of hellaswag_val.jsonl") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(body))
    return path


@dataclass
class Packed:
    """One example as one row: the context once, then each ending at the positions it would have alone."""

    tokens: list[int]
    pos: list[int]
    segment: list[int]  # CONTEXT, or which ending (0..3) a token belongs to
    targets: list[int]  # every ending token in order, ending 0 first
    predictors: list[int]  # for each target, the row index whose logits predict it
    lengths: list[int]  # tokens per ending


def pack(example: Example, block_size: int) -> Packed:
    """The row of an example; the context loses its first tokens if the longest ending would not fit.

    An ending's last token is predicted but predicts nothing, so it is left out of the row.
    """
    ctx = encode(example.ctx)
    endings = [encode(" " + e) for e in example.endings]
    keep = block_size - max(map(len, endings)) + 1
    if keep < 1:
        raise ValueError(f"example {example.ind}: an ending has more tokens than the model's block_size {block_size}")
    ctx = ctx[-keep:]
    C = len(ctx)
    p = Packed(tokens=list(ctx), pos=list(range(C)), segment=[CONTEXT] * C, targets=[], predictors=[],
               lengths=[len(e) for e in endings])
    for i, ending in enumerate(endings):
        start = len(p.tokens)
        p.tokens += ending[:-1]
        p.pos += range(C, C + len(ending) - 1)
        p.segment += [i] * (len(ending) - 1)
        # the context's last token predicts an ending's first token, each ending token the next one
        p.targets += ending
        p.predictors += [C - 1] + list(range(start, start + len(ending) - 1))
    return p


def attention_mask(segment: torch.Tensor) -> torch.Tensor:
    """(B, T, T) True where a query may see a key: earlier-or-same tokens of the context or of its own segment."""
    T = segment.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=segment.device).tril()
    seg_q, seg_k = segment.unsqueeze(2), segment.unsqueeze(1)
    return causal & ((seg_k == CONTEXT) | (seg_k == seg_q))


def target_losses(hidden: torch.Tensor, lm_head: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each target over the real vocabulary, from the hidden states (N, C) before them.

    In chunks: the full padded lm_head makes the faster matmul, and the log-softmax of a few rows of
    logits runs while they are in cache (on a CPU this is 2-3x faster than one (N, vocab) pass).
    """
    softmax_chunk = SOFTMAX_CHUNK if hidden.device.type == "cpu" else LOGITS_CHUNK  # a GPU wants big kernels
    losses = []
    for h, t in zip(hidden.split(LOGITS_CHUNK), targets.split(LOGITS_CHUNK)):
        logits = F.linear(h, lm_head)
        losses += [F.cross_entropy(rows[:, :VOCAB_SIZE].float(), rows_t, reduction="none")
                   for rows, rows_t in zip(logits.split(softmax_chunk), t.split(softmax_chunk))]
    return torch.cat(losses)


@torch.inference_mode()
def score_rows(model: GPT, rows: list[Packed], device: torch.device, autocast) -> torch.Tensor:
    """Summed loss of each ending of each row, (len(rows), 4), from one forward over the padded rows."""
    T = max(len(r.tokens) for r in rows)
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    pos = torch.zeros(len(rows), T, dtype=torch.long)
    segment = torch.full((len(rows), T), PADDING, dtype=torch.long)
    row_of, predictors, targets, ending_of = [], [], [], []
    for b, r in enumerate(rows):
        n = len(r.tokens)
        tokens[b, :n], pos[b, :n], segment[b, :n] = torch.tensor(r.tokens), torch.tensor(r.pos), torch.tensor(r.segment)
        row_of += [b] * len(r.targets)
        predictors += r.predictors
        targets += r.targets
        ending_of += [b * NUM_ENDINGS + i for i, n_i in enumerate(r.lengths) for _ in range(n_i)]
    as_tensor = lambda xs: torch.tensor(xs, device=device)  # noqa: E731
    with autocast:
        hidden = model.hidden(tokens.to(device), pos.to(device), attention_mask(segment.to(device)))
        before = hidden[as_tensor(row_of), as_tensor(predictors)]  # (targets, C): the state before each target
        losses = target_losses(before, model.lm_head.weight, as_tensor(targets))
    sums = torch.zeros(len(rows) * NUM_ENDINGS, device=device).index_add_(0, as_tensor(ending_of), losses)
    return sums.view(len(rows), NUM_ENDINGS).cpu()


def score(
    model: GPT, examples: list[Example], device: torch.device, *, batch_size: int = 16, dtype: str = "float32",
    progress: bool = False,
) -> list[dict]:
    """Score examples, batch_size at a time (similar lengths together); one result dict per example, in order.

    The model is put in eval mode for the pass and its mode restored after.
    """
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    packed = [pack(e, model.config.block_size) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: len(packed[i].tokens))
    results: list[dict | None] = [None] * len(examples)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc="hellaswag", unit="batch", disable=not progress):
            sums = score_rows(model, [packed[i] for i in batch], device, autocast)
            for i, row in zip(batch, sums.tolist()):
                ex, lengths = examples[i], packed[i].lengths
                means = [s / n for s, n in zip(row, lengths)]
                results[i] = {"ind": ex.ind, "label": ex.label, "pred": min(range(NUM_ENDINGS), key=row.__getitem__),
                              "pred_norm": min(range(NUM_ENDINGS), key=means.__getitem__),
                              "losses_sum": row, "losses_mean": means}
    finally:
        model.train(was_training)
    return results


def evaluate(
    model: GPT, examples: list[Example], compute: Compute, *, batch_size: int = 16, dtype: str = "float32",
    progress: bool = False,
) -> tuple[dict, list[dict]]:
    """Accuracy over all ranks, each scoring examples[rank::world_size]: ({"n", "acc", "acc_norm"}, this rank's results)."""
    mine = examples[compute.rank :: compute.world_size]
    results = score(model, mine, compute.device, batch_size=batch_size, dtype=dtype, progress=progress and compute.master)
    counts = torch.tensor([len(results), sum(r["pred"] == r["label"] for r in results),
                           sum(r["pred_norm"] == r["label"] for r in results)], dtype=torch.long, device=compute.device)
    n, correct, correct_norm = compute.all_reduce(counts).tolist()
    return {"n": n, "acc": correct / n, "acc_norm": correct_norm / n}, results


def find_data(data: str | None, url: str, cache_dir: str | Path, data_flag: str = "--data") -> Path:
    """The local file data as given, or else the cached download of url."""
    if data is None:
        return download(url, cache_dir, data_flag)
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"{data}: no such file (a jsonl in HellaSwag's format is expected)")
    return path


def fetch_data(data: str | None, url: str, cache_dir: str | Path, compute: Compute, data_flag: str = "--data") -> Path:
    """find_data on rank 0 first (one download, not one per rank), then on the others, which read the
    cache. A failure on rank 0 raises FileNotFoundError on every rank, so none waits forever."""
    error = None
    if compute.master:
        try:
            find_data(data, url, cache_dir, data_flag)
        except (FileNotFoundError, ValueError) as e:
            error = str(e)
    errors = [e for e in compute.gather(error) if e]
    if errors:
        raise FileNotFoundError(errors[0])
    return find_data(data, url, cache_dir, data_flag)


def add_hellaswag_args(parser: argparse.ArgumentParser, every: int) -> None:
    """The flags of HellaSwag during training; every is the script's default for --hellaswag_every."""
    g = parser.add_argument_group("HellaSwag during training (eval/hellaswag.py)")
    g.add_argument("--hellaswag_every", type=int, default=every,
                   help="score HellaSwag every N steps and at the end (on the uncompiled model; weights are unaffected); 0 = never")
    g.add_argument("--hellaswag_data", default=None, help="a local hellaswag_val.jsonl; default: download it once into --hellaswag_cache")
    g.add_argument("--hellaswag_cache", default=CACHE_DIR, help="where the downloaded validation split is kept")
    g.add_argument("--hellaswag_url", default=URL, help="where to download it from")
    g.add_argument("--hellaswag_limit", type=int, default=0, help="score only the first N examples; 0 = all 10042")
    g.add_argument("--hellaswag_batch_size", type=int, default=16, help="examples per forward pass")


def hellaswag_evaluation(args: argparse.Namespace, compute: Compute):
    """The training loop's evaluation (every, fn(model) -> metrics) for these flags, or None when off.

    The data is fetched now, by rank 0, so a missing file or network stops the run before it trains.
    """
    if args.hellaswag_every <= 0:
        return None
    if args.hellaswag_limit < 0 or args.hellaswag_batch_size < 1:
        raise ValueError("--hellaswag_limit must be >= 0 and --hellaswag_batch_size >= 1")
    try:
        path = fetch_data(args.hellaswag_data, args.hellaswag_url, args.hellaswag_cache, compute, "--hellaswag_data")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (or pass --hellaswag_every 0)") from None
    examples = load_examples(path)[: args.hellaswag_limit or None]
    dtype = resolve_dtype(args.dtype, compute.device)

    def run(model: GPT) -> dict:
        metrics, _ = evaluate(model, examples, compute, batch_size=args.hellaswag_batch_size, dtype=dtype)
        return {"hellaswag_acc_norm": metrics["acc_norm"], "hellaswag_acc": metrics["acc"]}

    return args.hellaswag_every, run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("model (one of)")
    g.add_argument("--checkpoint", default=None, help="a step_*.pt of any stage, or a run directory (its newest)")
    g.add_argument("--init_from", default=None, help="a Hugging Face GPT-2 (gpt2, gpt2-medium, ...) or a local HF directory")
    g = parser.add_argument_group("data")
    g.add_argument("--data", default=None, help="a local jsonl in HellaSwag's format; default: the validation split, downloaded once")
    g.add_argument("--url", default=URL, help="where to download the validation split from (default: %(default)s)")
    g.add_argument("--cache_dir", default=CACHE_DIR, help="where the download is kept (default: %(default)s)")
    g.add_argument("--limit", type=int, default=0, help="score only the first N examples; 0 = all")
    g = parser.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="auto = bfloat16 autocast on CUDA, float32 elsewhere")
    g.add_argument("--batch_size", type=int, default=16, help="examples per forward pass (default: %(default)s)")
    g.add_argument("--out_json", default=None, help="write the accuracy and every example's losses and predictions here")
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.init_from is None):
        parser.error("pass one of --checkpoint and --init_from")
    if args.batch_size < 1 or args.limit < 0:
        parser.error("--batch_size must be >= 1 and --limit >= 0")
    try:
        check_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    compute = setup_compute(args.device)
    try:
        path = fetch_data(args.data, args.url, args.cache_dir, compute)
        examples = load_examples(path)[: args.limit or None]
        model, source = load_pretrained(args.checkpoint, args.init_from)
    except (OSError, ValueError) as e:  # OSError: also the Hub out of reach for --init_from
        compute.print0(f"error: {e}", file=sys.stderr)
        cleanup(compute)
        return 2
    model.to(compute.device).requires_grad_(False).pack_for_cpu_inference()  # 1.7x faster on CPU; nothing elsewhere
    dtype = resolve_dtype(args.dtype, compute.device)
    if note := emulated_bf16_note(dtype, compute.device):
        compute.print0(note)
    compute.print0(f"{source}: {len(examples)} examples over {compute.world_size} rank(s) on {compute.device} ({dtype})")
    try:
        metrics, results = evaluate(model, examples, compute, batch_size=args.batch_size, dtype=dtype, progress=True)
        per_rank = compute.gather(results) if args.out_json else []
    finally:
        cleanup(compute)
    if compute.master:
        print(f"hellaswag: {metrics['n']} examples | acc {metrics['acc']:.4f} | acc_norm {metrics['acc_norm']:.4f}")
        if args.out_json:
            # rank r scored examples r, r + W, r + 2W, ...: interleave back into file order
            W = compute.world_size
            in_order = [per_rank[k % W][k // W] for k in range(len(examples))]
            report = {"model": source, "data": str(path), **metrics, "examples": in_order}
            atomic_write(args.out_json, lambda f: f.write(json.dumps(report, indent=1).encode()))
            print(f"wrote {args.out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
