"""Convert between our GPT and Hugging Face's GPT2LMHeadModel format (config.json + model.safetensors).

Export a checkpoint of this repo, so that `transformers.GPT2LMHeadModel.from_pretrained(DIR)` loads it:

    python model/export_hf.py --checkpoint checkpoints/pretrain --out_dir exports/pretrain_hf
    python model/export_hf.py --checkpoint checkpoints/dolly/step_001000.pt --out_dir exports/dolly_hf

Import GPT-2 weights from the Hub or from a local directory in HF format, in Python:

    from model.export_hf import load_hf_model
    model = load_hf_model("gpt2")              # or gpt2-medium, gpt2-large, gpt2-xl, "owner/repo"
    model = load_hf_model("path/to/hf_dir")    # offline: config.json + model.safetensors (or pytorch_model.bin)

The two formats differ in three ways only. HF's GPT-2 stores the four projection weights of each block
(attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) as Conv1D, i.e. (in, out), the transpose of
nn.Linear's (out, in). HF keeps the tokenizer's 50257 vocabulary rows where we pad to 50304. And HF
files carry no lm_head.weight: it is tied to transformer.wte.weight, as ours is.

The exported directory also holds GPT-2's tokenizer (vocab.json, merges.txt) and a tokenizer_config.json
whose chat template is our prompt template (model/prompt.py's CHAT_TEMPLATE), so that transformers,
vLLM or any server that reads it renders chats as our server does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the repo root importable

import safetensors.torch
import torch

from model.atomic import atomic_write
from model.checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint
from model.gpt import GPT, GPTConfig
from model.hub import probe_hub
from model.prompt import CHAT_TEMPLATE
from model.tokenizer import EOT, VOCAB_SIZE, gpt2_vocabulary

# weights that HF's Conv1D stores as (in, out); everything else has the same layout in both formats
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# OpenAI's four GPT-2 sizes, published on the Hub under this organisation
HUB_ALIASES = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}

# transformers' GPT2Config defaults: config.json files written by save_pretrained omit default values
_GPT2_CONFIG_DEFAULTS = {
    "model_type": "gpt2",
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}

# buffers that old GPT-2 files saved beside the weights (the causal mask and its fill value), matched on
# the last two name parts: a suffix test would also catch the real weight attn.c_attn.bias
_STALE_BUFFERS = {("attn", "bias"), ("attn", "masked_bias")}


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under GPT2LMHeadModel's names and layouts: Conv1D weights transposed, the
    vocabulary trimmed to the tokenizer's 50257 rows, lm_head left out (HF ties it to wte).

    Every tensor is a contiguous CPU copy that shares no storage, as safetensors requires.
    """
    if model.config.vocab_size < VOCAB_SIZE:
        raise ValueError(f"the model has {model.config.vocab_size} token rows; GPT-2's tokenizer needs {VOCAB_SIZE}")
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        tensor = tensor.detach().cpu()
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        elif name == "transformer.wte.weight":
            tensor = tensor[:VOCAB_SIZE]  # padding rows are never targets nor sampled: nothing is lost
        out[name] = tensor.clone(memory_format=torch.contiguous_format)
    return out


