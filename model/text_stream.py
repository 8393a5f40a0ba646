"""Generated tokens to text that is safe to show as it streams.

GPT-2's byte-level BPE splits multi-byte characters (CJK, emoji) across tokens, so a token's bytes
alone may be half a character: those bytes wait for the rest. And a stop string may arrive over
several tokens: text that could be the start of one waits until it is clear either way. What
TextStream returns, concatenated, is exactly the text of the whole completion cut before the first
stop string, so a streamed answer equals the non-streamed one.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

from model.tokenizer import get_tokenizer


class TextStream:
    """Feed tokens with push(); each call returns the new text that is safe to show (often "")."""

    def __init__(self, stop: Iterable[str] = ()):
        self.stop = [s for s in stop if s]
        # bytes that are no UTF-8 at all (a model can emit them) are dropped rather than shown as U+FFFD
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self._held = ""  # decoded text that may be the start of a stop string
        self.stopped = False  # a stop string was found: nothing more will be returned

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        text = self._held + self._utf8.decode(get_tokenizer().decode_single_token_bytes(token))
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return text[: min(hits)]
        keep = self._partial_stop(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The text held back, at the end of the completion (it did not become a stop string)."""
        if self.stopped:
            return ""
        text, self._held = self._held + self._utf8.decode(b"", final=True), ""
        return text

    def _partial_stop(self, text: str) -> int:
        """Length of the longest end of text that is the beginning of a stop string."""
        for n in range(min(len(text), max((len(s) - 1 for s in self.stop), default=0)), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stop):
                return n
        return 0
