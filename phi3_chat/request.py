"""Requests and their generation state: how a row samples, what it asks, and how its tokens
become text (stop strings and streaming included) while its generator runs.
"""

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime_genai as og

from phi3_chat.guidance import EndTracker, Guidance
from phi3_chat.sampler import RowSampler

_REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class _Sampling:
    """How the next token is picked. Every row samples on its own (`phi3_chat.sampler`), so
    rows with any sampling share batches; ``seed`` makes a row's samples repeat.
    """

    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    seed: int | None = None

    def search_options(self) -> dict[str, Any]:
        # The generator is always greedy: sampled rows write their own noisy logits.
        return {"do_sample": False}

    def sampler(self) -> RowSampler | None:
        """This row's own sampler; None for a greedy row."""
        if not self.do_sample:
            return None
        return RowSampler.of(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed
        )


@dataclass(frozen=True)
class _Request:
    """One validated row, ready to generate."""

    index: int
    shape: str  # "chat" or "prompt"
    input_ids: np.ndarray
    max_tokens: int
    stop: tuple[str, ...]
    sampling: _Sampling
    guidance: Guidance | None = None  # the grammar its answer follows (rows share it to batch)
    logprobs: int | None = None  # None: no logprobs; else how many top_logprobs per token
    tools: Any = None  # the request's tool set (`phi3_chat.tools.ToolSet`), if it has one

    @property
    def group(self) -> Guidance | None:
        """What rows must share to run in one batch: their grammar (None: free text)."""
        return self.guidance


class _IncrementalDecoder:
    """Turns generated tokens into text as they come, in pieces that join into the answer.

    Why not ``tokenizer.decode`` on everything, or ``og.TokenizerStream``: in og 0.18 a
    decode stops at the first bytes that are not valid UTF-8 and returns one U+FFFD for all
    the rest (one broken byte, or a character cut by ``max_tokens``, would lose the remainder
    of the answer), and the stream drops characters around such bytes. So this decodes a
    small window: the tokens not emitted yet plus the previous piece's tokens as context (a
    SentencePiece decode strips the leading space of its first token; the context absorbs
    that, as in TGI). A window holding U+FFFD waits for the rest of a multi-byte character
    (at most 4 tokens); past that, its longest clean prefix is emitted, or its first token
    becomes one U+FFFD. On valid
    UTF-8 the pieces join into exactly ``tokenizer.decode(all tokens)``.
    """

    _MAX_CHARACTER_TOKENS = 4  # a UTF-8 character has at most 4 bytes, each token at least 1

    def __init__(self, tokenizer: og.Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._tokens: list[int] = []
        self._prefix = 0  # start of the context window: tokens already emitted
        self._read = 0  # tokens before this index have been emitted

    def push(self, token: int) -> str:
        """Adds one token; returns the text it completes (often all of it, maybe "")."""
        self._tokens.append(token)
        return self._drain(final=False)

    def flush(self) -> str:
        """Returns whatever is still held back: no more tokens will come."""
        return self._drain(final=True)

    def _drain(self, *, final: bool) -> str:
        pieces = []
        while self._read < len(self._tokens):
            piece = self._piece(len(self._tokens))
            if piece is not None:
                pieces.append(piece)
                self._prefix, self._read = self._read, len(self._tokens)
                break
            if not final and len(self._tokens) - self._read < self._MAX_CHARACTER_TOKENS:
                break  # maybe the middle of a character: wait for the rest
            for end in range(len(self._tokens) - 1, self._read, -1):
                piece = self._piece(end)
                if piece is not None:
                    pieces.append(piece)
                    self._prefix, self._read = self._read, end
                    break
            else:
                pieces.append(_REPLACEMENT_CHAR)  # bytes that never form a character
                self._prefix = self._read = self._read + 1
        return "".join(pieces)

    def _piece(self, end: int) -> str | None:
        """Text of tokens [read, end), or None while it is not valid UTF-8."""
        text = self._decode(self._prefix, end)
        if _REPLACEMENT_CHAR in text:
            return None
        return text[len(self._decode(self._prefix, self._read)) :]

    def _decode(self, start: int, end: int) -> str:
        if start == end:
            return ""
        return self._tokenizer.decode(np.asarray(self._tokens[start:end], dtype=np.int32))


@dataclass
class _RowState:
    """Tokens and text of one request while its generator runs (owned by that call only)."""

    request: _Request
    decoder: _IncrementalDecoder
    eos_token_ids: frozenset[int]
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    streamed: int = 0  # characters of text already handed to a stream
    #: Per generated token, when logprobs were asked for: (token, logprob, [(token, logprob)]).
    token_logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    sampler: RowSampler | None = None
    _longest_stop: int = field(init=False, default=0)
    _end: EndTracker | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._longest_stop = max((len(stop) for stop in self.request.stop), default=0)
        if self.sampler is None:
            self.sampler = self.request.sampling.sampler()
        if self.request.guidance is not None:
            self._end = self.request.guidance.tracker()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int) -> None:
        self.completion_tokens += 1
        if token in self.eos_token_ids:
            self._finish("stop")
        else:
            before = len(self.text)
            self._append(self.decoder.push(token))
            if self._end is not None and not self.done:
                end = self._end.feed(self.text[before:])
                if end is not None:  # the value is whole: what the token added past it goes
                    self.text = self.text[:end]
                    self.finish_reason = "stop"
            if self.completion_tokens >= self.request.max_tokens:
                self._finish("length")

    def end(self) -> None:
        """The generator stopped on its own (max_length): nothing more will come."""
        self._finish("length")

    def cancel(self) -> None:
        """Nobody waits for this row any more: it takes no more tokens and hands out nothing."""
        if not self.done:
            self.finish_reason = "cancelled"

    def _finish(self, reason: str) -> None:
        if not self.done:
            self._append(self.decoder.flush())
        if not self.done:  # the held-back text may have completed a stop string
            self.finish_reason = reason

    def _append(self, piece: str) -> None:
        if not piece or self.request.stop == ():
            self.text += piece
            return
        start = max(0, len(self.text) - self._longest_stop + 1)
        self.text += piece
        cuts = [self.text.find(stop, start) for stop in self.request.stop]
        cuts = [cut for cut in cuts if cut >= 0]
        if cuts:
            self.text = self.text[: min(cuts)]
            self.finish_reason = "stop"

    def take_stream_text(self) -> str:
        """Text not streamed yet, holding back a tail that may still become a stop string."""
        end = len(self.text)
        if not self.done:
            end -= self._stop_prefix_length()
        piece = self.text[self.streamed : end]
        self.streamed = max(self.streamed, end)
        return piece

    def _stop_prefix_length(self) -> int:
        longest = 0
        for stop in self.request.stop:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
