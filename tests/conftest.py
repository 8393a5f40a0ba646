"""Shared fixtures: the repo root on sys.path, where the real data samples live, tiny shards and a
tiny trained model."""

import random
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = dict(block_size=64, n_layer=2, n_head=2, n_embd=64)  # trained_tiny's model
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"  # real samples beside the checkout; absent on a user's laptop
# tests import the project as `from model.gpt import GPT`, also when pytest is run without `python -m`
sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def without_onednn(monkeypatch):
    """As on a CPU where oneDNN runs none of model/cpu_linear.py's products: plain torch everywhere."""
    from model import cpu_linear

    monkeypatch.setattr(cpu_linear, "runs", lambda dtype: False)


@pytest.fixture
def shared_data() -> Path:
    """The real data samples folder; tests that need it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (real data samples are only beside the project's own checkouts)")
    return SHARED_DATA


def make_shards(out_dir: Path, tokens, shard_size: int) -> Path:
    """Write tokens as val/train shards with a manifest, as data_prep/fineweb.py would (shard 0 is val)."""
    import numpy as np

    from model.shards import SHARD_FORMAT, shard_name, write_manifest, write_shard

    out_dir.mkdir(parents=True, exist_ok=True)
    tokens = np.asarray(tokens, dtype=np.uint16)
    shards = []
    for index, start in enumerate(range(0, len(tokens), shard_size)):
        split = "val" if index == 0 else "train"
        shards.append(write_shard(out_dir, shard_name(split, index), tokens[start : start + shard_size]) | {"split": split})
    write_manifest(out_dir, {"format": SHARD_FORMAT, "producer": "data_prep/fineweb.py", "shards": shards})
    return out_dir


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Path:
    """Shards of a small learnable token stream: random walks over a 500-token vocabulary."""
    import numpy as np

    rng = np.random.default_rng(0)
    steps = rng.choice([1, 2, 3], size=60_000)
    tokens = (np.cumsum(steps) % 500) + 100
    return make_shards(tmp_path_factory.mktemp("synthetic"), tokens, shard_size=20_000)


def counting_sentences(rng: random.Random, n: int) -> list[str]:
    """A tiny world a 2-layer model learns in seconds: counting on from a number, in words and digits."""
    out = []
    for _ in range(n):
        a = rng.randint(0, 40)
        out.append(f"Count on from {a}: {a + 1}, {a + 2}, {a + 3}, {a + 4}.")
    return out


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """(model, held-out token ids, checkpoint path) of a tiny GPT trained for a few seconds, so that its
    logits have clear winners (random weights give near ties that any rounding can flip). Shared: copy
    the model before changing it."""
    import torch

    from model.checkpoint import model_state, save_checkpoint
    from model.gpt import GPT, GPTConfig
    from model.tokenizer import encode

    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY_CONFIG))
    rng = random.Random(0)
    train = [t for s in counting_sentences(rng, 2000) for t in encode(s + " ")]
    heldout = [t for s in counting_sentences(rng, 20) for t in encode(s + " ")][: TINY_CONFIG["block_size"]]
    data = torch.tensor(train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):
        starts = torch.randint(0, len(data) - TINY_CONFIG["block_size"] - 1, (8,))
        x = torch.stack([data[s : s + TINY_CONFIG["block_size"]] for s in starts])
        y = torch.stack([data[s + 1 : s + TINY_CONFIG["block_size"] + 1] for s in starts])
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    path = tmp_path_factory.mktemp("ckpt") / "step_000080.pt"
    save_checkpoint(model_state(model) | {"kind": "sft", "step": 80}, path)
    return model, heldout, path