def hf_config(config: GPTConfig) -> dict:
    """config.json of a GPT2LMHeadModel with our model's shape (vocabulary unpadded)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": VOCAB_SIZE,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,  # older transformers releases read the context length from here
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # 4 * n_embd, as in our MLP
        "activation_function": "gelu_new",  # the tanh approximation, as in our MLP
        "layer_norm_epsilon": 1e-5,  # nn.LayerNorm's default, which our blocks use
        # our one dropout rate is applied where HF applies each of its three
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "bos_token_id": EOT,
        "eos_token_id": EOT,
        "tie_word_embeddings": True,
        "use_cache": True,
    }


def hf_tokenizer_files(block_size: int) -> dict[str, str]:
    """{file name: text} of GPT-2's tokenizer as transformers reads it (vocab.json, merges.txt) and a
    tokenizer_config.json whose chat template is our prompt template, so that
    AutoTokenizer.from_pretrained(dir).apply_chat_template(messages) gives the tokens our server sends."""
    tokens, merges = gpt2_vocabulary()
    eot = tokens[EOT]
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": eot, "eos_token": eot, "unk_token": eot,
        "add_bos_token": False,  # our prompts start with the template, never with <|endoftext|>
        "add_prefix_space": False,
        "model_max_length": block_size,
        "added_tokens_decoder": {str(EOT): {"content": eot, "special": True, "single_word": False, "lstrip": False,
                                            "rstrip": False, "normalized": False}},
        "chat_template": CHAT_TEMPLATE,
    }
    return {
        "vocab.json": json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
    }


def export_hf(model: GPT, out_dir: str | Path) -> None:
    """Write out_dir/model.safetensors (fp32, as the model stores its weights), config.json and the
    tokenizer files (hf_tokenizer_files), each atomically (model/atomic.py), so an interrupted export
    never leaves a half-written file."""
    out_dir = Path(out_dir)
    # the "format" entry tells transformers these are PyTorch tensors
    weights = safetensors.torch.save(hf_state_dict(model), metadata={"format": "pt"})
    atomic_write(out_dir / "model.safetensors", lambda f: f.write(weights))
    files = {"config.json": json.dumps(hf_config(model.config), indent=2) + "\n", **hf_tokenizer_files(model.config.block_size)}
    for name, text in files.items():
        atomic_write(out_dir / name, lambda f, text=text: f.write(text.encode()))


def _gpt_config(hf: dict, source: str) -> GPTConfig:
    """Our GPTConfig for an HF GPT-2 config.json, refusing the variants our GPT cannot represent."""
    cfg = {**_GPT2_CONFIG_DEFAULTS, **hf}
    unsupported = []
    if cfg["model_type"] != "gpt2":
        unsupported.append(f"model_type {cfg['model_type']!r} (only 'gpt2')")
    if cfg["vocab_size"] != VOCAB_SIZE:
        unsupported.append(f"vocab_size {cfg['vocab_size']} (our tokenizer is GPT-2's {VOCAB_SIZE} tokens)")
    if cfg["n_inner"] not in (None, 4 * cfg["n_embd"]):
        unsupported.append(f"n_inner {cfg['n_inner']} (our MLP is 4 * n_embd wide)")
    if cfg["activation_function"] not in ("gelu_new", "gelu_pytorch_tanh"):  # both are the tanh GELU
        unsupported.append(f"activation_function {cfg['activation_function']!r} (ours is the tanh GELU)")
    if cfg["layer_norm_epsilon"] != 1e-5:
        unsupported.append(f"layer_norm_epsilon {cfg['layer_norm_epsilon']} (ours is 1e-5)")
    if not cfg["scale_attn_weights"] or cfg["scale_attn_by_inverse_layer_idx"]:
        unsupported.append("attention scaling other than 1/sqrt(head size)")
    if cfg["add_cross_attention"]:
        unsupported.append("cross-attention")
    if not cfg["tie_word_embeddings"]:
        unsupported.append("an lm_head untied from wte")
    if unsupported:
        raise ValueError(f"{source}: this GPT-2 variant cannot be loaded into our GPT: " + "; ".join(unsupported))
    dropout = cfg["resid_pdrop"]
    if not cfg["embd_pdrop"] == cfg["attn_pdrop"] == dropout:
        print(f"{source}: HF dropouts differ (resid/embd/attn); using resid_pdrop={dropout} for all three")
    # vocab stays unpadded: padding rows would be zeros, and their logits of 0 would take a share of the
    # softmax from real tokens, since a trained model's real logits are nowhere near 0
    return GPTConfig(
        block_size=cfg["n_positions"],
        vocab_size=VOCAB_SIZE,
        n_layer=cfg["n_layer"],
        n_head=cfg["n_head"],
        n_embd=cfg["n_embd"],
        dropout=dropout,
    )


def _our_state_dict(hf_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF GPT-2 weights (saved from GPT2LMHeadModel, "transformer.h.0...", or from GPT2Model, "h.0...")
    under our names and layouts."""
    out = {}
    for name, tensor in hf_weights.items():
        if tuple(name.split(".")[-2:]) in _STALE_BUFFERS:
            continue
        if name == "lm_head.weight":
            continue  # a copy of wte: _gpt_config has refused untied heads
        name = name.removeprefix("transformer.")
        out[f"transformer.{name}"] = tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor
    if "transformer.wte.weight" in out:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def _hub_download(name: str, repo_id: str, filename: str) -> Path:
    """One file of a Hub repo, from the local HF cache or the network; name is what the user passed."""
    probe_hub()  # offline: the cache at once, not a minute of retries
    # imported here: only fetching from the Hub needs huggingface_hub
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename))
    except (OSError, ValueError) as e:  # offline, unknown repo or file, malformed id: all OSError/ValueError
        raise OSError(
            f"could not fetch {filename} of '{repo_id}' from the Hugging Face Hub ({type(e).__name__}: {e}), "
            f"and there is no local directory '{name}'. Pass a local directory in HF format instead "
            "(config.json + model.safetensors or pytorch_model.bin); "
            f"on a machine with network: hf download {repo_id} config.json model.safetensors --local-dir DIR"
        ) from e


