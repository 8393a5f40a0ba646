"""Export any stage's checkpoint to a GGUF file that llama.cpp (llama-cli, llama-server) and Ollama run.

    python model/export_gguf.py --checkpoint checkpoints/dolly --out dolly-q8_0.gguf --type q8_0
    python model/export_gguf.py --checkpoint checkpoints/demo/dpo --out demo-f32.gguf --type f32
    llama-server -m dolly-q8_0.gguf --jinja                    # llama.cpp's OpenAI-compatible server
    ollama create dolly -f dolly-q8_0.Modelfile                # Ollama, with the Modelfile written beside

The file is written with the `gguf` package (the llama.cpp project's own writer) under llama.cpp's
`gpt2` architecture, which is our model exactly: learned positions, pre-LayerNorm blocks with
biases, a fused q/k/v projection, GELU (tanh) and the output projection tied to the token embedding.
So nothing is approximated: the tensors go under llama.cpp's names (token_embd, position_embd,
blk.N.attn_norm / attn_qkv / attn_output / ffn_norm / ffn_up / ffn_down, output_norm) in the same
(out, in) layout as nn.Linear, and no output.weight is written: llama.cpp then uses token_embd for
the output, as our tied lm_head does. The vocabulary is trimmed from the model's padded rows to
GPT-2's 50257, with GPT-2's own token strings and merges and the pre-tokenizer "gpt-2" (llama.cpp
warns that quality is degraded without one), <|endoftext|> as both BOS and EOS, and our prompt
template as the file's chat template (model/prompt.py's CHAT_TEMPLATE, Jinja), so that a runtime
rendering chats from the file (llama-server --jinja) sends the model what our server sends.
Ollama renders chats with a Go template of its own instead, so a Modelfile is written beside the
file (--modelfile): FROM the file, our template as model/prompt.py's OLLAMA_TEMPLATE, the context
length and our server's sampling defaults.

Types: f32 (bitwise our weights), f16 (every matrix in half precision), q8_0 (every matrix in
blocks of 32 int8 values with one f16 scale, 8.5 bits a weight: a quarter of f32's bytes), q4_0
(blocks of 32 4-bit values with one f16 scale, 4.5 bits a weight; README: what it costs). LayerNorm
weights and all biases stay f32 in every type, as llama.cpp's own converter keeps them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the repo root importable

import gguf
import numpy as np

from model.atomic import atomic_path, atomic_write
from model.cli import HelpFormatter
from model.engine import DEFAULT_TEMPERATURE
from model.gpt import GPT
from model.pretrained import load_pretrained
from model.prompt import CHAT_TEMPLATE, OLLAMA_TEMPLATE
from model.tokenizer import EOT, VOCAB_SIZE, gpt2_vocabulary

TYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
    "q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, gguf.GGMLQuantizationType.Q4_0),
}

QUANTIZED = (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0)

# our parameter names (after "transformer.h.N.") -> llama.cpp's gpt2 tensor names (after "blk.N.")
BLOCK_NAMES = {
    "ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
}


def gguf_name(name: str) -> str | None:
    """llama.cpp's name for one of our parameters; None for lm_head, which llama.cpp takes from token_embd."""
    if name == "lm_head.weight":
        return None
    if name.startswith("transformer.h."):
        layer, rest = name.removeprefix("transformer.h.").split(".", 1)
        module, kind = rest.rsplit(".", 1)
        return f"blk.{layer}.{BLOCK_NAMES[module]}.{kind}"
    return {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
            "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}[name]


def gguf_tensors(model: GPT, file_type: str) -> list[tuple[str, np.ndarray, gguf.GGMLQuantizationType]]:
    """(name, data, type) of every tensor the file holds, in the model's order: matrices in the chosen
    type (q8_0 and q4_0 data already quantized to their bytes), vectors in f32, the vocabulary cut to
    50257 rows."""
    if model.config.vocab_size < VOCAB_SIZE:
        raise ValueError(f"the model has {model.config.vocab_size} token rows; GPT-2's tokenizer needs {VOCAB_SIZE}")
    qtype = TYPES[file_type][1]
    tensors = []
    for name, tensor in model.state_dict().items():
        target = gguf_name(name)
        if target is None:
            continue
        data = tensor.detach().float().cpu().numpy()
        if target == "token_embd.weight":
            data = data[:VOCAB_SIZE]
        kind = qtype if data.ndim == 2 else gguf.GGMLQuantizationType.F32
        if kind in QUANTIZED and data.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
            kind = gguf.GGMLQuantizationType.F16  # rows must be whole blocks of 32 (n_embd is, for every GPT-2)
        tensors.append((target, gguf.quants.quantize(np.ascontiguousarray(data), kind), kind))
    return tensors


def write_gguf(model: GPT, path: str | Path, file_type: str = "f32", name: str = "nanogpt") -> None:
    """Write the model as a GGUF file of `file_type` (one of TYPES), atomically."""
    c = model.config
    tensors = gguf_tensors(model, file_type)
    tokens, merges = gpt2_vocabulary()
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "gpt2")
        writer.add_name(name)
        writer.add_file_type(TYPES[file_type][0])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(c.block_size)
        writer.add_embedding_length(c.n_embd)
        writer.add_feed_forward_length(4 * c.n_embd)
        writer.add_block_count(c.n_layer)
        writer.add_head_count(c.n_head)
        writer.add_layer_norm_eps(1e-5)  # nn.LayerNorm's default, which our blocks use
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types([gguf.TokenType.CONTROL if i == EOT else gguf.TokenType.NORMAL
                                for i in range(len(tokens))])
        writer.add_token_merges(merges)
        writer.add_bos_token_id(EOT)
        writer.add_eos_token_id(EOT)
        writer.add_add_bos_token(False)  # our prompts start with the template, never with <|endoftext|>
        writer.add_chat_template(CHAT_TEMPLATE)
        for tensor_name, data, kind in tensors:
            writer.add_tensor(tensor_name, data, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def modelfile(gguf_path: str | Path, modelfile_path: str | Path, context_length: int) -> str:
    """An Ollama Modelfile for a GGUF file: FROM it (by a relative path when they share a folder, as
    Ollama resolves FROM from the Modelfile's folder), our prompt template, <|endoftext|> as the stop,
    the context length, and our server's sampling defaults: temperature 0.7 and no top-k, top-p or
    repeat penalty, where Ollama's own (top_k 40, top_p 0.9, repeat_penalty 1.1) would change even
    greedy answers."""
    gguf_path, modelfile_path = Path(gguf_path), Path(modelfile_path)
    source = (f"./{gguf_path.name}" if gguf_path.resolve().parent == modelfile_path.resolve().parent
              else str(gguf_path.resolve()))
    return (
        f"# ollama create NAME -f {modelfile_path.name}   (written by model/export_gguf.py)\n"
        f"FROM {source}\n"
        "# our prompt template (model/prompt.py), as our server and tuning render conversations\n"
        f'TEMPLATE """{OLLAMA_TEMPLATE}"""\n'
        'PARAMETER stop "<|endoftext|>"\n'
        f"PARAMETER num_ctx {context_length}\n"
        f"PARAMETER temperature {DEFAULT_TEMPERATURE}\n"
        "PARAMETER top_k 0\n"
        "PARAMETER top_p 1\n"
        "PARAMETER repeat_penalty 1\n"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a step_*.pt file or a run directory (its newest checkpoint)")
    parser.add_argument("--out", required=True, help="the .gguf file to write")
    parser.add_argument("--type", default="q8_0", choices=list(TYPES),
                        help="weight type: f32 (exact), f16, q8_0 (a quarter of f32's bytes) or q4_0 (an eighth)")
    parser.add_argument("--name", default=None, help="the model's name in the file (default: the run directory's)")
    parser.add_argument("--modelfile", default=None,
                        help="the Ollama Modelfile to write (default: --out with .Modelfile for .gguf; none: no Modelfile)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for a checkpoint that cannot be exported)."""
    args = parse_args(argv)
    try:
        model, source = load_pretrained(args.checkpoint)
        name = args.name or Path(source).resolve().parent.name
        write_gguf(model, args.out, args.type, name)
        modelfile_path = args.modelfile or Path(args.out).with_suffix(".Modelfile")
        if args.modelfile != "none":
            text = modelfile(args.out, modelfile_path, model.config.block_size)
            atomic_write(modelfile_path, lambda f: f.write(text.encode()))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = Path(args.out).stat().st_size
    print(f"{source} -> {args.out} ({args.type}, {size / 2**20:.1f} MiB)")
    if args.modelfile != "none":
        print(f"Ollama: ollama create {name} -f {modelfile_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
