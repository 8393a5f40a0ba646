"""The Hugging Face Hub, asked first whether it answers at all.

Without network, huggingface_hub retries each request with backoff ("Retrying in 8s"): a script
that loads a dataset took 24 s of warnings before its error. probe_hub() asks the endpoint once, with
a short timeout, before datasets or huggingface_hub is imported; when nothing answers it switches
both to offline mode (HF_HUB_OFFLINE=1), so a cached copy still loads at once and a missing one
fails at once, and the caller's error names its --input option. load_hub_dataset() is that for
datasets, which every data prep script loads through; export_hf.py calls probe_hub() itself.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

PROBE_TIMEOUT = 3.0  # seconds: the Hub answers in well under one where there is network


def probe_hub(timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether the Hub endpoint (HF_ENDPOINT, default https://huggingface.co) answers; if it does not,
    set HF_HUB_OFFLINE=1 for this process. Call it before importing datasets or huggingface_hub,
    which read the variable at import. An operator's HF_HUB_OFFLINE=1 is kept, and nothing is asked."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        # urllib honours HTTPS_PROXY and friends, as huggingface_hub does
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
        return True
    except urllib.error.HTTPError:
        return True  # an answer, even an error status: the network is there
    except (urllib.error.URLError, OSError, ValueError):
        os.environ["HF_HUB_OFFLINE"] = "1"
        return False


def load_hub_dataset(path: str, split: str, name: str | None = None, data_dir: str | None = None):
    """datasets.load_dataset(path, name, split=split, data_dir=data_dir), the Hub asked first (probe_hub): offline, the
    local cache or an error at once. Raises OSError saying what could not be loaded and whether the
    Hub answered; the caller adds what to do instead (its --input)."""
    online = probe_hub()
    try:
        from datasets import load_dataset  # a slow import that only this path needs

        subset = {"data_dir": data_dir} if data_dir else {}  # a subset kept as a folder (hh-rlhf's helpful-base)
        return load_dataset(path, name=name, split=split, **subset)
    except Exception as e:  # offline, datasets raises ConnectionError, OSError, hub errors, ... depending on where
        what = f"{path}{f' ({name or data_dir})' if name or data_dir else ''}, split {split}"
        raise OSError(f"could not load {what} from the Hugging Face Hub{'' if online else ' (no answer: offline)'} "
                      f"or its local cache: {type(e).__name__}: {e}") from None