def _local_files(directory: Path) -> tuple[Path, Path]:
    """config.json and the weights file of a local HF model directory."""
    config = directory / "config.json"
    weights = [directory / name for name in ("model.safetensors", "pytorch_model.bin")]
    missing = [] if config.is_file() else ["config.json"]
    if not any(w.is_file() for w in weights):
        missing.append("model.safetensors (or pytorch_model.bin)")
    if missing:
        raise FileNotFoundError(
            f"{directory} is not a model directory in HF format: it has no {' and no '.join(missing)}"
        )
    return config, next(w for w in weights if w.is_file())


def load_hf_model(name_or_dir: str) -> GPT:
    """Our GPT with the weights of an HF GPT-2, loaded strictly.

    name_or_dir: a local directory with config.json and model.safetensors (or pytorch_model.bin), one of
    gpt2 / gpt2-medium / gpt2-large / gpt2-xl (OpenAI's weights), or any "owner/repo" on the Hub.
    """
    directory = Path(name_or_dir)
    if directory.is_dir():
        config_path, weights_path = _local_files(directory)
    elif name_or_dir in HUB_ALIASES or name_or_dir.count("/") == 1:
        repo_id = HUB_ALIASES.get(name_or_dir, name_or_dir)
        config_path = _hub_download(name_or_dir, repo_id, "config.json")
        weights_path = _hub_download(name_or_dir, repo_id, "model.safetensors")
    else:
        raise FileNotFoundError(
            f"{name_or_dir} is neither a local directory nor a Hub model "
            f"({', '.join(HUB_ALIASES)} or owner/repo)"
        )
    config = _gpt_config(json.loads(config_path.read_text()), source=name_or_dir)
    if weights_path.suffix == ".safetensors":
        hf_weights = safetensors.torch.load_file(weights_path)
    else:
        hf_weights = torch.load(weights_path, map_location="cpu", weights_only=True)
    model = GPT(config)
    try:
        model.load_state_dict(_our_state_dict(hf_weights), strict=True)
    except RuntimeError as e:  # missing, unexpected or misshapen weights
        raise ValueError(f"the weights of {name_or_dir} do not match its config.json: {e}") from None
    return model


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Export a checkpoint of this repo as a Hugging Face GPT2LMHeadModel directory."
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a step_*.pt file, or a run directory (its newest checkpoint)"
    )
    parser.add_argument("--out_dir", required=True, help="directory to write config.json and model.safetensors to")
    args = parser.parse_args()

    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        parser.error(f"--out_dir {args.out_dir} is a file: pass a directory for config.json and model.safetensors")
    try:
        path = resolve_checkpoint(args.checkpoint)
        model = model_from_checkpoint(load_checkpoint(path))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    export_hf(model, args.out_dir)
    print(f"exported {path} to {args.out_dir} (load it with GPT2LMHeadModel.from_pretrained)")


if __name__ == "__main__":
    main()
