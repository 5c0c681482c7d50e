"""Incremental, UTF-8-safe detokenization and stop strings held back across token boundaries.

Byte-level tokenizers split one character over several tokens; decoding such a prefix yields U+FFFD.
`IncrementalDetokenizer` decodes a short window of recent tokens and emits only the text that is new
and complete, so a character is never cut. `StopMatcher` holds back any tail of the text that could be
the start of a stop string, so a stop string is never emitted, even when it spans tokens.
"""

from __future__ import annotations

# Tokens of context decoded before the new ones: SentencePiece-style decoders drop a leading space on the
# first token of a decode call, so new text is always taken as a difference against a decoded prefix.
_CONTEXT = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-_CONTEXT:])
        self.prefix = 0  # ids[prefix:read] is the decoded context
        self.read = len(self.ids)  # ids[read:] are not emitted yet

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ('' while a character is still partial)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        full = self._decode(self.ids[self.prefix:])
        if len(full) > len(prefix_text) and not full.endswith("\ufffd") and full.startswith(prefix_text):
            new = full[len(prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
            return new
        if not full.startswith(prefix_text) and not full.endswith("\ufffd"):
            # a decoder that rewrites earlier text (rare): re-anchor on the new tokens alone
            new = self._decode(self.ids[self.read:])
            self.prefix, self.read = self.read, len(self.ids)
            return new
        return ""

    def flush(self) -> str:
        """Text of tokens still held at the end of generation (an incomplete character decodes to U+FFFD)."""
        if self.read >= len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        full = self._decode(self.ids[self.prefix:])
        self.prefix, self.read = self.read, len(self.ids)
        return full[len(prefix_text):] if full.startswith(prefix_text) else full


class StopMatcher:
    """Feed text deltas; get back what may be emitted now and whether a stop string was hit."""

    def __init__(self, stops: tuple[str, ...], include_stop: bool = False) -> None:
        self.stops = tuple(s for s in stops if s)
        self.include = include_stop
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        hit, at = None, -1
        for s in self.stops:
            i = self.pending.find(s)
            if i != -1 and (hit is None or i < at):
                hit, at = s, i
        if hit is not None:
            out = self.pending[: at + (len(hit) if self.include else 0)]
            self.pending = ""
            return out, True
        hold = self._held_tail()
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _held_tail(self) -> int:
        """Length of the longest suffix of pending that is a proper prefix of a stop string."""
        longest = max(len(s) for s in self.stops) - 1
        for k in range(min(longest, len(self.pending)), 0, -1):
            tail = self.pending[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0
