"""Incremental detokenization with stop strings (what a streaming OpenAI server must get right).

Design choices
- The whole completion is decoded again at each step (byte-level BPE: earlier characters never
  change, only an unfinished UTF-8 sequence at the end, shown as U+FFFD, which is held back).
- Stop strings: the completion is cut before the first occurrence of any of them and the stop
  string itself is not returned (OpenAI semantics). While streaming, the last
  len(longest stop) - 1 characters are held back, since they may be the start of a stop string
  that the next token completes.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tok = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # decoded completion so far (possibly cut at a stop string)
        self.sent = 0  # characters already handed out

    def add(self, ids: list[int]) -> tuple[str, bool]:
        """Append token ids; returns (new text safe to emit, whether a stop string was hit)."""
        self.ids.extend(ids)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            start = max(0, self.sent - self.hold)
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = text[:min(hits)]
                return self._take(len(self.text)), True
        self.text = text
        safe = len(text) - self.hold
        if text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        return self._take(safe), False

    def flush(self) -> str:
        """All text not yet handed out (at the end of the completion)."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out = self.text[self.sent:upto]
        self.sent = upto
        return out
