"""GPT-2 in one file: the model that every stage of this repo trains, evaluates and serves.

References:
1) OpenAI's GPT-2 release (TensorFlow): https://github.com/openai/gpt-2/blob/master/src/model.py
2) Hugging Face's PyTorch port: transformers/models/gpt2/modeling_gpt2.py
3) the GPT-2 paper, "Language Models are Unsupervised Multitask Learners" (2019)

Parameter names are GPT-2's own (transformer.wte/wpe/h.N/ln_f, attn.c_attn/c_proj, mlp.c_fc/c_proj,
lm_head), so model/export_hf.py only has to transpose the four Conv1D weights of each block.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import cpu_linear, int8_linear
from model.cli import QUANT_TYPES
from model.lm_loss import lm_loss

# Targets equal to this contribute no loss (prompt tokens in fine-tuning, padding). The data code
# imports it from here; it is also F.cross_entropy's default.
IGNORE_INDEX = -100

# Devices with a fused AdamW kernel in torch (one kernel for all parameters instead of a loop).
FUSED_ADAMW_DEVICES = ("cuda", "cpu", "mps")


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the position embedding covers
    vocab_size: int = 50304  # GPT-2's 50257 tokens padded to a multiple of 128: faster matmuls; padded rows are never targets
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # 0 for pretraining as in GPT-2 reproductions; a little helps small fine-tuning sets


class Linear(nn.Linear):
    """nn.Linear whose float32 products on CPU go through oneDNN (model/cpu_linear.py: about 2x
    faster where torch's MKL takes a generic path, as on AMD CPUs), and which can hold its weight
    packed for inference (GPT.pack_for_cpu_inference) or replace it by int8 (GPT.prepare_inference).

    The packed copy is used only without gradients and while the weight is unchanged since packing
    (the weight's version counter: an optimizer step or load_state_dict moves it), so a model that
    trains again never computes with stale weights.
    """

    packed: torch.Tensor | None = None  # a plain attribute, not a buffer: never in the state dict
    packed_version: int = -1
    int8: int8_linear.Int8Weight | None = None  # set, the weight is gone: an inference-only model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8 is not None:
            return int8_linear.linear(x, self.int8, self.bias)
        if cpu_linear.usable(x):
            fresh = self.packed is not None and self.weight._version == self.packed_version
            return cpu_linear.linear(x, self.weight, self.bias, self.packed if fresh else None)
        return F.linear(x, self.weight, self.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:  # inference (model/engine.py): store the new keys and values, attend over all cached ones
            k, v = cache.store(k, v)  # (B, nh, T_cached, hs)
        # flash / memory-efficient kernels where the device has them; without a mask it is the implicit causal one
        precision = nullcontext()
        if cpu_linear.bf16_autocast(q):
            # CPU bf16 autocast: torch's CPU flash attention is several times slower backward in bf16
            # than in float32 (measured 8x at the demo's shape), so attention alone stays float32
            q, k, v, precision = q.float(), k.float(), v.float(), torch.autocast("cpu", enabled=False)
        with precision:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if attn_mask is None else attn_mask.unsqueeze(1), is_causal=attn_mask is None,
                dropout_p=self.dropout if self.training else 0.0,
            )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 was trained with the tanh approximation
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """A Pre-LN transformer block: LayerNorm before each sublayer, residual around it."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying (GPT-2 does it): the output projection is the token embedding
        self.transformer.wte.weight = self.lm_head.weight
        self.init_weights()

    def init_weights(self) -> None:
        """GPT-2 initialisation.

        Every Linear and Embedding weight ~ N(0, 0.02), every bias 0, LayerNorm weight 1 and bias 0.
        The two residual projections of each block (attn.c_proj, mlp.c_proj) use 0.02 / sqrt(2 * n_layer)
        instead, so the residual stream's variance does not grow with depth (GPT-2 paper, section 2.3).
        """
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith("c_proj") else 0.02
                torch.nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                torch.nn.init.ones_(module.weight)
                torch.nn.init.zeros_(module.bias)

    def hidden(
        self, idx: torch.Tensor, pos: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
        kv_cache: list | None = None,
    ) -> torch.Tensor:
        """The final hidden states (B, T, n_embd), after ln_f, of token ids idx (B, T).

        By default token t sits at position t and sees tokens 0..t. pos (B, T) and a boolean attn_mask
        (B, T, T_keys), True where a query may see a key, let one row hold several sequences that share
        a prefix (HellaSwag packs a context with its four endings), or rows of different lengths
        decode together. kv_cache holds one object per layer whose store(k, v) keeps the new keys and
        values and returns all the row's keys and values so far (model/engine.py). Callers that only
        need some positions' logits apply lm_head to those alone.
        """
        B, T = idx.size()
        if pos is None:
            assert T <= self.config.block_size, f"sequence of {T} tokens is longer than block_size {self.config.block_size}"
            pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,), broadcast over the batch
        # with pos given, a row may be longer than block_size: only each position must be below it
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, attn_mask, None if kv_cache is None else kv_cache[i])
        return self.transformer.ln_f(x)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean",
        return_logits: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, vocab_size) for token ids idx (B, T), and a loss when targets are given.

        reduction: "mean" over the targets that are not IGNORE_INDEX, "sum" of them, or "none" for
        the per-token loss (B, T) with 0 at ignored positions. return_logits=False (with targets)
        returns no logits and runs lm_head only where there is a target: the same loss, far cheaper
        when most positions are ignored, as the prompts of instruction tuning and DPO are (lm_head is
        most of a small model's compute), and for "mean" or "sum" on CPU fused with lm_head
        (model/lm_loss.py).
        """
        B, T = idx.size()
        x = self.hidden(idx)  # (B, T, n_embd)
        if targets is not None and not return_logits:
            keep = targets != IGNORE_INDEX
            if reduction != "none":
                return None, lm_loss(x[keep], self.lm_head, targets[keep], reduction)
            per_token = F.cross_entropy(self.lm_head(x[keep]).float(), targets[keep], reduction="none")
            return None, torch.zeros(B, T, dtype=per_token.dtype, device=x.device).masked_scatter(keep, per_token)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        if targets is None:
            return logits, None
        # float32 loss even when the logits are bf16: log-softmax over 50k entries needs the precision
        loss = F.cross_entropy(
            logits.float().view(B * T, -1), targets.reshape(B * T), ignore_index=IGNORE_INDEX, reduction=reduction
        )
        return logits, loss.view(B, T) if reduction == "none" else loss

    @torch.no_grad()
    def pack_for_cpu_inference(self) -> bool:
        """Keep a copy of every Linear weight in oneDNN's packed layout, for generating on CPU.

        Decoding multiplies a few rows by every weight; packed, those products are 3-4x faster than
        F.linear for 1 to 16 rows at the 124M shape, and each row gets the same bits whatever the
        batch (README, Benchmarks). It costs a second copy of the weights in memory, so
        inference-only callers (the server, the CLI, eval) ask for it; training never does. Returns
        False, changing nothing, where it does not apply (weights not float32 on CPU, a torch
        without oneDNN, or a oneDNN that cannot run float32 products here: cpu_linear.runs).
        """
        if not cpu_linear.usable(self.lm_head.weight):
            return False
        for module in self.modules():
            if isinstance(module, Linear):
                module.packed = cpu_linear.pack(module.weight)
                module.packed_version = module.weight._version
        return True

    @torch.no_grad()
    def prepare_inference(self, quant: str = "none") -> str:
        """Get an eval model ready to generate, and say how its products will run (for logs).

        quant "none" keeps the weights and packs them on CPU (pack_for_cpu_inference). "int8"
        replaces every Linear weight, the tied vocabulary projection included, by per-output-channel
        int8 (model/int8_linear.py) and drops the float one, so the model can no longer train; the
        token embedding keeps its float32 table for lookups. CPU only: on a GPU the weights are
        already bf16 and the products are not bound by reading them as a CPU's are.
        """
        if quant not in QUANT_TYPES:
            raise ValueError(f"quant must be one of {', '.join(QUANT_TYPES)}, not {quant!r}")
        if self.lm_head.int8 is not None:
            raise ValueError("this model holds int8 weights already (its float ones are gone): load the checkpoint again")
        if quant == "none":
            if self.pack_for_cpu_inference():
                return "float32 weights, packed for oneDNN"
            return f"{self.lm_head.weight.dtype} weights".removeprefix("torch.")
        if self.lm_head.weight.device.type != "cpu":
            raise ValueError(f"int8 weights are for decoding on CPU, and this model is on {self.lm_head.weight.device}: "
                             "load it on the CPU (--device cpu, NANOGPT_DEVICE=cpu) or keep its float weights")
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        for module in linears:
            module.int8 = int8_linear.quantize(module.weight)
            module.packed = None
            module.weight = None  # lm_head's: wte keeps the shared table for its lookups
        pages = ", in 2 MB pages" if int8_linear.gather_in_huge_pages([m.int8 for m in linears]) else ""
        return f"int8 weights ({int8_linear.kernel_description()}{pages})"

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; tied wte/lm_head counted once. non_embedding drops both embedding tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs of one training step (forward + backward) per token, as in the PaLM paper's MFU.

        6 per weight that takes part in a matmul (everything but the position table, which is a lookup)
        plus attention's score and value matmuls, 12 * n_layer * n_embd * seq_len.
        """
        n = self.num_params() - self.transformer.wpe.weight.numel()
        return 6 * n + 12 * self.config.n_layer * self.config.n_embd * seq_len

    def configure_optimizer(
        self, weight_decay: float, learning_rate: float, betas: tuple[float, float], device_type: str
    ) -> torch.optim.AdamW:
        """AdamW with weight decay on the matrices and embeddings (>= 2-D) only, never on biases or
        LayerNorm gains; the fused kernel where the device has one."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device_type in FUSED_ADAMW_DEVICES
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=1e-8, fused=fused)
